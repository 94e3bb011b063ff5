//! The control protocol between the shim (on the host) and the hook (in the container).
//!
//! One request line, one reply line, over `$MIG_CTL_DIR/ctl.sock` (a unix stream socket: the
//! shim reaches it through the bind-mounted host dir, whatever the container's network
//! namespace):
//!
//! ```text
//! checkpoint [TIMEOUT_MS]       ->  ok IMAGE...       (names inside the checkpoint dir)
//! checkpoint-stop [TIMEOUT_MS]  ->  ok IMAGE...       (and the application is gone)
//! status                        ->  ok state=running mode=launch dmtcp=4.2.0 peers=1 port=7779
//! version                       ->  ok dmtcp=4.2.0 hook=0.1.0
//! anything failing              ->  error MESSAGE
//! ```
//!
//! `checkpoint` leaves the application running. `checkpoint-stop` is the consistent
//! checkpoint for a migration: DMTCP ends every process of the application right after writing
//! its image (`dmtcp_command -kc`), so nothing it does after the memory image reaches files or
//! volumes. The reply comes once the images are complete *and* the processes are gone; the
//! hook then exits (status 137, as if killed). A failure reply says `stopped=no` when the
//! application was never touched and keeps running, `stopped=yes` when DMTCP had already begun
//! (the application is gone without a checkpoint):
//! `error stopped=no MESSAGE` / `error stopped=yes MESSAGE`.
//!
//! Tokens are space-separated; `%`, space, tab, CR and LF inside a token are percent-encoded.
//! `shim/src/dmtcp.rs` holds the client side of this format; keep the two in step.

use std::time::Duration;

/// Default time a checkpoint may take when the request names none.
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Checkpoint, leaving the application running.
    Checkpoint {
        timeout: Duration,
    },
    /// Checkpoint, and end the application with its image (a stop for migration).
    CheckpointStop {
        timeout: Duration,
    },
    Status,
    Version,
}

impl Request {
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        let timeout = |ms: Option<&str>| match ms {
            None => Ok(DEFAULT_CHECKPOINT_TIMEOUT),
            Some(ms) => ms
                .parse()
                .map(Duration::from_millis)
                .map_err(|_| format!("checkpoint timeout {ms:?} is not milliseconds")),
        };
        let req = match (words.next(), words.next()) {
            (Some("checkpoint"), ms) => Request::Checkpoint {
                timeout: timeout(ms)?,
            },
            (Some("checkpoint-stop"), ms) => Request::CheckpointStop {
                timeout: timeout(ms)?,
            },
            (Some("status"), None) => Request::Status,
            (Some("version"), None) => Request::Version,
            _ => return Err(format!("unknown request {:?}", line.trim())),
        };
        match words.next() {
            None => Ok(req),
            Some(_) => Err(format!("unexpected arguments in {:?}", line.trim())),
        }
    }
}

/// Formats a reply line (with its newline).
pub fn reply(result: Result<Vec<String>, String>) -> String {
    match result {
        Ok(tokens) if tokens.is_empty() => "ok\n".to_owned(),
        Ok(tokens) => {
            let encoded: Vec<String> = tokens.iter().map(|t| encode(t)).collect();
            format!("ok {}\n", encoded.join(" "))
        }
        Err(msg) => format!("error {}\n", msg.replace(['\n', '\r'], " ")),
    }
}

pub fn encode(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    for c in token.chars() {
        match c {
            '%' | ' ' | '\t' | '\r' | '\n' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(
            Request::parse("checkpoint\n"),
            Ok(Request::Checkpoint {
                timeout: DEFAULT_CHECKPOINT_TIMEOUT
            })
        );
        assert_eq!(
            Request::parse("checkpoint 1500"),
            Ok(Request::Checkpoint {
                timeout: Duration::from_millis(1500)
            })
        );
        assert_eq!(
            Request::parse("checkpoint-stop 2000\n"),
            Ok(Request::CheckpointStop {
                timeout: Duration::from_millis(2000)
            })
        );
        assert_eq!(
            Request::parse("checkpoint-stop"),
            Ok(Request::CheckpointStop {
                timeout: DEFAULT_CHECKPOINT_TIMEOUT
            })
        );
        assert!(Request::parse("checkpoint-stop 1 2").is_err());
        assert_eq!(Request::parse("status"), Ok(Request::Status));
        assert_eq!(Request::parse("version\n"), Ok(Request::Version));
        assert!(Request::parse("checkpoint soon").is_err());
        assert!(Request::parse("status now").is_err());
        assert!(Request::parse("").is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(
            reply(Ok(vec!["ckpt_a b.dmtcp".into(), "x%y".into()])),
            "ok ckpt_a%20b.dmtcp x%25y\n"
        );
        assert_eq!(reply(Ok(vec![])), "ok\n");
        assert_eq!(reply(Err("bad\nthing".into())), "error bad thing\n");
    }
}
