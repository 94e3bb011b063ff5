//! PID 1 of a DMTCP container: starts the coordinator and the application (fresh or from a
//! checkpoint), forwards signals, reaps zombies and exits with the application's status.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    #[error("cannot tell DMTCP's version from {command}: {output}")]
    Version { command: String, output: String },
    #[error("dmtcp_coordinator did not start within {waited:?}: {log_tail}")]
    Coordinator { waited: Duration, log_tail: String },
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
const COORDINATOR_START: Duration = Duration::from_secs(10);

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
    let version = dmtcp_version(&dmtcp, &children)?;

    let coordinator_log = cfg.tmp_dir.join("mig-coordinator.log");
    dmtcp.port = start_coordinator(&dmtcp, &children, &cfg, &coordinator_log)?;

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
        "DMTCP {version}, coordinator on port {}, {} {app_command}",
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
        coordinator_log,
        version,
        mode,
    ));
    let server = Arc::clone(&controller);
    std::thread::spawn(move || server.serve(listener));

    let mut code = supervise(&children, &mask);
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

fn dmtcp_version(dmtcp: &Dmtcp, children: &Children) -> Result<String, HookError> {
    let mut cmd = dmtcp.version_command();
    let command = format!("{cmd:?}");
    let out = children
        .run_helper(&mut cmd)
        .map_err(|source| HookError::Spawn {
            command: command.clone(),
            source,
        })?;
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    dmtcp::parse_version(&String::from_utf8_lossy(&text)).ok_or_else(|| HookError::Version {
        command,
        output: dmtcp::tail(&text, 5),
    })
}

/// Starts the coordinator and returns the port it listens on (it writes the port file only
/// once it listens, which also tells us it is ready).
fn start_coordinator(
    dmtcp: &Dmtcp,
    children: &Children,
    cfg: &Config,
    log_path: &std::path::Path,
) -> Result<u16, HookError> {
    let port_file = cfg.tmp_dir.join("mig-coordinator.port");
    let _ = fs::remove_file(&port_file);
    let log = File::create(log_path).map_err(io_err("creating", log_path))?;
    let log2 = log.try_clone().map_err(io_err("creating", log_path))?;
    let mut cmd = dmtcp.coordinator(&port_file);
    // stdin must be /dev/null: a foreground coordinator reads commands from a terminal stdin.
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    let command = format!("{cmd:?}");
    children
        .spawn(&mut cmd, Role::Coordinator)
        .map_err(|source| HookError::Spawn { command, source })?;
    let started = Instant::now();
    loop {
        if let Some(port) = fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(port);
        }
        let exited = children
            .reap()
            .iter()
            .any(|r| r.role == Some(Role::Coordinator));
        if exited || started.elapsed() > COORDINATOR_START {
            return Err(HookError::Coordinator {
                waited: started.elapsed(),
                log_tail: control::log_tail(log_path),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for signals until the application is gone; returns its exit code.
///
/// The application is the launched entrypoint, or after a restart the processes
/// `dmtcp_restart` hands over: itself when it execs into the one restored process, else the
/// restored processes it leaves re-parented to the hook. Other orphans are reaped silently,
/// and the hook exits when the last application process has, as tini does.
fn supervise(children: &Children, mask: &SigSet) -> i32 {
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
                    "dmtcp_coordinator (pid {}) exited ({}): checkpoints are no longer possible",
                    r.pid,
                    r.status
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
