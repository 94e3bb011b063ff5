//! Can DMTCP wrap this program?
//!
//! DMTCP works by `LD_PRELOAD`ing `libdmtcp.so` into the program, so it silently does nothing
//! for a statically linked program (no dynamic loader, nothing is preloaded) and the loader
//! ignores `LD_PRELOAD` for setuid/setgid programs. Both would run "fine" and then fail at the
//! first checkpoint, so they are refused up front with a message that says why. The shim
//! checks at create (inside the container's root), the restore-hook again at start.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a program cannot run under DMTCP; `path` names it as the caller chose to show it.
#[derive(Debug)]
pub struct Unwrappable {
    /// The program (or `#!` interpreter) at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: Reason,
}

/// What makes a program unwrappable.
#[derive(Debug)]
pub enum Reason {
    /// Statically linked: no `PT_INTERP`.
    Static,
    /// setuid or setgid.
    Setuid,
    /// Neither an ELF executable nor a `#!` script (or its interpreter is missing).
    NotExecutable,
    /// More nested `#!` interpreters than Linux follows.
    TooManyInterpreters,
    /// It could not be read.
    Io(io::Error),
}

impl fmt::Display for Unwrappable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.reason {
            Reason::Static => write!(
                f,
                "DMTCP cannot checkpoint statically linked program {path}: it has no dynamic \
                 loader (no PT_INTERP), so DMTCP's LD_PRELOAD library is never loaded; use a \
                 dynamically linked build or the CRIU engine"
            ),
            Reason::Setuid => write!(
                f,
                "DMTCP cannot checkpoint setuid/setgid program {path}: the dynamic loader \
                 ignores LD_PRELOAD for it; use the CRIU engine"
            ),
            Reason::NotExecutable => {
                write!(f, "{path} is neither an ELF executable nor a #! script")
            }
            Reason::TooManyInterpreters => write!(f, "{path}: #! interpreter chain is too deep"),
            Reason::Io(e) => write!(f, "cannot inspect {path}: {e}"),
        }
    }
}

