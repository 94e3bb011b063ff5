//! The fixture of a shim end-to-end test: a node with the busybox image, and `ctr run` with the
//! runtime under test.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::command::{describe, status_text};
use crate::{Node, TestImage, prereq, runtime};

/// One test's node, image and runtime.
pub struct ShimTest {
    pub node: Node,
    pub image: TestImage,
    /// The runtime type passed to `ctr run --runtime`.
    pub runtime: String,
}

impl ShimTest {
    /// Sets up the fixture for `test`, or reports why it cannot run here and returns None
    /// (panicking instead when `MIG_E2E_REQUIRED=1`).
    pub fn start(test: &str) -> Option<Self> {
        if let Some(skip) = prereq::require_root_and_tools() {
            skip.report(test);
            return None;
        }
        let image = TestImage::busybox()
            .unwrap_or_else(|e| panic!("{test}: building the test image: {e:#}"));
        let node = Node::start(test).unwrap_or_else(|e| panic!("{test}: {e:#}"));
        node.import(&image)
            .unwrap_or_else(|e| panic!("{test}: {e:#}"));
        Some(Self {
            node,
            image,
            runtime: runtime(),
        })
    }

    /// `ctr run [FLAGS] --runtime R IMAGE ID ARGS...` as a command, not yet run.
    pub fn run_command(&self, flags: &[&str], id: &str, args: &[&str]) -> Command {
        let mut cmd = self.node.ctr_command();
        cmd.arg("run")
            .args(flags)
            .args(["--runtime", &self.runtime, &self.image.name, id])
            .args(args);
        cmd
    }

    /// `ctr run --rm IMAGE ID ARGS...`: waits for the container and returns ctr's output, whose
    /// status is the container's exit status.
    pub fn run(&self, id: &str, args: &[&str]) -> Output {
        let mut cmd = self.run_command(&["--rm"], id, args);
        crate::command::output_with_timeout(&mut cmd, crate::node::CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&cmd)))
    }

    /// `ctr run -d IMAGE ID ARGS...`, then waits until the task runs.
    pub fn run_detached(&self, id: &str, args: &[&str]) -> Result<()> {
        let mut cmd = self.run_command(&["-d"], id, args);
        let out = crate::command::output_with_timeout(&mut cmd, crate::node::CTR_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                describe(&cmd),
                status_text(out.status),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.node
            .wait_for_status(id, "RUNNING", Duration::from_secs(30))
    }

    /// Starts `ctr run --rm IMAGE ID ARGS...` in the background and waits until the container
    /// prints a line equal to `ready` on stdout. The returned run yields the rest of the output
    /// and ctr's exit status (the container's); its stdin stays open until closed.
    pub fn spawn_until(&self, id: &str, args: &[&str], ready: &str) -> Result<BackgroundRun> {
        let mut cmd = self.run_command(&["--rm"], id, args);
        let what = describe(&cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let lines = read_lines(child.stdout.take().expect("piped stdout"));
        let stdin = child.stdin.take();
        let mut run = BackgroundRun {
            child,
            stdin,
            lines,
            what,
            seen: Vec::new(),
        };
        run.wait_for_line(ready, Duration::from_secs(30))?;
        Ok(run)
    }

    /// Fails with a description of what is left when the node does not become clean.
    pub fn assert_clean(&self) {
        if let Err(e) = self.node.wait_until_clean(Duration::from_secs(10)) {
            panic!("{e:#}");
        }
    }
}

/// A `ctr run` running in the background.
pub struct BackgroundRun {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
    seen: Vec<String>,
}

impl BackgroundRun {
    /// Writes `bytes` to ctr's stdin, then closes it when `close` (the container sees EOF).
    pub fn send(&mut self, bytes: &[u8], close: bool) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin
            .write_all(bytes)
            .with_context(|| format!("writing to the stdin of `{}`", self.what))?;
        if close {
            self.stdin = None;
        }
        Ok(())
    }

    /// Waits for a stdout line equal to `line`.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let found = l.trim_end() == line;
                    self.seen.push(l);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let status = self.child.wait().map(status_text).unwrap_or_default();
                    let stderr = self.child.stderr.take().map(read_all).unwrap_or_default();
                    bail!(
                        "`{}` never printed {line:?} (stdout so far: {:?}; ctr: {status}; stderr: {})",
                        self.what,
                        self.seen,
                        stderr.trim()
                    );
                }
            }
        }
    }

    /// Waits for ctr to exit; returns its exit code (the container's) and all of stdout.
    pub fn finish(mut self, timeout: Duration) -> Result<(i32, String)> {
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("`{}` still running after {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        let stderr = self.child.stderr.take().map(read_all).unwrap_or_default();
        let code = status.code().with_context(|| {
            format!(
                "`{}` died of {} ({})",
                self.what,
                status_text(status),
                stderr.trim()
            )
        })?;
        Ok((code, self.seen.join("")))
    }
}

impl Drop for BackgroundRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

fn read_all(mut r: impl std::io::Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}
