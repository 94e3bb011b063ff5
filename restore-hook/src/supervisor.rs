//! PID 1 of a DMTCP container: starts the coordinator and the application (fresh or from a
//! checkpoint), forwards signals, reaps zombies and exits with the application's status.

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::unistd::Pid;

use crate::children::{self, Children, Role};
use crate::config::{Config, ConfigError};
use crate::control::{self, Controller, Mode};
use crate::dmtcp::{self, Dmtcp};
use crate::elf::{self, WrapError};
use crate::{images, libs, log};

/// Signals passed on to the application, as `docker stop`, `kubectl delete` and terminals
/// send them. SIGUSR2 is safe to pass because DMTCP is moved to another checkpoint signal.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGQUIT,
];

/// Why the hook could not start the application.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Wrap(#[from] WrapError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("DMTCP is not installed at {path} (set MIG_DMTCP_DIR)")]
    NoDmtcp { path: PathBuf },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {host}:{port} for dmtcp_coordinator: {source}")]
    Listen {
        host: &'static str,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
}

fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> HookError {
    let path = path.into();
    move |source| HookError::Io { what, path, source }
}

/// The hook's exit status after a `checkpoint-stop`: 128 + SIGKILL, as a CRIU dump's kill
/// reports. DMTCP ends each process with `_exit(0)`, but a status of 0 would tell Kubernetes
/// the workload completed (a Job would count as succeeded), when it was stopped to move.
const STOPPED_BY_CHECKPOINT: i32 = 137;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the container's application under DMTCP and returns the exit code for the hook.
pub fn run(args: Vec<OsString>) -> Result<i32, HookError> {
    let cfg = Config::from_env()?;
    // In a pod sharing its pid namespace the hook is not PID 1; as a subreaper it still
    // inherits the processes `dmtcp_restart` leaves behind.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(s);
    }
    // Blocked before any thread or child exists, so every later thread inherits the mask and
    // the signals wait for `sigwait` below (children get a clean mask from std at exec).
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(|source| HookError::Sys {
        what: "blocking signals",
        source,
    })?;

    let checkpoint = images::find_checkpoint(&cfg.ckpt_dir)
        .map_err(io_err("reading checkpoint dir", &cfg.ckpt_dir))?;
    if checkpoint.is_none() {
        let program = args[0].to_string_lossy();
        let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into());
        elf::check_wrappable(&elf::resolve(&program, &path)?)?;
    }

    fs::create_dir_all(&cfg.tmp_dir).map_err(io_err("creating DMTCP_TMPDIR", &cfg.tmp_dir))?;
    let library_path = libs::library_path(&cfg.deps_dir, &cfg.tmp_dir)
        .map_err(io_err("linking DMTCP's libraries from", &cfg.deps_dir))?;
    let mut dmtcp = Dmtcp::new(&cfg, library_path);
    if !dmtcp.program("dmtcp_launch").is_file() {
        return Err(HookError::NoDmtcp {
            path: cfg.dmtcp_dir.clone(),
        });
    }
    let children = Arc::new(Children::default());
    let coordinator_log = cfg.tmp_dir.join("mig-coordinator.log");
    start_coordinator(&mut dmtcp, &children, &coordinator_log)?;

    let (mode, mut app) = match &checkpoint {
        None => (Mode::Launch, dmtcp.launch(&args)),
        Some(images) => (Mode::Restart, dmtcp.restart(images)),
    };
    let role = match mode {
        Mode::Launch => Role::App,
        Mode::Restart => Role::Restarter,
    };
    let app_command = format!("{app:?}");
    children
        .spawn(&mut app, role)
        .map_err(|source| HookError::Spawn {
            command: app_command.clone(),
            source,
        })?;
    log!(
        "DMTCP coordinator on port {}, {} {app_command}",
        dmtcp.port,
        match mode {
            Mode::Launch => "launching",
            Mode::Restart => "restarting",
        }
    );

    fs::create_dir_all(&cfg.ctl_dir).map_err(io_err("creating MIG_CTL_DIR", &cfg.ctl_dir))?;
    let socket = cfg.ctl_dir.join("ctl.sock");
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(io_err("binding", &socket))?;
    let controller = Arc::new(Controller::new(
        dmtcp,
        Arc::clone(&children),
        cfg.ckpt_dir.clone(),
        coordinator_log.clone(),
        mode,
    ));
    let server = Arc::clone(&controller);
    std::thread::spawn(move || server.serve(listener));

    let mut code = supervise(&children, &mask, &coordinator_log);
    // A `checkpoint-stop` ends the application before it is answered: the container must
    // not end (taking the coordinator and the reply with it) until the reply is out.
    if controller.shut_down() {
        log!("the application ended with its checkpoint (exit {code}); exiting 137 as if killed");
        code = STOPPED_BY_CHECKPOINT;
    }
    let _ = fs::remove_file(&socket);
    for pid in children.with_role(Role::Coordinator) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    Ok(code)
}