impl std::error::Error for Unwrappable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.reason {
            Reason::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Checks that `program` (an executable or a `#!` script, whose interpreter is checked in
/// turn) can run under DMTCP. `locate` maps an interpreter path as written after `#!` to the
/// file to inspect (`None`: not found); `show` maps an inspected file to the path errors name
/// (the shim inspects a container's files from the host and names them as the container sees
/// them).
pub fn check_wrappable(
    program: &Path,
    locate: impl Fn(&Path) -> Option<PathBuf>,
    show: impl Fn(&Path) -> PathBuf,
) -> Result<(), Unwrappable> {
    let fail = |path: &Path, reason| Unwrappable {
        path: show(path),
        reason,
    };
    let mut current = program.to_path_buf();
    // A script's interpreter may itself be a script; Linux allows a few levels.
    for _ in 0..4 {
        let meta = current
            .metadata()
            .map_err(|e| fail(&current, Reason::Io(e)))?;
        if meta.permissions().mode() & 0o6000 != 0 {
            return Err(fail(&current, Reason::Setuid));
        }
        let head = read_head(&current).map_err(|e| fail(&current, Reason::Io(e)))?;
        if let Some(rest) = head.strip_prefix(b"#!") {
            let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let next = line
                .split_whitespace()
                .next()
                .and_then(|interp| locate(Path::new(interp)));
            match next {
                Some(next) => current = next,
                None => return Err(fail(&current, Reason::NotExecutable)),
            }
            continue;
        }
        return match has_interp(&head) {
            Some(true) => Ok(()),
            Some(false) => Err(fail(&current, Reason::Static)),
            None => Err(fail(&current, Reason::NotExecutable)),
        };
    }
    Err(fail(program, Reason::TooManyInterpreters))
}

/// The first 64 KiB of `path`: enough for an ELF header and its program headers, or a `#!`
/// line.
pub fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(4096);
    File::open(path)?.take(64 * 1024).read_to_end(&mut head)?;
    Ok(head)
}

/// Whether the ELF image starting with `head` has a `PT_INTERP` program header (is dynamically
/// linked); `None` when `head` is not an ELF file or its program headers lie beyond `head`.
pub fn has_interp(head: &[u8]) -> Option<bool> {
    const PT_INTERP: u64 = 3;
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
    let num = |off: usize, len: usize| -> Option<u64> {
        let bytes = head.get(off..off.checked_add(len)?)?;
        let mut v = 0u64;
        for i in 0..len {
            let b = if little { bytes[len - 1 - i] } else { bytes[i] };
            v = (v << 8) | u64::from(b);
        }
        Some(v)
    };
    let (phoff, phentsize, phnum) = if is64 {
        (num(0x20, 8)?, num(0x36, 2)?, num(0x38, 2)?)
    } else {
        (num(0x1c, 4)?, num(0x2a, 2)?, num(0x2c, 2)?)
    };
    for i in 0..phnum {
        let off = usize::try_from(phoff.checked_add(i.checked_mul(phentsize)?)?).ok()?;
        if num(off, 4)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// Whether `head` is an ELF shared object (`ET_DYN`), e.g. a library.
pub fn is_shared_object(head: &[u8]) -> bool {
    head.get(..4) == Some(b"\x7fELF") && head.get(16) == Some(&3)
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

    /// The same, 32-bit big-endian.
    fn elf32_be(types: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 52];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 1;
        v[5] = 2;
        v[0x1c..0x20].copy_from_slice(&52u32.to_be_bytes());
        v[0x2a..0x2c].copy_from_slice(&32u16.to_be_bytes());
        v[0x2c..0x2e].copy_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            let mut ph = vec![0u8; 32];
            ph[..4].copy_from_slice(&t.to_be_bytes());
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

    fn check(path: &Path) -> Result<(), Unwrappable> {
        check_wrappable(path, |p| Some(p.to_path_buf()), Path::to_path_buf)
    }

    #[test]
    fn interp_detection() {
        assert_eq!(has_interp(&elf64(&[6, 3, 1])), Some(true));
        assert_eq!(has_interp(&elf64(&[1, 1])), Some(false));
        assert_eq!(has_interp(&elf32_be(&[1, 3])), Some(true));
        assert_eq!(has_interp(&elf32_be(&[1])), Some(false));
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
        assert!(check(&dynamic).is_ok());
        assert!(matches!(
            check(&stat),
            Err(Unwrappable {
                reason: Reason::Static,
                ..
            })
        ));
        assert!(matches!(
            check(&suid),
            Err(Unwrappable {
                reason: Reason::Setuid,
                ..
            })
        ));
        let script = format!("#!{} -e\necho hi\n", stat.display());
        let s = write_exec(dir.path(), "script", script.as_bytes(), 0o755);
        match check(&s) {
            Err(Unwrappable {
                path,
                reason: Reason::Static,
            }) => assert_eq!(path, stat),
            other => panic!("unexpected {other:?}"),
        }
        let msg = check(&stat).unwrap_err().to_string();
        assert!(msg.starts_with("DMTCP cannot checkpoint statically linked program"));
        let missing = write_exec(dir.path(), "orphan", b"#!/no/such/interpreter\n", 0o755);
        assert!(matches!(
            check_wrappable(&missing, |_| None, Path::to_path_buf),
            Err(Unwrappable {
                reason: Reason::NotExecutable,
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_path_as_shown() {
        let dir = tempfile::tempdir().unwrap();
        let stat = write_exec(dir.path(), "static", &elf64(&[1]), 0o755);
        let err = check_wrappable(
            &stat,
            |p| Some(p.to_path_buf()),
            |_| PathBuf::from("/bin/app"),
        )
        .unwrap_err();
        assert_eq!(err.path, PathBuf::from("/bin/app"));
        assert!(err.to_string().contains("program /bin/app:"), "{err}");
    }
}
