//! [`CheckpointWriter`]: builds a checkpoint in a temporary directory and installs it atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::archive;
use crate::checkpoint::{Checkpoint, payload_files};
use crate::error::{Corruption, Error, Result, io_err};
use crate::identity::WorkloadIdentity;
use crate::manifest::{
    EngineInfo, FORMAT_VERSION, FileEntry, IMAGES_DIR, MANIFEST_FILE, Manifest, PAYLOAD_DIRS,
    ROOTFS_DIR, UPPER_LAYER_FILE, VOLUMES_DIR, sha256_file,
};
use crate::name::SafeName;
use crate::stamp::{STAMP_FILE, Stamp};

/// A checkpoint's size hint, beside its payload (see [`CheckpointWriter::in_memory`]).
pub(crate) const SIZE_HINT_FILE: &str = "size-hint";
use crate::store::Store;
use crate::sys;
use crate::tail::{self, TailHasher};

/// A checkpoint being written. Dropping it without committing deletes everything written.
#[derive(Debug)]
pub struct CheckpointWriter {
    /// The root it writes in, as a store of its own.
    store: Store,
    /// The store's other root, if it has two: the workload's checkpoint there is removed once
    /// this one is installed.
    other: Option<Store>,
    /// Whether `store` is the memory root.
    in_memory: bool,
    identity: WorkloadIdentity,
    key: SafeName,
    tmp: PathBuf,
    final_path: PathBuf,
    installed: bool,
    /// Whether file data is fsynced at commit (see [`CheckpointWriter::set_durable`]).
    durable: bool,
    /// Files hashed while they were written: path in the checkpoint -> (size, sha256).
    prehashed: BTreeMap<String, (u64, String)>,
    /// Follows the engine's page images while it writes them.
    tail: Option<TailHasher>,
}

impl CheckpointWriter {
    pub(crate) fn new(
        store: &Store,
        identity: WorkloadIdentity,
        other: Option<Store>,
    ) -> Result<Self> {
        let key = identity.safe_key();
        // The temp directory lives in the store root so the final rename stays on one
        // filesystem and is atomic.
        let tmp = store.hidden_path(".tmp-", &key);
        private_dir(&tmp)?;
        Ok(Self {
            store: store.clone(),
            other,
            in_memory: false,
            final_path: store.path_for(&identity),
            identity,
            key,
            tmp,
            installed: false,
            durable: true,
            prehashed: BTreeMap::new(),
            tail: None,
        })
    }

    /// Whether this checkpoint is written in the store's memory root (see
    /// [`Store::begin_transient`]).
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Notes that this checkpoint is written in memory, sized for about `bytes`: a
    /// `size-hint` file beside the payload (not part of it, never sent) that
    /// [`Store::size_hint`] reads, so that whoever streams it can ask the receiver for as
    /// much room.
    pub(crate) fn set_size_hint(&mut self, bytes: u64) -> Result<()> {
        let path = self.tmp.join(SIZE_HINT_FILE);
        fs::write(&path, bytes.to_string()).map_err(io_err("write", &path))?;
        self.in_memory = true;
        Ok(())
    }

    /// Whether [`CheckpointWriter::commit`] makes the file data durable (fsync) before it
    /// installs the checkpoint; the default. The manifest, the stamp and the directories are
    /// always synced.
    ///
    /// A migration's checkpoint can do without: it is streamed to the destination at once and
    /// only needs to outlive the migration on this node, within this boot. Writing a GiB of
    /// memory images to disk takes seconds here, all of them downtime. If the node crashes
    /// first, the workload is lost as it would have been without a migration; the checkpoint
    /// left behind carries a stamp of another boot, so a later restore hashes every file and
    /// refuses one whose data did not reach the disk, never restoring it.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Starts hashing the engine's memory page images (`images/pages-*.img`) while the engine
    /// writes them, on a thread of its own, so that the commit does not read them again (see
    /// the `tail` module). Call [`CheckpointWriter::images_written`] once the engine is done.
    pub fn hash_images_while_written(&mut self) -> Result<()> {
        let dir = self.images_dir()?;
        self.follow(dir, tail::is_page_image)
    }

    /// As [`CheckpointWriter::hash_images_while_written`], for an engine that writes its images
    /// (DMTCP's `ckpt_*.dmtcp`) into `dir`, from where the caller then moves them (renames:
    /// the same files) into [`CheckpointWriter::images_dir`].
    pub fn hash_dmtcp_images_while_written(&mut self, dir: &Path) -> Result<()> {
        self.follow(dir.to_path_buf(), tail::is_dmtcp_image)
    }

