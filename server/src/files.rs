//! Small files the server keeps for itself: the agent's marks and records, the controller's
//! journal. Each is written whole or not at all, and readable by root alone (they say what
//! the workloads are and where they run).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tracing::warn;

/// Replaces `path` with `bytes`: a temp file beside it (mode 0600), fsync, rename over
/// `path`; with `sync_dir`, an fsync of the directory too, so that the rename itself
/// survives a crash. After a crash `path` holds the old content or the new one, never a
/// part; a reader never sees a half-written file.
pub(crate) fn write_private(path: &Path, bytes: &[u8], sync_dir: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "record".into());
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if sync_dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().inspect_err(|_| remove_if_exists(&tmp))
}

/// Removes the file at `path`; one that is not there is fine, another failure a warning.
pub(crate) fn remove_if_exists(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("record.json");
        std::fs::write(&path, b"old").unwrap();
        write_private(&path, b"new", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "a temp file is left");
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should go: the rename fails.
        let path = dir.path().join("taken");
        std::fs::create_dir(path.join("x").parent().unwrap()).unwrap();
        std::fs::write(path.join("x"), b"").unwrap();
        assert!(write_private(&path, b"new", false).is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("taken")]);
    }
}
