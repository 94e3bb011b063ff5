//! Where things are inside the container, as the shim's spec rewrite put them there.

use std::env;
use std::path::PathBuf;

/// The hook's settings, read from the environment the shim adds to the container's process.
///
/// Every default is the path the shim mounts the thing at, so a hand-written OCI bundle only
/// has to mount, not to configure.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node's DMTCP installation (`bin/`, `lib/dmtcp/`), mounted read-only.
    pub dmtcp_dir: PathBuf,
    /// Shared libraries DMTCP links against that a minimal image may lack (libatomic,
    /// libstdc++, libgcc_s), mounted read-only; may be absent.
    pub deps_dir: PathBuf,
    /// DMTCP's writable temp dir (DMTCP exits 99 without one).
    pub tmp_dir: PathBuf,
    /// Where checkpoint images are written, and read from at restart.
    pub ckpt_dir: PathBuf,
    /// Holds `ctl.sock`, the control socket the shim connects to from the host.
    pub ctl_dir: PathBuf,
    /// The coordinator's port; 0 lets the coordinator pick a free one (host networking).
    pub port: u16,
    /// The signal DMTCP uses internally to stop threads. DMTCP's default, SIGUSR2, turns a
    /// forwarded `kill -USR2` into a checkpoint request, so a real-time signal is used instead.
    pub ckpt_signal: i32,
}

/// Env var names of the contract with the shim.
pub mod var {
    pub const DMTCP_DIR: &str = "MIG_DMTCP_DIR";
    pub const DEPS_DIR: &str = "MIG_DMTCP_DEPS";
    pub const TMP_DIR: &str = "DMTCP_TMPDIR";
    pub const CKPT_DIR: &str = "MIG_CKPT_DIR";
    pub const CTL_DIR: &str = "MIG_CTL_DIR";
    pub const PORT: &str = "MIG_COORD_PORT";
    pub const CKPT_SIGNAL: &str = "MIG_DMTCP_CKPT_SIGNAL";
}

/// The default coordinator port; each container has its own network namespace.
pub const DEFAULT_PORT: u16 = 7779;

/// Error in the hook's configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    var: &'static str,
    value: String,
    reason: &'static str,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        let path = |var: &str, default: &str| {
            PathBuf::from(env::var_os(var).unwrap_or_else(|| default.into()))
        };
        let port = match env::var(var::PORT) {
            Ok(v) => v.parse().map_err(|_| ConfigError {
                var: var::PORT,
                value: v,
                reason: "not a port number",
            })?,
            Err(_) => DEFAULT_PORT,
        };
        let ckpt_signal = match env::var(var::CKPT_SIGNAL) {
            Ok(v) => match v.parse::<i32>() {
                Ok(n) if (1..=libc::SIGRTMAX()).contains(&n) => n,
                _ => {
                    return Err(ConfigError {
                        var: var::CKPT_SIGNAL,
                        value: v,
                        reason: "not a signal number",
                    });
                }
            },
            Err(_) => libc::SIGRTMAX() - 2,
        };
        Ok(Self {
            dmtcp_dir: path(var::DMTCP_DIR, "/.mig/dmtcp"),
            deps_dir: path(var::DEPS_DIR, "/.mig/deps"),
            tmp_dir: path(var::TMP_DIR, "/.mig/tmp"),
            ckpt_dir: path(var::CKPT_DIR, "/.mig/ckpt"),
            ctl_dir: path(var::CTL_DIR, "/.mig/ctl"),
            port,
            ckpt_signal,
        })
    }
}