    fn follow(&mut self, dir: PathBuf, wanted: fn(&str) -> bool) -> Result<()> {
        self.tail =
            Some(TailHasher::start(dir.clone(), wanted).map_err(io_err("start hashing", &dir))?);
        Ok(())
    }

    /// The engine has written and closed its images (and they are in
    /// [`CheckpointWriter::images_dir`]): collects the digests computed while it wrote them. A
    /// failure to follow them is not an error: the commit hashes them itself.
    pub fn images_written(&mut self) {
        let Some(tail) = self.tail.take() else {
            return;
        };
        let images = self.tmp.join(IMAGES_DIR);
        match tail
            .finish()
            .and_then(|digests| tail::by_name(&images, &digests))
        {
            Ok(digests) => {
                for (name, digest) in digests {
                    self.prehashed
                        .insert(format!("{IMAGES_DIR}/{name}"), digest);
                }
            }
            Err(e) => {
                tracing::warn!(dir = %self.tmp.display(), error = %e, "could not hash the images while they were written; hashing them at commit");
            }
        }
    }

    /// The temporary checkpoint directory. A receiver writes streamed files (and
    /// `manifest.json`) here before calling [`CheckpointWriter::commit_received`].
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// The workload this checkpoint is for.
    pub fn identity(&self) -> &WorkloadIdentity {
        &self.identity
    }

    /// The directory (created on first call, mode 0700) the engine writes its images into.
    pub fn images_dir(&self) -> Result<PathBuf> {
        self.payload_dir(IMAGES_DIR)
    }

    /// Packs the container's overlay upper directory into `rootfs/upper.tar`
    /// (see [`archive::pack_tree`]).
    pub fn add_upper_layer(&mut self, upper_dir: &Path) -> Result<()> {
        self.payload_dir(ROOTFS_DIR)?;
        self.pack_new(upper_dir, UPPER_LAYER_FILE.to_string())
    }

    /// Packs the content of the pod's local volume `name` into `volumes/<name>.tar`.
    pub fn add_volume(&mut self, name: &SafeName, dir: &Path) -> Result<()> {
        self.payload_dir(VOLUMES_DIR)?;
        self.pack_new(dir, format!("{VOLUMES_DIR}/{name}.tar"))
    }

    /// Packs `src` into the payload file `rel`, hashing the archive as it is written.
    fn pack_new(&mut self, src: &Path, rel: String) -> Result<()> {
        let archive_path = self.tmp.join(&rel);
        if archive_path.symlink_metadata().is_ok() {
            return Err(Error::AlreadyAdded { path: archive_path });
        }
        let digest = archive::pack_tree_hashed(src, &archive_path, self.durable)?;
        self.prehashed.insert(rel, digest);
        Ok(())
    }

    fn payload_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.tmp.join(name);
        match private_dir(&dir) {
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
        Ok(dir)
    }

    /// Hashes every file, writes the manifest and installs the checkpoint as the workload's
    /// current one, atomically replacing any previous checkpoint.
    ///
    /// Files and directories are made root-owned (when running as root) with modes 0600 and
    /// 0700 whatever the engine created them with, and are fsynced before the rename, so that
    /// after a crash the store holds either the old or the new complete checkpoint.
    pub fn commit(mut self, engine: EngineInfo, image: &str) -> Result<Checkpoint> {
        let mut files = Vec::new();
        let mut dirs = BTreeSet::new();
        let payload: Vec<String> = payload_files(&self.tmp)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let started = std::time::Instant::now();
        self.images_written();
        let durable = self.durable;
        if durable {
            // The disk writes every file while we hash them from the page cache; the fsyncs
            // after the hashes then mostly wait for what is left, and (the blocks of all files
            // being allocated by then) the first one's journal commit covers the others.
            for path in &payload {
                start_writeback(&self.tmp.join(path));
            }
        }
        for path in &payload {
            make_private(&self.tmp.join(path), 0o600)?;
        }
        let prehashed = std::mem::take(&mut self.prehashed);
        let hashed = crate::manifest::parallel_map(&payload, |path| -> Result<(u64, String)> {
            let full = self.tmp.join(path);
            let size = full.metadata().map_err(io_err("stat", &full))?.len();
            let digest = match prehashed.get(path) {
                // Hashed while written, and not grown or shrunk since.
                Some(d) if d.0 == size => d.clone(),
                _ => sha256_file(&full)?,
            };
            if durable {
                sync(&full)?;
            }
            Ok(digest)
        });
        let hashed_ms = started.elapsed().as_millis();
        for (path, digest) in payload.into_iter().zip(hashed) {
            let (size, sha256) = digest?;
            dirs.extend(
                Path::new(&path)
                    .ancestors()
                    .skip(1)
                    .filter(|d| !d.as_os_str().is_empty())
                    .map(Path::to_path_buf),
            );
            files.push(FileEntry { path, size, sha256 });
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            engine,
            identity: self.identity.clone(),
            image: image.to_owned(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            files,
        };
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&manifest_path)
            .map_err(io_err("create", &manifest_path))?;
        out.write_all(&manifest.to_json(&self.tmp)?)
            .and_then(|()| out.sync_all())
            .map_err(io_err("write", &manifest_path))?;
        make_private(&manifest_path, 0o600)?;
        // Every byte was hashed just now (or while written): record it, so that neither the
        // sender nor a rollback restore on this node hashes them again. The stamp holds for
        // this boot only, so files that were not made durable are hashed after a crash.
        self.stamp(&manifest.files)?;
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        let checkpoint = self.finish(dirs)?;
        tracing::info!(
            files = manifest.files.len(),
            bytes,
            durable,
            hash_and_sync_ms = hashed_ms,
            total_ms = started.elapsed().as_millis(),
            "checkpoint committed"
        );
        Ok(checkpoint)
    }

