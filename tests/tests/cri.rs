//! The kubelet's side of a migration, through the CRI: a pod of a Deployment runs on node A
//! with RuntimeClass handler `mig`, is stopped there (the shim checkpoints it on SIGTERM), its
//! checkpoint is moved to node B, and a new pod of the same Deployment resumes it on node B.
//!
//! No kubelet or API server can run here; the test speaks the CRI to each node's containerd
//! exactly as the kubelet would (`RunPodSandbox(runtime_handler = "mig")`, `CreateContainer`,
//! `StartContainer`, `StopContainer`...). Pods use host networking, so no CNI is needed, and a
//! locally built pause image as sandbox image.
//!
//! Times of the stop-with-checkpoint and of the create+start-with-restore are printed on stderr
//! (`--nocapture` shows them).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mig_e2e::cri::{
    self, ContainerConfig, ContainerMetadata, CriClient, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, container_state, namespace_mode,
    sandbox_state,
};
use mig_e2e::image::BUSYBOX_IMAGE;
use mig_e2e::leftovers::{self, Process};
use mig_e2e::prereq::{find_on_path, require_root_and_tools};
use mig_e2e::{Node, NodeOptions, Skip, TestImage, pause};

/// The RuntimeClass handler the harness configures for our runtime.
const HANDLER: &str = "mig";
const NAMESPACE: &str = "default";
/// Pods of one Deployment (`counter`, ReplicaSet hash `7d4b9c5f6d`): the shim strips the
/// suffixes, so both map to workload `counter`. The suffixes are drawn from Kubernetes'
/// alphabet for generated names (no vowels, no 0, 1, 3), as the shim expects.
const POD_A: &str = "counter-7d4b9c5f6d-x2x9q";
const POD_B: &str = "counter-7d4b9c5f6d-m8k2z";
const CONTAINER: &str = "counter";
/// `k8s_<namespace>_<workload>_<container>`: where the checkpoint goes in a node's store.
const KEY: &str = "k8s_default_counter_counter";
/// Counts ten times a second into the root filesystem. PID 1 ignores signals it has no
/// handler for: the trap makes a plain SIGTERM stop it (so a stop that does not checkpoint
/// ends at once instead of waiting for the SIGKILL).
const COUNTER: &str =
    r#"trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done"#;
/// How far the counter gets on node A: far enough that a restart from 1 cannot pass for a
/// resume.
const COUNT_BEFORE: u64 = 15;
/// StopContainer's grace period (SIGTERM, then SIGKILL after it).
const GRACE: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(20);

/// One node with the CRI: containerd, a CRI client and the shim's state dir.
struct CriNode {
    cri: CriClient,
    state: PathBuf,
    node: Node,
}

impl CriNode {
    fn start(name: &str, state: &Path, images: &[&TestImage]) -> Result<Self> {
        fs::DirBuilder::new().mode(0o700).create(state)?;
        let env = BTreeMap::from([(
            "MIG_STATE_DIR".to_string(),
            state.to_string_lossy().into_owned(),
        )]);
        let node = Node::start_with(
            name,
            NodeOptions {
                cri: true,
                env,
                extra_config: cri::node_config(pause::PAUSE_IMAGE),
                ..Default::default()
            },
        )?;
        for image in images {
            cri::import_for_cri(&node, image)?;
        }
        let cri = CriClient::connect(node.address())?;
        for image in images {
            cri.wait_for_image(&image.name, WAIT)?;
        }
        Ok(Self {
            cri,
            state: state.to_path_buf(),
            node,
        })
    }

    /// The bundle containerd made for task `id` in the CRI's namespace.
    fn bundle(&self, id: &str) -> PathBuf {
        self.node
            .state()
            .join("io.containerd.runtime.v2.task")
            .join(cri::CRI_NAMESPACE)
            .join(id)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.state.join("checkpoints").join(KEY)
    }

