//! `mig-restore-hook`: the PID 1 the shim injects into containers checkpointed with DMTCP.
//!
//! `mig-restore-hook -- ENTRYPOINT ARGS...` starts a DMTCP coordinator, then either restores
//! the checkpoint in `$MIG_CKPT_DIR` or launches the entrypoint under `dmtcp_launch`, and serves
//! `$MIG_CTL_DIR/ctl.sock` (see `protocol`) so the shim can checkpoint it. DMTCP cannot do
//! without such an init: the wrapped program cannot be PID 1 itself, and `dmtcp_restart`
//! leaves the restored processes to be adopted by PID 1.

mod children;
mod config;
mod control;
mod dmtcp;
mod elf;
mod images;
mod libs;
mod protocol;
mod supervisor;

/// Logs to stderr, which is the container's log.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("mig-restore-hook: {}", format_args!($($arg)*))
    };
}

fn main() {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match args.first().and_then(|a| a.to_str()) {
        Some("--") => {
            args.remove(0);
        }
        Some("--version") => {
            println!("mig-restore-hook {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        _ => {}
    }
    if args.is_empty() {
        log!("usage: mig-restore-hook -- ENTRYPOINT [ARGS...]");
        std::process::exit(2);
    }
    match supervisor::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            log!("{e}");
            // 127 as a shell reports a command it could not run.
            std::process::exit(127);
        }
    }
}
