//! End-to-end tests of checkpoint and restore: a container migrates between two nodes (two
//! private containerd instances on this machine, each with its own `MIG_STATE_DIR`), through
//! the node's checkpoint store or through containerd's own checkpoint images.
//!
//! The nodes share one containerd namespace: a container keeps its namespace and id when it
//! migrates, and its checkpoint is keyed by them (`ctr_<namespace>_<id>`).
//!
//! Times of checkpoints and restores are printed on stderr (`--nocapture` shows them).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mig_checkpoint::WorkloadIdentity;
use mig_e2e::command::{describe, output_with_timeout, status_text};
use mig_e2e::node::CTR_TIMEOUT;
use mig_e2e::prereq::{find_on_path, require_root_and_tools};
use mig_e2e::{Node, NodeOptions, Skip, TestImage, leftovers, unique_namespace};

/// The migrating container's id, the same on both nodes.
const ID: &str = "counter";
/// Counts ten times a second into the root filesystem (`/count`) and a volume (`/data/log`).
/// PID 1 ignores signals it has no handler for: the trap lets a plain SIGTERM stop it.
const COUNTER: &str = r#"trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo $i > /count; echo $i >> /data/log; sleep 0.1; done"#;
/// The same without a volume, for containerd's own checkpoints.
const COUNTER_NO_VOLUME: &str =
    r#"trap 'exit 143' TERM; i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done"#;
/// How far the counter gets before it is checkpointed: far enough that a restart from 1
/// cannot pass for a resume.
const COUNT_BEFORE: u64 = 15;
const WAIT: Duration = Duration::from_secs(20);
const CHECKPOINT_ON_STOP: &str = "mig.dev/checkpoint-on-stop=true";
const VOLUMES: &str = "mig.dev/volumes=/data";

/// Two nodes sharing a namespace, each with its own state dir, and host dirs for volumes.
struct Pair {
    // B first: dropped first, it removes its containers before A's teardown looks for
    // processes in the cgroups both nodes share.
    b: Node,
    a: Node,
    image: TestImage,
    runtime: String,
    /// `ctr_<namespace>_counter`: where [`ID`]'s checkpoint goes in a store.
    key: String,
    /// Holds the state dirs (`a/`, `b/`) and volume dirs; removed after the nodes stop.
    dirs: tempfile::TempDir,
}

impl Pair {
    /// Starts the nodes for `test`, or reports why it cannot run and returns None.
    fn start(test: &str, env: &[(&str, &str)], image: Option<TestImage>) -> Option<Self> {
        if !mig_runtime_under_test(test) {
            return None;
        }
        if let Some(skip) = require_root_and_tools().or_else(require_criu) {
            skip.report(test);
            return None;
        }
        let image = image.unwrap_or_else(|| {
            TestImage::busybox().unwrap_or_else(|e| panic!("{test}: building the image: {e:#}"))
        });
        let dirs = tempfile::Builder::new()
            .prefix("migck-")
            .tempdir()
            .expect("creating the test's directory");
        let namespace = unique_namespace(test);
        let start = |node: &str| {
            let state = dirs.path().join(node);
            fs::create_dir_all(&state).unwrap();
            let mut vars: BTreeMap<String, String> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            vars.insert("MIG_STATE_DIR".into(), state.to_string_lossy().into_owned());
            let options = NodeOptions {
                namespace: Some(namespace.clone()),
                owns_namespace: true,
                env: vars,
                ..Default::default()
            };
            let n = Node::start_with(&format!("{test}-{node}"), options)
                .unwrap_or_else(|e| panic!("{test}: {e:#}"));
            n.import(&image).unwrap_or_else(|e| panic!("{test}: {e:#}"));
            n
        };
        let a = start("a");
        let b = start("b");
        let key = WorkloadIdentity::container(namespace.as_str(), ID)
            .expect("a valid identity")
            .key();
        Some(Self {
            a,
            b,
            image,
            runtime: mig_e2e::runtime(),
            key,
            dirs,
        })
    }

    fn state(&self, node: &Node) -> PathBuf {
        let which = if std::ptr::eq(node, &self.a) {
            "a"
        } else {
            "b"
        };
        self.dirs.path().join(which)
    }

    fn store(&self, node: &Node) -> PathBuf {
        self.state(node).join("checkpoints")
    }

    /// Where [`ID`]'s checkpoint is in `node`'s store.
    fn checkpoint(&self, node: &Node) -> PathBuf {
        self.store(node).join(&self.key)
    }

    /// An empty host dir for a volume, new on each call.
    fn volume(&self, name: &str) -> PathBuf {
        let dir = self.dirs.path().join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        dir
    }

