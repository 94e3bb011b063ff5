//! Running commands with a deadline: a broken shim must fail a test, not hang it.

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr. After `timeout` the
/// process is killed and the returned output says so on stderr (its status is then "signal 9").
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    run(cmd, timeout, false)
}

/// Like [`output_with_timeout`], but stdin is a pipe that stays open (and silent) until the
/// command exits: script(1) ends the session as soon as its stdin reaches EOF.
pub fn output_with_open_stdin(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    run(cmd, timeout, true)
}

fn run(cmd: &mut Command, timeout: Duration, open_stdin: bool) -> io::Result<Output> {
    let stdin = if open_stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    // Its own process group, so that a timeout kills what it started too.
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let stdin = child.stdin.take();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, timed_out) = match rx.recv_timeout(timeout) {
        Ok(status) => (status?, false),
        Err(_) => {
            // SAFETY: kill(2) of our child's process group; the child has not been reaped yet
            // (the waiter thread is still blocked in wait()), so the group id is still ours.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            (rx.recv().map_err(io::Error::other)??, true)
        }
    };
    drop(stdin);
    // A grandchild that outlives the command may hold the pipes open: don't wait for it forever.
    let grace = Duration::from_secs(5);
    let stdout = stdout.recv_timeout(grace).unwrap_or_default();
    let mut stderr = stderr.recv_timeout(grace).unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(
            format!("\nmig-e2e: killed after {timeout:?}: {}\n", describe(cmd)).as_bytes(),
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The command line of `cmd`, quoted for sh: for error messages, and for script(1).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// "exit 3", "signal 9": what a test failure message should show.
pub fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{status}"),
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn describe_quotes_for_sh() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'a b' \"$x\"", ""]);
        assert_eq!(describe(&cmd), r#"sh -c 'echo '\''a b'\'' "$x"' ''"#);
        let out = output_with_timeout(
            Command::new("sh")
                .args(["-c", &describe(&cmd)])
                .env("x", "X"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b X\n");
    }

    #[test]
    fn kills_after_the_timeout() {
        let out = output_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGKILL));
        assert!(String::from_utf8_lossy(&out.stderr).contains("killed after"));
    }
}
