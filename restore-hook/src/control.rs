//! The control socket: checkpoints on the shim's request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::children::{Children, Role};
use crate::dmtcp::{self, CoordStatus, Dmtcp};
use crate::images;
use crate::protocol::{self, Request};

/// How the application was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Launch,
    Restart,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Launch => "launch",
            Mode::Restart => "restart",
        }
    }
}

/// A checkpoint that failed, with what DMTCP said.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read coordinator status from {output:?}")]
    Status { output: String },
    #[error("no process is running under DMTCP")]
    NoPeers,
    #[error("DMTCP's processes are not all running (a checkpoint or restart is under way)")]
    NotRunning,
    #[error("the application exited before its checkpoint was complete")]
    AppExited,
    #[error("the application exited, the hook is shutting down")]
    ShuttingDown,
    #[error("checkpoint did not complete within {timeout:?} (coordinator log: {log_tail})")]
    Timeout { timeout: Duration, log_tail: String },
    #[error("checkpoint directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A checkpoint that failed, and whether the application is gone with it.
#[derive(Debug)]
pub struct Failed {
    pub error: CheckpointError,
    /// DMTCP had begun ending the application (`checkpoint-stop` only): it is gone, or going.
    pub stopped: bool,
}

impl From<CheckpointError> for Failed {
    fn from(error: CheckpointError) -> Self {
        Self {
            error,
            stopped: false,
        }
    }
}

/// Checkpoint requests being answered, so that the hook does not exit under one.
#[derive(Debug, Default)]
struct Inflight {
    count: usize,
    /// When the last of them gives up (its timeout).
    until: Option<Instant>,
    /// The application is gone: no new checkpoint is accepted.
    closing: bool,
}

/// How long past a request's own timeout the hook waits for its reply to be written.
const REPLY_MARGIN: Duration = Duration::from_secs(5);
/// How often completion is polled at most.
const MAX_POLL: Duration = Duration::from_millis(50);

/// Serves the control socket and performs checkpoints.
pub struct Controller {
    pub dmtcp: Dmtcp,
    pub children: Arc<Children>,
    pub ckpt_dir: PathBuf,
    pub coordinator_log: PathBuf,
    pub mode: Mode,
    /// DMTCP's version, once asked for: `dmtcp_launch --version` takes ~10 ms, which the
    /// container's start need not wait for.
    dmtcp_version: Mutex<Option<String>>,
    /// Held for the whole of a checkpoint: DMTCP runs one at a time.
    checkpointing: Mutex<()>,
    inflight: Mutex<Inflight>,
    idle: Condvar,
    /// A `checkpoint-stop` completed: the application ended with its checkpoint.
    stopped_by_checkpoint: AtomicBool,
}

/// Counts a checkpoint request as in flight until dropped (after its reply was written).
struct InflightGuard<'a>(&'a Controller);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.0.inflight();
        g.count -= 1;
        if g.count == 0 {
            g.until = None;
        }
        self.0.idle.notify_all();
    }
}

impl Controller {
    pub fn new(
        dmtcp: Dmtcp,
        children: Arc<Children>,
        ckpt_dir: PathBuf,
        coordinator_log: PathBuf,
        mode: Mode,
    ) -> Self {
        Self {
            dmtcp,
            children,
            ckpt_dir,
            coordinator_log,
            mode,
            dmtcp_version: Mutex::new(None),
            checkpointing: Mutex::new(()),
            inflight: Mutex::new(Inflight::default()),
            idle: Condvar::new(),
            stopped_by_checkpoint: AtomicBool::new(false),
        }
    }

    fn inflight(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a checkpoint request, unless the hook is shutting down.
    fn begin(&self, timeout: Duration) -> Option<InflightGuard<'_>> {
        let mut g = self.inflight();
        if g.closing {
            return None;
        }
        g.count += 1;
        let until = Instant::now() + timeout;
        g.until = Some(g.until.map_or(until, |u| u.max(until)));
        Some(InflightGuard(self))
    }

