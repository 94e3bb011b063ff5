//! Packing a directory tree (an overlay upper layer, a volume) into a tar archive and back,
//! preserving everything overlayfs and the workload depend on.
//!
//! What is kept: regular files, directories, symlinks, hardlinks (as tar link entries to the
//! first path of the inode), character and block devices (an overlay *whiteout* is a 0:0
//! character device), fifos, permission bits including setuid/setgid/sticky, uid/gid, mtimes
//! with nanoseconds, and every extended attribute (overlay *opaque* directories are marked by
//! `trusted.overlay.opaque` or `user.overlay.opaque` = `y`; file capabilities, ACLs and SELinux
//! labels are xattrs too). What is dropped: sockets, which the process that bound them
//! recreates (CRIU rebinds them on restore), and `*.overlay.origin`, a file handle into the
//! source node's lower filesystem that means nothing on another node. Sparse files are
//! stored expanded. Metacopy upper layers (`metacopy=on`, not containerd's default) are not
//! supported: their data lives in the lower layer.
//!
//! Why the `tar` crate is used only as a container format: its `Entry::unpack` (0.4.46)
//! writes character devices and fifos out as empty regular files, which would turn every
//! whiteout into a file that hides nothing; it sets mtimes to the second only; and it has no
//! way to replace what a new container's upper directory already holds while refusing to
//! write through symlinks there. So headers are built and applied by this module, and the
//! crate reads and writes the entries. Xattrs travel in PAX `SCHILY.xattr.<name>` records
//! (the GNU tar / containers-storage convention, so `tar --xattrs -xpf` reads the archives too)
//! and nanosecond mtimes in PAX `mtime` records.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::error::{Error, Result, io_err};
use crate::manifest::hex;
use crate::sys;

const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Xattr values with a newline travel hex-encoded under this prefix: the `tar` crate's PAX
/// reader (0.4.46) splits records at newlines instead of using their length prefix, so a binary
/// value (overlayfs' own `trusted.overlay.uuid` is 16 random bytes) would break the archive.
const XATTR_HEX_PAX_PREFIX: &[u8] = b"MIG.xattr.hex.";

/// Xattrs that are meaningful only on the node (the filesystem instance) that wrote them: a file
/// handle into the source's lower layer, and the source overlay's identity.
const NODE_LOCAL_XATTRS: [&[u8]; 4] = [
    b"trusted.overlay.origin",
    b"user.overlay.origin",
    b"trusted.overlay.uuid",
    b"user.overlay.uuid",
];

/// Packs the tree under `src` (the directory itself included, as `.`) into a new tar file
/// `out`, created with mode 0600, and makes it durable.
///
/// The tree must not change while being packed (the container is stopped or frozen); a file
/// that shrinks meanwhile fails the archive instead of corrupting it.
pub fn pack_tree(src: &Path, out: &Path) -> Result<()> {
    pack_tree_hashed(src, out, true).map(|_| ())
}