/// Starts the coordinator on `dmtcp.port` (0: one the kernel picks) and sets `dmtcp.port` to
/// it, without waiting for the coordinator to be ready.
///
/// The hook makes the coordinator's listening socket, on the loopback its clients use, and
/// hands it over as fd [`dmtcp::PROTECTED_COORD_FD`], as `dmtcp_launch` does when it starts a
/// coordinator. The application's `dmtcp_launch` or `dmtcp_restart` can then connect right
/// away: the kernel queues the connection until the coordinator, starting meanwhile (~15 ms),
/// accepts it. Should the coordinator not start, the socket closes with it, the connection is
/// reset, the application's DMTCP program fails, and the supervisor logs the coordinator's log.
///
/// The socket has `TCP_NODELAY`, which the connections the coordinator accepts inherit. DMTCP
/// 4.2.0 leaves Nagle's algorithm on, and the coordinator sends most replies as two writes (a
/// message, then its data): the second waits for the ACK of the first, which the peer delays
/// by 40 ms. A restart waits for three such replies, a checkpoint for more (measured here on
/// 16 MiB: restart 220 -> 90 ms, checkpoint 430 -> 165 ms).
fn start_coordinator(
    dmtcp: &mut Dmtcp,
    children: &Children,
    log_path: &std::path::Path,
) -> Result<(), HookError> {
    let listen_err = |source| HookError::Listen {
        host: dmtcp::COORD_HOST,
        port: dmtcp.port,
        source,
    };
    let listener = TcpListener::bind((dmtcp::COORD_HOST, dmtcp.port)).map_err(listen_err)?;
    set_nodelay(&listener).map_err(listen_err)?;
    dmtcp.port = listener.local_addr().map_err(listen_err)?.port();
    let log = File::create(log_path).map_err(io_err("creating", log_path))?;
    let log2 = log.try_clone().map_err(io_err("creating", log_path))?;
    let mut cmd = dmtcp.coordinator();
    // stdin must be /dev/null: a foreground coordinator reads commands from a terminal stdin.
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    let command = format!("{cmd:?}");
    children
        .spawn_passing(
            &mut cmd,
            Role::Coordinator,
            Some((listener.as_fd(), dmtcp::PROTECTED_COORD_FD)),
        )
        .map_err(|source| HookError::Spawn { command, source })?;
    // Dropped: the coordinator's copy is the only one left.
    Ok(())
}

/// Sets `TCP_NODELAY` on `listener` (std has it for streams only).
fn set_nodelay(listener: &TcpListener) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd, and an option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Waits for signals until the application is gone; returns its exit code.
///
/// The application is the launched entrypoint, or after a restart the processes
/// `dmtcp_restart` hands over: itself when it execs into the one restored process, else the
/// restored processes it leaves re-parented to the hook. Other orphans are reaped silently,
/// and the hook exits when the last application process has, as tini does.
fn supervise(children: &Children, mask: &SigSet, coordinator_log: &std::path::Path) -> i32 {
    let me = std::process::id() as i32;
    let mut code = 0;
    loop {
        let sig = match mask.wait() {
            Ok(s) => s,
            Err(e) => {
                log!("sigwait failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if sig != Signal::SIGCHLD {
            let targets: Vec<i32> = children
                .with_role(Role::App)
                .into_iter()
                .chain(children.with_role(Role::Restarter))
                .collect();
            log!("forwarding {sig} to {targets:?}");
            for pid in targets {
                if let Err(e) = kill(Pid::from_raw(pid), sig) {
                    log!("cannot forward {sig} to {pid}: {e}");
                }
            }
            continue;
        }
        for r in children.reap() {
            match r.role {
                Some(Role::App) => code = children::shell_code(r.status),
                Some(Role::Restarter) if r.status.success() => {
                    let adopted: Vec<i32> = children::children_of(me)
                        .into_iter()
                        .filter(|p| children.role_of(*p).is_none())
                        .collect();
                    for pid in &adopted {
                        children.set_role(*pid, Role::App);
                    }
                    if !adopted.is_empty() {
                        log!("dmtcp_restart handed over restored process(es) {adopted:?}");
                    }
                }
                Some(Role::Restarter) => {
                    code = children::shell_code(r.status);
                    log!("dmtcp_restart failed: {}", r.status);
                }
                Some(Role::Coordinator) => log!(
                    "dmtcp_coordinator (pid {}) exited ({}): checkpoints are no longer \
                     possible; its log: {}",
                    r.pid,
                    r.status,
                    control::log_tail(coordinator_log)
                ),
                Some(Role::Helper) | None => {}
            }
        }
        if children.with_role(Role::App).is_empty()
            && children.with_role(Role::Restarter).is_empty()
        {
            return code;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_connections_inherit_nodelay() {
        let listener = TcpListener::bind((dmtcp::COORD_HOST, 0)).unwrap();
        set_nodelay(&listener).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
