//! `manifest.json`: what a checkpoint contains and the digests that prove it is intact.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Corruption, Error, Result, io_err};
use crate::identity::WorkloadIdentity;

/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name in a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Directory the checkpoint engine writes its images into (CRIU `*.img`, DMTCP `ckpt_*.dmtcp`).
pub const IMAGES_DIR: &str = "images";
/// Directory holding the container's root filesystem changes.
pub const ROOTFS_DIR: &str = "rootfs";
/// The archive of the container's overlay upper layer.
pub const UPPER_LAYER_FILE: &str = "rootfs/upper.tar";
/// Directory holding one `<volume name>.tar` per local volume of the pod.
pub const VOLUMES_DIR: &str = "volumes";
/// The subdirectories whose files the manifest lists; nothing else may exist beside the manifest.
pub(crate) const PAYLOAD_DIRS: [&str; 3] = [IMAGES_DIR, ROOTFS_DIR, VOLUMES_DIR];

/// The checkpoint engine and its exact version. Images are only restored by the same engine
/// and version: CRIU and DMTCP image formats are not promised to be compatible across versions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Engine name, e.g. `criu` or `dmtcp`.
    pub name: String,
    /// Engine version as the engine reports it, e.g. `4.2.1`.
    pub version: String,
}

impl EngineInfo {
    /// An engine name and version.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
        }
    }
}

impl fmt::Display for EngineInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// One file of a checkpoint, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the checkpoint directory, `/`-separated, under `images/`, `rootfs/`
    /// or `volumes/`. Validated when the manifest is parsed, so safe to join onto a directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, 64 lowercase hex digits.
    pub sha256: String,
}

impl FileEntry {
    /// Checks that the file exists under `dir` as a regular file with the listed size and
    /// digest. A receiver can call this on each file as it arrives.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        self.check_size(dir)?;
        let (_, sha256) = sha256_file(&dir.join(&self.path))?;
        if sha256 != self.sha256 {
            return Err(self.corrupt(
                dir,
                Corruption::Sha256Mismatch {
                    manifest: self.sha256.clone(),
                    file: sha256,
                },
            ));
        }
        Ok(())
    }

    /// The cheap part of [`FileEntry::verify`]: presence, type and size.
    pub(crate) fn check_size(&self, dir: &Path) -> Result<()> {
        let path = dir.join(&self.path);
        let meta = match path.symlink_metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.corrupt(dir, Corruption::Missing));
            }
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        if !meta.file_type().is_file() {
            let kind = crate::checkpoint::file_kind(&meta);
            return Err(self.corrupt(dir, Corruption::NotARegularFile { kind }));
        }
        if meta.len() != self.size {
            return Err(self.corrupt(
                dir,
                Corruption::SizeMismatch {
                    manifest: self.size,
                    file: meta.len(),
                },
            ));
        }
        Ok(())
    }

    fn corrupt(&self, dir: &Path, problem: Corruption) -> Error {
        Error::Corrupt {
            dir: dir.to_path_buf(),
            file: self.path.clone(),
            problem,
        }
    }
}

/// The content of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] when written by this build.
    pub format_version: u32,
    /// The engine that wrote `images/`.
    pub engine: EngineInfo,
    /// The workload the checkpoint belongs to.
    pub identity: WorkloadIdentity,
    /// The container's image reference, so the restoring side can check it runs the same image.
    pub image: String,
    /// Creation time in seconds since the Unix epoch (UTC).
    pub created_unix: u64,
    /// Every file of the checkpoint except the manifest itself, sorted by path.
    pub files: Vec<FileEntry>,
}

/// Just the version, parsed first so that a future format with other fields is reported as
/// an unsupported version rather than as a confusing schema error.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

impl Manifest {
    /// Reads and validates `dir/manifest.json` (see [`Manifest::parse`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let meta = match path.symlink_metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::MissingManifest {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        if !meta.file_type().is_file() {
            return Err(Error::Corrupt {
                dir: dir.to_path_buf(),
                file: MANIFEST_FILE.into(),
                problem: Corruption::NotARegularFile {
                    kind: crate::checkpoint::file_kind(&meta),
                },
            });
        }
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        Self::parse(&bytes, dir)
    }

    /// Parses a manifest belonging to checkpoint directory `dir` (used in messages only).
    ///
    /// Checks the format version, and that every listed path is relative, stays inside the
    /// checkpoint, lies under a payload directory and is listed once, so that callers (and a
    /// receiver writing streamed files) can join the paths onto a directory safely.
    pub fn parse(bytes: &[u8], dir: &Path) -> Result<Self> {
        let invalid = |source| Error::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            source,
        };
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(invalid)?;
        if probe.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                dir: dir.to_path_buf(),
                found: probe.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Self = serde_json::from_slice(bytes).map_err(invalid)?;
        let mut seen = HashSet::new();
        for entry in &manifest.files {
            let problem = if let Err(reason) = validate_relative_path(&entry.path) {
                Some(Corruption::InvalidPath { reason })
            } else if !is_sha256_hex(&entry.sha256) {
                Some(Corruption::InvalidDigest)
            } else if !seen.insert(entry.path.as_str()) {
                Some(Corruption::Duplicate)
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(entry.corrupt(dir, problem));
            }
        }
        Ok(manifest)
    }

    /// The manifest as pretty JSON, as written to `manifest.json`.
    pub fn to_json(&self, dir: &Path) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|source| Error::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            source,
        })
    }

    /// The entry for `path` (relative, `/`-separated), if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Runs `f` on every item on up to as many threads as the machine has cores (at most 4), and
/// returns the results in the items' order. Hashing gigabytes of memory images is the
/// checkpoint's critical path on both ends of a migration; it is CPU-bound per file.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get().min(4))
        .unwrap_or(1)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().ok().flatten())
        .collect()
}

/// Size and SHA-256 (lowercase hex) of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex(&hasher.finalize())))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a manifest path: `/`-separated, under a payload directory, no empty, `.` or `..`
/// component, no NUL, bounded length.
pub fn validate_relative_path(path: &str) -> Result<(), &'static str> {
    if path.len() > 4096 {
        return Err("longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return Err("absolute");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    let mut components = path.split('/');
    let top = components.next().unwrap_or_default();
    if !PAYLOAD_DIRS.contains(&top) {
        return Err("not under images/, rootfs/ or volumes/");
    }
    let mut rest = 0;
    for component in components {
        if component.is_empty() || component == "." || component == ".." {
            return Err("empty, '.' or '..' component");
        }
        rest += 1;
    }
    if rest == 0 {
        return Err("names a directory, not a file");
    }
    Ok(())
}