    /// `ctr run -d [FLAGS] --runtime R IMAGE ID ARGS...` on `node`.
    fn run_output(&self, node: &Node, flags: &[&str], args: &[&str]) -> (Output, String) {
        let mut cmd = node.ctr_command();
        cmd.arg("run")
            .arg("-d")
            .args(flags)
            .args(["--runtime", &self.runtime, &self.image.name, ID])
            .args(args);
        let what = describe(&cmd);
        let out = output_with_timeout(&mut cmd, CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        (out, what)
    }

    /// Runs [`ID`] on `node` and waits until it runs; returns how long that took.
    fn run(&self, node: &Node, flags: &[&str], args: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        let (out, what) = self.run_output(node, flags, args);
        if !out.status.success() {
            bail!(
                "`{what}` failed ({}): {}",
                status_text(out.status),
                stderr(&out).trim()
            );
        }
        node.wait_for_status(ID, "RUNNING", WAIT)?;
        Ok(started.elapsed())
    }

    /// Flags that mount `volume` at /data and name it in `mig.dev/volumes`.
    fn volume_flags(volume: &Path, more: &[&str]) -> Vec<String> {
        let mut flags = vec![
            "--annotation".to_string(),
            VOLUMES.to_string(),
            "--mount".to_string(),
            format!(
                "type=bind,src={},dst=/data,options=rbind:rw",
                volume.display()
            ),
        ];
        for m in more {
            flags.push("--annotation".into());
            flags.push(m.to_string());
        }
        flags
    }

    /// Stops and removes [`ID`] on `node` (with SIGKILL: a checkpoint-on-stop container
    /// checkpoints again).
    fn remove(&self, node: &Node) {
        if node
            .task_status(ID)
            .unwrap()
            .is_some_and(|s| s != "STOPPED")
        {
            node.ctr_ok(&["task", "kill", "--signal", "SIGKILL", ID])
                .unwrap();
            node.wait_for_status(ID, "STOPPED", WAIT).unwrap();
        }
        if node.task_status(ID).unwrap().is_some() {
            node.ctr_ok(&["task", "delete", ID]).unwrap();
        }
        node.ctr_ok(&["containers", "rm", ID]).unwrap();
    }

    /// No mounts or processes left by either node, nor mounts under the state dirs.
    fn assert_clean(&self) {
        for node in [&self.a, &self.b] {
            if let Err(e) = node.wait_until_clean(Duration::from_secs(10)) {
                panic!("{e:#}");
            }
        }
        let mounts = leftovers::mounts_under(self.dirs.path());
        assert!(
            mounts.is_empty(),
            "mounts left under {}: {mounts:?}",
            self.dirs.path().display()
        );
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// These tests exercise our shim's own checkpoints: under another runtime they do not apply.
fn mig_runtime_under_test(test: &str) -> bool {
    let runtime = mig_e2e::runtime();
    if runtime != mig_e2e::MIG_RUNTIME {
        mig_e2e::note_skip(
            test,
            &format!(
                "checks {} only (MIG_E2E_RUNTIME={runtime})",
                mig_e2e::MIG_RUNTIME
            ),
        );
        return false;
    }
    true
}

fn require_criu() -> Option<Skip> {
    find_on_path("criu").is_none().then(|| Skip {
        reason: "`criu` is not on PATH (run scripts/setup.sh)".into(),
    })
}

/// The value of /count in [`ID`] on `node`, read by an exec.
fn count_in(node: &Node) -> Result<u64> {
    static EXEC: AtomicU32 = AtomicU32::new(0);
    // The counter rewrites /count with `echo > /count`: a read between the truncation and
    // the write finds it empty. Read again then.
    for _ in 0..5 {
        let exec_id = format!("read{}", EXEC.fetch_add(1, Ordering::Relaxed));
        let text = node.ctr_ok(&["task", "exec", "--exec-id", &exec_id, ID, "cat", "/count"])?;
        if text.trim().is_empty() {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        return text
            .trim()
            .parse()
            .with_context(|| format!("/count holds {text:?}"));
    }
    bail!("/count stayed empty over five reads")
}

/// The numbers of a counter's log (one a line); an incomplete last line is left out.
fn log_numbers(path: &Path) -> Vec<u64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("{}: line {l:?} is no number", path.display()))
        })
        .collect()
}

/// Waits until the log at `path` has at least `n` lines; returns them.
fn wait_for_log(path: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let numbers = log_numbers(path);
        if numbers.len() >= n {
            return numbers;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} line(s) after {WAIT:?}, expected {n}",
            path.display(),
            numbers.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts `numbers` is 1, 2, 3... without a gap or a restart.
#[track_caller]
fn assert_consecutive(numbers: &[u64], what: &str) {
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "{what}: line {} is {n}, expected {} (all: {numbers:?})",
            i + 1,
            i + 1
        );
    }
}

/// Deletes the stopped task [`ID`] and returns its exit status, which `ctr task delete`
/// reports in a warning ("task ID exit with non-zero exit code 137"), or 0.
fn exit_code(node: &Node) -> Option<i32> {
    let out = node.ctr(&["task", "delete", ID]);
    assert!(
        out.status.success(),
        "ctr task delete {ID}: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    match err.split_once("non-zero exit code ") {
        Some((_, rest)) => rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok()),
        None => Some(0),
    }
}

/// `ctr task kill -s SIGTERM ID`, timed.
fn sigterm(node: &Node) -> (Output, Duration) {
    let started = Instant::now();
    let out = node.ctr(&["task", "kill", "--signal", "SIGTERM", ID]);
    (out, started.elapsed())
}

/// Copies `from` to `to` (which must not exist) as `cp -a` does.
fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("running cp");
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        to.display(),
        stderr(&out)
    );
}

/// Moves a checkpoint to another node's store the way a transfer would: copy, then delete.
fn move_checkpoint(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    copy_dir(from, to);
    fs::remove_dir_all(from).unwrap();
}

/// Asserts the checkpoint dir is 0700 (and its subdirs), its files 0600.
fn assert_private(dir: &Path) {
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(dir), 0o700, "mode of {}", dir.display());
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                assert_eq!(mode(&path), 0o700, "mode of {}", path.display());
                stack.push(path);
            } else {
                assert!(meta.is_file(), "{} is not a regular file", path.display());
                assert_eq!(mode(&path), 0o600, "mode of {}", path.display());
                files += 1;
            }
        }
    }
    assert!(files > 0, "no files in {}", dir.display());
}

