//! The loopback interface of a restored container with a network namespace of its own.
//!
//! runc brings `lo` up when it creates a container in a new network namespace, but a CRIU
//! restore through runc does not: runc always checkpoints with the network namespace "empty"
//! (`--empty-ns network`: runc does not manage network devices), so CRIU makes a new namespace
//! and restores the sockets into it, and nothing brings its `lo` up. The process comes back
//! with its listening and loopback sockets in a namespace where 127.0.0.1 is unreachable: a
//! broker or database whose clients (or sidecar threads) use localhost is cut off.
//!
//! The shim fixes that as runc would for a new container: before `runc restore` it adds a
//! `createRuntime` hook to the bundle's spec, which runc runs when CRIU has set up the
//! namespaces and before the process resumes (CRIU's `setup-namespaces` notification), with
//! the restored init's pid in the OCI state on stdin. The hook is this binary again, with
//! [`HOOK_ARG`]: it enters that process's network namespace and sets `lo` up (the kernel gives
//! it 127.0.0.1 and ::1). Containers that join a namespace by path (a pod's, the host's) are
//! left alone: their network is someone else's.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

use oci_spec::runtime::{HookBuilder, LinuxNamespaceType, Spec};

/// The argument that makes the shim binary run as the restore hook.
pub const HOOK_ARG: &str = "loopback-up";
/// Seconds runc gives the hook.
const HOOK_TIMEOUT_SECS: i64 = 10;

/// Whether the container gets a network namespace of its own (one without a path).
pub fn has_own_network_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
        })
}

/// Adds the hook that brings `lo` up to `spec` when the container has a network namespace of
/// its own (see the module doc), running `shim` (this binary). Whether it added one; adding
/// it twice is harmless, but it is added once.
pub fn add_restore_hook(spec: &mut Spec, shim: &Path) -> Result<bool, String> {
    if !has_own_network_namespace(spec) {
        return Ok(false);
    }
    let args = vec![
        shim.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "containerd-shim-mig-v2".into()),
        HOOK_ARG.to_string(),
    ];
    let hook = HookBuilder::default()
        .path(shim)
        .args(args)
        .timeout(HOOK_TIMEOUT_SECS)
        .build()
        .map_err(|e| format!("build the loopback hook: {e}"))?;
    let mut hooks = spec.hooks().clone().unwrap_or_default();
    let mut create_runtime = hooks.create_runtime().clone().unwrap_or_default();
    if create_runtime.iter().any(|h| h == &hook) {
        return Ok(false);
    }
    create_runtime.push(hook);
    hooks.set_create_runtime(Some(create_runtime));
    spec.set_hooks(Some(hooks));
    Ok(true)
}

/// The hook itself: reads the OCI state from stdin, enters the network namespace of its `pid`
/// and sets `lo` up. Returns the process exit code; errors go to stderr, which runc puts in
/// its error, so a failed restore says why.
pub fn hook_main() -> i32 {
    match run_hook() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("containerd-shim-mig-v2 {HOOK_ARG}: {e}");
            1
        }
    }
}

fn run_hook() -> Result<(), String> {
    let mut state = String::new();
    std::io::stdin()
        .read_to_string(&mut state)
        .map_err(|e| format!("read the OCI state from stdin: {e}"))?;
    let pid = state_pid(&state)?;
    loopback_up_in(pid)
}

/// The `pid` of an OCI state document.
fn state_pid(state: &str) -> Result<u32, String> {
    let value: serde_json::Value = serde_json::from_str(state)
        .map_err(|e| format!("the OCI state on stdin is not JSON ({e}): {state:?}"))?;
    value["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("the OCI state on stdin has no pid: {state}"))
}

/// Sets `lo` up in the network namespace of process `pid` (this thread moves into it).
pub fn loopback_up_in(pid: u32) -> Result<(), String> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: setns with a namespace file descriptor we own; it only changes this thread's
    // network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "enter the network namespace of {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a plain socket, closed below; the ioctls read and write `req`, which lives on
    // this stack frame for both calls.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(format!(
                "open a socket in the network namespace of {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) != 0 {
            result = Err(format!(
                "read the flags of lo in the network namespace of {pid}: {}",
                std::io::Error::last_os_error()
            ));
        } else if req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) != 0 {
                result = Err(format!(
                    "set lo up in the network namespace of {pid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        libc::close(sock);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HooksBuilder;

    fn spec_with_network(path: Option<&str>) -> Spec {
        let mut value = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        if let Some(p) = path {
            let ns = if p.is_empty() {
                serde_json::json!({"type": "network"})
            } else {
                serde_json::json!({"type": "network", "path": p})
            };
            value["linux"]["namespaces"]
                .as_array_mut()
                .expect("array")
                .push(ns);
        }
        serde_json::from_value(value).expect("spec")
    }

    #[test]
    fn the_hook_goes_only_to_containers_with_their_own_network_namespace() {
        let shim = Path::new("/usr/local/bin/containerd-shim-mig-v2");
        let mut own = spec_with_network(Some(""));
        assert_eq!(add_restore_hook(&mut own, shim), Ok(true));
        let hooks = own.hooks().clone().expect("hooks");
        let hook = &hooks.create_runtime().clone().expect("createRuntime")[0];
        assert_eq!(hook.path(), shim);
        assert_eq!(
            hook.args().clone().expect("args"),
            vec!["containerd-shim-mig-v2".to_string(), HOOK_ARG.to_string()]
        );
        // Once only.
        assert_eq!(add_restore_hook(&mut own, shim), Ok(false));
        assert_eq!(
            own.hooks()
                .clone()
                .and_then(|h| h.create_runtime().clone())
                .map(|v| v.len()),
            Some(1)
        );
        // A pod's (or any joined) namespace, and the host's, are not ours to touch.
        for mut spec in [
            spec_with_network(Some("/var/run/netns/cni-1234")),
            spec_with_network(None),
        ] {
            assert_eq!(add_restore_hook(&mut spec, shim), Ok(false));
            assert!(spec.hooks().is_none());
        }
    }

    #[test]
    fn existing_hooks_are_kept() {
        let mut spec = spec_with_network(Some(""));
        let theirs = HookBuilder::default()
            .path("/usr/bin/true")
            .build()
            .expect("hook");
        spec.set_hooks(Some(
            HooksBuilder::default()
                .create_runtime(vec![theirs.clone()])
                .poststop(vec![theirs.clone()])
                .build()
                .expect("hooks"),
        ));
        assert_eq!(add_restore_hook(&mut spec, Path::new("/shim")), Ok(true));
        let hooks = spec.hooks().clone().expect("hooks");
        let create_runtime = hooks.create_runtime().clone().expect("createRuntime");
        assert_eq!(create_runtime.len(), 2);
        assert_eq!(create_runtime[0], theirs);
        assert_eq!(hooks.poststop().clone().expect("poststop"), vec![theirs]);
    }

    #[test]
    fn the_pid_comes_from_the_oci_state() {
        let state =
            r#"{"ociVersion":"1.0.2","id":"c","status":"creating","pid":4242,"bundle":"/b"}"#;
        assert_eq!(state_pid(state), Ok(4242));
        assert!(state_pid(r#"{"id":"c"}"#).unwrap_err().contains("no pid"));
        assert!(state_pid("not json").unwrap_err().contains("not JSON"));
    }
}
