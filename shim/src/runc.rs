//! The seam to runc: every container operation the task service needs, as one trait, and its
//! real implementation that runs the `runc` binary.
//!
//! The shim library reaps *every* child with `waitpid(-1)` from its SIGCHLD handler, so a child
//! spawned here must never be waited on directly (that races the reaper and loses with ECHILD).
//! [`RuncCli`] subscribes to the library's exit monitor before each spawn and takes the exit
//! status from there, and spawns through `std::process` so that nothing else reaps behind its back.

use std::{
    fs,
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe},
    monitor::{Subject, Topic},
};
use serde_json::Value;

use crate::error::{Error, Result};

/// The stdio a container process is started with.
#[derive(Debug, Default)]
pub struct ChildStdio {
    /// Standard input of the process; `/dev/null` when `None`.
    pub stdin: Option<Stdio>,
    /// Standard output; `/dev/null` when `None`.
    pub stdout: Option<Stdio>,
    /// Standard error; `/dev/null` when `None`.
    pub stderr: Option<Stdio>,
    /// With a terminal: the socket on which runc sends the pty master.
    pub console_socket: Option<PathBuf>,
}

/// What `runc checkpoint` is asked to do; mirrors containerd's `CheckpointOptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointOpts {
    /// Where CRIU writes its images.
    pub image_path: PathBuf,
    /// Where CRIU writes its logs and scratch files.
    pub work_path: PathBuf,
    /// Keep the container running after the dump.
    pub leave_running: bool,
    /// Checkpoint established TCP connections.
    pub tcp_established: bool,
    /// Allow external unix sockets.
    pub external_unix_sockets: bool,
    /// Allow a process attached to a terminal (shell job).
    pub shell_job: bool,
    /// Checkpoint file locks.
    pub file_locks: bool,
    /// Namespaces to leave empty (re-created, not restored), e.g. `network`.
    pub empty_namespaces: Vec<String>,
    /// CRIU's cgroup handling (`soft`, `full`, `strict`, `ignore`); CRIU's default when empty.
    pub cgroups_mode: String,
    /// Restore only: leave the memory to a `criu lazy-pages` daemon listening in
    /// `work_path` (see [`crate::lazy`]).
    pub lazy_pages: bool,
}

/// The restore half of [`CheckpointOpts`].
pub type RestoreOpts = CheckpointOpts;

/// Every runc operation the shim performs. The real side is [`RuncCli`]; unit tests put a fake
/// behind it.
#[async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// `runc create`: returns the pid of the container's init, waiting at its exec fifo.
    async fn create(&self, id: &str, bundle: &Path, stdio: ChildStdio) -> Result<i32>;
    /// `runc start`.
    async fn start(&self, id: &str) -> Result<()>;
    /// `runc exec --detach` of `process` (an OCI process as JSON); returns its pid.
    async fn exec(
        &self,
        id: &str,
        bundle: &Path,
        exec_id: &str,
        process: &[u8],
        stdio: ChildStdio,
    ) -> Result<i32>;
    /// `runc kill [--all] id signal`.
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()>;
    /// `runc delete [--force]`.
    async fn delete(&self, id: &str, force: bool) -> Result<()>;
    /// `runc pause`.
    async fn pause(&self, id: &str) -> Result<()>;
    /// `runc resume`.
    async fn resume(&self, id: &str) -> Result<()>;
    /// `runc ps`: the pids in the container.
    async fn ps(&self, id: &str) -> Result<Vec<u32>>;
    /// `runc update --resources`, `resources` being OCI LinuxResources as JSON.
    async fn update(&self, id: &str, bundle: &Path, resources: &[u8]) -> Result<()>;
    /// `runc events --stats`: the `data` object of the stats event.
    async fn stats(&self, id: &str) -> Result<Value>;
    /// `runc checkpoint` (CRIU).
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()>;
    /// `runc checkpoint --lazy-pages` (CRIU's lazy migration, [`crate::postcopy`]): returns
    /// once CRIU has written everything but the memory pages and its page server listens on
    /// `page_server` (`127.0.0.1:PORT`); the processes stay frozen until
    /// [`LazyDump::wait`] says how the dump ended.
    async fn checkpoint_lazy(
        &self,
        id: &str,
        _opts: &CheckpointOpts,
        _page_server: &str,
    ) -> Result<LazyDump> {
        Err(Error::FailedPrecondition(format!(
            "container {id}: this runtime cannot checkpoint lazily"
        )))
    }
    /// `runc restore --detach` (CRIU); returns the pid of the restored init.
    async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &RestoreOpts,
        stdio: ChildStdio,
    ) -> Result<i32>;
}