/// Checkpoints the counter running on A with a SIGTERM, and checks the kill waited for the
/// checkpoint and stopped the task with `exit` (137 with both engines: CRIU's dump kills the
/// processes; DMTCP ends them right after their images and the restore-hook reports 137, as
/// the workload must not run, not even its SIGTERM handler, past its checkpoint).
/// Returns the last count it logged.
fn checkpoint_on_a(p: &Pair, volume: &Path, engine: &str, exit: i32) -> u64 {
    let before = wait_for_log(&volume.join("log"), COUNT_BEFORE as usize);
    assert_consecutive(&before, "log on A before the checkpoint");
    let (out, took) = sigterm(&p.a);
    assert!(
        out.status.success(),
        "`ctr task kill -s SIGTERM {ID}` (checkpoint on stop) failed ({}): {}\nshim log:\n{}",
        status_text(out.status),
        stderr(&out),
        p.a.log_lines_with(ID)
    );
    eprintln!("{engine}: checkpoint on stop (SIGTERM until ctr returns): {took:?}");
    // The kill returns once the checkpoint is complete: it is in the store already.
    let ckpt = p.checkpoint(&p.a);
    assert!(
        ckpt.join("manifest.json").is_file(),
        "no checkpoint at {} when the kill returned",
        ckpt.display()
    );
    p.a.wait_for_status(ID, "STOPPED", WAIT).unwrap();
    if engine == "CRIU" {
        // Before the task is deleted (exit_code below): that removes the container's dir.
        assert_criu_configured(p);
    }
    let last = *log_numbers(&volume.join("log"))
        .last()
        .expect("the log is not empty");
    // Stopped: it counts no more.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        log_numbers(&volume.join("log")).last(),
        Some(&last),
        "the counter still counts on A after its checkpoint on stop"
    );
    assert_eq!(
        exit_code(&p.a),
        Some(exit),
        "exit status after the checkpoint on stop"
    );
    p.a.ctr_ok(&["containers", "rm", ID]).unwrap();
    // Nothing of the container is left on A: no process (DMTCP's hook and coordinator
    // included), no mount.
    if let Err(e) = p.a.wait_until_clean(Duration::from_secs(10)) {
        panic!("after the checkpoint on stop: {e:#}");
    }
    last
}

/// The dump on A read the container's own CRIU configuration (the shim names it in the
/// spec), which has CRIU lock the network with nftables where this CRIU supports it.
fn assert_criu_configured(p: &Pair) {
    let dir = p
        .state(&p.a)
        .join("containers")
        .join(p.a.namespace())
        .join(ID);
    let conf = dir.join("criu.conf");
    let nftables = Command::new("criu")
        .args(["check", "--feature", "nftables"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nftables {
        assert!(
            !conf.exists(),
            "{} written though this CRIU cannot lock with nftables",
            conf.display()
        );
        return;
    }
    let text = fs::read_to_string(&conf)
        .unwrap_or_else(|e| panic!("the container's CRIU configuration {}: {e}", conf.display()));
    assert!(
        text.lines().any(|l| l == "network-lock nftables"),
        "{} does not choose nftables: {text:?}",
        conf.display()
    );
    let log_path = dir.join("criu-work").join("dump.log");
    let log = fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("CRIU's dump log {}: {e}", log_path.display()));
    assert!(
        log.contains(&format!("Parsing config file {}", conf.display())),
        "CRIU's dump did not read {}; its log begins:\n{}",
        conf.display(),
        log.lines().take(10).collect::<Vec<_>>().join("\n")
    );
    // A TCP connection the dump met was locked with nftables: in a network namespace the
    // container did not create (a pod's, the host's), CRIU locks each connection itself.
    if log.contains("Dumping TCP connection") {
        assert!(
            log.contains("Running nftables [add element"),
            "CRIU dumped a TCP connection without locking it with nftables ({})",
            log_path.display()
        );
    }
}

/// Writes into the container's own tmpfs mounts (`/dev/shm`, `/run`), whose content travels
/// with a checkpoint too (the shim carries it as a volume, shim/src/tmpfs.rs).
fn write_tmpfs(node: &Node) {
    node.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "tw",
        ID,
        "sh",
        "-c",
        "echo shm-a > /dev/shm/s && echo run-a > /run/r",
    ])
    .unwrap();
}

/// What [`write_tmpfs`] wrote on A is there on B, and both mounts are still tmpfs mounts.
fn assert_tmpfs_carried(node: &Node) {
    let out = node
        .ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "tr",
            ID,
            "cat",
            "/dev/shm/s",
            "/run/r",
        ])
        .unwrap();
    assert_eq!(
        out, "shm-a\nrun-a\n",
        "/dev/shm and /run written on A, read on B"
    );
    let info = node
        .ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "tm",
            ID,
            "cat",
            "/proc/self/mountinfo",
        ])
        .unwrap();
    for dest in ["/dev/shm", "/run"] {
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(dest))
            .unwrap_or_else(|| panic!("no {dest} mount in the restored container:\n{info}"));
        let fstype = line.split(" - ").nth(1).and_then(|t| t.split(' ').next());
        assert_eq!(
            fstype,
            Some("tmpfs"),
            "{dest} in the restored container: {line}"
        );
    }
}

