//! DMTCP test fixtures shared by the end-to-end tests: where DMTCP and the static restore-hook
//! are, and a counter image DMTCP can wrap (dynamically linked: DMTCP cannot wrap static
//! programs such as busybox).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::prereq::find_on_path;
use crate::{Skip, TestImage};

/// Where DMTCP is: `MIG_DMTCP_DIR`, the install root of `dmtcp_launch` on PATH, or /opt/dmtcp.
pub fn find_dmtcp() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MIG_DMTCP_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(launch) = find_on_path("dmtcp_launch") {
        return launch.parent()?.parent().map(Path::to_path_buf);
    }
    let opt = Path::new("/opt/dmtcp");
    opt.join("bin/dmtcp_launch")
        .is_file()
        .then(|| opt.to_path_buf())
}

/// The static restore-hook: `MIG_RESTORE_HOOK`, else the workspace's static build.
pub fn find_hook() -> PathBuf {
    std::env::var_os("MIG_RESTORE_HOOK")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::workspace_dir().join("target/x86_64-unknown-linux-gnu/release/mig-restore-hook")
        })
}

pub const C_COUNTER: &str = r#"#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
static void term(int sig) { (void)sig; _exit(143); }
int main(void) {
    signal(SIGTERM, term);
    for (unsigned long i = 1;; i++) {
        FILE *f = fopen("/count", "w");
        if (f) { fprintf(f, "%lu\n", i); fclose(f); }
        FILE *g = fopen("/data/log", "a");
        if (g) { fprintf(g, "%lu\n", i); fclose(g); }
        usleep(100000);
    }
}
"#;

/// An image with busybox and `/counter`, a dynamically linked C counter, with its libraries.
pub fn counter_image() -> Result<TestImage> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("counter.c");
    let bin = dir.path().join("counter");
    fs::write(&src, C_COUNTER)?;
    let out = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running gcc")?;
    if !out.status.success() {
        bail!("gcc: {}", String::from_utf8_lossy(&out.stderr));
    }
    let files = crate::image::program_with_libraries(&bin, "counter")?;
    TestImage::busybox_with_files(
        "docker.io/library/mig-dmtcp-counter:test",
        &["/counter"],
        &files,
    )
}

/// Why a DMTCP test cannot run here.
pub enum Missing {
    /// DMTCP itself: not a failure even with `MIG_E2E_REQUIRED=1`, since scripts/setup.sh
    /// cannot install it on a fresh machine.
    Dmtcp,
    /// Something the project's set-up provides (the static restore-hook, gcc).
    Other(Skip),
}

impl Missing {
    /// Reports the skip of `test`, as a failure where `MIG_E2E_REQUIRED=1` requires it.
    pub fn report(self, test: &str) {
        match self {
            Missing::Dmtcp => crate::note_skip(
                test,
                "DMTCP is not installed (dmtcp_launch not on PATH, MIG_DMTCP_DIR unset)",
            ),
            Missing::Other(skip) => skip.report(test),
        }
    }
}

/// DMTCP's install dir and the static restore-hook, or what is missing to run a DMTCP test
/// (DMTCP, the hook, or gcc to build [`counter_image`]).
pub fn prerequisites() -> std::result::Result<(PathBuf, PathBuf), Missing> {
    let dmtcp = find_dmtcp().ok_or(Missing::Dmtcp)?;
    let hook = find_hook();
    if !hook.is_file() {
        return Err(Missing::Other(Skip {
            reason: format!(
                "the static restore-hook {} is missing (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p mig-restore-hook --target x86_64-unknown-linux-gnu, or set MIG_RESTORE_HOOK)",
                hook.display()
            ),
        }));
    }
    if find_on_path("gcc").is_none() {
        return Err(Missing::Other(Skip {
            reason: "`gcc` is not on PATH: it builds the dynamically linked counter".into(),
        }));
    }
    Ok((dmtcp, hook))
}
