//! End to end, as root, against real containerd: the containerd seam, and whole migrations
//! between two private containerd nodes whose agents live in network namespaces made here
//! (10.231.0.1 and 10.231.0.2 on a veth pair; nothing else is ever a target).
//!
//! Skips with one line when prerequisites are missing; `MIG_E2E_REQUIRED=1` makes that a
//! failure.

#[path = "support/pki.rs"]
mod pki;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mig_e2e::node::unique_namespace;
use mig_e2e::{MIG_RUNTIME, Node, NodeOptions, RUNC_RUNTIME, TestImage, require_root_and_tools};
use mig_server::containerd::{Containerd, Ctr, Grpc, TaskStatus, WORKLOAD_LABEL};
use serde_json::{Value, json};

const TOKEN: &str = "e2e-token-5b0c1d2e3f";

fn skip(test: &str, reason: &str) {
    mig_e2e::Skip {
        reason: reason.to_string(),
    }
    .report(test);
}

fn prerequisites(test: &str) -> bool {
    if let Some(s) = require_root_and_tools() {
        s.report(test);
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_seam_against_real_containerd() {
    if !prerequisites("containerd_seam_against_real_containerd") {
        return;
    }
    let node = Node::start("seam").expect("node");
    let image = TestImage::busybox().expect("image");
    node.import(&image).expect("import");
    let ns = node.namespace().to_string();
    let label = format!("{WORKLOAD_LABEL}=counter");
    node.ctr_ok(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNC_RUNTIME,
        "--label",
        &label,
        "--env",
        "A=b",
        &image.name,
        "c1",
        "sh",
        "-c",
        "while :; do sleep 1; done",
    ])
    .expect("run");
    // The agent's implementation, built as main.rs builds it.
    let api = Grpc::new(Ctr::new(node.address(), Duration::from_secs(60)));
    let ids = api
        .list_by_label(&ns, WORKLOAD_LABEL, "counter")
        .await
        .expect("list");
    assert_eq!(ids, vec!["c1".to_string()]);
    assert!(
        api.list_by_label(&ns, WORKLOAD_LABEL, "other")
            .await
            .expect("list")
            .is_empty()
    );
    let mut info = api.info(&ns, "c1").await.expect("info");
    assert_eq!(info.image, image.name);
    assert_eq!(info.runtime, RUNC_RUNTIME);
    assert!(matches!(
        api.info(&ns, "nope").await,
        Err(mig_server::containerd::ContainerdError::NotFound { .. })
    ));
    assert_eq!(
        api.task_status(&ns, "c1").await.expect("status"),
        Some(TaskStatus::Running)
    );
    // Recreate it under another id from its record, as a destination does.
    info.id = "c2".into();
    api.create(&info, RUNC_RUNTIME).await.expect("create");
    api.start_task(&ns, "c2").await.expect("start");
    assert_eq!(
        api.task_status(&ns, "c2").await.expect("status"),
        Some(TaskStatus::Running)
    );
    let c2 = api.info(&ns, "c2").await.expect("info");
    assert_eq!(
        c2.labels.get(WORKLOAD_LABEL).map(String::as_str),
        Some("counter")
    );
    assert_eq!(c2.spec["process"]["args"], info.spec["process"]["args"]);
    assert!(
        c2.spec["process"]["env"]
            .as_array()
            .expect("env")
            .contains(&json!("A=b")),
        "{}",
        c2.spec["process"]["env"]
    );
    for id in ["c1", "c2"] {
        api.kill(&ns, id, "SIGKILL").await.expect("kill");
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.task_status(&ns, id).await.expect("status") != Some(TaskStatus::Stopped) {
            assert!(Instant::now() < deadline, "{id} did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        api.delete_task(&ns, id, false).await.expect("delete task");
        api.delete_container(&ns, id)
            .await
            .expect("delete container");
    }
    node.stop().expect("stop");
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct Net {
    a: String,
    b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new() -> Self {
        // Unique per process and call: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = (std::process::id() % 10_000) * 10 + NEXT.fetch_add(1, Ordering::SeqCst) % 10;
        let net = Net {
            a: format!("miga-{tag}"),
            b: format!("migb-{tag}"),
        };
        let (va, vb) = (format!("mva{tag}"), format!("mvb{tag}"));
        ip(&["netns", "add", &net.a]);
        ip(&["netns", "add", &net.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &net.a]);
        ip(&["link", "set", &vb, "netns", &net.b]);
        for (ns, dev, addr) in [
            (&net.a, &va, "10.231.0.1/24"),
            (&net.b, &vb, "10.231.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A `mig-server serve` inside a network namespace; killed on drop.
struct Agent(Child);

impl Agent {
    /// Runs the agent itself (not `ip netns exec`, which may fork) in `netns`, so that the pid
    /// the test kills is the agent's.
    fn start(netns: &str, args: &[&str], log: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log).expect("log");
        let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).expect("netns");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mig-server"));
        cmd.arg("serve")
            .args(args)
            .env("MIG_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let fd = ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; `ns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn mig-server");
        drop(ns);
        Agent(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The controller (node01's server) in plain HTTP.
const PLAIN_API: &str = "http://10.231.0.1:7070";

/// HTTP to the plain controller through curl inside `netns`: (status, body).
fn http(netns: &str, method: &str, path: &str, body: Option<&Value>, token: bool) -> (u16, Value) {
    http_at(netns, PLAIN_API, None, method, path, body, token)
}

/// HTTP through curl inside `netns` to `base` (trusting `ca` for https): (status, body).
fn http_at(
    netns: &str,
    base: &str,
    ca: Option<&Path>,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: bool,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        "curl",
        "-s",
        "-m",
        "30",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    if token {
        cmd.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    }
    if let Some(b) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let out = cmd.arg(&url).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn wait_terminal(netns: &str, id: &str) -> Value {
    wait_terminal_at(netns, PLAIN_API, None, id)
}

fn wait_terminal_at(netns: &str, base: &str, ca: Option<&Path>, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, m) = http_at(
            netns,
            base,
            ca,
            "GET",
            &format!("/migrations/{id}"),
            None,
            false,
        );
        if ["done", "failed", "rolled_back"].contains(&m["phase"].as_str().unwrap_or("")) {
            return m;
        }
        assert!(Instant::now() < deadline, "migration stuck: {m}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP proxy in network namespace `netns` from `listen` to `upstream` that sabotages the
/// checkpoint stream (the `/agent/v1/receive` request; other requests, such as the `prepare`
/// before it on the same kept-alive connection, pass untouched) at its byte `at`: flips it, or
/// (with `victim`) kills the destination agent and closes the connection.
fn proxy(
    netns: &str,
    listen: &'static str,
    upstream: &'static str,
    at: usize,
    victim: Option<u32>,
) {
    let path = PathBuf::from(format!("/var/run/netns/{netns}"));
    let ready = Arc::new(AtomicBool::new(false));
    let ready2 = ready.clone();
    thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns on this thread only; the fd is valid for the call.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let listener = TcpListener::bind(listen).expect("bind proxy");
        ready2.store(true, Ordering::SeqCst);
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let (mut c_read, mut s_write) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut s_read, mut c_write) = (server, client);
            thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
            });
            thread::spawn(move || {
                const MARK: &[u8] = b"POST /agent/v1/receive/";
                let mut seen = 0usize;
                // Absolute offset of the byte to sabotage, once the stream's request began.
                let mut target: Option<usize> = None;
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if target.is_none()
                        && let Some(i) = buf[..n].windows(MARK.len()).position(|w| w == MARK)
                    {
                        target = Some(seen + i + at);
                    }
                    if let Some(at) = target.filter(|&t| seen <= t && t < seen + n) {
                        if let Some(pid) = victim {
                            // SAFETY: plain kill(2) of the agent this test started.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                            let _ = c_read.shutdown(std::net::Shutdown::Both);
                            let _ = s_write.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        buf[at - seen] ^= 0x40;
                    }
                    seen += n;
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    while !ready.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
}

/// The counter's value, read from its file inside the container (retried: an exec can race
/// with a task that has just been restored).
fn count(node: &Node, id: &str) -> u64 {
    let mut last = String::new();
    for _ in 0..20 {
        let exec_id = format!("r{}", rand_suffix());
        match node.ctr_ok(&["tasks", "exec", "--exec-id", &exec_id, id, "cat", "/count"]) {
            Ok(s) => match s.trim().parse() {
                Ok(n) => return n,
                Err(e) => last = format!("{s:?}: {e}"),
            },
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(250));
    }
    panic!("cannot read the counter of {id} on {}: {last}", node.name());
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Two containerd nodes sharing a namespace, each with its state dir, and their agents in two
/// network namespaces: node01 (10.231.0.1, controller too) and node02 (10.231.0.2), both
/// registered. Dropped in field order: agents, network, nodes, then the work dir.
struct Cluster {
    agent_a: Agent,
    agent_b: Agent,
    net: Net,
    b: Node,
    a: Node,
    state_a: PathBuf,
    state_b: PathBuf,
    a_args: Vec<String>,
    b_args: Vec<String>,
    /// The controller's base URL, and the CA to trust when it is https.
    api: String,
    ca: Option<PathBuf>,
    work: tempfile::TempDir,
}

impl Drop for Cluster {
    /// The nodes' checkpoint stores in memory are outside the work dir (on /dev/shm).
    fn drop(&mut self) {
        for state in [&self.state_a, &self.state_b] {
            if let Some(dir) = mig_checkpoint::room::memory_dir("", state) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

impl Cluster {
    /// Starts it, with `env` added to both nodes' (and so their shims') environment and
    /// `image` imported on both.
    fn start(env: &[(&str, &str)], image: &TestImage) -> Self {
        Self::start_with(env, image, false)
    }

    /// As [`Cluster::start`]; with `tls`, both servers serve TLS with certificates of a CA
    /// made for the test (node01 for 10.231.0.1, node02 for 10.231.0.2), and trust only it.
    fn start_with(env: &[(&str, &str)], image: &TestImage, tls: bool) -> Self {
        let work = tempfile::tempdir().expect("tmp");
        let ns = unique_namespace("mig");
        let node = |name: &str, state: &Path| {
            let mut vars: BTreeMap<String, String> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vars.insert("MIG_STATE_DIR".into(), state.display().to_string());
            Node::start_with(
                name,
                NodeOptions {
                    namespace: Some(ns.clone()),
                    owns_namespace: true,
                    env: vars,
                    ..Default::default()
                },
            )
            .expect("node")
        };
        let (state_a, state_b) = (work.path().join("state-a"), work.path().join("state-b"));
        let (a, b) = (node("node01", &state_a), node("node02", &state_b));
        a.import(image).expect("import");
        b.import(image).expect("import");
        let net = Net::new();
        // node02's TLS flags, when the cluster serves TLS (added below, with node01's).
        let mut b_args_tls: Vec<String> = Vec::new();
        let a_sock = a.address().display().to_string();
        let b_sock = b.address().display().to_string();
        let (sa, sb) = (state_a.display().to_string(), state_b.display().to_string());
        let a_args: Vec<String> = [
            "--role",
            "all",
            "--listen",
            "10.231.0.1:7070",
            "--node-name",
            "node01",
            "--containerd-address",
            &a_sock,
            "--namespace",
            &ns,
            "--state-dir",
            &sa,
            "--migration-timeout-secs",
            "120",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut a_args = a_args;
        let (api, ca, controller) = if tls {
            let ca = pki::TestCa::new(work.path(), "ca");
            for (args, name, ip) in [
                (&mut a_args, "node01", "10.231.0.1"),
                (&mut b_args_tls, "node02", "10.231.0.2"),
            ] {
                let (cert, key) = ca.issue(name, &[ip]);
                for (flag, file) in [
                    ("--tls-cert", &cert),
                    ("--tls-key", &key),
                    ("--tls-ca", &ca.cert),
                ] {
                    args.push(flag.into());
                    args.push(file.display().to_string());
                }
            }
            (
                "https://10.231.0.1:7070",
                Some(ca.cert),
                "https://10.231.0.1:7070",
            )
        } else {
            (PLAIN_API, None, PLAIN_API)
        };
        let agent_a = Agent::start(&net.a, &strs(&a_args), &work.path().join("agent-a.log"));
        let b_args: Vec<String> = [
            "--role",
            "node",
            "--listen",
            "10.231.0.2:7070",
            "--node-name",
            "node02",
            "--controller",
            controller,
            "--containerd-address",
            &b_sock,
            "--namespace",
            &ns,
            "--state-dir",
            &sb,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(b_args_tls)
        .collect();
        let agent_b = Agent::start(&net.b, &strs(&b_args), &work.path().join("agent-b.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_at(&net.a, api, ca.as_deref(), "GET", "/nodes", None, false)
            .1
            .as_array()
            .map_or(0, Vec::len)
            < 2
        {
            assert!(Instant::now() < deadline, "agents did not register");
            thread::sleep(Duration::from_millis(100));
        }
        Cluster {
            agent_a,
            agent_b,
            net,
            b,
            a,
            state_a,
            state_b,
            a_args,
            b_args,
            api: api.to_string(),
            ca,
            work,
        }
    }

    /// A request to the controller, over https when the cluster serves TLS.
    fn api(&self, method: &str, path: &str, body: Option<&Value>, token: bool) -> (u16, Value) {
        let ca = self.ca.as_deref();
        http_at(&self.net.a, &self.api, ca, method, path, body, token)
    }

    fn wait_terminal(&self, id: &str) -> Value {
        wait_terminal_at(&self.net.a, &self.api, self.ca.as_deref(), id)
    }

    /// Runs `args` from `image` on node01 with our runtime, no IO, as the container `counter`
    /// of the workload `counter` (the label `POST /migrate` resolves a deployment by).
    fn run_counter(&self, image: &TestImage, args: &[&str]) {
        self.run_workload(image, "counter", args);
    }

    /// Runs `args` (the image's command when empty) from `image` on node01 with our runtime,
    /// no IO, as the container `name` of the workload `name`.
    fn run_workload(&self, image: &TestImage, name: &str, args: &[&str]) {
        let label = format!("{WORKLOAD_LABEL}={name}");
        let mut cmd = vec![
            "run",
            "-d",
            "--null-io",
            "--runtime",
            MIG_RUNTIME,
            "--label",
            &label,
            &image.name,
            name,
        ];
        cmd.extend_from_slice(args);
        self.a
            .ctr_ok(&cmd)
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
    }

    /// Kills node01's server (controller and agent) and starts a new one on the same state
    /// dir; its log goes to `log` in the work dir.
    fn restart_agent_a(&mut self, log: &str) {
        self.agent_a.kill();
        self.agent_a = Agent::start(
            &self.net.a,
            &strs(&self.a_args),
            &self.work.path().join(log),
        );
    }

    /// Kills node02's agent and starts a new one; its log goes to `log` in the work dir.
    fn restart_agent_b(&mut self, log: &str) {
        self.agent_b.kill();
        self.agent_b = Agent::start(
            &self.net.b,
            &strs(&self.b_args),
            &self.work.path().join(log),
        );
    }
}

/// The counter of the CRIU migration tests: a number in /count, one more every 100 ms.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done";

/// The masked directories of restored container `id` on `node` (runc's maskedPaths), after
/// it was dumped and restored several times: still masked, read-only and empty. Those under
/// /proc are external mounts in CRIU's images (the shim binds an empty directory of the
/// container's own there, README "CriuNetworkLock"); `/sys/firmware` stays runc's tmpfs.
fn masked_dirs_stay_masked(node: &Node, id: &str) {
    let task = node
        .tasks()
        .expect("ctr task ls")
        .into_iter()
        .find(|t| t.id == id)
        .expect("the restored task");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", task.pid))
        .expect("mountinfo of the restored task");
    let mut checked = vec![("/sys/firmware", false)];
    if Path::new("/proc/acpi").is_dir() {
        checked.push(("/proc/acpi", true));
    } else {
        eprintln!("this kernel has no /proc/acpi: the external mask is not checked here");
    }
    for (path, external) in checked {
        let lines: Vec<&str> = mounts
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(path))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{path} is masked once in the restored container:\n{mounts}"
        );
        let fields: Vec<&str> = lines[0].split(' ').collect();
        assert!(
            fields[5].split(',').any(|o| o == "ro"),
            "the masked {path} is read-only: {}",
            lines[0]
        );
        assert_eq!(
            fields[3].ends_with("/masked-empty"),
            external,
            "{path} is {} the container's empty directory: {}",
            if external { "" } else { "not" },
            lines[0]
        );
        let inside = format!("/proc/{}/root{path}", task.pid);
        let entries = std::fs::read_dir(&inside)
            .expect("read the masked dir")
            .count();
        assert_eq!(entries, 0, "{inside} is empty");
        assert!(
            std::fs::write(format!("{inside}/x"), b"x").is_err(),
            "{inside} cannot be written to"
        );
    }
}

/// The common start of the CRIU migration tests: their prerequisites (else a skip with the
/// reason, and `None`), the busybox image on two nodes (`tls`: serving TLS, see
/// [`Cluster::start_with`]), and `script` (sh) running on node01 as the workload `counter`.
fn counter_cluster(test: &str, tls: bool, script: &str) -> Option<(TestImage, Cluster)> {
    if !prerequisites(test) {
        return None;
    }
    for tool in ["criu", "curl", "ip"] {
        if mig_e2e::prereq::find_on_path(tool).is_none() {
            skip(test, &format!("`{tool}` is not on PATH"));
            return None;
        }
    }
    let image = TestImage::busybox().expect("image");
    let c = Cluster::start_with(&[], &image, tls);
    c.run_counter(&image, &["sh", "-c", script]);
    Some((image, c))
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn migrate_between_two_nodes_with_faults() {
    let Some((image, mut c)) =
        counter_cluster("migrate_between_two_nodes_with_faults", false, COUNTER)
    else {
        return;
    };

    // Bad requests change nothing.
    let migrate =
        |dest: &str| json!({"deployment": "counter", "originNode": "node01", "destNode": dest});
    assert_eq!(
        http(
            &c.net.a,
            "POST",
            "/migrate",
            Some(&migrate("node02")),
            false
        )
        .0,
        401
    );
    assert_eq!(
        http(&c.net.a, "POST", "/migrate", Some(&migrate("node01")), true).0,
        400
    );
    assert_eq!(
        http(&c.net.a, "POST", "/migrate", Some(&migrate("node09")), true).0,
        404
    );
    let (s, _) = http(
        &c.net.a,
        "POST",
        "/migrate",
        Some(&json!({"deployment": "nope", "originNode": "node01", "destNode": "node02"})),
        true,
    );
    assert_eq!(s, 404);

    let fails_and_stays = |dest: &str, what: &str| {
        let before = count(&c.a, "counter");
        let (s, m) = http(&c.net.a, "POST", "/migrate", Some(&migrate(dest)), true);
        assert_eq!(s, 202, "{what}: {m}");
        let m = wait_terminal(&c.net.a, m["id"].as_str().expect("id"));
        assert!(
            ["failed", "rolled_back"].contains(&m["phase"].as_str().unwrap_or("")),
            "{what}: {m}"
        );
        assert!(
            m["failure"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{what}: {m}"
        );
        c.a.wait_for_status("counter", "RUNNING", Duration::from_secs(30))
            .expect(what);
        thread::sleep(Duration::from_millis(500));
        let after = count(&c.a, "counter");
        eprintln!("{what}: counter {before} -> {after}; migration {m}");
        assert!(
            after > before,
            "{what}: counter went from {before} to {after}: state lost"
        );
        m
    };

    // 1. A corrupted byte in the stream.
    proxy(&c.net.b, "10.231.0.2:7171", "10.231.0.2:7070", 2048, None);
    http(
        &c.net.a,
        "POST",
        "/register",
        Some(&json!({"name": "node03", "address": "10.231.0.2:7171"})),
        true,
    );
    fails_and_stays("node03", "corrupted stream");
    assert!(
        mig_dir_clean(&c.state_b),
        "partial data left on the destination"
    );
    // The container and its task, created ahead on the destination, went with the abort.
    assert!(
        no_containers(&c.b),
        "the container created ahead is left on the destination"
    );

    // 2. Restore fails on the destination (its image is gone, so create fails).
    c.b.ctr_ok(&["images", "rm", &image.name])
        .expect("rm image");
    fails_and_stays("node02", "failed restore");
    assert!(no_containers(&c.b));
    assert!(mig_dir_clean(&c.state_b));
    c.b.import(&image).expect("import");

    // 3. The destination agent is killed during the transfer.
    let pid = c.agent_b.0.id();
    proxy(
        &c.net.b,
        "10.231.0.2:7172",
        "10.231.0.2:7070",
        2048,
        Some(pid),
    );
    http(
        &c.net.a,
        "POST",
        "/register",
        Some(&json!({"name": "node04", "address": "10.231.0.2:7172"})),
        true,
    );
    fails_and_stays("node04", "destination killed");
    c.restart_agent_b("agent-b2.log");
    thread::sleep(Duration::from_secs(1));
    assert!(
        mig_dir_clean(&c.state_b),
        "restarted agent left partial data"
    );

    // 4. The real thing.
    thread::sleep(Duration::from_millis(500));
    let before = count(&c.a, "counter");
    let (s, m) = http(&c.net.a, "POST", "/migrate", Some(&migrate("node02")), true);
    assert_eq!(s, 202, "{m}");
    let m = wait_terminal(&c.net.a, m["id"].as_str().expect("id"));
    assert_eq!(m["phase"], "done", "{m}");
    c.b.wait_for_status("counter", "RUNNING", Duration::from_secs(10))
        .expect("running on b");
    thread::sleep(Duration::from_millis(500));
    let after = count(&c.b, "counter");
    eprintln!("migrated: counter {before} -> {after}; migration {m}");
    assert!(
        after > before,
        "counter restarted on the destination: {before} -> {after}"
    );
    assert!(no_containers(&c.a), "still on origin");
    masked_dirs_stay_masked(&c.b, "counter");
    let incoming = std::fs::read_dir(c.state_b.join("incoming"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(incoming, 0, "the incoming mark is left after the restore");
    // Where /dev/shm is a tmpfs, the checkpoint went through memory on both nodes (the
    // counter holds far less than any node's spare memory), and nothing is left there.
    if mig_checkpoint::room::memory_dir("", &c.state_b).is_some() {
        assert_eq!(
            m["checkpointInMemory"],
            json!({"origin": true, "destination": true}),
            "{m}"
        );
        assert!(mig_dir_clean(&c.state_a) && mig_dir_clean(&c.state_b));
    }
}

/// Post-copy (`"postCopy": true`): the origin's shim dumps everything but the memory pages
/// and keeps the processes frozen; node02 restores at once and its lazy pages daemon fetches
/// the pages from node01's CRIU through both shims and both agents.
///
/// First a fill that fails after the daemon has fetched every page (a `criu` wrapper makes
/// `lazy-pages` exit 7 then, while `fail-lazy` exists): the destination must not count as
/// having them, so the origin's CRIU is reset, the counter resumes on node01 from where it
/// was frozen, and its page-less checkpoint is gone. Then the real thing: the counter goes on
/// counting on node02, and is gone from node01.
#[test]
fn counter_migrates_post_copy_and_a_failed_fill_resumes_it_on_the_origin() {
    const TEST: &str = "counter_migrates_post_copy_and_a_failed_fill_resumes_it_on_the_origin";
    if !prerequisites(TEST) {
        return;
    }
    let Some(real) = mig_e2e::prereq::find_on_path("criu") else {
        return skip(TEST, "`criu` is not on PATH");
    };
    if !Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists() {
        return skip(
            TEST,
            "this kernel has no userfaultfd, which post-copy needs",
        );
    }
    let pipe_max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    let sys_resource = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0);
    if pipe_max < 4 << 20 && !sys_resource {
        return skip(
            TEST,
            "fs.pipe-max-size is below 4 MiB without CAP_SYS_RESOURCE, so CRIU's page server \
             cannot serve (scripts/setup.sh raises it)",
        );
    }
    for tool in ["curl", "ip"] {
        if mig_e2e::prereq::find_on_path(tool).is_none() {
            return skip(TEST, &format!("`{tool}` is not on PATH"));
        }
    }
    let wrappers = tempfile::Builder::new()
        .prefix("mige2e-criu-")
        .tempdir()
        .expect("tmp");
    let fail = wrappers.path().join("fail-lazy");
    let wrapper = wrappers.path().join("criu");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = lazy-pages ] && [ -e {fail} ]; then\n  {real} \"$@\"\n  \
             echo 'injected failure of criu lazy-pages' >&2\n  exit 7\nfi\nexec {real} \"$@\"\n",
            fail = fail.display(),
            real = real.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut path = vec![wrappers.path().to_path_buf(), mig_e2e::shim_dir()];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(path).expect("PATH");
    let path = path.to_string_lossy().into_owned();
    let image = TestImage::busybox().expect("image");
    let c = Cluster::start_with(&[("PATH", path.as_str())], &image, false);
    c.run_counter(&image, &["sh", "-c", COUNTER]);
    let migrate = json!({"deployment": "counter", "originNode": "node01", "destNode": "node02",
                         "postCopy": true});
    thread::sleep(Duration::from_millis(500));

    // 1. The fill fails on node02 after it had every page.
    std::fs::write(&fail, "").expect("touch");
    let before = count(&c.a, "counter");
    let (s, m) = c.api("POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let m = c.wait_terminal(m["id"].as_str().expect("id"));
    eprintln!("failed fill: migration {m}");
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert_eq!(m["postCopy"], true, "{m}");
    assert!(
        m["failure"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("lazy")),
        "the reason should name the lazy pages daemon: {m}"
    );
    c.a.wait_for_status("counter", "RUNNING", Duration::from_secs(30))
        .expect("running on the origin");
    thread::sleep(Duration::from_millis(700));
    let after = count(&c.a, "counter");
    assert!(
        after > before,
        "the counter went from {before} to {after} on the origin: it did not resume"
    );
    thread::sleep(Duration::from_millis(500));
    assert!(
        count(&c.a, "counter") > after,
        "the counter does not count on the origin"
    );
    assert!(no_containers(&c.b), "the destination kept a container");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mig_dir_clean(&c.state_a) || !mig_dir_clean(&c.state_b) {
        assert!(
            Instant::now() < deadline,
            "left behind: origin {:?}, destination {:?}",
            mig_dir_leftovers(&c.state_a),
            mig_dir_leftovers(&c.state_b)
        );
        thread::sleep(Duration::from_millis(100));
    }

    // 2. The real thing.
    std::fs::remove_file(&fail).expect("rm");
    let before = count(&c.a, "counter");
    let (s, m) = c.api("POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let m = c.wait_terminal(m["id"].as_str().expect("id"));
    eprintln!("post-copy: migration {m}");
    assert_eq!(m["phase"], "done", "{m}");
    c.b.wait_for_status("counter", "RUNNING", Duration::from_secs(10))
        .expect("running on node02");
    thread::sleep(Duration::from_millis(500));
    let after = count(&c.b, "counter");
    assert!(
        after > before,
        "the counter restarted on the destination: {before} -> {after}"
    );
    assert!(no_containers(&c.a), "still on the origin");
    assert!(
        m["checkpointBytes"].as_u64().unwrap_or(u64::MAX) < 1 << 20,
        "a post-copy checkpoint carries no memory pages: {m}"
    );
}

/// A DMTCP workload through `POST /migrate`: the destination creates it ahead of its
/// checkpoint (the shim defers DMTCP's wrapping and restart to start), it resumes there with
/// its memory, and nothing of it is left on the origin.
/// The same migration with both servers serving TLS and trusting only the test's CA: the API,
/// the registration, the agents' calls and the checkpoint stream all go over https.
#[test]
fn migration_over_tls() {
    let Some((_, c)) = counter_cluster("migration_over_tls", true, COUNTER) else {
        return;
    };
    let (_, nodes) = c.api("GET", "/nodes", None, false);
    for node in nodes.as_array().expect("nodes") {
        let address = node["address"].as_str().unwrap_or_default();
        assert!(address.starts_with("https://"), "{nodes}");
    }
    // Plain HTTP to the TLS port gets no answer.
    assert_eq!(http(&c.net.a, "GET", "/healthz", None, false).0, 0);
    thread::sleep(Duration::from_millis(500));
    let before = count(&c.a, "counter");
    let migrate = json!({"deployment": "counter", "originNode": "node01", "destNode": "node02"});
    let (s, m) = c.api("POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let m = c.wait_terminal(m["id"].as_str().expect("id"));
    assert_eq!(m["phase"], "done", "{m}");
    assert!(m["bytesTransferred"].as_u64().unwrap_or(0) > 0, "{m}");
    c.b.wait_for_status("counter", "RUNNING", Duration::from_secs(10))
        .expect("running on b");
    thread::sleep(Duration::from_millis(500));
    let after = count(&c.b, "counter");
    assert!(
        after > before,
        "counter restarted on the destination: {before} -> {after}"
    );
    for log in ["agent-a.log", "agent-b.log"] {
        let text = std::fs::read_to_string(c.work.path().join(log)).unwrap_or_default();
        assert!(
            !text.contains("TLS is off"),
            "{log} says TLS is off:\n{text}"
        );
    }
    // Both nodes share one containerd namespace (see kill_the_controller_mid_migration):
    // remove the counter here.
    c.b.ctr_ok(&["tasks", "rm", "-f", "counter"])
        .expect("rm task");
    c.b.ctr_ok(&["containers", "rm", "counter"])
        .expect("rm container");
}

#[test]
fn dmtcp_workload_migrates_through_the_server() {
    const TEST: &str = "dmtcp_workload_migrates_through_the_server";
    if !prerequisites(TEST) {
        return;
    }
    for tool in ["curl", "ip"] {
        if mig_e2e::prereq::find_on_path(tool).is_none() {
            return skip(TEST, &format!("`{tool}` is not on PATH"));
        }
    }
    let (dmtcp, hook) = match mig_e2e::dmtcp::prerequisites() {
        Ok(found) => found,
        Err(missing) => return missing.report(TEST),
    };
    let image = mig_e2e::dmtcp::counter_image().expect("DMTCP counter image");
    let (dmtcp, hook) = (dmtcp.display().to_string(), hook.display().to_string());
    let c = Cluster::start(
        &[
            ("MIG_ENGINE", "dmtcp"),
            ("MIG_DMTCP_DIR", &dmtcp),
            ("MIG_RESTORE_HOOK", &hook),
        ],
        &image,
    );
    c.run_counter(&image, &["/counter"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let n = count(&c.a, "counter");
        if n >= 5 || Instant::now() > deadline {
            break n;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let migrate = json!({"deployment": "counter", "originNode": "node01", "destNode": "node02"});
    let (s, m) = http(&c.net.a, "POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let m = wait_terminal(&c.net.a, m["id"].as_str().expect("id"));
    assert_eq!(
        m["phase"],
        "done",
        "{m}\nnode02's shim log:\n{}",
        c.b.log_lines_with("counter")
    );
    c.b.wait_for_status("counter", "RUNNING", Duration::from_secs(10))
        .expect("running on node02");
    let first = count(&c.b, "counter");
    eprintln!("DMTCP migrated: counter {before} -> {first}; migration {m}");
    assert!(
        first >= before,
        "the counter restarted on the destination: {before} -> {first}"
    );
    thread::sleep(Duration::from_millis(500));
    let later = count(&c.b, "counter");
    assert!(
        later > first,
        "not counting on the destination: {first} -> {later}"
    );
    assert!(no_containers(&c.a), "still on the origin");
    assert!(mig_dir_clean(&c.state_a), "left on the origin");
    assert!(mig_dir_clean(&c.state_b), "left on the destination");
}

/// The controller (node01's server, `--role all`: the origin's agent goes with it) is killed
/// while the checkpoint streams to the destination, and started again on the same state dir:
/// it finds the migration in its journal and rolls it back.
#[test]
fn controller_killed_while_transferring_is_resolved_when_it_restarts() {
    kill_the_controller_mid_migration(
        "controller_killed_while_transferring_is_resolved_when_it_restarts",
        "transferring",
    );
}

/// As above, killed while the destination restores: the new controller asks it whether it
/// runs the workload, and finishes the migration or rolls it back accordingly.
#[test]
fn controller_killed_while_restoring_is_resolved_when_it_restarts() {
    kill_the_controller_mid_migration(
        "controller_killed_while_restoring_is_resolved_when_it_restarts",
        "restoring",
    );
}

/// As above, killed while the origin is cleaned up (`finishing`: the workload runs on the
/// destination): the new controller only finishes the cleanup, and the migration is done.
#[test]
fn controller_killed_while_finishing_is_resolved_when_it_restarts() {
    kill_the_controller_mid_migration(
        "controller_killed_while_finishing_is_resolved_when_it_restarts",
        "finishing",
    );
}

/// Kills node01's server when the migration of the counter to node02 is in phase `kill_in`
/// (the origin has stopped the workload by then) and starts it again: the workload then runs
/// on exactly one node, with its memory, and nothing of the migration is left.
fn kill_the_controller_mid_migration(test: &str, kill_in: &str) {
    // 256 MiB of noise in the container's root travels in the checkpoint's upper layer: the
    // transfer and the restore take long enough (seconds) to kill the controller in them.
    let ballast = format!("echo 0 > /count; head -c 268435456 /dev/urandom > /ballast; {COUNTER}");
    let Some((_, mut c)) = counter_cluster(test, false, &ballast) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&c.a, "counter") < 5 {
        assert!(Instant::now() < deadline, "the counter does not count");
        thread::sleep(Duration::from_millis(200));
    }
    let before = count(&c.a, "counter");
    let migrate = json!({"deployment": "counter", "originNode": "node01", "destNode": "node02"});
    let (s, m) = http(&c.net.a, "POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let id = m["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The phase as the controller journals it (before it acts on it): read from its file, not
    // asked over HTTP, whose answer can take longer than the phase lasts on a loaded machine.
    let record = c
        .state_a
        .join("controller/migrations")
        .join(format!("{id}.json"));
    let killed_in = loop {
        let m: Value = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let phase = m["phase"].as_str().unwrap_or("").to_string();
        if phase == kill_in {
            c.agent_a.kill();
            break phase;
        }
        assert!(
            !["done", "failed", "rolled_back"].contains(&phase.as_str()),
            "the migration ended before the controller could be killed in it: {m}"
        );
        assert!(Instant::now() < deadline, "migration stuck: {m}");
        thread::sleep(Duration::from_millis(10));
    };
    eprintln!("killed node01's server while {killed_in}");
    c.restart_agent_a("agent-a2.log");
    let m = wait_terminal(&c.net.a, &id);
    let log = || std::fs::read_to_string(c.work.path().join("agent-a2.log")).unwrap_or_default();
    eprintln!("after the restart: {m}");
    let phase = m["phase"].as_str().unwrap_or("");
    let said = format!("{}{}", m["failure"]["reason"], m["warnings"]);
    assert!(
        said.contains("the controller restarted while"),
        "{m}
{}",
        log()
    );
    assert!(
        kill_in != "finishing" || phase == "done",
        "a migration whose destination ran the workload ended {phase}: {m}"
    );
    let (runs_on, gone_from) = match phase {
        "rolled_back" => (&c.a, &c.b),
        "done" => (&c.b, &c.a),
        _ => panic!(
            "expected rolled_back or done: {m}
{}",
            log()
        ),
    };
    runs_on
        .wait_for_status("counter", "RUNNING", Duration::from_secs(30))
        .expect("the workload runs");
    assert!(
        gone_from
            .ctr_ok(&["containers", "ls", "-q"])
            .expect("ls")
            .trim()
            .is_empty(),
        "the workload is on both nodes after {phase}"
    );
    thread::sleep(Duration::from_millis(500));
    let after = count(runs_on, "counter");
    eprintln!("{phase}: counter {before} -> {after}");
    assert!(
        after > before,
        "the counter restarted: {before} -> {after} ({phase})"
    );
    assert!(mig_dir_clean(&c.state_a), "left on node01");
    assert!(mig_dir_clean(&c.state_b), "left on node02");
    // The history is the restarted controller's too.
    let (_, all) = http(&c.net.a, "GET", "/migrations", None, false);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    // Both nodes share one containerd namespace, so each node's teardown counts the other's
    // container processes as its own leftovers: remove the counter here.
    runs_on
        .ctr_ok(&["tasks", "rm", "-f", "counter"])
        .expect("rm task");
    runs_on
        .ctr_ok(&["containers", "rm", "counter"])
        .expect("rm container");
}

/// No checkpoint, temp dir, migration record or incoming mark left in a node's state dir.
/// A receive that failed on its own (the stream ended or broke) removes its temp dir when its
/// thread notices, which may be a moment after the migration was marked failed: wait a little.
/// Whether `node` holds no container (in the test's namespace).
fn no_containers(node: &Node) -> bool {
    node.ctr_ok(&["containers", "ls", "-q"])
        .expect("ls")
        .trim()
        .is_empty()
}

fn mig_dir_clean(state: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = mig_dir_leftovers(state);
        if left.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("left in {}: {left:?}", state.display());
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// What is left of migrations in a node's state dir, and in its checkpoint store in memory
/// (the default one of that state dir, which the agents and shims here use).
fn mig_dir_leftovers(state: &Path) -> Vec<String> {
    let memory = mig_checkpoint::room::memory_dir("", state);
    ["checkpoints", "migrations", "incoming", "pages"]
        .iter()
        .map(|d| (d.to_string(), state.join(d)))
        .chain(memory.map(|m| ("memory".to_string(), m)))
        .flat_map(|(d, dir)| {
            std::fs::read_dir(dir)
                .map(|e| {
                    e.flatten()
                        .map(|e| format!("{d}/{}", e.file_name().to_string_lossy()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// The broker's configuration in the mosquitto image: anonymous clients on port 1883 of the
/// container's own network namespace, and no persistence, so a retained message exists only
/// in the broker's memory.
const MOSQUITTO_CONF: &str = "listener 1883\nallow_anonymous true\npersistence false\nuser root\n";

/// The original design's example: a real mosquitto broker (Debian's binary and its libraries
/// in an image of their own) under the mig runtime on node01, in a network namespace of its
/// own. Retained messages published to it live only in its memory (persistence is off); after
/// `POST /migrate` of the workload `mosquitto` to node02 a subscriber there gets them all, so
/// the broker's memory moved, its listening socket and network namespace came with it, and it
/// is gone from node01. CRIU here; DMTCP below.
#[test]
fn mosquitto_broker_migrates_with_its_retained_messages() {
    const TEST: &str = "mosquitto_broker_migrates_with_its_retained_messages";
    if !prerequisites(TEST) || mig_e2e::prereq::find_on_path("criu").is_none() {
        return skip(TEST, "`criu` is not on PATH");
    }
    mosquitto_migrates(TEST, &[]);
}

/// The same broker restored lazily on node02 (the shim's `criu lazy-pages` fills its memory
/// in while it runs; chosen by itself from 64 MiB of pages, forced here): the server's restore
/// watches the task run while the shim's start waits for the last page, and the record's
/// downtime ends when the broker ran.
#[test]
fn mosquitto_broker_restored_lazily_migrates_with_its_retained_messages() {
    const TEST: &str = "mosquitto_broker_restored_lazily_migrates_with_its_retained_messages";
    if !prerequisites(TEST) || mig_e2e::prereq::find_on_path("criu").is_none() {
        return skip(TEST, "`criu` is not on PATH");
    }
    mosquitto_migrates(TEST, &[("MIG_CRIU_LAZY_PAGES", "always")]);
}

/// The same broker and migration with the DMTCP engine: the broker runs under `dmtcp_launch`
/// (the restore-hook is the container's init) and is restarted from its DMTCP images on node02.
#[test]
fn mosquitto_broker_under_dmtcp_migrates_with_its_retained_messages() {
    const TEST: &str = "mosquitto_broker_under_dmtcp_migrates_with_its_retained_messages";
    if !prerequisites(TEST) {
        return;
    }
    let (dmtcp, hook) = match mig_e2e::dmtcp::prerequisites() {
        Ok(found) => found,
        Err(missing) => return missing.report(TEST),
    };
    let (dmtcp, hook) = (dmtcp.display().to_string(), hook.display().to_string());
    mosquitto_migrates(
        TEST,
        &[
            ("MIG_ENGINE", "dmtcp"),
            ("MIG_DMTCP_DIR", &dmtcp),
            ("MIG_RESTORE_HOOK", &hook),
        ],
    );
}

/// Runs the broker on node01 with the nodes' environment `env` (the engine), publishes
/// retained messages, migrates it to node02 and checks they are all there.
fn mosquitto_migrates(test: &str, env: &[(&str, &str)]) {
    for tool in ["ip", "nsenter", "ldd", "mosquitto_pub", "mosquitto_sub"] {
        if mig_e2e::prereq::find_on_path(tool).is_none() {
            skip(
                test,
                &format!("`{tool}` is not on PATH (scripts/setup.sh installs it)"),
            );
            return;
        }
    }
    let Some(broker) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        skip(
            test,
            "no mosquitto binary (scripts/setup.sh installs Debian's mosquitto)",
        );
        return;
    };
    let mut files =
        mig_e2e::image::program_with_libraries(broker, "usr/sbin/mosquitto").expect("broker");
    files.push(mig_e2e::ImageFile {
        path: "etc/mosquitto/mosquitto.conf".into(),
        mode: 0o644,
        contents: MOSQUITTO_CONF.as_bytes().to_vec(),
    });
    let image = TestImage::busybox_with_files(
        "docker.io/library/mig-mosquitto:test",
        &["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"],
        &files,
    )
    .expect("image");
    let c = Cluster::start(env, &image);
    c.run_workload(&image, "mosquitto", &[]);
    let pid = task_pid(&c.a, "mosquitto");
    // ctr gives the container a network namespace with only `lo`, down.
    run_ok(Command::new("nsenter").args([
        "-t",
        &pid.to_string(),
        "-n",
        "ip",
        "link",
        "set",
        "lo",
        "up",
    ]));

    let nonce = rand_suffix();
    let messages: Vec<(String, String)> = (0..3)
        .map(|i| (format!("mig/state/{i}"), format!("retained-{i}-{nonce}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for (topic, message) in &messages {
        loop {
            let out = mqtt(
                pid,
                "mosquitto_pub",
                &["-r", "-q", "1", "-t", topic, "-m", message],
            );
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not take a message within 20s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(
        retained(pid, messages.len()),
        expected(&messages),
        "before the migration"
    );

    let migrate = json!({"deployment": "mosquitto", "originNode": "node01", "destNode": "node02"});
    let (s, m) = c.api("POST", "/migrate", Some(&migrate), true);
    assert_eq!(s, 202, "{m}");
    let m = c.wait_terminal(m["id"].as_str().expect("id"));
    assert_eq!(
        m["phase"],
        "done",
        "{m}\nnode02's shim log:\n{}",
        c.b.log_lines_with("mosquitto")
    );
    assert_eq!(m["containers"], json!(["mosquitto"]), "{m}");
    // The engine asked for made the checkpoint the destination restored.
    let engine = env
        .iter()
        .find(|(k, _)| *k == "MIG_ENGINE")
        .map_or("criu", |(_, v)| *v);
    let restored = c.b.log_lines_with("restoring from checkpoint");
    assert!(
        restored.contains(&format!("engine={engine} ")),
        "node02 did not restore a {engine} checkpoint:\n{restored}"
    );
    if env.contains(&("MIG_CRIU_LAZY_PAGES", "always")) {
        let log = c.b.log_lines_with("lazy");
        assert!(
            log.contains("lazy=true") && log.contains("every page is in place"),
            "node02 did not restore lazily:\n{log}"
        );
    }
    let downtime = m["downtimeMs"].as_u64().expect("downtimeMs");
    let stopped: u64 = ["checkpointing", "transferring", "restoring"]
        .iter()
        .map(|p| {
            m["timings"]
                .as_array()
                .expect("timings")
                .iter()
                .find(|t| t["phase"] == *p)
                .and_then(|t| t["duration_ms"].as_u64())
                .unwrap_or_else(|| panic!("no {p} timing: {m}"))
        })
        .sum();
    assert!(
        downtime <= stopped + 5,
        "downtime {downtime} ms outlasts checkpointing + transferring + restoring ({stopped} ms): {m}"
    );

    c.b.wait_for_status("mosquitto", "RUNNING", Duration::from_secs(10))
        .expect("running on node02");
    let moved = task_pid(&c.b, "mosquitto");
    assert_eq!(
        retained(moved, messages.len()),
        expected(&messages),
        "the broker on node02 lost its retained messages (started afresh?)"
    );
    // And it still takes new ones.
    let out = mqtt(
        moved,
        "mosquitto_pub",
        &["-r", "-q", "1", "-t", "mig/after", "-m", "after"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        c.a.tasks()
            .expect("tasks")
            .iter()
            .all(|t| t.id != "mosquitto"),
        "the broker is still on node01"
    );
    let origin = c.a.ctr_ok(&["containers", "ls", "-q"]).expect("containers");
    assert!(!origin.lines().any(|l| l == "mosquitto"), "{origin}");
    // Both nodes share one containerd namespace: remove the broker here.
    c.b.ctr_ok(&["tasks", "rm", "-f", "mosquitto"])
        .expect("rm task");
    c.b.ctr_ok(&["containers", "rm", "mosquitto"])
        .expect("rm container");
}

fn task_pid(node: &Node, id: &str) -> u32 {
    node.wait_for_status(id, "RUNNING", Duration::from_secs(20))
        .expect("running");
    node.tasks()
        .expect("tasks")
        .into_iter()
        .find(|t| t.id == id)
        .map(|t| t.pid)
        .expect("task")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mosquitto client run in the network namespace of process `pid`, against its port 1883.
fn mqtt(pid: u32, client: &str, args: &[&str]) -> std::process::Output {
    let pid = pid.to_string();
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &pid, "-n", client, "-h", "127.0.0.1", "-p", "1883"])
        .args(args);
    mig_e2e::command::output_with_timeout(&mut cmd, Duration::from_secs(20)).expect("client")
}

/// The retained messages under mig/state/ the broker of process `pid` gives a new subscriber,
/// as "topic message" lines, sorted; waits for `n` of them (5 s at most).
fn retained(pid: u32, n: usize) -> Vec<String> {
    let out = mqtt(
        pid,
        "mosquitto_sub",
        &["-t", "mig/state/#", "-v", "-C", &n.to_string(), "-W", "5"],
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    if lines.len() < n {
        // What the client said, for the assertion that follows.
        lines.push(format!(
            "(mosquitto_sub: {}; {})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lines
}

fn expected(messages: &[(String, String)]) -> Vec<String> {
    let mut lines: Vec<String> = messages.iter().map(|(t, m)| format!("{t} {m}")).collect();
    lines.sort();
    lines
}