    /// Called by the supervisor once the application is gone: refuses new checkpoints and
    /// waits until those in flight have been answered (bounded by their own timeouts), so
    /// that a `checkpoint-stop` gets its reply before the container ends. Returns whether
    /// the application ended because of a completed `checkpoint-stop`.
    pub fn shut_down(&self) -> bool {
        let mut g = self.inflight();
        g.closing = true;
        while g.count > 0 {
            let until = g.until.unwrap_or_else(Instant::now) + REPLY_MARGIN;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                crate::log!("exiting with {} checkpoint request(s) unanswered", g.count);
                break;
            }
            g = self
                .idle
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.stopped_by_checkpoint.load(Ordering::SeqCst)
    }

    /// Accepts connections forever, one thread each, so `status` answers during a checkpoint.
    pub fn serve(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let this = Arc::clone(&self);
                    std::thread::spawn(move || this.handle(stream));
                }
                Err(e) => crate::log!("control socket accept failed: {e}"),
            }
        }
    }

    fn handle(&self, stream: UnixStream) {
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let req = Request::parse(&line);
        let guard = match &req {
            Ok(Request::Checkpoint { timeout } | Request::CheckpointStop { timeout }) => {
                match self.begin(*timeout) {
                    Some(g) => Some(g),
                    None => {
                        let msg = match req {
                            Ok(Request::CheckpointStop { .. }) => "stopped=yes ",
                            _ => "",
                        };
                        let reply =
                            protocol::reply(Err(format!("{msg}{}", CheckpointError::ShuttingDown)));
                        let _ = (&stream).write_all(reply.as_bytes());
                        return;
                    }
                }
            }
            _ => None,
        };
        let result = req.and_then(|req| self.answer(req));
        let mut stream = &stream;
        if let Err(e) = stream.write_all(protocol::reply(result).as_bytes()) {
            crate::log!("control socket reply failed: {e}");
        }
        drop(guard);
    }

    fn answer(&self, req: Request) -> Result<Vec<String>, String> {
        match req {
            Request::Version => Ok(vec![
                format!("dmtcp={}", self.dmtcp_version()?),
                format!("hook={}", env!("CARGO_PKG_VERSION")),
            ]),
            Request::Status => {
                let state = match self.checkpointing.try_lock() {
                    Ok(_) => "running",
                    Err(_) => "checkpointing",
                };
                let peers = self
                    .coord_status()
                    .map(|s| s.peers.to_string())
                    .unwrap_or_else(|_| "unknown".into());
                Ok(vec![
                    format!("state={state}"),
                    format!("mode={}", self.mode.as_str()),
                    format!(
                        "dmtcp={}",
                        self.dmtcp_version().unwrap_or_else(|_| "unknown".into())
                    ),
                    format!("peers={peers}"),
                    format!("port={}", self.dmtcp.port),
                ])
            }
            Request::Checkpoint { timeout } => {
                let started = Instant::now();
                let result = self.checkpoint(timeout);
                match &result {
                    Ok(images) => crate::log!(
                        "checkpoint of {} process(es) complete in {} ms",
                        images.len(),
                        started.elapsed().as_millis()
                    ),
                    Err(e) => crate::log!("checkpoint failed: {e}"),
                }
                result.map_err(|e| e.to_string())
            }
            Request::CheckpointStop { timeout } => {
                let started = Instant::now();
                let result = self.checkpoint_stop(timeout);
                match &result {
                    Ok(images) => crate::log!(
                        "checkpoint-stop of {} process(es) complete in {} ms; the application \
                         is gone",
                        images.len(),
                        started.elapsed().as_millis()
                    ),
                    Err(f) if f.stopped => crate::log!(
                        "checkpoint-stop failed after DMTCP began ending the application: {}",
                        f.error
                    ),
                    Err(f) => crate::log!(
                        "checkpoint-stop failed, the application keeps running: {}",
                        f.error
                    ),
                }
                result.map_err(|f| {
                    let stopped = if f.stopped { "yes" } else { "no" };
                    format!("stopped={stopped} {}", f.error)
                })
            }
        }
    }

    /// DMTCP's version, from `dmtcp_launch --version` the first time.
    fn dmtcp_version(&self) -> Result<String, String> {
        let mut known = self.dmtcp_version.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = &*known {
            return Ok(v.clone());
        }
        let mut cmd = self.dmtcp.version_command();
        let command = format!("{cmd:?}");
        let out = self
            .children
            .run_helper(&mut cmd)
            .map_err(|e| format!("running {command}: {e}"))?;
        let mut text = out.stdout;
        text.extend_from_slice(&out.stderr);
        let version = dmtcp::parse_version(&String::from_utf8_lossy(&text)).ok_or_else(|| {
            format!(
                "cannot tell DMTCP's version from {command}: {}",
                dmtcp::tail(&text, 5)
            )
        })?;
        *known = Some(version.clone());
        Ok(version)
    }

    fn run(&self, cmd: std::process::Command) -> Result<Output, CheckpointError> {
        self.run_accepting(cmd, |_| false)
    }

    /// Runs a helper; a failing exit status is an error unless `accept` takes the output.
    fn run_accepting(
        &self,
        mut cmd: std::process::Command,
        accept: impl Fn(&Output) -> bool,
    ) -> Result<Output, CheckpointError> {
        let command = format!("{cmd:?}");
        let out = self
            .children
            .run_helper(&mut cmd)
            .map_err(|source| CheckpointError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() && !accept(&out) {
            let mut text = out.stderr.clone();
            text.extend_from_slice(&out.stdout);
            return Err(CheckpointError::Command {
                command,
                status: out.status.to_string(),
                stderr: dmtcp::tail(&text, 5),
            });
        }
        Ok(out)
    }

    /// No application process is left: the supervisor reaped them all and the coordinator
    /// has seen every one disconnect. The coordinator handles its peers' messages in order and
    /// answers a status query only after earlier events, so once it counts no peer, every
    /// image name a process sent before exiting has been recorded (and a complete
    /// checkpoint's restart script written).
    fn app_gone(&self) -> Result<bool, CheckpointError> {
        if !self.children.with_role(Role::App).is_empty()
            || !self.children.with_role(Role::Restarter).is_empty()
        {
            return Ok(false);
        }
        Ok(self.coord_status()?.peers == 0)
    }

    /// The images of the complete checkpoint in the checkpoint dir, if its restart script
    /// has been written.
    fn complete_images(&self) -> Result<Option<Vec<String>>, CheckpointError> {
        let dir_err = |source| CheckpointError::Dir {
            dir: self.ckpt_dir.clone(),
            source,
        };
        let Some(script) = images::find_restart_script(&self.ckpt_dir).map_err(dir_err)? else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&script).map_err(dir_err)?;
        Ok(images::parse_restart_script(&text))
    }

    fn commit(&self, names: &[String]) -> Result<(), CheckpointError> {
        images::commit(&self.ckpt_dir, names).map_err(|source| CheckpointError::Dir {
            dir: self.ckpt_dir.clone(),
            source,
        })
    }

    fn timeout(&self, timeout: Duration) -> CheckpointError {
        CheckpointError::Timeout {
            timeout,
            log_tail: log_tail(&self.coordinator_log),
        }
    }

    fn coord_status(&self) -> Result<CoordStatus, CheckpointError> {
        let out = self.run(self.dmtcp.control("-s"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        dmtcp::parse_status(&text).ok_or_else(|| CheckpointError::Status {
            output: text.into_owned(),
        })
    }

    /// Checkpoints every process and returns the image names once all are complete; the
    /// application runs on.
    ///
    /// `dmtcp_command -bc` does not block in DMTCP 4.2.0, so completion is observed instead:
    /// the coordinator writes its restart script only after every process has renamed its
    /// finished image into place, and answers a status query only after that write is done
    /// (it is single-threaded).
    pub fn checkpoint(&self, timeout: Duration) -> Result<Vec<String>, CheckpointError> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        if self.coord_status()?.peers == 0 {
            return Err(CheckpointError::NoPeers);
        }
        images::remove_restart_scripts(&self.ckpt_dir).map_err(|source| CheckpointError::Dir {
            dir: self.ckpt_dir.clone(),
            source,
        })?;
        self.run(self.dmtcp.control("-c"))?;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(names) = self.complete_images()? {
                let status = self.coord_status()?;
                if status.running {
                    self.commit(&names)?;
                    return Ok(names);
                }
                if status.peers == 0 {
                    // Written, but nobody resumes from it: the application exited meanwhile.
                    return Err(CheckpointError::AppExited);
                }
            } else if self.app_gone()? && self.complete_images()?.is_none() {
                return Err(CheckpointError::AppExited);
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(timeout));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Checkpoints every process and has DMTCP end them right after writing their images
    /// (`dmtcp_command -kc`: each process exits instead of resuming), so the application never
    /// runs past its memory image. Returns the image names once all are complete and every
    /// process is gone; the supervisor then ends the container.
    ///
    /// Failures before DMTCP was asked leave the application running (`stopped: false`).
    /// Once it was asked there is no way back: DMTCP has no abort, and its processes exit
    /// after their image whatever happens to the others. A failure then (an image that
    /// cannot be written, a process that dies, the timeout) is `stopped: true`; on timeout
    /// the hook kills what is left, so that the outcome is definite.
    ///
    /// One gap is DMTCP's: it sets "kill after the next checkpoint" before checking that it
    /// can start one, and `-kc` cannot tell a refusal apart from success. The status check
    /// below rules out the refusals the hook can cause (it runs one checkpoint at a time); a
    /// `dmtcp_command` run by hand inside the container in between could still make DMTCP
    /// refuse, and this request would then wait out its timeout and kill the application.
    pub fn checkpoint_stop(&self, timeout: Duration) -> Result<Vec<String>, Failed> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        let status = self.coord_status()?;
        if status.peers == 0 {
            return Err(CheckpointError::NoPeers.into());
        }
        // `-kc` cannot report a refusal (below), so refuse what DMTCP would.
        if !status.running {
            return Err(CheckpointError::NotRunning.into());
        }
        images::remove_restart_scripts(&self.ckpt_dir).map_err(|source| CheckpointError::Dir {
            dir: self.ckpt_dir.clone(),
            source,
        })?;
        // DMTCP 4.2.0's dmtcp_command sends `-kc` as two commands: `K` (kill after the next
        // checkpoint, and start it) and `c`, which the coordinator then refuses as "not
        // running" because the checkpoint is under way; dmtcp_command exits 2 and prints
        // "Computation was checkpointed and killed." That is the normal outcome.
        self.run_accepting(self.dmtcp.control("-kc"), |out| {
            out.status.code() == Some(2)
                && String::from_utf8_lossy(&out.stdout).contains("checkpointed and killed")
        })?;
        let stopped = |error| Failed {
            error,
            stopped: true,
        };
        let mut pause = Duration::from_millis(5);
        loop {
            let images = self.complete_images().map_err(stopped)?;
            if self.app_gone().map_err(stopped)? {
                // Re-read after the coordinator has seen everyone go (see `app_gone`).
                let images = match images {
                    Some(names) => Some(names),
                    None => self.complete_images().map_err(stopped)?,
                };
                let names = images.ok_or(CheckpointError::AppExited).map_err(stopped)?;
                self.commit(&names).map_err(stopped)?;
                self.stopped_by_checkpoint.store(true, Ordering::SeqCst);
                return Ok(names);
            }
            if Instant::now() >= deadline {
                self.kill_app();
                return Err(stopped(self.timeout(timeout)));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    fn kill_app(&self) {
        for pid in self
            .children
            .with_role(Role::App)
            .into_iter()
            .chain(self.children.with_role(Role::Restarter))
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| dmtcp::tail(&b, 3))
        .unwrap_or_else(|e| format!("unreadable {}: {e}", path.display()))
}