/// runc, the binary.
#[derive(Debug, Clone)]
pub struct RuncCli {
    binary: PathBuf,
    root: PathBuf,
    systemd_cgroup: bool,
    no_pivot_root: bool,
    no_new_keyring: bool,
}

/// A finished command: exit code and what it printed.
#[derive(Debug)]
pub struct Finished {
    /// Exit code; 128 + signal when killed by one.
    pub code: i32,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

/// A runner for code that needs a blocking `Command::output` (DMTCP discovery) inside the
/// shim's server, where the library's reaper would otherwise steal the exit status.
pub fn output_through_reaper(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    use std::os::unix::process::ExitStatusExt;
    let mut owned = Command::new(cmd.get_program());
    owned.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => owned.env(k, v),
            None => owned.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        owned.current_dir(dir);
    }
    let handle = tokio::runtime::Handle::current();
    let done = std::thread::scope(|s| {
        s.spawn(|| handle.block_on(run_watched(owned, None)))
            .join()
            .map_err(|_| std::io::Error::other("command runner panicked"))
    })?
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(std::process::Output {
        status: std::process::ExitStatus::from_raw((done.code & 0xff) << 8),
        stdout: done.stdout.into_bytes(),
        stderr: done.stderr.into_bytes(),
    })
}

impl RuncCli {
    /// A runc that keeps its state under `root`.
    pub fn new(
        binary: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
        systemd_cgroup: bool,
        no_pivot_root: bool,
        no_new_keyring: bool,
    ) -> Self {
        Self {
            binary: binary.into(),
            root: root.into(),
            systemd_cgroup,
            no_pivot_root,
            no_new_keyring,
        }
    }

    fn command(&self, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = log {
            cmd.arg("--log").arg(log);
        }
        cmd.args(["--log-format", "json"]);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        // runc must not share the shim's process group: a signal to the group (ctrl-c on a
        // foreground shim under test) must not tear runc down half way.
        cmd.process_group(0);
        cmd
    }

    async fn run(&self, cmd: Command, stdin: Option<Vec<u8>>) -> Result<Finished> {
        run_watched(cmd, stdin).await
    }

    /// Runs a runc sub-command that reports through stdout/stderr; an error carries runc's
    /// own message.
    async fn simple(&self, op: &str, id: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(None);
        cmd.args(args);
        let done = self.run(cmd, None).await?;
        if done.code != 0 {
            return Err(Error::Runc {
                op: op.into(),
                id: id.into(),
                message: last_error(&done.stderr)
                    .unwrap_or_else(|| format!("exit status {}", done.code)),
            });
        }
        Ok(done.stdout)
    }

    /// Runs a sub-command whose stdio belongs to the container (create, exec, restore): runc's
    /// error is then only in its log file.
    async fn detached(
        &self,
        op: &str,
        id: &str,
        log: &Path,
        args: Vec<std::ffi::OsString>,
        stdio: ChildStdio,
    ) -> Result<()> {
        let _ = fs::remove_file(log);
        let mut cmd = self.command(Some(log));
        cmd.args(args)
            .stdin(stdio.stdin.unwrap_or_else(Stdio::null))
            .stdout(stdio.stdout.unwrap_or_else(Stdio::null))
            .stderr(stdio.stderr.unwrap_or_else(Stdio::null));
        let (child, mut sub) = spawn_watched(&mut cmd).await?;
        // Our copies of the container's ends of its stdio pipes must close now, or the
        // container's output never reaches EOF.
        drop(cmd);
        let code = wait_exit(child.id() as i32, &mut sub).await;
        let _ = monitor_unsubscribe(sub.id).await;
        if code != 0 {
            let logged = fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Runc {
                op: op.into(),
                id: id.into(),
                message: last_error(&logged).unwrap_or_else(|| format!("exit status {code}")),
            });
        }
        Ok(())
    }

    fn criu_args(opts: &CheckpointOpts) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--image-path".into(),
            opts.image_path.clone().into(),
            "--work-path".into(),
            opts.work_path.clone().into(),
        ];
        let flags = [
            (opts.tcp_established, "--tcp-established"),
            (opts.external_unix_sockets, "--ext-unix-sk"),
            (opts.shell_job, "--shell-job"),
            (opts.file_locks, "--file-locks"),
        ];
        args.extend(flags.iter().filter(|(on, _)| *on).map(|(_, f)| (*f).into()));
        for ns in &opts.empty_namespaces {
            args.push("--empty-ns".into());
            args.push(ns.into());
        }
        if !opts.cgroups_mode.is_empty() {
            args.push("--manage-cgroups-mode".into());
            args.push(opts.cgroups_mode.clone().into());
        }
        args
    }
}

