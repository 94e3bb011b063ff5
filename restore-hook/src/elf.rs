//! Can DMTCP wrap this program?
//!
//! DMTCP works by `LD_PRELOAD`ing `libdmtcp.so` into the program, so it silently does nothing
//! for a statically linked program (no dynamic loader, nothing is preloaded) and the loader
//! ignores `LD_PRELOAD` for setuid/setgid programs. Both would run "fine" and then fail at the
//! first checkpoint, so they are refused up front with a message that says why.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a program cannot run under DMTCP.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("cannot find program {program:?} in PATH {path:?}")]
    NotFound { program: String, path: String },
    #[error("cannot inspect {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "DMTCP cannot checkpoint statically linked program {path}: it has no dynamic loader \
         (no PT_INTERP), so DMTCP's LD_PRELOAD library is never loaded; use a dynamically \
         linked build or the CRIU engine"
    )]
    Static { path: PathBuf },
    #[error(
        "DMTCP cannot checkpoint setuid/setgid program {path}: the dynamic loader ignores \
         LD_PRELOAD for it; use the CRIU engine"
    )]
    Setuid { path: PathBuf },
    #[error("{path} is neither an ELF executable nor a #! script")]
    NotExecutable { path: PathBuf },
    #[error("{path}: #! interpreter chain is too deep")]
    TooManyInterpreters { path: PathBuf },
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
    let mut current = path.to_path_buf();
    // A script's interpreter may itself be a script; Linux allows a few levels.
    for _ in 0..4 {
        let io = |source| WrapError::Io {
            path: current.clone(),
            source,
        };
        let meta = current.metadata().map_err(io)?;
        if meta.permissions().mode() & 0o6000 != 0 {
            return Err(WrapError::Setuid { path: current });
        }
        let mut head = Vec::with_capacity(4096);
        File::open(&current)
            .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
            .map_err(io)?;
        if let Some(rest) = head.strip_prefix(b"#!") {
            let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            match line.split_whitespace().next() {
                Some(interp) => current = PathBuf::from(interp),
                None => return Err(WrapError::NotExecutable { path: current }),
            }
            continue;
        }
        return match has_interp(&head) {
            Some(true) => Ok(()),
            Some(false) => Err(WrapError::Static { path: current }),
            None => Err(WrapError::NotExecutable { path: current }),
        };
    }
    Err(WrapError::TooManyInterpreters {
        path: path.to_path_buf(),
    })
}

/// Whether the ELF image starting with `head` has a `PT_INTERP` program header; `None` when
/// `head` is not an ELF file or its program headers lie beyond `head`.
pub fn has_interp(head: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if head.get(..4)? != b"\x7fELF" {
        return None;
    }
    let is64 = match head.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match head.get(5)? {
        1 => true,
        2 => false,
        _ => return None,
    };
    let u16_at = |off: usize| -> Option<u64> {
        let b: [u8; 2] = head.get(off..off + 2)?.try_into().ok()?;
        Some(u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |off: usize| -> Option<u64> {
        let b: [u8; 4] = head.get(off..off + 4)?.try_into().ok()?;
        Some(u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |off: usize| -> Option<u64> {
        let b: [u8; 8] = head.get(off..off + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, phentsize, phnum) = if is64 {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?)
    };
    for i in 0..phnum {
        let off = usize::try_from(phoff.checked_add(i.checked_mul(phentsize)?)?).ok()?;
        if u32_at(off)? == u64::from(PT_INTERP) {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal little-endian ELF64 header followed by `types` program headers.
    fn elf64(types: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2;
        v[5] = 1;
        v[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            v.extend(ph);
        }
        v
    }

    fn write_exec(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn interp_detection() {
        assert_eq!(has_interp(&elf64(&[6, 3, 1])), Some(true));
        assert_eq!(has_interp(&elf64(&[1, 1])), Some(false));
        assert_eq!(has_interp(b"not elf"), None);
        let mut truncated = elf64(&[1, 3]);
        truncated.truncate(100);
        assert_eq!(has_interp(&truncated), None);
    }

    #[test]
    fn static_setuid_and_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let dynamic = write_exec(dir.path(), "dyn", &elf64(&[3]), 0o755);
        let stat = write_exec(dir.path(), "static", &elf64(&[1]), 0o755);
        let suid = write_exec(dir.path(), "suid", &elf64(&[3]), 0o4755);
        assert!(check_wrappable(&dynamic).is_ok());
        assert!(matches!(
            check_wrappable(&stat),
            Err(WrapError::Static { .. })
        ));
        assert!(matches!(
            check_wrappable(&suid),
            Err(WrapError::Setuid { .. })
        ));
        let script = format!("#!{} -e\necho hi\n", stat.display());
        let s = write_exec(dir.path(), "script", script.as_bytes(), 0o755);
        match check_wrappable(&s) {
            Err(WrapError::Static { path }) => assert_eq!(path, stat),
            other => panic!("unexpected {other:?}"),
        }
        let msg = check_wrappable(&stat).unwrap_err().to_string();
        assert!(msg.starts_with("DMTCP cannot checkpoint statically linked program"));
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
}
