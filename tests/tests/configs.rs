//! The deployment files under `configs/` are valid: Kubernetes manifests against the Kubernetes
//! schemas (strict), the containerd fragment as TOML and as containerd loads it, the files
//! consistent with each other and with the shim's options, and the node installer on a scratch
//! host. `configs/validate.sh` does the work; these tests run it the way a user or CI does.
//!
//! The validator (PyPI `kubernetes-validate`) installs itself on first use. When it cannot be
//! installed (no python3 venv, no access to PyPI) the script exits 77 and the tests print
//! `SKIP configs: <reason>`, or fail when `MIG_E2E_REQUIRED=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mig_e2e::prereq::Skip;

/// validate.sh's exit status when the validator cannot be installed.
const VALIDATOR_UNAVAILABLE: i32 = 77;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `configs/validate.sh ARGS`; `None` once the skip is reported (validator unavailable).
fn validate(test: &str, args: &[&Path]) -> Option<Output> {
    let script = configs_dir().join("validate.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    if out.status.code() == Some(VALIDATOR_UNAVAILABLE) {
        let stderr = text(&out.stderr);
        let reason = stderr
            .lines()
            .find_map(|l| l.strip_prefix("SKIP configs: "))
            .unwrap_or("configs/validate.sh could not install its validator")
            .to_owned();
        Skip { reason }.report(test);
        return None;
    }
    Some(out)
}

#[test]
fn configs() {
    let Some(out) = validate("configs", &[]) else {
        return;
    };
    assert!(
        out.status.success(),
        "configs/validate.sh failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    for step in [
        "manifests valid",
        "consistent:",
        "install-node.sh:",
        "all configs valid",
    ] {
        assert!(
            stdout.contains(step),
            "validate.sh skipped a step ({step}):\n{stdout}"
        );
    }
}

/// Guards the validator itself: strict mode must reject a field it does not know, which is how a
/// typo in a manifest shows (the API server would drop it silently, or refuse it with
/// `kubectl apply --validate=strict`).
#[test]
fn a_misspelt_field_fails_validation() {
    let example = configs_dir().join("examples/redis.yaml");
    let manifest = std::fs::read_to_string(&example).unwrap();
    assert!(manifest.contains("runtimeClassName: mig"), "{manifest}");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("redis.yaml");
    std::fs::write(
        &broken,
        manifest.replace("runtimeClassName", "runtimeClasName"),
    )
    .unwrap();

    let Some(out) = validate("a_misspelt_field_fails_validation", &[&example]) else {
        return;
    };
    assert!(
        out.status.success(),
        "the unmodified example must pass: {}",
        text(&out.stderr)
    );
    let out = validate("a_misspelt_field_fails_validation", &[&broken]).unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("'runtimeClasName' was unexpected"),
        "{stderr}"
    );
}

/// A kind or apiVersion the schemas do not know is an error, not the validator's mere warning.
#[test]
fn an_unknown_api_version_fails_validation() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("runtimeclass.yaml");
    let manifest = std::fs::read_to_string(configs_dir().join("runtimeclass.yaml")).unwrap();
    std::fs::write(
        &broken,
        manifest.replace("node.k8s.io/v1", "node.k8s.io/v1alpha9"),
    )
    .unwrap();
    let Some(out) = validate("an_unknown_api_version_fails_validation", &[&broken]) else {
        return;
    };
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("node.k8s.io/v1alpha9"), "{stderr}");
}
