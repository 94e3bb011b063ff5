//! Every process the hook is parent of, and who reaps it.
//!
//! As PID 1 (or a child subreaper) the hook must reap every zombie with `waitpid(-1)`, which
//! also reaps the short-lived `dmtcp_command` helpers the control thread runs. So all children
//! are spawned through [`Children`], which records each one's [`Role`] before anyone can reap
//! it, and the supervisor hands a reaped helper's status to the thread waiting for it.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// What a child of the hook is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The container's DMTCP coordinator.
    Coordinator,
    /// The application (a `dmtcp_launch`ed entrypoint, or a restored process).
    App,
    /// `dmtcp_restart`: becomes the application itself (one image: it execs into the restored
    /// process) or exits after forking the restored processes, which are re-parented to us.
    Restarter,
    /// A short-lived helper (`dmtcp_command`, `dmtcp_launch --version`) someone waits for.
    Helper,
}

/// A child the supervisor reaped.
#[derive(Debug)]
pub struct Reaped {
    pub pid: i32,
    pub role: Option<Role>,
    pub status: ExitStatus,
}

#[derive(Default)]
struct Inner {
    roles: HashMap<i32, Role>,
    /// Helpers reaped by the supervisor, waiting for their spawner to collect the status.
    helper_exits: HashMap<i32, ExitStatus>,
}

/// The registry of the hook's children.
#[derive(Default)]
pub struct Children {
    inner: Mutex<Inner>,
    helper_exited: Condvar,
}

/// How long a helper may run before the hook gives up on it.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

impl Children {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind: still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` with inherited fds >= 3 closed and records it as `role` before the
    /// supervisor can reap it.
    pub fn spawn(&self, cmd: &mut Command, role: Role) -> io::Result<Child> {
        self.spawn_passing(cmd, role, None)
    }

    /// [`Self::spawn`], passing `fd` on as the child's fd `target`, its only one >= 3.
    pub fn spawn_passing(
        &self,
        cmd: &mut Command,
        role: Role,
        pass: Option<(BorrowedFd<'_>, RawFd)>,
    ) -> io::Result<Child> {
        let pass = pass.map(|(fd, target)| (fd.as_raw_fd(), target));
        // SAFETY: only async-signal-safe calls, on open fds. CLOSE_RANGE_CLOEXEC closes the
        // fds at exec rather than now, so std's own exec-error pipe keeps working. DMTCP
        // processes sharing an inherited pipe hang at restart ("Restart_Ns_Register_Data").
        // The signal mask is the supervisor's (everything it forwards is blocked); without the
        // reset the application would inherit it, and DMTCP would even save it into the images.
        unsafe {
            cmd.pre_exec(move || {
                if libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(empty.as_mut_ptr());
                let rc =
                    libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
                if rc != 0 {
                    return Err(io::Error::from_raw_os_error(rc));
                }
                // `fd` is open in the child (`pass` borrowed it for the spawn). dup2's copy is
                // not close-on-exec; `fd` itself, when it already is the target, is made so
                // above and must be made inheritable again.
                let passed = match pass {
                    Some((fd, target)) if fd == target => libc::fcntl(fd, libc::F_SETFD, 0),
                    Some((fd, target)) => libc::dup2(fd, target),
                    None => 0,
                };
                if passed == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut inner = self.lock();
        let child = cmd.spawn()?;
        inner.roles.insert(pid_of(&child), role);
        Ok(child)
    }

    /// Runs a helper to completion and returns its output.
    pub fn run_helper(&self, cmd: &mut Command) -> io::Result<Output> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(cmd, Role::Helper)?;
        let pid = pid_of(&child);
        let stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_end(&mut buf);
            }
            buf
        });
        let mut stdout = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_end(&mut stdout)?;
        }
        let stderr = err_reader.join().unwrap_or_default();
        let status = self.wait_helper(pid)?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    fn wait_helper(&self, pid: i32) -> io::Result<ExitStatus> {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(ws) => {
                self.lock().roles.remove(&pid);
                return Ok(to_exit_status(ws));
            }
            // The supervisor reaped it first: it hands the status over below.
            Err(Errno::ECHILD) => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + HELPER_TIMEOUT;
        let mut inner = self.lock();
        loop {
            if let Some(status) = inner.helper_exits.remove(&pid) {
                return Ok(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("helper {pid} was reaped but its status never arrived"),
                ));
            }
            inner = self
                .helper_exited
                .wait_timeout(inner, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reaps every exited child without blocking. Helpers' statuses go to their waiters.
    pub fn reap(&self) -> Vec<Reaped> {
        let mut reaped = Vec::new();
        loop {
            let ws = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(ws) => ws,
            };
            let Some(pid) = ws.pid() else { break };
            let pid = pid.as_raw();
            let status = to_exit_status(ws);
            let mut inner = self.lock();
            let role = inner.roles.remove(&pid);
            if role == Some(Role::Helper) {
                inner.helper_exits.insert(pid, status);
                self.helper_exited.notify_all();
                continue;
            }
            reaped.push(Reaped { pid, role, status });
        }
        reaped
    }

    pub fn set_role(&self, pid: i32, role: Role) {
        self.lock().roles.insert(pid, role);
    }

    pub fn with_role(&self, role: Role) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .lock()
            .roles
            .iter()
            .filter(|(_, r)| **r == role)
            .map(|(p, _)| *p)
            .collect();
        pids.sort_unstable();
        pids
    }

    pub fn role_of(&self, pid: i32) -> Option<Role> {
        self.lock().roles.get(&pid).copied()
    }
}

fn pid_of(child: &Child) -> i32 {
    // Linux pids fit in i32 (pid_max <= 2^22).
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

fn to_exit_status(ws: WaitStatus) -> ExitStatus {
    match ws {
        WaitStatus::Exited(_, code) => ExitStatus::from_raw((code & 0xff) << 8),
        WaitStatus::Signaled(_, sig, core) => {
            ExitStatus::from_raw(sig as i32 | if core { 0x80 } else { 0 })
        }
        _ => ExitStatus::from_raw(0),
    }
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub fn shell_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The pids whose parent is `parent`, from /proc (the processes `dmtcp_restart` left to us).
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parent_in_stat(&s))
                == Some(parent)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The ppid field of a /proc/PID/stat line; the command name may contain spaces and parens.
fn parent_in_stat(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn stat_parsing() {
        assert_eq!(parent_in_stat("42 (a) b) S 7 42 42 0"), Some(7));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn passes_one_fd_at_the_given_number() {
        let children = Children::default();
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let other = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let script = format!(
            "test -S /proc/$$/fd/821 && test ! -e /proc/$$/fd/{}",
            other.as_raw_fd()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut child = children
            .spawn_passing(&mut cmd, Role::Helper, Some((listener.as_fd(), 821)))
            .unwrap();
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn helper_and_codes() {
        let children = Children::default();
        let out = children
            .run_helper(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(shell_code(out.status), 3);
        let out = children
            .run_helper(Command::new("sh").args(["-c", "kill -TERM $$"]))
            .unwrap();
        assert_eq!(shell_code(out.status), 128 + 15);
    }
}
