//! The control socket: checkpoints on the shim's request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::children::Children;
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
    #[error("checkpoint did not complete within {timeout:?} (coordinator log: {log_tail})")]
    Timeout { timeout: Duration, log_tail: String },
    #[error("checkpoint directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the control socket and performs checkpoints.
pub struct Controller {
    pub dmtcp: Dmtcp,
    pub children: Arc<Children>,
    pub ckpt_dir: PathBuf,
    pub coordinator_log: PathBuf,
    pub dmtcp_version: String,
    pub mode: Mode,
    /// Held for the whole of a checkpoint: DMTCP runs one at a time.
    checkpointing: Mutex<()>,
}

impl Controller {
    pub fn new(
        dmtcp: Dmtcp,
        children: Arc<Children>,
        ckpt_dir: PathBuf,
        coordinator_log: PathBuf,
        dmtcp_version: String,
        mode: Mode,
    ) -> Self {
        Self {
            dmtcp,
            children,
            ckpt_dir,
            coordinator_log,
            dmtcp_version,
            mode,
            checkpointing: Mutex::new(()),
        }
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
        let result = Request::parse(&line).and_then(|req| self.answer(req));
        let mut stream = &stream;
        if let Err(e) = stream.write_all(protocol::reply(result).as_bytes()) {
            crate::log!("control socket reply failed: {e}");
        }
    }

    fn answer(&self, req: Request) -> Result<Vec<String>, String> {
        match req {
            Request::Version => Ok(vec![
                format!("dmtcp={}", self.dmtcp_version),
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
                    format!("dmtcp={}", self.dmtcp_version),
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
        }
    }

    fn run(&self, mut cmd: std::process::Command) -> Result<Output, CheckpointError> {
        let command = format!("{cmd:?}");
        let out = self
            .children
            .run_helper(&mut cmd)
            .map_err(|source| CheckpointError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() {
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

    fn coord_status(&self) -> Result<CoordStatus, CheckpointError> {
        let out = self.run(self.dmtcp.control("-s"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        dmtcp::parse_status(&text).ok_or_else(|| CheckpointError::Status {
            output: text.into_owned(),
        })
    }

    /// Checkpoints every process and returns the image names once all are complete.
    ///
    /// `dmtcp_command -bc` does not block in DMTCP 4.2.0, so completion is observed instead:
    /// the coordinator writes its restart script only after every process has renamed its
    /// finished image into place, and answers a status query only after that write is done
    /// (it is single-threaded).
    pub fn checkpoint(&self, timeout: Duration) -> Result<Vec<String>, CheckpointError> {
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + timeout;
        let dir_err = |source| CheckpointError::Dir {
            dir: self.ckpt_dir.clone(),
            source,
        };
        if self.coord_status()?.peers == 0 {
            return Err(CheckpointError::NoPeers);
        }
        images::remove_restart_scripts(&self.ckpt_dir).map_err(dir_err)?;
        self.run(self.dmtcp.control("-c"))?;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(script) = images::find_restart_script(&self.ckpt_dir).map_err(dir_err)? {
                let status = self.coord_status()?;
                if status.running {
                    let text = std::fs::read_to_string(&script).map_err(dir_err)?;
                    if let Some(names) = images::parse_restart_script(&text) {
                        images::commit(&self.ckpt_dir, &names).map_err(dir_err)?;
                        return Ok(names);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(CheckpointError::Timeout {
                    timeout,
                    log_tail: log_tail(&self.coordinator_log),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| dmtcp::tail(&b, 3))
        .unwrap_or_else(|e| format!("unreadable {}: {e}", path.display()))
}