#[async_trait]
impl Runtime for RuncCli {
    async fn create(&self, id: &str, bundle: &Path, stdio: ChildStdio) -> Result<i32> {
        let pid_file = bundle.join("init.pid");
        let mut args: Vec<std::ffi::OsString> = vec![
            "create".into(),
            "--bundle".into(),
            bundle.into(),
            "--pid-file".into(),
            pid_file.clone().into(),
        ];
        if let Some(socket) = &stdio.console_socket {
            args.push("--console-socket".into());
            args.push(socket.into());
        }
        if self.no_pivot_root {
            args.push("--no-pivot".into());
        }
        if self.no_new_keyring {
            args.push("--no-new-keyring".into());
        }
        args.push(id.into());
        self.detached("create", id, &bundle.join("log.json"), args, stdio)
            .await?;
        read_pid(&pid_file)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.simple("start", id, &["start", id]).await.map(drop)
    }

    async fn exec(
        &self,
        id: &str,
        bundle: &Path,
        exec_id: &str,
        process: &[u8],
        stdio: ChildStdio,
    ) -> Result<i32> {
        let spec = bundle.join(format!("{exec_id}.process.json"));
        let pid_file = bundle.join(format!("{exec_id}.pid"));
        fs::write(&spec, process).map_err(Error::io(format!("write {}", spec.display())))?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "exec".into(),
            "--process".into(),
            spec.clone().into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.clone().into(),
        ];
        if let Some(socket) = &stdio.console_socket {
            args.push("--console-socket".into());
            args.push(socket.into());
        }
        args.push(id.into());
        let log = bundle.join(format!("{exec_id}.log.json"));
        let result = self.detached("exec", id, &log, args, stdio).await;
        let _ = fs::remove_file(&spec);
        let _ = fs::remove_file(&log);
        result?;
        let pid = read_pid(&pid_file);
        let _ = fs::remove_file(&pid_file);
        pid
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = signal.to_string();
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, signal.as_str()]);
        self.simple("kill", id, &args).await.map(drop)
    }

    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut args = vec!["delete"];
        if force {
            args.push("--force");
        }
        args.push(id);
        self.simple("delete", id, &args).await.map(drop)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.simple("pause", id, &["pause", id]).await.map(drop)
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.simple("resume", id, &["resume", id]).await.map(drop)
    }

    async fn ps(&self, id: &str) -> Result<Vec<u32>> {
        let out = self
            .simple("ps", id, &["ps", "--format", "json", id])
            .await?;
        serde_json::from_str::<Option<Vec<u32>>>(out.trim())
            .map(Option::unwrap_or_default)
            .map_err(|e| Error::Other(format!("runc ps for {id} printed unexpected output: {e}")))
    }

    async fn update(&self, id: &str, bundle: &Path, resources: &[u8]) -> Result<()> {
        let file = bundle.join("update-resources.json");
        fs::write(&file, resources).map_err(Error::io(format!("write {}", file.display())))?;
        let file_arg = file.to_string_lossy().into_owned();
        let result = self
            .simple("update", id, &["update", "--resources", &file_arg, id])
            .await;
        let _ = fs::remove_file(&file);
        result.map(drop)
    }

    async fn stats(&self, id: &str) -> Result<Value> {
        let out = self
            .simple("events", id, &["events", "--stats", id])
            .await?;
        let mut event: Value = serde_json::from_str(out.trim()).map_err(|e| {
            Error::Other(format!(
                "runc events --stats for {id} printed unexpected output: {e}"
            ))
        })?;
        Ok(event.get_mut("data").map(Value::take).unwrap_or_default())
    }

    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        fs::create_dir_all(&opts.work_path)
            .map_err(Error::io(format!("create {}", opts.work_path.display())))?;
        let mut args: Vec<std::ffi::OsString> = vec!["checkpoint".into()];
        args.extend(Self::criu_args(opts));
        if opts.leave_running {
            args.push("--leave-running".into());
        }
        args.push(id.into());
        let mut cmd = self.command(None);
        cmd.args(args);
        let done = self.run(cmd, None).await?;
        if done.code != 0 {
            return Err(Error::Runc {
                op: "checkpoint".into(),
                id: id.into(),
                message: with_criu_log(
                    last_error(&done.stderr)
                        .unwrap_or_else(|| format!("exit status {}", done.code)),
                    &opts.work_path.join("dump.log"),
                ),
            });
        }
        Ok(())
    }

    async fn checkpoint_lazy(
        &self,
        id: &str,
        opts: &CheckpointOpts,
        page_server: &str,
    ) -> Result<LazyDump> {
        use std::os::fd::{AsRawFd, IntoRawFd};
        fs::create_dir_all(&opts.work_path)
            .map_err(Error::io(format!("create {}", opts.work_path.display())))?;
        // CRIU writes one byte to the status fd once its page server listens.
        let (ready_r, ready_w) =
            nix::unistd::pipe().map_err(|e| Error::Other(format!("pipe: {e}")))?;
        let mut args: Vec<std::ffi::OsString> = vec!["checkpoint".into()];
        args.extend(Self::criu_args(opts));
        args.extend([
            "--lazy-pages".into(),
            "--page-server".into(),
            page_server.into(),
            "--status-fd".into(),
            ready_w.as_raw_fd().to_string().into(),
        ]);
        args.push(id.into());
        let mut cmd = self.command(None);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (child, mut sub) = spawn_watched(&mut cmd).await?;
        drop(ready_w);
        let pid = child.id() as i32;
        let log = opts.work_path.join("dump.log");
        let ready_fd = ready_r.into_raw_fd();
        let mut ready = tokio::task::spawn_blocking(move || {
            use std::os::fd::FromRawFd;
            // SAFETY: the read end of the pipe made above, owned by nothing else.
            let mut f = unsafe { std::fs::File::from_raw_fd(ready_fd) };
            let mut byte = [0u8; 1];
            matches!(f.read(&mut byte), Ok(1))
        });
        tokio::select! {
            listening = &mut ready => {
                if listening.unwrap_or(false) {
                    return Ok(LazyDump { id: id.into(), pid, sub, log });
                }
                let code = wait_exit(pid, &mut sub).await;
                let _ = monitor_unsubscribe(sub.id).await;
                Err(lazy_dump_failed(id, code, &log))
            }
            code = wait_exit(pid, &mut sub) => {
                let _ = monitor_unsubscribe(sub.id).await;
                Err(lazy_dump_failed(id, code, &log))
            }
        }
    }

    async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &RestoreOpts,
        stdio: ChildStdio,
    ) -> Result<i32> {
        fs::create_dir_all(&opts.work_path)
            .map_err(Error::io(format!("create {}", opts.work_path.display())))?;
        let pid_file = bundle.join("init.pid");
        let mut args: Vec<std::ffi::OsString> = vec!["restore".into()];
        args.extend(Self::criu_args(opts));
        if opts.lazy_pages {
            args.push("--lazy-pages".into());
        }
        args.extend([
            "--bundle".into(),
            bundle.into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.clone().into(),
        ]);
        if let Some(socket) = &stdio.console_socket {
            args.push("--console-socket".into());
            args.push(socket.into());
        }
        if self.no_pivot_root {
            args.push("--no-pivot".into());
        }
        args.push(id.into());
        let log = bundle.join("log.json");
        self.detached("restore", id, &log, args, stdio)
            .await
            .map_err(|e| match e {
                Error::Runc { op, id, message } => Error::Runc {
                    op,
                    id,
                    message: with_criu_log(message, &opts.work_path.join("restore.log")),
                },
                other => other,
            })?;
        read_pid(&pid_file)
    }
}

