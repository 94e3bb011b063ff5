//! What the end-to-end tests need from the machine, and how a test skips when it is missing.
//!
//! A missing prerequisite makes a test print `SKIP <test>: <reason>` and return, so that
//! `cargo test` stays useful on a developer's laptop. With `MIG_E2E_REQUIRED=1` (set by
//! scripts/test.sh and CI) it panics instead: a test must never pass silently in CI.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{runtime, shim_binary_name, shim_dir};

/// Why the end-to-end tests cannot run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub reason: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Skip {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// Reports the skip of `test`: a line on stderr, or a panic when `MIG_E2E_REQUIRED=1`.
    pub fn report(&self, test: &str) {
        if required() {
            panic!("{test}: cannot run and MIG_E2E_REQUIRED=1: {}", self.reason);
        }
        note_skip(test, &self.reason);
    }
}

/// Says that `test` is skipped and why: on stderr, and (cargo test hides a passing test's
/// output) appended to the file named by `MIG_SKIP_LOG`, which scripts/test.sh prints in its
/// summary, so that a skip is never silent.
pub fn note_skip(test: &str, reason: &str) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("MIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write: concurrent tests append whole lines.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// True when `MIG_E2E_REQUIRED=1`: skipping is then a failure.
pub fn required() -> bool {
    std::env::var("MIG_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

/// Checks root, containerd, ctr, runc and the shim binary of the runtime under test
/// ([`runtime()`]). `None` means everything is there.
pub fn require_root_and_tools() -> Option<Skip> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(Skip::new("needs root (containerd, runc and mounts)"));
    }
    for tool in ["containerd", "ctr", "runc"] {
        if find_on_path(tool).is_none() {
            return Some(Skip::new(format!(
                "`{tool}` is not on PATH (run scripts/setup.sh)"
            )));
        }
    }
    let runtime = runtime();
    let Some(binary) = shim_binary_name(&runtime) else {
        return Some(Skip::new(format!(
            "MIG_E2E_RUNTIME={runtime} is not a runtime type like io.containerd.NAME.vN"
        )));
    };
    let ours = shim_dir().join(&binary);
    // Our own runtime must be the one just built, never a stale copy installed on PATH.
    let on_path_is_enough = runtime != crate::MIG_RUNTIME;
    let found = ours.is_file() || (on_path_is_enough && find_on_path(&binary).is_some());
    if !found {
        let where_ = if on_path_is_enough {
            " nor on PATH"
        } else {
            ""
        };
        return Some(Skip::new(format!(
            "shim `{binary}` for runtime {runtime} is not in {}{where_} (cargo build --release, or set MIG_SHIM_DIR)",
            shim_dir().display()
        )));
    }
    None
}

/// The first executable called `name` on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