/// Runs the counter on A with checkpoint-on-stop and the volume `vol_a`, then checkpoints it
/// with a SIGTERM (CRIU); returns the last count it logged.
fn counter_checkpointed_on_a(p: &Pair, vol_a: &Path) -> u64 {
    let flags = Pair::volume_flags(vol_a, &[CHECKPOINT_ON_STOP]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    p.run(&p.a, &flags, &["sh", "-c", COUNTER]).unwrap();
    checkpoint_on_a(p, vol_a, "CRIU", 137)
}

/// Runs the counter on B from the checkpoint in B's store, with a fresh volume, and checks it
/// resumed from `last`: /count and the volume's log continue, the checkpoint is consumed.
fn resume_on_b(p: &Pair, flags: &[String], volume: &Path, last: u64) {
    resume_on_b_running(p, flags, &["sh", "-c", COUNTER], volume, last);
}

/// [`resume_on_b`] for a container created with `args`.
fn resume_on_b_running(p: &Pair, flags: &[String], args: &[&str], volume: &Path, last: u64) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let took = p
        .run(&p.b, &flags, args)
        .unwrap_or_else(|e| panic!("restore on B: {e:#}\nshim log:\n{}", p.b.log_lines_with(ID)));
    eprintln!("CRIU: restore on B (ctr run -d until RUNNING): {took:?}");
    let ckpt = p.checkpoint(&p.b);
    assert!(
        !ckpt.exists(),
        "the checkpoint was not consumed: {} still exists",
        ckpt.display()
    );
    let first = count_in(&p.b).unwrap();
    assert!(
        first >= last,
        "/count on B is {first} right after the restore: the counter did not resume from {last}"
    );
    let log = wait_for_log(&volume.join("log"), last as usize + 5);
    assert_consecutive(&log, "log on B (restored volume, then counting on)");
    let later = count_in(&p.b).unwrap();
    assert!(later > first, "/count on B stays at {first}: not counting");
}

