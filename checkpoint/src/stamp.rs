//! `verified.json`: the record that a checkpoint's content was hashed when it was installed,
//! so that a restore in the same boot need not hash gigabytes of images again.
//!
//! The writer installs a stamp only after every byte of every file was checked against (or
//! hashed into) the manifest: [`crate::CheckpointWriter::commit`] hashes the files it lists,
//! [`crate::CheckpointWriter::commit_received_hashed`] trusts digests computed while the files
//! were written (the receiver compares each with the manifest as it arrives). The stamp holds
//!
//! - the boot id (`/proc/sys/kernel/random/boot_id`) of the kernel that saw the content: after
//!   a crash or reboot, data not yet written back (the destination does not fsync file data,
//!   see the writer) can be lost while the metadata survives, so a stamp from another boot is
//!   never trusted;
//! - the sha256 of `manifest.json`, byte for byte;
//! - for each listed file: size, device, inode, mtime and ctime (nanoseconds), taken after the
//!   writer's last chmod/chown of the file.
//!
//! [`crate::Checkpoint::verify_for_restore`] accepts the files without hashing when the stamp
//! is root-owned (or, when not running as root, owned by us), not accessible to others, of the
//! current boot, names the current manifest, and every file's metadata is unchanged; otherwise
//! it hashes everything ([`crate::Checkpoint::verify`]). The cheap checks (no unlisted file,
//! no symlink or device, every file present with its listed size) always run.
//!
//! What this detects without hashing: any write through the file system API (it moves mtime
//! and ctime; `touch`/`utimensat` can restore mtime but not ctime), truncation or extension,
//! replacement of a file (new inode), chmod/chown, a changed manifest, a stamp copied from
//! another checkpoint (inodes differ), a crash or reboot since the install. What it does not
//! detect: corruption below the file system (bit rot, a faulty disk or a raw write to the
//! block device) and a root user who edits a file in place and then resets the clock or
//! forges the stamp — root can do anything to a root-only directory anyway, including
//! rewriting the manifest's digests.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, io_err};
use crate::manifest::{FileEntry, MANIFEST_FILE, hex};

/// The stamp's file name in a checkpoint directory (beside `manifest.json`).
pub(crate) const STAMP_FILE: &str = "verified.json";
const STAMP_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stamp {
    version: u32,
    boot_id: String,
    manifest_sha256: String,
    files: Vec<FileStamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    path: String,
    size: u64,
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(dir: &Path, path: &str) -> io::Result<Self> {
        let meta = dir.join(path).symlink_metadata()?;
        if !meta.file_type().is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(Self {
            path: path.to_owned(),
            size: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: mtime_ns(&meta),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        })
    }
}

/// A file's modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// The current boot's id; `None` where the kernel does not say (then no stamp is trusted).
pub fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

fn manifest_sha256(dir: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(dir.join(MANIFEST_FILE))?.read_to_end(&mut bytes)?;
    Ok(hex(&Sha256::digest(&bytes)))
}

impl Stamp {
    /// Records the current state of `dir`'s manifest and listed `files`. Call only once every
    /// byte of them has been checked against the manifest, after the last chmod/chown.
    /// `None` when there is no boot id to bind the stamp to.
    pub(crate) fn capture(dir: &Path, files: &[FileEntry]) -> Result<Option<Self>> {
        let Some(boot_id) = boot_id() else {
            return Ok(None);
        };
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_sha256 = manifest_sha256(dir).map_err(io_err("read", &manifest_path))?;
        let files = files
            .iter()
            .map(|f| FileStamp::of(dir, &f.path).map_err(io_err("stat", &dir.join(&f.path))))
            .collect::<Result<_>>()?;
        Ok(Some(Self {
            version: STAMP_VERSION,
            boot_id,
            manifest_sha256,
            files,
        }))
    }

    /// Writes the stamp into `dir` (mode 0600). Not fsynced: a stamp lost in a crash only
    /// costs a full verification, and one that survives belongs to another boot.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STAMP_FILE);
        let bytes = serde_json::to_vec(self).map_err(|e| io_err("encode", &path)(e.into()))?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(io_err("write", &path))
    }

    /// Whether `dir` holds a trustworthy stamp that matches its manifest and the current
    /// metadata of exactly `files`. `Err` carries the reason it does not (for the log).
    pub(crate) fn check(dir: &Path, files: &[FileEntry]) -> std::result::Result<(), String> {
        let path = dir.join(STAMP_FILE);
        let meta = match path.symlink_metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("no stamp".into()),
            Err(e) => return Err(format!("stat stamp: {e}")),
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
            return Err("stamp is not a private file of ours".into());
        }
        let bytes = fs::read(&path).map_err(|e| format!("read stamp: {e}"))?;
        let stamp: Self = serde_json::from_slice(&bytes).map_err(|e| format!("stamp: {e}"))?;
        if stamp.version != STAMP_VERSION {
            return Err(format!("stamp version {}", stamp.version));
        }
        if boot_id().as_deref() != Some(stamp.boot_id.as_str()) {
            return Err("stamp is from another boot".into());
        }
        let manifest = manifest_sha256(dir).map_err(|e| format!("read manifest: {e}"))?;
        if manifest != stamp.manifest_sha256 {
            return Err("manifest changed since the stamp".into());
        }
        if stamp.files.len() != files.len() {
            return Err("stamp lists other files than the manifest".into());
        }
        for (stamped, entry) in stamp.files.iter().zip(files) {
            if stamped.path != entry.path || stamped.size != entry.size {
                return Err(format!(
                    "stamp does not match manifest entry {}",
                    entry.path
                ));
            }
            match FileStamp::of(dir, &entry.path) {
                Ok(now) if &now == stamped => {}
                Ok(_) => return Err(format!("{} changed since the stamp", entry.path)),
                Err(e) => return Err(format!("stat {}: {e}", entry.path)),
            }
        }
        Ok(())
    }
}
