//! [`Checkpoint`]: a complete checkpoint directory, opened for verification and restore.

use std::collections::HashSet;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Corruption, Error, Result, io_err};
use crate::identity::WorkloadIdentity;
use crate::manifest::{
    EngineInfo, FileEntry, IMAGES_DIR, MANIFEST_FILE, Manifest, PAYLOAD_DIRS, UPPER_LAYER_FILE,
    VOLUMES_DIR,
};
use crate::name::SafeName;
use crate::stamp::{STAMP_FILE, Stamp};

/// How [`Checkpoint::verify_for_restore`] established that the content is intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The `verified.json` stamp is valid: the content was hashed when the checkpoint was
    /// installed in this boot and no file's metadata changed since. Nothing was hashed now.
    ByStamp,
    /// Every file was hashed now and matched the manifest.
    Hashed,
}

/// A checkpoint directory whose manifest has been read and validated.
///
/// Opening checks only the manifest; call [`Checkpoint::verify_for_restore`] (or
/// [`Checkpoint::verify`] on a directory just received) before trusting the files.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    manifest: Manifest,
    /// Device and inode of `dir` when opened, to notice a newer checkpoint renamed over it.
    dir_id: (u64, u64),
}

impl Checkpoint {
    /// Makes the files' data durable (fsync each). For a checkpoint committed without (see
    /// [`crate::CheckpointWriter::set_durable`]), afterwards: its manifest, stamp and
    /// directories are durable already.
    pub fn sync_data(&self) -> Result<()> {
        for file in self.files() {
            let path = self.dir.join(&file.path);
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &path))?;
        }
        Ok(())
    }

    /// Opens the checkpoint in `dir` and parses its manifest.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let meta = dir
            .symlink_metadata()
            .map_err(io_err("open checkpoint", &dir))?;
        if !meta.is_dir() {
            return Err(io_err("open checkpoint", &dir)(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("is a {}, not a directory", file_kind(&meta)),
            )));
        }
        let manifest = Manifest::read(&dir)?;
        Ok(Self {
            dir,
            manifest,
            dir_id: (meta.dev(), meta.ino()),
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every file of the checkpoint except `manifest.json`, with size and digest: what a
    /// sender streams after the manifest.
    pub fn files(&self) -> &[FileEntry] {
        &self.manifest.files
    }

    /// The workload the checkpoint belongs to.
    pub fn identity(&self) -> &WorkloadIdentity {
        &self.manifest.identity
    }

    /// The engine that wrote the images.
    pub fn engine(&self) -> &EngineInfo {
        &self.manifest.engine
    }

    /// The engine's images directory, to hand to `criu restore` / `dmtcp_restart`.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }

    /// The overlay upper layer archive, if the checkpoint has one.
    pub fn upper_layer(&self) -> Option<PathBuf> {
        self.manifest
            .file(UPPER_LAYER_FILE)
            .map(|f| self.dir.join(&f.path))
    }

    /// The volume archives, by volume name, sorted by name.
    pub fn volumes(&self) -> Vec<(SafeName, PathBuf)> {
        let mut volumes: Vec<_> = self
            .manifest
            .files
            .iter()
            .filter_map(|f| {
                let name = f.path.strip_prefix(VOLUMES_DIR)?.strip_prefix('/')?;
                let name = SafeName::new(name.strip_suffix(".tar")?).ok()?;
                Some((name, self.dir.join(&f.path)))
            })
            .collect();
        volumes.sort();
        volumes
    }

    /// Refuses a checkpoint made by another engine or engine version than `engine`.
    pub fn check_engine(&self, engine: &EngineInfo) -> Result<()> {
        if &self.manifest.engine != engine {
            return Err(Error::EngineMismatch {
                dir: self.dir.clone(),
                checkpoint: self.manifest.engine.clone(),
                expected: engine.clone(),
            });
        }
        Ok(())
    }

    /// Checks that the directory holds exactly the listed files with their listed sizes and
    /// digests, and nothing else (no extra file, symlink or device).
    ///
    /// Cheap checks run first, so a truncated or incomplete checkpoint fails before gigabytes
    /// of memory images are hashed.
    pub fn verify(&self) -> Result<()> {
        self.check_listing()?;
        self.hash_all()
    }

    /// Every file listed and present with its size, nothing else.
    pub(crate) fn check_listing(&self) -> Result<()> {
        let listed: HashSet<&str> = self.files().iter().map(|f| f.path.as_str()).collect();
        for (path, _) in payload_files(&self.dir)? {
            if !listed.contains(path.as_str()) {
                return Err(Error::Corrupt {
                    dir: self.dir.clone(),
                    file: path,
                    problem: Corruption::Unlisted,
                });
            }
        }
        for file in self.files() {
            file.check_size(&self.dir)?;
        }
        Ok(())
    }

    fn hash_all(&self) -> Result<()> {
        crate::manifest::parallel_map(self.files(), |file| file.verify(&self.dir))
            .into_iter()
            .collect()
    }

    /// What a restore must call first: [`Checkpoint::check_engine`], then the checks of
    /// [`Checkpoint::verify`].
    ///
    /// The cheap checks (nothing unlisted, no symlink or device, every listed file present
    /// with its size) always run. The content is then taken as verified without hashing if the
    /// checkpoint carries a valid `verified.json` stamp (written by the writer after every
    /// byte was hashed, in this boot, for exactly these files with their current inode, size,
    /// mtime and ctime: see the `stamp` module for what that does and does not detect);
    /// otherwise every file is hashed as [`Checkpoint::verify`] does.
    pub fn verify_for_restore(&self, engine: &EngineInfo) -> Result<Verified> {
        self.check_engine(engine)?;
        self.check_listing()?;
        match self.stamp_status() {
            Ok(()) => {
                tracing::debug!(dir = %self.dir.display(), "checkpoint content verified at install (stamp valid)");
                Ok(Verified::ByStamp)
            }
            Err(reason) => {
                tracing::info!(dir = %self.dir.display(), %reason, "hashing the whole checkpoint");
                self.hash_all().map(|()| Verified::Hashed)
            }
        }
    }

    /// Whether the checkpoint's `verified.json` stamp is valid for its current files (see
    /// [`Checkpoint::verify_for_restore`]); `Err` says why not. Only metadata is read.
    pub fn stamp_status(&self) -> std::result::Result<(), String> {
        Stamp::check(&self.dir, self.files())
    }

    /// Whether `dir` is still the directory this checkpoint was opened from.
    pub(crate) fn is_still_at(&self, dir: &Path) -> Result<bool> {
        match dir.symlink_metadata() {
            Ok(meta) => Ok((meta.dev(), meta.ino()) == self.dir_id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", dir)(e)),
        }
    }
}

/// Every regular file under the payload directories of checkpoint directory `dir`, as
/// `/`-separated relative paths with their metadata, sorted.
///
/// Anything that may not be in a checkpoint is an error: an unknown top-level entry, or a
/// symlink, device, fifo or socket anywhere (a symlink could make a restore read or a
/// receiver write outside the checkpoint). `manifest.json` and the `verified.json` stamp are skipped; the caller handles them.
pub(crate) fn payload_files(dir: &Path) -> Result<Vec<(String, Metadata)>> {
    let mut files = Vec::new();
    for (name, meta) in read_dir_sorted(dir, dir, "")? {
        if name == MANIFEST_FILE
            || ((name == STAMP_FILE || name == crate::writer::SIZE_HINT_FILE) && meta.is_file())
        {
            continue;
        }
        if meta.is_dir() && PAYLOAD_DIRS.contains(&name.as_str()) {
            collect_files(dir, &dir.join(&name), &name, &mut files)?;
        } else {
            return Err(unexpected(dir, name, &meta));
        }
    }
    Ok(files)
}

fn collect_files(
    root: &Path,
    dir: &Path,
    rel: &str,
    files: &mut Vec<(String, Metadata)>,
) -> Result<()> {
    for (name, meta) in read_dir_sorted(root, dir, rel)? {
        let path = format!("{rel}/{name}");
        if meta.is_dir() {
            collect_files(root, &dir.join(&name), &path, files)?;
        } else if meta.is_file() {
            files.push((path, meta));
        } else {
            return Err(unexpected(root, path, &meta));
        }
    }
    Ok(())
}

fn read_dir_sorted(root: &Path, dir: &Path, rel: &str) -> Result<Vec<(String, Metadata)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            let name = entry.file_name().to_string_lossy().into_owned();
            return Err(Error::Corrupt {
                dir: root.to_path_buf(),
                file: if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                },
                problem: Corruption::InvalidPath {
                    reason: "file name is not UTF-8",
                },
            });
        };
        let meta = path.symlink_metadata().map_err(io_err("stat", &path))?;
        entries.push((name, meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

fn unexpected(dir: &Path, file: String, meta: &Metadata) -> Error {
    let problem = if meta.is_file() || meta.is_dir() {
        Corruption::Unlisted
    } else {
        Corruption::NotARegularFile {
            kind: file_kind(meta),
        }
    };
    Error::Corrupt {
        dir: dir.to_path_buf(),
        file,
        problem,
    }
}

/// A human name for the type of file `meta` describes.
pub(crate) fn file_kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown file type"
    }
}