/// A TCP connection inside a container that shares the host's network namespace, as a pod's
/// containers share one they did not create: CRIU locks the connection itself (with nftables
/// where it can, see `assert_criu_configured`), and on B the restored pair goes on talking.
/// The client sends the count through the connection; the server appends what it receives
/// to the volume's log, which must go on from where it was, with no number lost or repeated.
#[test]
fn tcp_connection_survives_the_migration() {
    let test = "tcp_connection_survives_the_migration";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    // The host's loopback is shared with every other test: a port of this process's own.
    // The server's stdin never ends (busybox nc closes the connection at its EOF).
    let port = 20_000 + std::process::id() % 20_000;
    let script = format!(
        "trap 'exit 143' TERM; tail -f /dev/null | nc -l -p {port} >> /data/log & sleep 0.3; \
         i=0; while :; do i=$((i+1)); echo $i > /count; echo $i; sleep 0.1; done \
         | nc 127.0.0.1 {port}"
    );
    let args = ["sh", "-c", script.as_str()];
    let vol_a = p.volume("vol-a");
    let mut flags = Pair::volume_flags(&vol_a, &[CHECKPOINT_ON_STOP]);
    flags.push("--net-host".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    p.run(&p.a, &flags, &args).unwrap();
    let last = checkpoint_on_a(&p, &vol_a, "CRIU", 137);
    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    let mut flags_b = Pair::volume_flags(&vol_b, &[]);
    flags_b.push("--net-host".into());
    resume_on_b_running(&p, &flags_b, &args, &vol_b, last);
    p.remove(&p.b);
    p.assert_clean();
}

/// The migration a node agent performs, through the store: checkpoint on stop (annotation)
/// on A, the checkpoint dir moved to B's store, the same container created on B.
#[test]
fn counter_migrates_through_the_store() {
    let test = "counter_migrates_through_the_store";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let flags = Pair::volume_flags(&vol_a, &[CHECKPOINT_ON_STOP]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    p.run(&p.a, &flags, &["sh", "-c", COUNTER]).unwrap();
    // Something in the root filesystem that only the container wrote.
    p.a.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        ID,
        "sh",
        "-c",
        "echo from-a > /log.txt",
    ])
    .unwrap();
    write_tmpfs(&p.a);

    let last = checkpoint_on_a(&p, &vol_a, "CRIU", 137);
    let ckpt_a = p.checkpoint(&p.a);
    assert_private(&ckpt_a);
    // The container's /dev/shm and /run travel as volumes, not in CRIU's images.
    for part in [
        "manifest.json",
        "images",
        "rootfs/upper.tar",
        "volumes",
        "volumes/tmpfs-dev-shm.tar",
        "volumes/tmpfs-run.tar",
    ] {
        assert!(
            ckpt_a.join(part).exists(),
            "{} lacks {part}",
            ckpt_a.display()
        );
    }

    move_checkpoint(&ckpt_a, &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    let flags_b = Pair::volume_flags(&vol_b, &[CHECKPOINT_ON_STOP]);
    resume_on_b(&p, &flags_b, &vol_b, last);
    let out =
        p.b.ctr_ok(&["task", "exec", "--exec-id", "r", ID, "cat", "/log.txt"])
            .unwrap();
    assert_eq!(out, "from-a\n", "/log.txt written on A, read on B");
    assert_tmpfs_carried(&p.b);

    // Still checkpoint-on-stop on B: stopping it checkpoints again, into B's store.
    p.remove(&p.b);
    assert!(
        p.checkpoint(&p.b).join("manifest.json").is_file(),
        "stopping the restored container did not checkpoint it into B's store"
    );
    p.assert_clean();
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

/// Xattr values are bytes: one holding a newline (as a binary value may, e.g. the random
/// `trusted.overlay.uuid` overlayfs puts on every upper dir) must travel intact, not break
/// the archive's PAX records.
#[test]
fn binary_xattr_survives_migration() {
    let test = "binary_xattr_survives_migration";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let tagged = vol_a.join("tagged");
    fs::write(&tagged, "tagged\n").unwrap();
    let value = b"line1\nline2\x00\xff\n";
    set_xattr(&tagged, "user.mig-test", value);
    let last = counter_checkpointed_on_a(&p, &vol_a);
    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    resume_on_b(&p, &Pair::volume_flags(&vol_b, &[]), &vol_b, last);
    assert_eq!(
        get_xattr(&vol_b.join("tagged"), "user.mig-test").as_deref(),
        Some(&value[..]),
        "the xattr of /data/tagged after the migration"
    );
    p.remove(&p.b);
    p.assert_clean();
}

/// A migration mark from the node agent makes a plain SIGTERM checkpoint; without a mark or
/// the annotation a SIGTERM just stops.
#[test]
fn mark_makes_sigterm_checkpoint() {
    let test = "mark_makes_sigterm_checkpoint";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let flags = Pair::volume_flags(&vol_a, &[]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    // No mark, no annotation: SIGTERM reaches the process, no checkpoint.
    p.run(&p.a, &flags, &["sh", "-c", COUNTER]).unwrap();
    wait_for_log(&vol_a.join("log"), 3);
    let (out, _) = sigterm(&p.a);
    assert!(out.status.success(), "plain SIGTERM: {}", stderr(&out));
    p.a.wait_for_status(ID, "STOPPED", WAIT).unwrap();
    assert_eq!(
        exit_code(&p.a),
        Some(143),
        "exit status after a plain SIGTERM (the trap's)"
    );
    p.a.ctr_ok(&["containers", "rm", ID]).unwrap();
    let stored: Vec<_> = fs::read_dir(p.store(&p.a))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        stored.is_empty(),
        "a plain SIGTERM checkpointed: {stored:?}"
    );

    // With a mark: the same SIGTERM checkpoints.
    fs::remove_file(vol_a.join("log")).unwrap();
    p.run(&p.a, &flags, &["sh", "-c", COUNTER]).unwrap();
    let marks = p.state(&p.a).join("marks");
    fs::create_dir_all(&marks).unwrap();
    let mark = marks.join(format!("{}.json", p.key));
    fs::write(&mark, r#"{"migration":"x"}"#).unwrap();
    let last = checkpoint_on_a(&p, &vol_a, "CRIU", 137);
    assert!(
        !mark.exists(),
        "the mark {} is still there after its checkpoint",
        mark.display()
    );
    assert_private(&p.checkpoint(&p.a));

    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    resume_on_b(&p, &Pair::volume_flags(&vol_b, &[]), &vol_b, last);
    // Neither mark nor annotation on B: SIGKILL stops it without a checkpoint.
    p.remove(&p.b);
    assert!(
        !p.checkpoint(&p.b).exists(),
        "stopping without a mark checkpointed on B"
    );
    p.assert_clean();
}

/// A container created ahead of its checkpoint (what the destination's node agent does for a
/// migration, with its incoming mark): the shim's create leaves the checkpoint to the start,
/// which fails with a clear error while none has arrived, and restores from one that arrived
/// after the create.
#[test]
fn incoming_mark_defers_the_restore_to_start() {
    let test = "incoming_mark_defers_the_restore_to_start";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let last = counter_checkpointed_on_a(&p, &vol_a);

    let incoming = p.state(&p.b).join("incoming");
    fs::create_dir_all(&incoming).unwrap();
    let mark = incoming.join(format!("{}.json", p.key));
    fs::write(&mark, r#"{"migration":"m-ahead"}"#).unwrap();
    let vol_b = p.volume("vol-b");
    let flags_b = Pair::volume_flags(&vol_b, &[CHECKPOINT_ON_STOP]);
    let flag_refs: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    // No checkpoint on B yet: the create succeeds (nothing needs it), the start cannot.
    let (out, what) = p.run_output(&p.b, &flag_refs, &["sh", "-c", COUNTER]);
    assert!(
        !out.status.success(),
        "`{what}` started a container waiting for its checkpoint without one"
    );
    let err = stderr(&out);
    for needle in [
        "created ahead of a migration's checkpoint",
        "no checkpoint of it has arrived",
    ] {
        assert!(
            err.contains(needle),
            "the error of `{what}` should say {needle:?}; got: {err}\nshim log:\n{}",
            p.b.log_lines_with(ID)
        );
    }
    if p.b.task_status(ID).unwrap().is_some() {
        p.b.ctr(&["task", "delete", "--force", ID]);
    }
    p.b.ctr_ok(&["containers", "rm", ID]).unwrap();
    assert!(
        fs::read_dir(&vol_b).unwrap().next().is_none(),
        "the volume on B was filled although no checkpoint was there"
    );

    // The checkpoint arrives; created again ahead of... nothing: the start restores from it.
    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    resume_on_b(&p, &flags_b, &vol_b, last);
    fs::remove_file(&mark).unwrap();
    p.remove(&p.b);
    p.assert_clean();
}

/// containerd's own path: `ctr containers checkpoint --task --rw`, the checkpoint image
/// exported and imported, `ctr containers restore --live --rw`.
#[test]
fn containerd_checkpoint_and_restore() {
    let test = "containerd_checkpoint_and_restore";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let reference = "docker.io/library/mig-counter-checkpoint:1";
    p.run(&p.a, &[], &["sh", "-c", COUNTER_NO_VOLUME]).unwrap();
    p.a.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "w",
        ID,
        "sh",
        "-c",
        "echo from-a > /log.txt",
    ])
    .unwrap();
    write_tmpfs(&p.a);
    let deadline = Instant::now() + WAIT;
    while count_in(&p.a).unwrap() < COUNT_BEFORE {
        assert!(Instant::now() < deadline, "the counter does not count");
        thread::sleep(Duration::from_millis(100));
    }

    let before = count_in(&p.a).unwrap();
    let started = Instant::now();
    p.a.ctr_ok(&["containers", "checkpoint", "--task", "--rw", ID, reference])
        .unwrap_or_else(|e| panic!("{e:#}\nshim log:\n{}", p.a.log_lines_with(ID)));
    eprintln!(
        "ctr containers checkpoint --task --rw: {:?}",
        started.elapsed()
    );
    // containerd checkpoints a task and lets it run on.
    let at_checkpoint = count_in(&p.a).unwrap();
    p.a.ctr_ok(&["task", "kill", "--signal", "SIGKILL", ID])
        .unwrap();
    p.a.wait_for_status(ID, "STOPPED", WAIT).unwrap();
    p.a.ctr(&["task", "delete", ID]);
    p.a.ctr_ok(&["containers", "rm", ID]).unwrap();

    let archive = p.dirs.path().join("checkpoint.tar");
    let archive_s = archive.to_string_lossy();
    // Now and then (~1 run in 10 on this loaded 2-core machine) containerd's own export
    // writes an archive its import calls an "unrecognized image format", every time it is
    // tried: up to three rounds of export and import, each failure shown with the archive's
    // listing.
    for attempt in 1..=3 {
        p.a.ctr_ok(&[
            "images",
            "export",
            "--skip-manifest-json",
            &archive_s,
            reference,
        ])
        .unwrap();
        match p.b.ctr_ok(&["images", "import", &archive_s]) {
            Ok(_) => break,
            Err(e) => {
                let listing = Command::new("tar")
                    .arg("tvf")
                    .arg(&archive)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                assert!(
                    attempt < 3,
                    "export and import failed three times: {e:#}\narchive:\n{listing}"
                );
                eprintln!(
                    "export and import failed (attempt {attempt}), retrying: {e:#}\narchive:\n{listing}"
                );
                thread::sleep(Duration::from_millis(500));
            }
        }
    }

    let started = Instant::now();
    p.b.ctr_ok(&["containers", "restore", "--live", "--rw", ID, reference])
        .unwrap_or_else(|e| panic!("{e:#}\nshim log:\n{}", p.b.log_lines_with(ID)));
    p.b.wait_for_status(ID, "RUNNING", WAIT).unwrap();
    eprintln!(
        "ctr containers restore --live --rw to RUNNING: {:?}",
        started.elapsed()
    );
    let info: serde_json::Value =
        serde_json::from_str(&p.b.ctr_ok(&["containers", "info", ID]).unwrap()).unwrap();
    assert_eq!(
        info["Runtime"]["Name"],
        p.runtime.as_str(),
        "the restored container's runtime: {info}"
    );
    let first = count_in(&p.b).unwrap();
    assert!(
        first >= before,
        "/count on B is {first} after the restore: the counter did not resume (it was at {before} before the checkpoint, {at_checkpoint} after)"
    );
    thread::sleep(Duration::from_millis(500));
    let later = count_in(&p.b).unwrap();
    assert!(later > first, "/count on B stays at {first}: not counting");
    let out =
        p.b.ctr_ok(&["task", "exec", "--exec-id", "r", ID, "cat", "/log.txt"])
            .unwrap();
    assert_eq!(out, "from-a\n", "/log.txt written on A, read on B (--rw)");
    assert_tmpfs_carried(&p.b);
    p.remove(&p.b);
    p.assert_clean();
}

/// Flips, in a copy of `pristine` installed as B's checkpoint, what `corrupt` does, then
/// checks that creating the container on B fails with an error holding each of `expect`.
fn refused_on_b(
    p: &Pair,
    pristine: &Path,
    flags: &[&str],
    corrupt: impl Fn(&Path),
    expect: &[&str],
) {
    let ckpt = p.checkpoint(&p.b);
    if ckpt.exists() {
        fs::remove_dir_all(&ckpt).unwrap();
    }
    fs::create_dir_all(p.store(&p.b)).unwrap();
    copy_dir(pristine, &ckpt);
    corrupt(&ckpt);
    let (out, what) = p.run_output(&p.b, flags, &["sh", "-c", COUNTER]);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "`{what}` from a corrupted checkpoint succeeded"
    );
    eprintln!("refused as expected: {}", err.trim());
    for needle in expect {
        assert!(
            err.contains(needle),
            "the error of `{what}` should mention {needle:?}; got: {err}\nshim log:\n{}",
            p.b.log_lines_with(ID)
        );
    }
    let status = p.b.task_status(ID).unwrap();
    assert!(
        status.is_none() || status.as_deref() == Some("STOPPED"),
        "a task runs from a corrupted checkpoint: {status:?}"
    );
    if status.is_some() {
        p.b.ctr(&["task", "delete", "--force", ID]);
    }
    let listed = p.b.ctr_ok(&["containers", "ls", "-q"]).unwrap();
    if listed.lines().any(|l| l == ID) {
        p.b.ctr_ok(&["containers", "rm", ID]).unwrap();
    }
    p.assert_clean();
    eprintln!(
        "after the refusal the corrupted checkpoint is {}",
        if ckpt.exists() { "kept" } else { "removed" }
    );
}

/// A truncated or altered checkpoint file makes the create on B fail, naming the file.
#[test]
fn corrupted_checkpoint_is_refused() {
    let test = "corrupted_checkpoint_is_refused";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let last = counter_checkpointed_on_a(&p, &vol_a);
    let pristine = p.dirs.path().join("pristine");
    move_checkpoint(&p.checkpoint(&p.a), &pristine);

    let vol_b = p.volume("vol-b");
    let flags_b = Pair::volume_flags(&vol_b, &[]);
    let flags_b_ref: Vec<&str> = flags_b.iter().map(String::as_str).collect();

    // rootfs/upper.tar cut short.
    refused_on_b(
        &p,
        &pristine,
        &flags_b_ref,
        |ckpt| {
            let file = ckpt.join("rootfs/upper.tar");
            let len = fs::metadata(&file).unwrap().len();
            let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.set_len(len / 2).unwrap();
        },
        &["rootfs/upper.tar", "size mismatch"],
    );

    // One byte flipped in the largest CRIU image: same size, other content.
    let images = pristine.join("images");
    let largest = fs::read_dir(&images)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("CRIU images")
        .file_name();
    let largest = largest.to_string_lossy().into_owned();
    let rel = format!("images/{largest}");
    refused_on_b(
        &p,
        &pristine,
        &flags_b_ref,
        |ckpt| {
            let file = ckpt.join(&rel);
            let mut bytes = fs::read(&file).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x01;
            fs::write(&file, bytes).unwrap();
        },
        &[rel.as_str(), "sha256 mismatch"],
    );
    assert!(
        !vol_b.join("log").exists(),
        "a refused restore filled the volume on B"
    );

    // The intact checkpoint restores: the refusals were about the corruption alone.
    let ckpt = p.checkpoint(&p.b);
    if ckpt.exists() {
        fs::remove_dir_all(&ckpt).unwrap();
    }
    copy_dir(&pristine, &ckpt);
    let vol_b2 = p.volume("vol-b2");
    resume_on_b(&p, &Pair::volume_flags(&vol_b2, &[]), &vol_b2, last);
    p.remove(&p.b);
    p.assert_clean();
}

/// A lazy restore (`criu lazy-pages` fills the memory in while the program runs; the shim
/// chooses it by itself from 64 MiB of pages, forced here on a small counter): the counter
/// resumes from where it was, which needs the pages the daemon brings, and the checkpoint is
/// consumed only once every page is in place.
#[test]
fn counter_restored_lazily_resumes_with_its_memory() {
    let test = "counter_restored_lazily_resumes_with_its_memory";
    let Some(p) = Pair::start(test, &[("MIG_CRIU_LAZY_PAGES", "always")], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let last = counter_checkpointed_on_a(&p, &vol_a);
    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    resume_on_b(&p, &Pair::volume_flags(&vol_b, &[]), &vol_b, last);
    let log = p.b.log_lines_with(ID);
    for needle in ["lazy=true", "lazy restore: every page is in place"] {
        assert!(
            log.contains(needle),
            "B's shim log lacks {needle:?}:\n{log}"
        );
    }
    p.remove(&p.b);
    p.assert_clean();
}

/// When the lazy pages daemon fails, the restored container must not run on (it may lack
/// pages): the shim kills it, the start fails saying why, and the checkpoint stays for
/// another try. The failure is injected with a `criu` first on the nodes' PATH that runs the
/// real one, and for `lazy-pages` reports failure after it.
#[test]
fn failed_lazy_fill_kills_the_restored_container_and_keeps_the_checkpoint() {
    let test = "failed_lazy_fill_kills_the_restored_container_and_keeps_the_checkpoint";
    let Some(real) = find_on_path("criu") else {
        // Pair::start reports the missing CRIU.
        let _ = Pair::start(test, &[], None);
        return;
    };
    let wrappers = tempfile::Builder::new()
        .prefix("migck-criu-")
        .tempdir()
        .unwrap();
    let wrapper = wrappers.path().join("criu");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = lazy-pages ]; then\n  {real} \"$@\"\n  \
             echo 'injected failure of criu lazy-pages' >&2\n  exit 7\nfi\nexec {real} \"$@\"\n",
            real = real.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let mut path = vec![wrappers.path().to_path_buf(), mig_e2e::shim_dir()];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let path = std::env::join_paths(path).unwrap();
    let path = path.to_string_lossy().into_owned();
    let env = [("MIG_CRIU_LAZY_PAGES", "always"), ("PATH", path.as_str())];
    let Some(p) = Pair::start(test, &env, None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    counter_checkpointed_on_a(&p, &vol_a);
    move_checkpoint(&p.checkpoint(&p.a), &p.checkpoint(&p.b));
    let vol_b = p.volume("vol-b");
    let flags = Pair::volume_flags(&vol_b, &[]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (out, what) = p.run_output(&p.b, &flags, &["sh", "-c", COUNTER]);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "`{what}` succeeded although the lazy pages daemon failed"
    );
    for needle in ["lazy pages daemon", "exited with status 7", "it was killed"] {
        assert!(
            err.contains(needle),
            "the error of `{what}` should mention {needle:?}; got: {err}\nshim log:\n{}",
            p.b.log_lines_with(ID)
        );
    }
    // Killed: the task stops (containerd may still be reaping it).
    let deadline = Instant::now() + WAIT;
    loop {
        let status = p.b.task_status(ID).unwrap();
        if status.is_none() || status.as_deref() == Some("STOPPED") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container runs on after its lazy restore failed: {status:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        p.checkpoint(&p.b).join("manifest.json").is_file(),
        "the checkpoint was consumed although the restore from it failed"
    );
    if p.b.task_status(ID).unwrap().is_some() {
        p.b.ctr_ok(&["task", "delete", "--force", ID]).unwrap();
    }
    p.b.ctr_ok(&["containers", "rm", ID]).unwrap();
    p.assert_clean();
}

/// When the checkpoint before a stop fails, the kill fails and the workload keeps running.
#[test]
fn failed_checkpoint_keeps_the_container_running() {
    let test = "failed_checkpoint_keeps_the_container_running";
    let Some(p) = Pair::start(test, &[], None) else {
        return;
    };
    let vol_a = p.volume("vol-a");
    let flags = Pair::volume_flags(&vol_a, &[CHECKPOINT_ON_STOP]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    p.run(&p.a, &flags, &["sh", "-c", COUNTER]).unwrap();
    wait_for_log(&vol_a.join("log"), 3);

    // The store cannot take a checkpoint: its directory is a regular file.
    let store = p.store(&p.a);
    if store.exists() {
        fs::remove_dir_all(&store).unwrap();
    }
    fs::write(&store, "not a directory").unwrap();

    let (out, took) = sigterm(&p.a);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "SIGTERM succeeded though the checkpoint cannot be written"
    );
    eprintln!("failed checkpoint reported in {took:?}: {}", err.trim());
    assert!(
        err.contains("keeps running"),
        "the error should say the container keeps running; got: {err}"
    );
    assert_eq!(
        p.a.task_status(ID).unwrap().as_deref(),
        Some("RUNNING"),
        "after a failed checkpoint on stop"
    );
    let before = count_in(&p.a).unwrap();
    thread::sleep(Duration::from_millis(500));
    let after = count_in(&p.a).unwrap();
    assert!(after > before, "the counter stopped counting at {before}");

    // Once the store is writable again the same stop checkpoints.
    fs::remove_file(&store).unwrap();
    let _ = checkpoint_on_a(&p, &vol_a, "CRIU", 137);
    p.assert_clean();
}

/// The store migration with DMTCP as the engine instead of CRIU.
#[test]
fn counter_migrates_with_dmtcp() {
    let test = "counter_migrates_with_dmtcp";
    if !mig_runtime_under_test(test) {
        return;
    }
    let (dmtcp, hook) = match mig_e2e::dmtcp::prerequisites() {
        Ok(found) => found,
        Err(missing) => return missing.report(test),
    };
    let image = mig_e2e::dmtcp::counter_image().unwrap_or_else(|e| panic!("{test}: {e:#}"));
    let dmtcp_s = dmtcp.to_string_lossy().into_owned();
    let hook_s = hook.to_string_lossy().into_owned();
    let env = [
        ("MIG_DMTCP_DIR", dmtcp_s.as_str()),
        ("MIG_RESTORE_HOOK", hook_s.as_str()),
    ];
    let Some(p) = Pair::start(test, &env, Some(image)) else {
        return;
    };
    let engine = "mig.dev/engine=dmtcp";
    let vol_a = p.volume("vol-a");
    let flags = Pair::volume_flags(&vol_a, &[CHECKPOINT_ON_STOP, engine]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let took = p
        .run(&p.a, &flags, &["/counter"])
        .unwrap_or_else(|e| panic!("{e:#}\nshim log:\n{}", p.a.log_lines_with(ID)));
    eprintln!("DMTCP: start under dmtcp_launch to RUNNING: {took:?}");
    let last = checkpoint_on_a(&p, &vol_a, "DMTCP", 137);
    let ckpt_a = p.checkpoint(&p.a);
    assert_private(&ckpt_a);
    let manifest = fs::read_to_string(ckpt_a.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("dmtcp"),
        "the manifest does not name the DMTCP engine: {manifest}"
    );
    move_checkpoint(&ckpt_a, &p.checkpoint(&p.b));

    let vol_b = p.volume("vol-b");
    let flags_b = Pair::volume_flags(&vol_b, &[engine]);
    let flags_b: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    let took = p.run(&p.b, &flags_b, &["/counter"]).unwrap_or_else(|e| {
        panic!(
            "DMTCP restore on B: {e:#}\nshim log:\n{}",
            p.b.log_lines_with(ID)
        )
    });
    eprintln!("DMTCP: restore on B (ctr run -d until RUNNING): {took:?}");
    assert!(
        !p.checkpoint(&p.b).exists(),
        "the DMTCP checkpoint was not consumed on B"
    );
    let log = wait_for_log(&vol_b.join("log"), last as usize + 5);
    // A number logged twice means the volume was archived after the process went on running
    // past its memory image: the restored process then repeats writes the volume already has.
    assert_consecutive(
        &log,
        "log on B (DMTCP restore; a repeated number means the volume's archive is later than the process image)",
    );
    let first = count_in(&p.b).unwrap();
    assert!(
        first > last,
        "/count on B is {first}, the counter was at {last} on A"
    );
    p.remove(&p.b);
    p.assert_clean();
}
