//! A process's stdio: containerd's FIFOs (or a file) bridged to the pipes or the pty the process
//! really holds.
//!
//! The process never gets containerd's FIFOs themselves: closing stdin (`CloseIO`) must reach
//! the process as EOF while containerd still holds its end, and output must survive the client
//! re-opening its side. So the shim owns one pipe per stream, or the pty master, and copies.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
};

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio as Paths};
use tokio::net::{UnixListener, unix::pipe};

use crate::{
    error::{Error, Result},
    runc::ChildStdio,
};

/// The shim's side of one process's stdio.
#[derive(Clone, Default)]
pub struct ProcessIo {
    tasks: IoTasks,
    console: Option<Pty>,
}

/// Stdio set up before runc runs, finished by [`PendingIo::attach`] once runc has handed over
/// the pty (with a terminal) or immediately (pipes).
pub struct PendingIo {
    paths: Paths,
    tasks: IoTasks,
    console: Option<(UnixListener, PathBuf)>,
}

impl PendingIo {
    /// Prepares stdio for a process whose stdio paths are `paths` (with a terminal: the socket
    /// on which runc will hand over the pty).
    pub fn prepare(paths: &Paths) -> Result<(ChildStdio, PendingIo)> {
        let tasks = IoTasks::default();
        if paths.terminal {
            // Not in the bundle: a socket path must fit in sun_path (108 bytes), and a
            // Kubernetes bundle path with its 64-hex container id already takes ~130.
            let socket_dir = nix::unistd::mkdtemp("/tmp/mig-pty-XXXXXX")
                .map_err(|e| Error::io("create the console socket dir")(e.into()))?;
            let socket = socket_dir.join("pty.sock");
            let listener = UnixListener::bind(&socket).map_err(Error::io(format!(
                "bind console socket {}",
                socket.display()
            )))?;
            let child = ChildStdio {
                console_socket: Some(socket.clone()),
                ..Default::default()
            };
            return Ok((
                child,
                PendingIo {
                    paths: paths.clone(),
                    tasks,
                    console: Some((listener, socket)),
                },
            ));
        }
        let mut child = ChildStdio::default();
        if !paths.stdin.is_empty() {
            let (tx, rx) = pipe::pipe().map_err(Error::io("create stdin pipe"))?;
            child.stdin = Some(Stdio::from(
                rx.into_blocking_fd().map_err(Error::io("stdin pipe"))?,
            ));
            tasks
                .copy_from_fifo(&paths.stdin, tx)
                .map_err(|e| Error::Other(format!("attach stdin {}: {e}", paths.stdin)))?;
        }
        child.stdout = output(&tasks, &paths.stdout)?;
        child.stderr = output(&tasks, &paths.stderr)?;
        Ok((
            child,
            PendingIo {
                paths: paths.clone(),
                tasks,
                console: None,
            },
        ))
    }

    /// Completes the set-up after runc has started the process.
    pub async fn attach(self) -> Result<ProcessIo> {
        let Some((listener, socket)) = self.console else {
            return Ok(ProcessIo {
                tasks: self.tasks,
                console: None,
            });
        };
        let master = receive_pty(&listener).await;
        remove_socket(&socket);
        let console = Pty::new(std::fs::File::from(master?))
            .map_err(|e| Error::Other(format!("set up the console: {e}")))?;
        if !self.paths.stdin.is_empty() {
            self.tasks
                .copy_from_fifo(&self.paths.stdin, console.clone())
                .map_err(|e| Error::Other(format!("attach stdin {}: {e}", self.paths.stdin)))?;
        }
        if !self.paths.stdout.is_empty() {
            self.tasks
                .copy_to_fifo(console.clone(), &self.paths.stdout)
                .map_err(|e| Error::Other(format!("attach stdout {}: {e}", self.paths.stdout)))?;
        }
        Ok(ProcessIo {
            tasks: self.tasks,
            console: Some(console),
        })
    }

    /// Gives up on a process that was never started.
    pub async fn abandon(self) {
        if let Some((_, socket)) = &self.console {
            remove_socket(socket);
        }
        self.tasks.abort().await;
    }
}

impl ProcessIo {
    /// Closes the process's stdin (it sees EOF).
    pub fn close_stdin(&self) {
        self.tasks.close_input();
    }

    /// Sets the terminal size.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(console) = &self.console else {
            return Err(Error::FailedPrecondition(
                "the process has no terminal to resize".into(),
            ));
        };
        let size = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsFd;
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is the live master.
        let rc = unsafe {
            libc::ioctl(
                console.as_fd().as_raw_fd(),
                libc::TIOCSWINSZ,
                &size as *const libc::winsize,
            )
        };
        if rc < 0 {
            return Err(Error::Io {
                context: "resize the terminal".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits (bounded) until everything the process wrote has been copied out, then stops.
    pub async fn drain(&self) {
        self.tasks.shutdown().await;
    }

    /// Stops copying at once.
    pub async fn abort(&self) {
        self.tasks.abort().await;
    }
}

fn remove_socket(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Sets up one output stream: a pipe whose read end is copied to a FIFO, or a file.
fn output(tasks: &IoTasks, path: &str) -> Result<Option<Stdio>> {
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(file) = path.strip_prefix("file://") {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .map_err(Error::io(format!("open log file {file}")))?;
        return Ok(Some(Stdio::from(f)));
    }
    if path.contains("://") {
        return Err(Error::InvalidArgument(format!(
            "unsupported stdio URI {path}: this shim supports FIFO paths and file:// URIs"
        )));
    }
    let (tx, rx) = pipe::pipe().map_err(Error::io("create output pipe"))?;
    let fd = tx.into_blocking_fd().map_err(Error::io("output pipe"))?;
    tasks
        .copy_to_fifo(rx, path)
        .map_err(|e| Error::Other(format!("attach output {path}: {e}")))?;
    Ok(Some(Stdio::from(fd)))
}

/// Receives the pty master that runc sends over the console socket (SCM_RIGHTS).
async fn receive_pty(listener: &UnixListener) -> Result<OwnedFd> {
    let (stream, _) = tokio::time::timeout(std::time::Duration::from_secs(30), listener.accept())
        .await
        .map_err(|_| Error::Other("runc did not send the console within 30s".into()))?
        .map_err(Error::io("accept on the console socket"))?;
    let stream = stream
        .into_std()
        .map_err(Error::io("console socket stream"))?;
    tokio::task::spawn_blocking(move || {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        stream
            .set_nonblocking(false)
            .map_err(Error::io("console socket stream"))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(&fd) = fds.first()
            {
                // SAFETY: the kernel just installed this descriptor for us; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Err(Error::Other(
            "runc's console message carried no file descriptor".into(),
        ))
    })
    .await
    .map_err(|e| Error::Other(format!("receive the console: {e}")))?
}