/// Runs `cmd` to completion, capturing its output. The exit status comes from the shim's
/// reaper (see the module docs).
pub async fn run_watched(mut cmd: Command, stdin: Option<Vec<u8>>) -> Result<Finished> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let (mut child, mut sub) = spawn_watched(&mut cmd).await?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let _ = pipe.write_all(&data);
        });
    }
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let code = wait_exit(child.id() as i32, &mut sub).await;
    let _ = monitor_unsubscribe(sub.id).await;
    Ok(Finished {
        code,
        stdout: out.await.unwrap_or_default(),
        stderr: err.await.unwrap_or_default(),
    })
}

/// Spawns `cmd` with the exit monitor already listening for it.
pub(crate) async fn spawn_watched(
    cmd: &mut Command,
) -> Result<(
    std::process::Child,
    containerd_shim::asynchronous::monitor::Subscription,
)> {
    let sub = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| Error::Other(format!("subscribe to exits: {e}")))?;
    match cmd.spawn() {
        Ok(child) => Ok((child, sub)),
        Err(e) => {
            let _ = monitor_unsubscribe(sub.id).await;
            Err(Error::Io {
                context: format!("run {}", cmd.get_program().to_string_lossy()),
                source: e,
            })
        }
    }
}

/// A lazy dump whose page server is serving ([`Runtime::checkpoint_lazy`]).
pub struct LazyDump {
    id: String,
    pid: i32,
    sub: containerd_shim::asynchronous::monitor::Subscription,
    log: PathBuf,
}

