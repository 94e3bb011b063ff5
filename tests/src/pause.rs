//! A local pause image, the sandbox image of pods run through the CRI: no registry is reachable
//! here, so `registry.k8s.io/pause` cannot be pulled.
//!
//! The image holds one statically linked program, `/pause`, built with `gcc -static` from the
//! C source below: it sleeps until SIGTERM or SIGINT and reaps children, as Kubernetes' own
//! pause does. The archive is cached next to the other test images, keyed by the source.

use std::fs;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::TestImage;
use crate::command::{describe, status_text};
use crate::image::{image_cache_dir, layout};
use crate::tar::Tar;

/// The reference of the pause image (what the CRI is configured to use as sandbox image).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/mig-pause:test";

const PAUSE_C: &str = r#"/* The pause container of mig-e2e: sleeps until SIGTERM or SIGINT, reaps children. */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = stop;
    sigaction(SIGINT, &sa, 0);
    sigaction(SIGTERM, &sa, 0);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, 0);
    for (;;)
        pause();
}
"#;

/// Bump when the image's layout changes, to invalidate cached archives.
const FORMAT: &str = "mig-e2e pause image v1";

/// Why the pause image cannot be built here (no C compiler, or no static libc), if so.
pub fn missing_prerequisite() -> Option<String> {
    if crate::prereq::find_on_path("gcc").is_none() {
        return Some("`gcc` is not on PATH (needed to build the pause image)".into());
    }
    None
}

/// Builds (or takes from the cache) the pause image [`PAUSE_IMAGE`].
pub fn pause_image() -> Result<TestImage> {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());

    let mut key = Sha256::new();
    key.update(FORMAT);
    key.update(PAUSE_IMAGE);
    key.update(PAUSE_C);
    let key: String = key
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let archive = image_cache_dir().join(format!("mig-pause-{key}.tar"));
    if !archive.exists() {
        let binary = compile_pause()?;
        let mut layer = Tar::new();
        layer.file("pause", 0o755, &binary)?;
        let bytes = layout(PAUSE_IMAGE, &["/pause"], &layer.finish())?;
        fs::create_dir_all(image_cache_dir())?;
        let partial = archive.with_extension(format!("partial.{}", std::process::id()));
        fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
        fs::rename(&partial, &archive)?;
    }
    Ok(TestImage {
        name: PAUSE_IMAGE.to_string(),
        archive,
    })
}

/// `gcc -static -Os -s pause.c`: the binary's bytes.
fn compile_pause() -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("pause.c");
    let binary = dir.path().join("pause");
    fs::write(&source, PAUSE_C)?;
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-Os", "-s", "-o"])
        .arg(&binary)
        .arg(&source);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {} (a static libc comes with libc6-dev)",
            describe(&cmd),
            status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::read(&binary).with_context(|| format!("reading {}", binary.display()))
}
