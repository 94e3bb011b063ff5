//! Harness for the end-to-end tests of kubernetes-mig: private containerd instances ([`Node`]),
//! locally built images ([`TestImage`]), `ctr` with deadlines, and checks for what a test
//! leaves behind (mounts, processes).
//!
//! Tests run as root against real containerd, runc and CRIU. When something is missing they
//! skip with a reason, unless `MIG_E2E_REQUIRED=1` ([`prereq`]).
//!
//! Environment:
//! - `MIG_E2E_RUNTIME`: runtime type under test (default `io.containerd.mig.v2`; set
//!   `io.containerd.runc.v2` to check the tests themselves against containerd's own shim).
//! - `MIG_SHIM_DIR`: directory holding `containerd-shim-mig-v2` (default: the workspace's
//!   `target/release`, else `target/debug`).
//! - `MIG_E2E_REQUIRED=1`: a missing prerequisite fails instead of skipping.
//! - `MIG_E2E_KEEP=1`: keep each node's directory (config, log) after the test.

pub mod command;
pub mod cri;
pub mod dmtcp;
pub mod image;
pub mod leftovers;
pub mod node;
pub mod pause;
pub mod prereq;
pub mod shim_test;
mod tar;

use std::path::PathBuf;

pub use image::{ImageFile, TestImage};
pub use node::{Node, NodeOptions, unique_namespace};
pub use prereq::{Skip, note_skip, require_root_and_tools};
pub use shim_test::ShimTest;

/// Our runtime type; containerd runs it as `containerd-shim-mig-v2`.
pub const MIG_RUNTIME: &str = "io.containerd.mig.v2";
/// containerd's own runc shim, the reference the tests are checked against.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// The runtime type under test: `MIG_E2E_RUNTIME`, or [`MIG_RUNTIME`].
pub fn runtime() -> String {
    std::env::var("MIG_E2E_RUNTIME")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| MIG_RUNTIME.to_string())
}

/// The binary containerd looks for on PATH for a runtime type:
/// `io.containerd.mig.v2` -> `containerd-shim-mig-v2`.
pub fn shim_binary_name(runtime: &str) -> Option<String> {
    let rest = runtime.strip_prefix("io.containerd.")?;
    let (name, version) = rest.rsplit_once('.')?;
    if name.is_empty() || !version.starts_with('v') || name.contains('/') {
        return None;
    }
    Some(format!(
        "containerd-shim-{}-{version}",
        name.replace('.', "-")
    ))
}

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where `containerd-shim-mig-v2` is taken from: `MIG_SHIM_DIR`, else `target/release` if it
/// holds the binary, else `target/debug`.
pub fn shim_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MIG_SHIM_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"));
    let release = target.join("release");
    if release.join("containerd-shim-mig-v2").is_file() {
        release
    } else {
        target.join("debug")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_binary_names() {
        assert_eq!(
            shim_binary_name("io.containerd.mig.v2").as_deref(),
            Some("containerd-shim-mig-v2")
        );
        assert_eq!(
            shim_binary_name("io.containerd.runc.v2").as_deref(),
            Some("containerd-shim-runc-v2")
        );
        assert_eq!(shim_binary_name("runc"), None);
        assert_eq!(shim_binary_name("io.containerd.mig"), None);
    }
}