    /// The counter's value, read with ExecSync.
    fn count(&self, container: &str) -> Result<u64> {
        let out = self.cri.exec_ok(container, &["cat", "/count"])?;
        out.trim()
            .parse()
            .with_context(|| format!("/count holds {out:?}"))
    }

    /// Waits until the counter reaches `at_least`; returns the value read.
    fn wait_for_count(&self, container: &str, at_least: u64) -> Result<u64> {
        let deadline = Instant::now() + WAIT;
        loop {
            // /count is rewritten ten times a second: a read may catch it empty.
            if let Ok(n) = self.count(container)
                && n >= at_least
            {
                return Ok(n);
            }
            if Instant::now() > deadline {
                bail!(
                    "the counter of {container} on node {} did not reach {at_least} within {WAIT:?} (last read: {:?})",
                    self.node.name(),
                    self.count(container)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// RunPodSandbox + CreateContainer + StartContainer: (sandbox id, container id).
    fn run_pod(&self, pod: &PodSandboxConfig) -> Result<(String, String)> {
        let sandbox = self.cri.run_pod_sandbox(pod, HANDLER)?;
        let status = self
            .cri
            .pod_sandbox_status(&sandbox)?
            .status
            .context("PodSandboxStatus carries no status")?;
        if status.state != sandbox_state::READY {
            bail!("sandbox {sandbox} is not ready: {status:?}");
        }
        let container = self
            .cri
            .create_container(&sandbox, &counter_config(), pod)?;
        self.cri.start_container(&container)?;
        Ok((sandbox, container))
    }

    /// StopPodSandbox + RemovePodSandbox (which removes the pod's containers too).
    fn remove_pod(&self, sandbox: &str) -> Result<()> {
        self.cri.stop_pod_sandbox(sandbox)?;
        self.cri.remove_pod_sandbox(sandbox)?;
        let left = self.cri.list_containers(sandbox)?;
        if !left.is_empty() {
            bail!("containers left after RemovePodSandbox: {left:?}");
        }
        Ok(())
    }
}

/// Why this test cannot run here, if so.
fn prerequisites() -> Option<Skip> {
    require_root_and_tools()
        .or_else(|| {
            find_on_path("criu").is_none().then(|| Skip {
                reason: "`criu` is not on PATH (run scripts/setup.sh)".into(),
            })
        })
        .or_else(|| pause::missing_prerequisite().map(|reason| Skip { reason }))
}

/// The pod as the kubelet describes a host-network pod of the `counter` Deployment.
fn pod_config(name: &str, uid: &str, logs: &Path, cgroup_parent: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: NAMESPACE.into(),
            attempt: 0,
        }),
        // A host-network pod has no UTS namespace of its own: runc refuses to set a hostname.
        hostname: String::new(),
        log_directory: logs.to_string_lossy().into_owned(),
        labels: HashMap::from([
            ("app".into(), "counter".into()),
            ("io.kubernetes.pod.name".into(), name.into()),
            ("io.kubernetes.pod.namespace".into(), NAMESPACE.into()),
            ("io.kubernetes.pod.uid".into(), uid.into()),
            ("pod-template-hash".into(), "7d4b9c5f6d".into()),
        ]),
        annotations: HashMap::from([
            ("mig.dev/checkpoint-on-stop".into(), "true".into()),
            ("kubernetes.io/config.source".into(), "api".into()),
        ]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// What the kubelet sets for a `hostNetwork: true` pod without a shared process namespace.
fn host_network() -> NamespaceOption {
    NamespaceOption {
        network: namespace_mode::NODE,
        pid: namespace_mode::CONTAINER,
        ipc: namespace_mode::POD,
        ..Default::default()
    }
}

fn counter_config() -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: CONTAINER.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), COUNTER.into()],
        log_path: format!("{CONTAINER}/0.log"),
        labels: HashMap::from([("io.kubernetes.container.name".into(), CONTAINER.into())]),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// The `pid` in the JSON of a verbose status's `info`.
fn info_pid(info: &HashMap<String, String>) -> Option<i32> {
    let json: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    json["pid"].as_i64().map(|p| p as i32)
}

/// Checks that one shim serves the whole pod (pause and app) and that the pause container
/// passed through untouched while the app container got the shim's own root filesystem.
fn check_one_shim_and_passthrough(a: &CriNode, sandbox: &str, container: &str) -> Result<()> {
    let shims = a.node.shims();
    let [shim] = &shims[..] else {
        bail!(
            "expected one shim for the pod, found {}: {shims:?}",
            shims.len()
        );
    };
    if !shim.has_arg_pair("-id", sandbox) {
        bail!("the shim is not the pod's (-id {sandbox}): {shim}");
    }
    let pause_pid = info_pid(&a.cri.pod_sandbox_status(sandbox)?.info)
        .context("PodSandboxStatus(verbose) carries no pid")?;
    let app_pid = info_pid(&a.cri.container_status(container)?.info)
        .context("ContainerStatus(verbose) carries no pid")?;
    let served: Vec<Process> =
        leftovers::with_descendants(&leftovers::processes(), vec![shim.clone()]);
    for (what, pid) in [("pause", pause_pid), ("app", app_pid)] {
        if !served.iter().any(|p| p.pid == pid) {
            bail!("the {what} process {pid} does not descend from the pod's shim {shim}");
        }
    }

    let record = "mig-rootfs.json";
    let pause_bundle = a.bundle(sandbox);
    if !pause_bundle.join("config.json").is_file() {
        bail!("no bundle for the sandbox at {}", pause_bundle.display());
    }
    if pause_bundle.join(record).exists() {
        bail!(
            "the pause container's bundle {} holds {record}: its root was rewritten",
            pause_bundle.display()
        );
    }
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(pause_bundle.join("config.json"))?)?;
    if spec["process"]["args"] != serde_json::json!(["/pause"]) {
        bail!(
            "the pause container's process was rewritten: {}",
            spec["process"]
        );
    }
    // The contrast that makes the check above mean something: the app container's root is
    // the shim's.
    if !a.bundle(container).join(record).is_file() {
        bail!(
            "the app container's bundle {} holds no {record}: is the shim handling it?",
            a.bundle(container).display()
        );
    }
    Ok(())
}

#[test]
fn a_deployment_pod_migrates_between_nodes_through_the_cri() {
    let test = "a_deployment_pod_migrates_between_nodes_through_the_cri";
    if let Some(skip) = prerequisites() {
        skip.report(test);
        return;
    }
    let fail = |e: anyhow::Error| -> ! { panic!("{test}: {e:#}") };
    let pause = pause::pause_image()
        .context("building the pause image")
        .unwrap_or_else(|e| fail(e));
    let busybox = TestImage::busybox()
        .context("building the busybox image")
        .unwrap_or_else(|e| fail(e));
    let dirs = tempfile::Builder::new()
        .prefix("mig-cri-")
        .tempdir()
        .unwrap_or_else(|e| fail(e.into()));
    let images = [&pause, &busybox];
    // B first: dropped first. A failure panics while both nodes live, so that their teardown
    // prints containerd's log.
    let b =
        CriNode::start("cri-b", &dirs.path().join("state-b"), &images).unwrap_or_else(|e| fail(e));
    let a =
        CriNode::start("cri-a", &dirs.path().join("state-a"), &images).unwrap_or_else(|e| fail(e));
    if let Err(e) = migrate(&a, &b, &dirs.path().join("logs")) {
        fail(e);
    }
}

fn migrate(a: &CriNode, b: &CriNode, logs: &Path) -> Result<()> {
    let version = a.cri.version()?;
    if version.runtime_name != "containerd" {
        bail!("the CRI is served by {version:?}, not containerd");
    }

    // Node A: the pod runs and counts.
    let uid = format!("{:08x}-a000-4000-8000-{:012x}", std::process::id(), 1);
    let pod_a = pod_config(
        POD_A,
        &uid,
        &logs.join(&uid),
        &format!("/{}", a.node.namespace()),
    );
    let (sandbox_a, container_a) = a.run_pod(&pod_a)?;
    let status = a.cri.status_of(&container_a)?;
    if status.state != container_state::RUNNING {
        bail!("container {container_a} on A is not running: {status:?}");
    }
    a.wait_for_count(&container_a, COUNT_BEFORE)?;
    let token = format!("written on node A by {}", std::process::id());
    a.cri.exec_ok(
        &container_a,
        &["sh", "-c", &format!("echo '{token}' > /migrated-file")],
    )?;
    check_one_shim_and_passthrough(a, &sandbox_a, &container_a)?;

    // StopContainer: the shim checkpoints on SIGTERM, into A's store.
    let last_seen = a.count(&container_a)?;
    let started = Instant::now();
    a.cri.stop_container(&container_a, GRACE)?;
    let stop_took = started.elapsed();
    let status = a.cri.status_of(&container_a)?;
    if status.state != container_state::EXITED {
        bail!("container {container_a} on A did not exit: {status:?}");
    }
    let checkpoint = a.checkpoint_dir();
    if !checkpoint.is_dir() {
        bail!(
            "StopContainer ({stop_took:?}) left no checkpoint at {} (store holds {:?})",
            checkpoint.display(),
            list(&a.state.join("checkpoints"))
        );
    }
    if stop_took >= GRACE {
        bail!("StopContainer took {stop_took:?}: the container waited for SIGKILL");
    }
    a.remove_pod(&sandbox_a)?;
    a.node.wait_until_clean(WAIT)?;

    // The checkpoint travels to node B's store (what the node agents do).
    let store_b = b.state.join("checkpoints");
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&store_b)?;
    fs::rename(&checkpoint, store_b.join(KEY))?;

