//! Small JSON files in the node's state dir through which a node's shims (one per container)
//! share what one of them found out once: CRIU's facts, DMTCP's installation. Reads that fail
//! mean "not cached"; writes are atomic (temp + rename) and best effort. And the PATH search
//! through which both engines find their programs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

/// The first executable file called `name` in the directories of `PATH`, as a shell finds it.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The cached value at `path`; `None` when it is missing or unreadable.
pub fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Replaces the cache at `path` with `value`; a failure is logged as caching `what` (the next
/// shim finds out again).
pub fn write<T: Serialize>(path: &Path, value: &T, what: &str) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(value)?)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "cache {what}");
    }
}