    /// Writes the `verified.json` stamp (see the `stamp` module) for `files` as they are now.
    fn stamp(&self, files: &[FileEntry]) -> Result<()> {
        // A received directory may come with a stamp of its own: it is never ours to trust.
        let path = self.tmp.join(STAMP_FILE);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove", &path)(e));
            }
            _ => {}
        }
        if let Some(stamp) = Stamp::capture(&self.tmp, files)? {
            stamp.write(&self.tmp)?;
            make_private(&self.tmp.join(STAMP_FILE), 0o600)?;
        }
        Ok(())
    }

    /// The checkpoint received into [`CheckpointWriter::dir`], if it is for this writer's
    /// workload.
    fn open_received(&self) -> Result<Checkpoint> {
        let received = Checkpoint::open(&self.tmp)?;
        if received.identity() != &self.identity {
            return Err(Error::IdentityMismatch {
                dir: self.tmp.clone(),
                found: Box::new(received.identity().clone()),
                expected: Box::new(self.identity.clone()),
            });
        }
        Ok(received)
    }

    /// Installs a checkpoint received into [`CheckpointWriter::dir`] (manifest and files, e.g.
    /// streamed from another node) after checking that it is for this writer's workload and
    /// passes [`Checkpoint::verify`].
    pub fn commit_received(mut self) -> Result<Checkpoint> {
        let received = self.open_received()?;
        received.verify()?;
        self.install_received(&received, true)
    }

    /// Installs a checkpoint received into [`CheckpointWriter::dir`] whose files the caller
    /// hashed while writing them: `hashed` lists, in manifest order, each file's path, the
    /// number of bytes written and the sha256 of those bytes.
    ///
    /// Instead of hashing the files again this checks that `hashed` is exactly the manifest's
    /// file list (same paths, sizes and digests), that the directory holds exactly those files
    /// with those sizes and nothing else, and that the checkpoint is for this writer's
    /// workload. The installed checkpoint carries a `verified.json` stamp, so that the restore
    /// does not hash it either.
    ///
    /// File data is not fsynced (the manifest, stamp and directories are): this is for a
    /// destination, and the origin keeps its own checkpoint until the restored workload runs. After a crash the stamp belongs to another boot, so the restore hashes
    /// every file and refuses one whose data was lost; it never restores lost data.
    pub fn commit_received_hashed(mut self, hashed: &[FileEntry]) -> Result<Checkpoint> {
        let received = self.open_received()?;
        received.check_listing()?;
        for (i, file) in received.files().iter().enumerate() {
            let problem = match hashed.get(i) {
                None => Some(Corruption::Missing),
                Some(h) if h.path != file.path => Some(Corruption::Missing),
                Some(h) if h.size != file.size => Some(Corruption::SizeMismatch {
                    manifest: file.size,
                    file: h.size,
                }),
                Some(h) if h.sha256 != file.sha256 => Some(Corruption::Sha256Mismatch {
                    manifest: file.sha256.clone(),
                    file: h.sha256.clone(),
                }),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                return Err(Error::Corrupt {
                    dir: self.tmp.clone(),
                    file: file.path.clone(),
                    problem,
                });
            }
        }
        if let Some(extra) = hashed.get(received.files().len()) {
            return Err(Error::Corrupt {
                dir: self.tmp.clone(),
                file: extra.path.clone(),
                problem: Corruption::Unlisted,
            });
        }
        self.install_received(&received, false)
    }

    fn install_received(&mut self, received: &Checkpoint, sync_data: bool) -> Result<Checkpoint> {
        let mut dirs = BTreeSet::new();
        for file in received.files() {
            let full = self.tmp.join(&file.path);
            make_private(&full, 0o600)?;
            if sync_data {
                sync(&full)?;
            }
            dirs.extend(
                Path::new(&file.path)
                    .ancestors()
                    .skip(1)
                    .filter(|d| !d.as_os_str().is_empty())
                    .map(Path::to_path_buf),
            );
        }
        make_private(&self.tmp.join(MANIFEST_FILE), 0o600)?;
        sync(&self.tmp.join(MANIFEST_FILE))?;
        self.stamp(received.files())?;
        self.finish(dirs)
    }

    /// Makes the directories private and durable, then renames the checkpoint into place.
    fn finish(&mut self, mut dirs: BTreeSet<PathBuf>) -> Result<Checkpoint> {
        dirs.extend(
            PAYLOAD_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|d| self.tmp.join(d).is_dir()),
        );
        // All inode changes first, so that the first fsync's journal commit covers them all;
        // then deepest first, so a parent's fsync follows its children's.
        for dir in dirs.iter().rev() {
            make_private(&self.tmp.join(dir), 0o700)?;
        }
        make_private(&self.tmp, 0o700)?;
        for dir in dirs.iter().rev() {
            sync(&self.tmp.join(dir))?;
        }
        sync(&self.tmp)?;
        self.install()?;
        sync(self.store.root())?;
        if let Some(other) = &self.other
            && let Err(e) = other.remove(&self.identity)
        {
            tracing::warn!(workload = %self.identity, error = %e,
                           "could not remove the older checkpoint from the store's other root");
        }
        Checkpoint::open(&self.final_path)
    }

    /// Renames the temp directory to the final path. An existing checkpoint is swapped out
    /// atomically with `RENAME_EXCHANGE`, so there is no moment without a checkpoint; where
    /// the filesystem lacks `renameat2` flags the old one is renamed away first.
    fn install(&mut self) -> Result<()> {
        // A concurrent remover can delete the old checkpoint between our two attempts; a
        // couple of retries settle that.
        for _ in 0..3 {
            match sys::rename_noreplace(&self.tmp, &self.final_path) {
                Ok(()) => {
                    self.installed = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) if sys::rename_flags_unsupported(&e) => return self.install_by_rename(),
                Err(e) => return Err(io_err("rename", &self.tmp)(e)),
            }
            match sys::rename_exchange(&self.tmp, &self.final_path) {
                Ok(()) => {
                    self.installed = true;
                    // The temp path now holds the previous checkpoint.
                    discard(&self.tmp);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if sys::rename_flags_unsupported(&e) => return self.install_by_rename(),
                Err(e) => return Err(io_err("exchange", &self.tmp)(e)),
            }
        }
        Err(io_err("rename", &self.tmp)(io::Error::other(
            "the checkpoint kept being replaced concurrently",
        )))
    }

    fn install_by_rename(&mut self) -> Result<()> {
        let old = self.store.hidden_path(".old-", &self.key);
        let had_old = match fs::rename(&self.final_path, &old) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("rename", &self.final_path)(e)),
        };
        if let Err(e) = fs::rename(&self.tmp, &self.final_path) {
            if had_old {
                // Best effort to leave the store as we found it; the error reported is the
                // original one.
                let _ = fs::rename(&old, &self.final_path);
            }
            return Err(io_err("rename", &self.tmp)(e));
        }
        self.installed = true;
        if had_old {
            discard(&old);
        }
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        // Stop following the images before they are deleted.
        drop(self.tail.take());
        if !self.installed {
            discard(&self.tmp);
        }
    }
}

/// Deletes a directory that is no longer needed. Failure is logged, not returned: the
/// operation that made it unneeded has already succeeded, and [`Store::remove_stale`] cleans
/// up what is left.
fn discard(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %dir.display(), error = %e, "could not remove checkpoint directory");
        }
        _ => {}
    }
}

fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create directory", dir))
}

/// Sets `mode` and, as root, root ownership: checkpoints hold process memory.
fn make_private(path: &Path, mode: u32) -> Result<()> {
    if sys::is_root() {
        std::os::unix::fs::lchown(path, Some(0), Some(0)).map_err(io_err("chown", path))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("fsync", path))
}

/// Asks the kernel to start writing `path`'s dirty pages back now, without waiting. Only an
/// optimisation ahead of [`sync`], which remains what makes the file durable.
fn start_writeback(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = File::open(path) {
        // SAFETY: the fd is valid for the call; offset 0 and nbytes 0 mean the whole file.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
}