impl std::fmt::Debug for LazyDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyDump")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .finish()
    }
}

impl LazyDump {
    /// The pid of `runc checkpoint`.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the end of the dump: `Ok` when CRIU served every page and ended the
    /// processes; an error (with CRIU's log) when it failed, which resumes them.
    pub async fn wait(mut self) -> Result<()> {
        let code = wait_exit(self.pid, &mut self.sub).await;
        let _ = monitor_unsubscribe(self.sub.id).await;
        if code == 0 {
            Ok(())
        } else {
            Err(lazy_dump_failed(&self.id, code, &self.log))
        }
    }
}

fn lazy_dump_failed(id: &str, code: i32, log: &Path) -> Error {
    Error::Runc {
        op: "checkpoint --lazy-pages".into(),
        id: id.into(),
        message: with_criu_log(format!("exit status {code}"), log),
    }
}

/// Waits for the exit of `pid`, which `sub` was listening for when it was spawned.
pub(crate) async fn wait_exit(
    pid: i32,
    sub: &mut containerd_shim::asynchronous::monitor::Subscription,
) -> i32 {
    while let Some(e) = sub.rx.recv().await {
        if matches!(e.subject, Subject::Pid(p) if p == pid) {
            return e.exit_code;
        }
    }
    // The monitor never closes a live subscription; treat its loss as a failed command.
    -1
}

fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> tokio::task::JoinHandle<String> {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn read_pid(path: &Path) -> Result<i32> {
    let text =
        fs::read_to_string(path).map_err(Error::io(format!("read pid file {}", path.display())))?;
    text.trim().parse().map_err(|_| {
        Error::Other(format!(
            "pid file {} holds {text:?}, not a pid",
            path.display()
        ))
    })
}

/// The message of runc's last error, from its JSON log lines (`{"level":"error","msg":...}`)
/// or, failing that, the last non-empty line of plain text.
pub fn last_error(log: &str) -> Option<String> {
    let mut plain = None;
    for line in log.lines().rev() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.get("level").and_then(Value::as_str) == Some("error") => {
                if let Some(msg) = v.get("msg").and_then(Value::as_str) {
                    return Some(msg.to_string());
                }
            }
            Ok(_) => {}
            Err(_) if plain.is_none() => plain = Some(line.to_string()),
            Err(_) => {}
        }
    }
    plain
}

/// Appends the tail of CRIU's log, where the actual reason for a failed dump/restore is.
pub(crate) fn with_criu_log(message: String, log: &Path) -> String {
    match fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(12)..].join("\n");
            format!("{message}; CRIU log {} ends with:\n{tail}", log.display())
        }
        Err(_) => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_prefers_runcs_json_error_lines() {
        let log = r#"{"level":"info","msg":"starting","time":"x"}
{"level":"error","msg":"runc run failed: unable to start container process: exec: \"/nonexistent\": stat /nonexistent: no such file or directory","time":"x"}
{"level":"info","msg":"done","time":"x"}
"#;
        let msg = last_error(log).unwrap();
        assert!(msg.contains("/nonexistent"), "{msg}");
        assert!(msg.contains("no such file or directory"), "{msg}");
    }

    #[test]
    fn last_error_falls_back_to_plain_text() {
        assert_eq!(
            last_error("container \"x\" does not exist\n\n").as_deref(),
            Some("container \"x\" does not exist")
        );
        assert_eq!(last_error(""), None);
    }

    #[test]
    fn criu_flags_follow_containerds_options() {
        let opts = CheckpointOpts {
            image_path: "/img".into(),
            work_path: "/work".into(),
            tcp_established: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "soft".into(),
            ..Default::default()
        };
        let args: Vec<String> = RuncCli::criu_args(&opts)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--image-path",
                "/img",
                "--work-path",
                "/work",
                "--tcp-established",
                "--file-locks",
                "--empty-ns",
                "network",
                "--manage-cgroups-mode",
                "soft"
            ]
        );
    }

    #[test]
    fn criu_log_tail_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        fs::write(&log, "a\nb\nError (criu/sk-inet.c:1): can't dump\n").unwrap();
        let msg = with_criu_log("exit status 1".into(), &log);
        assert!(msg.contains("can't dump"), "{msg}");
        assert_eq!(with_criu_log("m".into(), &dir.path().join("none")), "m");
    }
}
