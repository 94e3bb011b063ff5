//! A node: one private containerd with its own root, state, socket and configuration.
//!
//! Several nodes run side by side on one machine (a migration needs a source and a target).
//! Each gets its own containerd namespace by default, which also keeps their containers apart
//! where containerd's shims share host-wide paths: runc's root (`/run/containerd/runc/<ns>`) and
//! the cgroups ctr asks for (`/<ns>/<id>`). Shim sockets (`/run/containerd/s/<hash>`) are keyed
//! by containerd's address and never collide.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command::{describe, output_with_timeout, status_text};
use crate::image::TestImage;
use crate::leftovers::{self, Mount, Process};
use crate::shim_dir;

/// How long one `ctr` call may take before it counts as hung.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// The plugin that serves the CRI; disabled unless a test asks for it.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// NRI listens on one host-wide socket (/var/run/nri/nri.sock): two nodes would fight over it.
const NRI_PLUGIN: &str = "io.containerd.nri.v1.nri";

/// How to start a [`Node`].
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Serve the CRI (for tests that play the kubelet).
    pub cri: bool,
    /// The containerd namespace `ctr` uses; by default one unique to this node.
    pub namespace: Option<String>,
    /// TOML appended to the generated config.toml (must not repeat its tables).
    pub extra_config: String,
    /// Environment variables of containerd, which its shims inherit (`MIG_STATE_DIR`...).
    pub env: BTreeMap<String, String>,
    /// The given `namespace` belongs to this test alone (see [`unique_namespace`]; nodes of
    /// one migration share it): its host-wide leftovers are removed at teardown, as for a
    /// namespace made up by the node. Nodes sharing a namespace also share the cgroups ctr
    /// makes (`/<ns>/<id>`), so [`Node::processes`] of one sees the other's containers.
    pub owns_namespace: bool,
}