/// [`pack_tree`], returning the archive's size and SHA-256 (hashed as it is written); fsyncs it
/// when `durable`.
pub fn pack_tree_hashed(src: &Path, out: &Path, durable: bool) -> Result<(u64, String)> {
    let meta = src.symlink_metadata().map_err(io_err("stat", src))?;
    if !meta.is_dir() {
        return Err(io_err("pack", src)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_err("create", out))?;
    let hashing = HashingWriter {
        inner: file,
        hasher: Sha256::new(),
        size: 0,
    };
    let mut packer = Packer {
        builder: tar::Builder::new(BufWriter::with_capacity(1 << 20, hashing)),
        archive: out,
        first_link: HashMap::new(),
    };
    packer.add(src, Path::new("."), &meta)?;
    packer.walk(src, Path::new(""))?;
    let writer = packer
        .builder
        .into_inner()
        .map_err(io_err("write archive", out))?;
    let hashing = writer
        .into_inner()
        .map_err(|e| io_err("write archive", out)(e.into_error()))?;
    if durable {
        hashing.inner.sync_all().map_err(io_err("fsync", out))?;
    }
    Ok((hashing.size, hex(&hashing.hasher.finalize())))
}

/// Hashes what goes through it.
struct HashingWriter {
    inner: File,
    hasher: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Packer<'a> {
    builder: tar::Builder<BufWriter<HashingWriter>>,
    archive: &'a Path,
    /// First archived path of each multiply-linked inode, by (device, inode).
    first_link: HashMap<(u64, u64), PathBuf>,
}

impl Packer<'_> {
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<OsString> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            names.push(entry.map_err(io_err("read directory", dir))?.file_name());
        }
        // Sorted, so that packing the same tree twice gives the same archive.
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let rel = rel.join(&name);
            let meta = path.symlink_metadata().map_err(io_err("stat", &path))?;
            self.add(&path, &rel, &meta)?;
            if meta.is_dir() {
                self.walk(&path, &rel)?;
            }
        }
        Ok(())
    }

    fn add(&mut self, path: &Path, rel: &Path, meta: &fs::Metadata) -> Result<()> {
        let kind = meta.file_type();
        if kind.is_socket() {
            return Ok(());
        }
        let fail = |e: io::Error| Error::Archive {
            archive: self.archive.to_path_buf(),
            entry: rel.display().to_string(),
            problem: e.to_string(),
        };
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(u64::from(meta.uid()));
        header.set_gid(u64::from(meta.gid()));
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_size(0);

        if !kind.is_dir() && meta.nlink() > 1 {
            let inode = (meta.dev(), meta.ino());
            if let Some(first) = self.first_link.get(&inode) {
                header.set_entry_type(EntryType::Link);
                return self
                    .builder
                    .append_link(&mut header, rel, first)
                    .map_err(fail);
            }
            self.first_link.insert(inode, rel.to_path_buf());
        }

        let pax = pax_records(path, meta).map_err(fail)?;
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(fail)?;
        }

        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            self.builder.append_data(&mut header, rel, io::empty())
        } else if kind.is_file() {
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(path).map_err(io_err("open", path))?;
            let data = ExactReader {
                inner: file,
                remaining: meta.len(),
            };
            self.builder.append_data(&mut header, rel, data)
        } else if kind.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(path).map_err(io_err("read link", path))?;
            self.builder.append_link(&mut header, rel, target)
        } else if kind.is_char_device() || kind.is_block_device() {
            let entry_type = if kind.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            header.set_entry_type(entry_type);
            let rdev = meta.rdev();
            header
                .set_device_major(libc::major(rdev))
                .and_then(|()| header.set_device_minor(libc::minor(rdev)))
                .and_then(|()| self.builder.append_data(&mut header, rel, io::empty()))
        } else {
            header.set_entry_type(EntryType::Fifo);
            self.builder.append_data(&mut header, rel, io::empty())
        }
        .map_err(fail)
    }
}

/// PAX records for `path`: nanosecond mtime and all portable xattrs.
fn pax_records(path: &Path, meta: &fs::Metadata) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut records = Vec::new();
    if meta.mtime() >= 0 {
        records.push((
            "mtime".to_owned(),
            format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()).into_bytes(),
        ));
    }
    for name in sys::list_xattrs(path)? {
        if NODE_LOCAL_XATTRS.contains(&name.as_slice()) {
            continue;
        }
        let value = match sys::get_xattr(path, &name) {
            Ok(value) => value,
            // Removed between list and get.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        let Ok(name) = String::from_utf8(name) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "xattr name is not UTF-8",
            ));
        };
        if value.contains(&b'\n') {
            records.push((
                format!("MIG.xattr.hex.{name}"),
                hex_encode(&value).into_bytes(),
            ));
        } else {
            records.push((format!("SCHILY.xattr.{name}"), value));
        }
    }
    Ok(records)
}

