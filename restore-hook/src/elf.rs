//! Can DMTCP wrap this program? The check itself is `mig_elf` (shared with the shim, which
//! makes it at create); here the entrypoint is found through `PATH` as `execvp` would.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a program cannot run under DMTCP.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("cannot find program {program:?} in PATH {path:?}")]
    NotFound { program: String, path: String },
    #[error(transparent)]
    Unwrappable(#[from] mig_elf::Unwrappable),
}

/// Resolves `program` like `execvp` does: names with a `/` as they are, others through `path`
/// (a `PATH` value).
pub fn resolve(program: &str, path: &str) -> Result<PathBuf, WrapError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| WrapError::NotFound {
            program: program.to_owned(),
            path: path.to_owned(),
        })
}

/// Checks that `path` (an executable or a `#!` script, whose interpreter is checked in turn)
/// can run under DMTCP.
pub fn check_wrappable(path: &Path) -> Result<(), WrapError> {
    mig_elf::check_wrappable(path, |p| Some(p.to_path_buf()), Path::to_path_buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    fn write_exec(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn resolve_through_path() {
        let dir = tempfile::tempdir().unwrap();
        write_exec(dir.path(), "prog", b"#!/bin/sh\n", 0o755);
        write_exec(dir.path(), "noexec", b"", 0o644);
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(resolve("prog", &path).unwrap(), dir.path().join("prog"));
        assert!(resolve("noexec", &path).is_err());
        assert_eq!(resolve("./x", "").unwrap(), PathBuf::from("./x"));
    }

    #[test]
    fn a_static_program_is_refused_with_the_shared_message() {
        let dir = tempfile::tempdir().unwrap();
        // An ELF64 header with no program headers: no PT_INTERP.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let stat = write_exec(dir.path(), "static", &elf, 0o755);
        let msg = check_wrappable(&stat).unwrap_err().to_string();
        assert!(
            msg.starts_with("DMTCP cannot checkpoint statically linked program"),
            "{msg}"
        );
    }
}
