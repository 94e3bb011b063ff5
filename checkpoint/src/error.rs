//! The crate's error type.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::identity::WorkloadIdentity;
use crate::manifest::EngineInfo;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while writing, reading, verifying or unpacking a checkpoint.
///
/// Each variant names the path it concerns and what was being done, so the message alone is
/// enough to diagnose a failed migration from the shim's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("create directory", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A name that is to become a path component failed validation (see [`crate::SafeName`]).
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },

    /// A workload identity could not be built.
    #[error("invalid workload identity: {reason}")]
    InvalidIdentity {
        /// Which field was wrong and why.
        reason: String,
    },

    /// The directory has no `manifest.json`: it is not (or not yet) a complete checkpoint.
    #[error("{}: no manifest.json, so this is not a complete checkpoint", dir.display())]
    MissingManifest {
        /// The checkpoint directory.
        dir: PathBuf,
    },

    /// `manifest.json` is not valid JSON or does not have the expected fields.
    #[error("{}: invalid manifest: {source}", path.display())]
    InvalidManifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// The checkpoint was written in a format version this build cannot read.
    #[error(
        "{}: checkpoint format version {found} is not understood by this build (it reads version {supported})",
        dir.display()
    )]
    UnsupportedFormat {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The version in the manifest.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },

    /// The checkpoint was made by another engine, or another version of it, than the caller's.
    #[error(
        "{}: checkpoint was made by {checkpoint}, but this node restores with {expected}; refusing to restore",
        dir.display()
    )]
    EngineMismatch {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The engine recorded in the manifest.
        checkpoint: EngineInfo,
        /// The engine the caller restores with.
        expected: EngineInfo,
    },

    /// A file of the checkpoint is missing, truncated, tampered with, unexpected or unsafe.
    #[error("{}: {file}: {problem}", dir.display())]
    Corrupt {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The file's path relative to the checkpoint directory.
        file: String,
        /// What is wrong with it.
        problem: Corruption,
    },

    /// The manifest in the directory found for a workload names another workload.
    #[error("{}: checkpoint belongs to {found}, not {expected}", dir.display())]
    IdentityMismatch {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The identity recorded in the manifest.
        found: Box<WorkloadIdentity>,
        /// The identity the caller looked for.
        expected: Box<WorkloadIdentity>,
    },

    /// The checkpoint directory was replaced by a newer checkpoint since it was opened, so
    /// consuming it would throw away a checkpoint nobody restored.
    #[error("{}: replaced by a newer checkpoint since it was opened; not consuming it", dir.display())]
    Replaced {
        /// The checkpoint directory.
        dir: PathBuf,
    },

    /// An archive (upper layer or volume) holds an entry that cannot be packed or unpacked.
    #[error("{}: entry {entry:?}: {problem}", archive.display())]
    Archive {
        /// The archive file.
        archive: PathBuf,
        /// The entry's path inside the archive.
        entry: String,
        /// What is wrong with it.
        problem: String,
    },

    /// The same part (upper layer, a volume) was added to a checkpoint twice.
    #[error("{}: already added to this checkpoint", path.display())]
    AlreadyAdded {
        /// The file that already exists.
        path: PathBuf,
    },
}

/// What is wrong with one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// Listed in the manifest but absent.
    Missing,
    /// Present with another size than the manifest records (truncated or grown).
    SizeMismatch {
        /// Size in the manifest, in bytes.
        manifest: u64,
        /// Size on disk, in bytes.
        file: u64,
    },
    /// Present with the right size but different content.
    Sha256Mismatch {
        /// Hex digest in the manifest.
        manifest: String,
        /// Hex digest of the file on disk.
        file: String,
    },
    /// Present on disk but not listed in the manifest.
    Unlisted,
    /// A symlink, device, fifo or socket where only regular files and directories belong.
    NotARegularFile {
        /// What it is instead.
        kind: &'static str,
    },
    /// The manifest lists a path that is absolute, escapes the checkpoint or is malformed.
    InvalidPath {
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The manifest lists the same path twice.
    Duplicate,
    /// The manifest's digest for the file is not 64 lowercase hex digits.
    InvalidDigest,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("listed in the manifest but missing"),
            Self::SizeMismatch { manifest, file } if file < manifest => write!(
                f,
                "truncated: size mismatch (manifest {manifest} bytes, file {file} bytes)"
            ),
            Self::SizeMismatch { manifest, file } => {
                write!(
                    f,
                    "size mismatch (manifest {manifest} bytes, file {file} bytes)"
                )
            }
            Self::Sha256Mismatch { manifest, file } => {
                write!(f, "sha256 mismatch (manifest {manifest}, file {file})")
            }
            Self::Unlisted => f.write_str("not listed in the manifest"),
            Self::NotARegularFile { kind } => write!(f, "not a regular file ({kind})"),
            Self::InvalidPath { reason } => write!(f, "invalid path in manifest: {reason}"),
            Self::Duplicate => f.write_str("listed twice in the manifest"),
            Self::InvalidDigest => f.write_str("manifest sha256 is not 64 lowercase hex digits"),
        }
    }
}

/// Builds the `map_err` closure for an I/O error on `path` during `op`.
pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