/// Reads exactly `remaining` bytes, failing if the file ends early, because a tar entry's
/// size is written before its data and a short entry would desynchronise the archive.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Recreates the tree packed by [`pack_tree`] under `dest` (created with mode 0700 if
/// missing; its own metadata comes from the archive's `.` entry).
///
/// `dest` may already hold files, as a new container's upper directory does (runc creates
/// mount points there): archive entries replace what is in their way and directories merge.
/// Ownership is restored only when running as root; `trusted.*` xattrs and device nodes other
/// than whiteouts also need root. Entries that would escape `dest` (absolute paths, `..`,
/// paths through a symlink) are refused.
pub fn unpack_tree(archive: &Path, dest: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dest)
        .map_err(io_err("create directory", dest))?;
    let dest_meta = dest.symlink_metadata().map_err(io_err("stat", dest))?;
    if !dest_meta.is_dir() {
        return Err(io_err("unpack into", dest)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let file = File::open(archive).map_err(io_err("open", archive))?;
    let mut tar = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let as_root = sys::is_root();
    // Directory modes and mtimes are applied last: creating children changes a directory's
    // mtime, and a read-only directory mode would stop a non-root unpack from filling it.
    let mut dirs: Vec<(PathBuf, EntryMeta)> = Vec::new();
    let entries = tar.entries().map_err(|e| archive_error(archive, "", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error(archive, "<header>", e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let fail = |problem: String| Error::Archive {
            archive: archive.to_path_buf(),
            entry: name.clone(),
            problem,
        };
        let meta = EntryMeta::read(&mut entry).map_err(|e| fail(e.to_string()))?;
        let path = entry.path().map_err(|e| fail(e.to_string()))?;
        let rel = contained(&path).ok_or_else(|| fail("path escapes the destination".into()))?;
        check_parents(dest, &rel).map_err(fail)?;
        let target = dest.join(&rel);
        match meta.kind {
            EntryType::Directory => {
                if !rel.as_os_str().is_empty() {
                    match target.symlink_metadata() {
                        Ok(m) if m.is_dir() => {}
                        Ok(_) => {
                            remove_existing(&target)?;
                            create_dir(&target)?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir(&target)?,
                        Err(e) => return Err(io_err("stat", &target)(e)),
                    }
                }
                meta.apply_owner_and_xattrs(&target, as_root)?;
                dirs.push((target, meta));
                continue;
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_existing(&target)?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                io::copy(&mut entry, &mut out).map_err(|e| fail(e.to_string()))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail("symlink without a target".into()))?;
                remove_existing(&target)?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_err("symlink", &target))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| fail(e.to_string()))?
                    .ok_or_else(|| fail("hardlink without a target".into()))?;
                let link_rel = contained(&link)
                    .filter(|l| !l.as_os_str().is_empty())
                    .ok_or_else(|| fail("hardlink target escapes the destination".into()))?;
                check_parents(dest, &link_rel).map_err(fail)?;
                let source = dest.join(&link_rel);
                match source.symlink_metadata() {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(fail("hardlink target is missing or a directory".into())),
                }
                remove_existing(&target)?;
                // A hardlink shares the inode whose metadata its first entry already set.
                fs::hard_link(&source, &target).map_err(io_err("hardlink", &target))?;
                continue;
            }
            EntryType::Char | EntryType::Block => {
                remove_existing(&target)?;
                let (major, minor) = meta.device;
                let block = meta.kind == EntryType::Block;
                sys::mknod(&target, block, 0o600, major, minor)
                    .map_err(io_err("mknod", &target))?;
            }
            EntryType::Fifo => {
                remove_existing(&target)?;
                sys::mkfifo(&target, 0o600).map_err(io_err("mkfifo", &target))?;
            }
            EntryType::XGlobalHeader => continue,
            other => return Err(fail(format!("unsupported entry type {other:?}"))),
        }
        meta.apply_owner_and_xattrs(&target, as_root)?;
        if meta.kind != EntryType::Symlink {
            meta.apply_mode(&target)?;
        }
        meta.apply_mtime(&target)?;
    }
    for (dir, meta) in dirs.iter().rev() {
        meta.apply_mode(dir)?;
        meta.apply_mtime(dir)?;
    }
    Ok(())
}

/// The metadata of one archive entry, as needed to recreate it.
struct EntryMeta {
    kind: EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    device: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let mut xattrs = Vec::new();
        let mut pax_mtime = None;
        if let Some(pax) = entry.pax_extensions()? {
            for record in pax {
                let record = record?;
                let key = record.key_bytes();
                if let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX) {
                    xattrs.push((name.to_vec(), record.value_bytes().to_vec()));
                } else if let Some(name) = key.strip_prefix(XATTR_HEX_PAX_PREFIX) {
                    let value = hex_decode(record.value_bytes()).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "malformed hex xattr value")
                    })?;
                    xattrs.push((name.to_vec(), value));
                } else if key == b"mtime" {
                    pax_mtime = parse_pax_time(record.value_bytes());
                }
            }
        }
        let header = entry.header();
        let kind = header.entry_type();
        let id = |v: u64| {
            u32::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uid/gid out of range"))
        };
        let device = match kind {
            EntryType::Char | EntryType::Block => (
                header.device_major()?.unwrap_or(0),
                header.device_minor()?.unwrap_or(0),
            ),
            _ => (0, 0),
        };
        let header_mtime = i64::try_from(header.mtime()?).unwrap_or(0);
        Ok(Self {
            kind,
            mode: header.mode()? & 0o7777,
            uid: id(header.uid()?)?,
            gid: id(header.gid()?)?,
            mtime: pax_mtime.unwrap_or((header_mtime, 0)),
            device,
            xattrs,
        })
    }

    /// Ownership first, then xattrs: `chown` clears `security.capability`, so the reverse
    /// order would lose file capabilities.
    fn apply_owner_and_xattrs(&self, path: &Path, as_root: bool) -> Result<()> {
        if as_root {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
                .map_err(io_err("chown", path))?;
        }
        for (name, value) in &self.xattrs {
            sys::set_xattr(path, name, value).map_err(|source| Error::Io {
                op: "set xattr",
                path: path.join(format!("@{}", sys::lossy(name))),
                source,
            })?;
        }
        Ok(())
    }

    /// After chown, which clears setuid/setgid bits.
    fn apply_mode(&self, path: &Path) -> Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(self.mode))
            .map_err(io_err("chmod", path))
    }

    fn apply_mtime(&self, path: &Path) -> Result<()> {
        sys::set_mtime(path, self.mtime.0, self.mtime.1).map_err(io_err("set mtime", path))
    }
}

/// Parses a PAX time `secs[.fraction]` into seconds and nanoseconds.
fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let value = std::str::from_utf8(value).ok()?;
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = format!("{digits:0<9}").parse().ok()?;
    Some((secs, nanos))
}

/// `path` as a relative path inside the destination (empty for the root), or `None` if it is
/// absolute or has a `..` component.
fn contained(path: &Path) -> Option<PathBuf> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(rel)
}

/// Checks that every ancestor of `rel` under `dest` is a real directory, not a symlink an
/// earlier entry (or the destination's previous content) put there to redirect writes.
fn check_parents(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut dir = dest.to_path_buf();
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        if components.peek().is_none() {
            break;
        }
        dir.push(component);
        match dir.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("parent {} is not a directory", dir.display())),
            Err(e) => return Err(format!("parent {}: {e}", dir.display())),
        }
    }
    Ok(())
}

fn remove_existing(path: &Path) -> Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

fn create_dir(path: &Path) -> Result<()> {
    DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(io_err("create directory", path))
}

fn archive_error(archive: &Path, entry: &str, e: io::Error) -> Error {
    Error::Archive {
        archive: archive.to_path_buf(),
        entry: entry.to_owned(),
        problem: e.to_string(),
    }
}
