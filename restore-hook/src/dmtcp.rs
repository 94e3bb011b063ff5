//! The DMTCP command lines the hook runs, and what their output means.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::config::Config;

/// The coordinator is always reached over the container's own loopback.
pub const COORD_HOST: &str = "127.0.0.1";

/// The fd at which `dmtcp_coordinator` takes over a listening socket it inherits instead of
/// making its own (DMTCP's `PROTECTED_COORD_FD`, `PROTECTED_FD_START + 1` in
/// `include/protectedfds.h`): how `dmtcp_launch` starts a coordinator on a port it already
/// knows.
pub const PROTECTED_COORD_FD: i32 = 821;

/// The node's DMTCP, seen from inside the container, and how to run its programs.
#[derive(Debug, Clone)]
pub struct Dmtcp {
    bin: PathBuf,
    ckpt_dir: PathBuf,
    tmp_dir: PathBuf,
    ckpt_signal: i32,
    /// `LD_LIBRARY_PATH` for DMTCP's programs and the application (see `libs`).
    library_path: Option<OsString>,
    /// The port the coordinator listens on, once it is known.
    pub port: u16,
}

impl Dmtcp {
    pub fn new(cfg: &Config, library_path: Option<OsString>) -> Self {
        Self {
            bin: cfg.dmtcp_dir.join("bin"),
            ckpt_dir: cfg.ckpt_dir.clone(),
            tmp_dir: cfg.tmp_dir.clone(),
            ckpt_signal: cfg.ckpt_signal,
            library_path,
            port: cfg.port,
        }
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A DMTCP program with the environment every one of them needs.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        cmd.env("DMTCP_TMPDIR", &self.tmp_dir);
        // DMTCP's errors vanish when stderr is a pipe (runc without a tty) unless told where.
        if std::env::var_os("JALIB_STDERR_PATH").is_none() {
            cmd.env("JALIB_STDERR_PATH", "/dev/stderr");
        }
        if let Some(lp) = &self.library_path {
            cmd.env("LD_LIBRARY_PATH", lp);
        }
        cmd
    }

    /// The coordinator, in the foreground so the hook supervises it. It must inherit its
    /// listening socket, on [`Self::port`], as fd [`PROTECTED_COORD_FD`] (the port argument
    /// only names it then).
    pub fn coordinator(&self) -> Command {
        let mut cmd = self.command("dmtcp_coordinator");
        cmd.arg("--coord-port")
            .arg(self.port.to_string())
            .arg("--ckptdir")
            .arg(&self.ckpt_dir)
            .arg("-q");
        cmd
    }

    fn join_args(&self, cmd: &mut Command) {
        cmd.args([
            "--join-coordinator",
            "--coord-host",
            COORD_HOST,
            "--coord-port",
        ])
        .arg(self.port.to_string());
    }

    /// The entrypoint under DMTCP; `dmtcp_launch` execs it, so the pid is the application's.
    pub fn launch(&self, args: &[OsString]) -> Command {
        let mut cmd = self.command("dmtcp_launch");
        self.join_args(&mut cmd);
        cmd.arg("--ckptdir")
            .arg(&self.ckpt_dir)
            .arg("--no-gzip")
            .arg("--ckpt-signal")
            .arg(self.ckpt_signal.to_string())
            .args(args);
        cmd
    }

    /// Restores `images` (which recorded their ckpt dir and ckpt signal).
    pub fn restart(&self, images: &[PathBuf]) -> Command {
        let mut cmd = self.command("dmtcp_restart");
        self.join_args(&mut cmd);
        cmd.arg("--ckptdir").arg(&self.ckpt_dir).args(images);
        cmd
    }

    /// `dmtcp_command` with one command flag (`-c`, `-s`).
    pub fn control(&self, flag: &str) -> Command {
        let mut cmd = self.command("dmtcp_command");
        cmd.args(["--coord-host", COORD_HOST, "--coord-port"])
            .arg(self.port.to_string())
            .arg(flag);
        cmd
    }

    pub fn version_command(&self) -> Command {
        let mut cmd = self.command("dmtcp_launch");
        cmd.arg("--version");
        cmd
    }
}

/// What `dmtcp_command -s` says about the computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordStatus {
    pub peers: usize,
    /// All peers are running (false while a checkpoint or restart is under way).
    pub running: bool,
}

/// Parses `dmtcp_command -s` output (`NUM_PEERS=1`, `RUNNING=yes`).
pub fn parse_status(text: &str) -> Option<CoordStatus> {
    let mut peers = None;
    let mut running = None;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("NUM_PEERS=") {
            peers = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("RUNNING=") {
            running = Some(v.trim() == "yes");
        }
    }
    Some(CoordStatus {
        peers: peers?,
        running: running?,
    })
}

/// Parses `dmtcp_launch --version` (`dmtcp_launch (DMTCP) 4.2.0`).
pub fn parse_version(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let v = first.split("(DMTCP)").nth(1)?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The last `n` lines of `bytes`, for error messages, without DMTCP's terminal colours.
pub fn tail(bytes: &[u8], n: usize) -> String {
    let text = strip_ansi(&String::from_utf8_lossy(bytes));
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Removes `ESC [ ... letter` sequences: DMTCP colours its messages even into files.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_output() {
        let out = "Coordinator:\n  Host: 127.0.0.1\n  Port: 42521\nStatus...\n  NUM_PEERS=2\n  \
                   RUNNING=no\n  CKPT_INTERVAL=0 (checkpoint manually)\n";
        assert_eq!(
            parse_status(out),
            Some(CoordStatus {
                peers: 2,
                running: false
            })
        );
        assert_eq!(parse_status("Status...\n"), None);
    }

    #[test]
    fn version_output() {
        assert_eq!(
            parse_version("dmtcp_launch (DMTCP) 4.2.0\nLicense LGPLv3+").as_deref(),
            Some("4.2.0")
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn tails() {
        assert_eq!(tail(b"a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail(b"\x1b[0;32m[note] done\x1b[0m\n", 1), "[note] done");
    }
}