/// A containerd namespace unique to this process and call, from `name`: for nodes that must
/// share one (a container keeps its namespace when it migrates).
pub fn unique_namespace(name: &str) -> String {
    let short: String = sanitize(name).chars().take(12).collect();
    format!("{}-{}", short.trim_end_matches('-'), unique_suffix())
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running private containerd. Dropping it kills its tasks, stops containerd, unmounts what
/// is left under its directories and removes them.
pub struct Node {
    name: String,
    namespace: String,
    /// True when `namespace` was made up here, so its host-wide leftovers are ours to remove.
    own_namespace: bool,
    dir: PathBuf,
    address: PathBuf,
    log: PathBuf,
    shim_dir: PathBuf,
    containerd: Option<Child>,
}

impl Node {
    /// Starts a node called `name` with the default options.
    pub fn start(name: &str) -> Result<Self> {
        Self::start_with(name, NodeOptions::default())
    }

    pub fn start_with(name: &str, options: NodeOptions) -> Result<Self> {
        let own_namespace = options.namespace.is_none() || options.owns_namespace;
        // Short names, because unix socket paths (at most 107 bytes) get built below the
        // node's state directory: `<dir>/state/io.containerd.runtime.v2.task/<ns>/<id>/...`.
        let namespace = options
            .namespace
            .clone()
            .unwrap_or_else(|| unique_namespace(name));
        let dir = tempfile::Builder::new()
            .prefix("mig-")
            .tempdir_in(std::env::temp_dir())
            .context("creating the node's directory")?
            .keep();
        let mut node = Self {
            name: name.to_string(),
            namespace,
            own_namespace,
            address: dir.join("containerd.sock"),
            log: dir.join("containerd.log"),
            shim_dir: shim_dir(),
            dir,
            containerd: None,
        };
        // From here on, Drop cleans up whatever happens.
        node.launch(&options)
            .with_context(|| format!("starting node {name}"))?;
        Ok(node)
    }

    fn launch(&mut self, options: &NodeOptions) -> Result<()> {
        let config = self.dir.join("config.toml");
        fs::write(&config, self.config_toml(options))?;
        let log = fs::File::create(&self.log)?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.shim_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", std::env::join_paths(dirs)?)
            .envs(&options.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C aimed at the test runner must not skip teardown.
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", describe(&cmd)))?;
        self.containerd = Some(child);

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "containerd exited ({}) while starting; its log ends with:\n{}",
                    status_text(status),
                    self.log_tail(30)
                );
            }
            let out =
                output_with_timeout(self.ctr_command().arg("version"), Duration::from_secs(5))?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within 20s: {}\nits log ends with:\n{}",
                    self.address.display(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn config_toml(&self, options: &NodeOptions) -> String {
        let d = self.dir.display();
        let mut disabled = vec![NRI_PLUGIN];
        if !options.cri {
            disabled.push(CRI_PLUGIN);
        }
        let disabled = disabled
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut toml = format!(
            r#"# Generated by mig-e2e for node {name}.
version = 3
root = '{d}/root'
state = '{d}/state'
temp = '{d}/tmp'
disabled_plugins = [{disabled}]

[grpc]
  address = '{d}/containerd.sock'

[ttrpc]
  address = '{d}/containerd.sock.ttrpc'

[debug]
  level = 'debug'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.mig]
  runtime_type = '{runtime}'
  pod_annotations = ['mig.dev/*']
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.mig.options]
    SystemdCgroup = false
"#,
            name = self.name,
            runtime = crate::MIG_RUNTIME,
        );
        if options.cri {
            toml.push_str(
                "\n[plugins.'io.containerd.grpc.v1.cri']\n  stream_server_address = '127.0.0.1'\n  stream_server_port = '0'\n",
            );
        }
        if !options.extra_config.is_empty() {
            let _ = writeln!(toml, "\n{}", options.extra_config);
        }
        toml
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The containerd namespace `ctr` calls of this node use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The directory holding root, state, config, socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's root (content, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// containerd's state (bundles of running tasks).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// containerd's stdout and stderr, shims' logs included.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// PID of containerd.
    pub fn pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(Child::id)
    }

    /// `ctr --address SOCK --namespace NS`, ready for more arguments.
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    /// Runs `ctr ARGS` against this node; a call that hangs is killed after [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = self.ctr_command();
        cmd.args(args);
        output_with_timeout(&mut cmd, CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)))
    }

    /// Runs `ctr ARGS` and returns its stdout, or an error with the command, status and stderr.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args);
        if !out.status.success() {
            bail!(
                "`ctr {}` on node {} failed ({}): {}",
                args.join(" "),
                self.name,
                status_text(out.status),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports `image` (and unpacks it for the default snapshotter).
    pub fn import(&self, image: &TestImage) -> Result<()> {
        let archive = image.archive.to_string_lossy();
        self.ctr_ok(&["images", "import", &archive])?;
        let listed = self.ctr_ok(&["images", "ls", "-q"])?;
        if !listed.lines().any(|l| l == image.name) {
            bail!(
                "imported {archive} but `ctr images ls` shows no {}: {listed}",
                image.name
            );
        }
        Ok(())
    }

    /// Tasks as `ctr task ls` shows them: (id, pid, status).
    pub fn tasks(&self) -> Result<Vec<Task>> {
        let out = self.ctr_ok(&["task", "ls"])?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(Task {
                    id: f.next()?.into(),
                    pid: f.next()?.parse().ok()?,
                    status: f.next()?.into(),
                })
            })
            .collect())
    }

    /// The status of task `id` (`RUNNING`, `PAUSED`, `STOPPED`...), or None if there is no task.
    pub fn task_status(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .tasks()?
            .into_iter()
            .find(|t| t.id == id)
            .map(|t| t.status))
    }

    /// Waits until task `id` has `status`.
    pub fn wait_for_status(&self, id: &str, status: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.task_status(id)?;
            if now.as_deref() == Some(status) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "task {id} on node {} is {now:?} after {timeout:?}, expected {status}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Mounts under this node's directory (rootfs overlays of tasks, mostly).
    pub fn leftover_mounts(&self) -> Vec<Mount> {
        leftovers::mounts_under(&self.dir)
    }

    /// Shims serving this node (their command line carries `-address <our socket>`).
    pub fn shims(&self) -> Vec<Process> {
        let address = self.address.to_string_lossy();
        leftovers::processes()
            .into_iter()
            .filter(|p| p.has_arg_pair("-address", &address))
            .collect()
    }

    /// Every process this node started that is still alive, containerd itself excluded: its
    /// shims, their descendants (the containers' processes) and anything in the cgroups ctr
    /// gives this node's containers.
    pub fn processes(&self) -> Vec<Process> {
        let all = leftovers::processes();
        let address = self.address.to_string_lossy();
        let containerd = self.pid().map(|p| p as i32);
        let roots: Vec<Process> = all
            .iter()
            .filter(|p| Some(p.pid) != containerd)
            .filter(|p| p.has_arg_pair("-address", &address) || p.in_cgroup_below(&self.namespace))
            .cloned()
            .collect();
        leftovers::with_descendants(&all, roots)
    }

    /// Waits up to `timeout` for no mounts and no processes to be left, and describes what
    /// remains otherwise. Shims exit shortly after their last task is deleted, not at once.
    pub fn wait_until_clean(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mounts = self.leftover_mounts();
            let procs = self.processes();
            if mounts.is_empty() && procs.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut msg = format!("node {} is not clean after {timeout:?}:", self.name);
                for m in &mounts {
                    let _ = write!(
                        msg,
                        "\n  mount {} ({} from {})",
                        m.mount_point.display(),
                        m.fs_type,
                        m.source
                    );
                }
                for p in &procs {
                    let _ = write!(msg, "\n  process {p}");
                }
                bail!(msg);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of containerd's log that mention `needle` (a container id, say).
    pub fn log_lines_with(&self, needle: &str) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the node now, reporting what could not be cleaned up.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(mut containerd) = self.containerd.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();

        if containerd.try_wait().ok().flatten().is_none() {
            self.remove_all_containers();
            // SAFETY: kill(2) of our own child, not reaped yet.
            unsafe { libc::kill(containerd.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while containerd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = containerd.kill();
        }
        let _ = containerd.wait();

        // Shims outlive containerd by design; here nothing may outlive the node.
        let procs = self.processes();
        if !procs.is_empty() {
            problems.push(format!(
                "killed {} leftover process(es): {}",
                procs.len(),
                join(&procs)
            ));
            for p in &procs {
                // SAFETY: kill(2) by pid; at worst the process is already gone.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(200));
        }
        let mounts = self.unmount_all();
        if !mounts.is_empty() {
            problems.push(format!(
                "unmounted {} leftover mount(s): {}",
                mounts.len(),
                join(
                    &mounts
                        .iter()
                        .map(|m| m.mount_point.display())
                        .collect::<Vec<_>>()
                )
            ));
        }
        if self.own_namespace {
            self.remove_host_wide_state();
        }
        if std::env::var_os("MIG_E2E_KEEP").is_some() {
            eprintln!(
                "node {}: kept {} (MIG_E2E_KEEP)",
                self.name,
                self.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            problems.push(format!("removing {}: {e}", self.dir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("node {}: {}", self.name, problems.join("; "))
        }
    }

    /// Force-deletes every task and container of every namespace of this node.
    fn remove_all_containers(&self) {
        let quick = Duration::from_secs(20);
        let ctr = |ns: &str, args: &[&str]| {
            let mut cmd = Command::new("ctr");
            cmd.arg("--address")
                .arg(&self.address)
                .arg("--namespace")
                .arg(ns)
                .args(args);
            output_with_timeout(&mut cmd, quick)
                .ok()
                .filter(|o| o.status.success())
        };
        let lines = |o: Option<Output>| -> Vec<String> {
            o.map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
        };
        for ns in lines(ctr("default", &["namespaces", "ls", "-q"])) {
            for task in lines(ctr(&ns, &["task", "ls", "-q"])) {
                ctr(&ns, &["task", "delete", "--force", &task]);
            }
            for container in lines(ctr(&ns, &["containers", "ls", "-q"])) {
                ctr(&ns, &["containers", "rm", &container]);
            }
        }
    }

    /// Lazily unmounts everything under the node's directory, deepest first; returns what it found.
    fn unmount_all(&self) -> Vec<Mount> {
        let found = self.leftover_mounts();
        for _ in 0..5 {
            let mut mounts = self.leftover_mounts();
            if mounts.is_empty() {
                break;
            }
            mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_point.as_os_str().len()));
            for m in mounts {
                if let Ok(path) =
                    std::ffi::CString::new(m.mount_point.as_os_str().as_encoded_bytes())
                {
                    // SAFETY: umount2 with a valid NUL-terminated path.
                    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
        found
    }

    /// runc's state directories (containerd's shim's and ours) and the empty cgroups of this
    /// node's namespace.
    fn remove_host_wide_state(&self) {
        let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(&self.namespace));
        // Our shim's runc root: /run/containerd/mig/<FNV-1a of the address>/<namespace>
        // (shim/src/shim.rs, runc_root). Removed only when empty: runc state of a live
        // container is not ours to delete.
        let hash = self
            .address
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let mig_root = Path::new("/run/containerd/mig").join(format!("{hash:016x}"));
        let _ = fs::remove_dir(mig_root.join(&self.namespace));
        let _ = fs::remove_dir(&mig_root);
        let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in hierarchies.flatten() {
            remove_empty_cgroups(&h.path().join(&self.namespace));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- node {} (namespace {}): containerd log tail ({}) ----\n{}\n----",
                self.name,
                self.namespace,
                self.log.display(),
                self.log_tail(60)
            );
        }
        if let Err(e) = self.teardown() {
            eprintln!("teardown: {e:#}");
        }
    }
}

/// A task as `ctr task ls` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub pid: u32,
    pub status: String,
}

/// Removes a cgroup directory tree bottom-up; cgroup directories are removed with rmdir, which
/// only succeeds once they hold no process.
fn remove_empty_cgroups(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_cgroups(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A containerd namespace must match `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`.
fn sanitize(name: &str) -> String {
    let words: Vec<&str> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        "node".to_string()
    } else {
        words.join("-")
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