    // Node B: a new pod of the Deployment resumes the counter.
    let uid = format!("{:08x}-b000-4000-8000-{:012x}", std::process::id(), 2);
    let pod_b = pod_config(
        POD_B,
        &uid,
        &logs.join(&uid),
        &format!("/{}", b.node.namespace()),
    );
    let started = Instant::now();
    let (sandbox_b, container_b) = b.run_pod(&pod_b)?;
    let restore_took = started.elapsed();
    let status = b.cri.status_of(&container_b)?;
    if status.state != container_state::RUNNING {
        bail!("container {container_b} on B is not running: {status:?}");
    }
    let resumed = b.count(&container_b)?;
    if resumed < last_seen {
        bail!("the counter restarted on B: {resumed} < {last_seen} last seen on A");
    }
    b.wait_for_count(&container_b, resumed + 3)?;
    let file = b.cri.exec_ok(&container_b, &["cat", "/migrated-file"])?;
    if file.trim() != token {
        bail!("/migrated-file on B holds {file:?}, expected {token:?}");
    }
    if b.checkpoint_dir().exists() {
        bail!(
            "the checkpoint at {} was not consumed by the restore",
            b.checkpoint_dir().display()
        );
    }
    eprintln!(
        "TIMING cri: StopContainer with checkpoint {stop_took:?}; RunPodSandbox+CreateContainer+StartContainer with restore {restore_took:?} (counter {last_seen} on A -> {resumed} on B)"
    );

    // B's pod has the Deployment's annotation too: its stop checkpoints again, ready for the
    // next hop. Then nothing may be left on either node.
    b.cri.stop_container(&container_b, GRACE)?;
    if !b.checkpoint_dir().is_dir() {
        bail!("stopping the resumed container left no checkpoint on B");
    }
    b.remove_pod(&sandbox_b)?;
    b.node.wait_until_clean(WAIT)?;
    for state in [&a.state, &b.state] {
        let mounts = leftovers::mounts_under(state);
        if !mounts.is_empty() {
            bail!("mounts left under {}: {mounts:?}", state.display());
        }
    }
    Ok(())
}

fn list(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
