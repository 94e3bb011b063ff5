//! End-to-end tests of the runtime under test, driven like a user drives it: `ctr run --runtime`.
//!
//! They run against `MIG_E2E_RUNTIME` (default `io.containerd.mig.v2`); with
//! `MIG_E2E_RUNTIME=io.containerd.runc.v2` they check themselves against containerd's own shim.

use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use mig_e2e::ShimTest;
use mig_e2e::command::{describe, output_with_open_stdin, status_text};

const WAIT: Duration = Duration::from_secs(60);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` exited with `code`, showing everything it printed otherwise.
#[track_caller]
fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}, got {}\nstdout: {}\nstderr: {}",
        status_text(out.status),
        stdout(out),
        stderr(out)
    );
}

/// Guards every other test: the container really is served by the runtime under test, and for
/// our runtime by the binary just built, not a stale copy on PATH.
#[test]
fn the_runtime_under_test_serves_the_container() {
    let Some(t) = ShimTest::start("the_runtime_under_test_serves_the_container") else {
        return;
    };
    t.run_detached("who", &["sleep", "1000"]).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&t.node.ctr_ok(&["containers", "info", "who"]).unwrap()).unwrap();
    assert_eq!(
        info["Runtime"]["Name"],
        t.runtime.as_str(),
        "container record: {info}"
    );

    let shims = t.node.shims();
    let shim = shims
        .iter()
        .find(|p| p.has_arg_pair("-id", "who"))
        .unwrap_or_else(|| panic!("no shim with -id who among {shims:?}"));
    let exe = std::fs::read_link(format!("/proc/{}/exe", shim.pid)).unwrap();
    let expected = mig_e2e::shim_binary_name(&t.runtime).unwrap();
    assert_eq!(
        exe.file_name().unwrap().to_string_lossy(),
        expected,
        "shim executable {}",
        exe.display()
    );
    if t.runtime == mig_e2e::MIG_RUNTIME {
        let built = mig_e2e::shim_dir().join(&expected).canonicalize().unwrap();
        assert_eq!(
            exe, built,
            "containerd ran a shim other than the one under test"
        );
    }
    t.node
        .ctr_ok(&["task", "delete", "--force", "who"])
        .unwrap();
    t.node.ctr_ok(&["containers", "rm", "who"]).unwrap();
    t.assert_clean();
}

#[test]
fn run_prints_stdout() {
    let Some(t) = ShimTest::start("run_prints_stdout") else {
        return;
    };
    let out = t.run("echo", &["echo", "hello"]);
    assert_exit(&out, 0, "ctr run echo hello");
    assert_eq!(stdout(&out), "hello\n");
    t.assert_clean();
}

#[test]
fn run_returns_the_exit_status() {
    let Some(t) = ShimTest::start("run_returns_the_exit_status") else {
        return;
    };
    let out = t.run("exit3", &["sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_exit(&out, 3, "ctr run sh -c 'exit 3'");
    assert!(
        stderr(&out).contains("to-stderr"),
        "container stderr not forwarded: {}",
        stderr(&out)
    );
    t.assert_clean();
}

#[test]
fn exec_into_a_running_container() {
    let Some(t) = ShimTest::start("exec_into_a_running_container") else {
        return;
    };
    t.run_detached("box", &["sleep", "1000"]).unwrap();

    let out = t.node.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "box",
        "sh",
        "-c",
        "echo in-exec $((6*7)); exit 5",
    ]);
    assert_exit(&out, 5, "ctr task exec");
    assert_eq!(stdout(&out), "in-exec 42\n");

    // The exec shares the container's filesystem.
    let out = t.node.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "box",
        "sh",
        "-c",
        "echo shared > /tmp/f",
    ]);
    assert_exit(&out, 0, "ctr task exec (write)");
    let out = t
        .node
        .ctr(&["task", "exec", "--exec-id", "e3", "box", "cat", "/tmp/f"]);
    assert_exit(&out, 0, "ctr task exec (read)");
    assert_eq!(stdout(&out), "shared\n");

    // An exec of a missing binary fails and leaves the container running.
    let out = t
        .node
        .ctr(&["task", "exec", "--exec-id", "e4", "box", "/nonexistent"]);
    assert!(
        !out.status.success(),
        "exec of /nonexistent succeeded: {}",
        stdout(&out)
    );
    assert_eq!(
        t.node.task_status("box").unwrap().as_deref(),
        Some("RUNNING")
    );

    t.node
        .ctr_ok(&["task", "delete", "--force", "box"])
        .unwrap();
    t.node.ctr_ok(&["containers", "rm", "box"]).unwrap();
    t.assert_clean();
}

/// Runs `command` (a ctr command line) in a 33x101 terminal, as a user at a shell would:
/// `ctr run -t` needs a terminal, and script(1) gives it one, sized by stty first.
fn in_terminal(command: &Command) -> Output {
    let line = format!("stty rows 33 cols 101; exec {}", describe(command));
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"]);
    output_with_open_stdin(&mut cmd, WAIT).unwrap()
}

/// What a container prints to show its terminal: ctr passes the size on (ResizePty) just after
/// the task starts, so it polls for it. (busybox's `stty size` prints nothing, and exits 0,
/// while the size is 0x0.)
const TTY_PROBE: &str = r#"tty; for i in $(seq 50); do s=$(stty size 2>/dev/null); [ -n "$s" ] && [ "$s" != "0 0" ] && break; sleep 0.1; done; echo "size=$s"; exit 4"#;

#[track_caller]
fn assert_terminal(out: &Output, what: &str) {
    let text = stdout(out).replace('\r', "");
    assert_exit(out, 4, what);
    assert!(
        text.contains("/dev/pts/0"),
        "{what}: `tty` printed {text:?}"
    );
    assert!(
        text.contains("size=33 101"),
        "{what}: `stty size` printed {text:?}"
    );
}

#[test]
fn tty_reaches_the_container() {
    let Some(t) = ShimTest::start("tty_reaches_the_container") else {
        return;
    };
    let out = in_terminal(&t.run_command(&["-t", "--rm"], "tty", &["sh", "-c", TTY_PROBE]));
    assert_terminal(&out, "ctr run -t");
    t.assert_clean();
}

/// Kubernetes names containers with 64 hex digits, under containerd's state
/// `/run/containerd/io.containerd.runtime.v2.task/k8s.io/<id>/`: a console socket made in the
/// bundle directory would not fit in a unix socket address (107 bytes).
#[test]
fn tty_with_a_kubernetes_length_id() {
    let Some(t) = ShimTest::start("tty_with_a_kubernetes_length_id") else {
        return;
    };
    let id = "4f9c2a7be1d3058c6a2e9b7f0d1c3e5a7b9d2f4e6a8c0b1d3f5e7a9c2b4d6f8e";
    assert_eq!(id.len(), 64);
    let out = in_terminal(&t.run_command(&["-t", "--rm"], id, &["sh", "-c", TTY_PROBE]));
    assert_terminal(&out, "ctr run -t with a 64-character id");
    t.assert_clean();
}

#[test]
fn exec_with_a_tty() {
    let Some(t) = ShimTest::start("exec_with_a_tty") else {
        return;
    };
    t.run_detached("box", &["sleep", "1000"]).unwrap();
    let mut exec = t.node.ctr_command();
    exec.args([
        "task",
        "exec",
        "-t",
        "--exec-id",
        "term",
        "box",
        "sh",
        "-c",
        TTY_PROBE,
    ]);
    let out = in_terminal(&exec);
    // The exec gets a console of its own, not the init's (which has none).
    assert_exit(&out, 4, "ctr task exec -t");
    let text = stdout(&out).replace('\r', "");
    assert!(
        text.contains("/dev/pts/"),
        "ctr task exec -t: `tty` printed {text:?}"
    );
    assert!(
        text.contains("size=33 101"),
        "ctr task exec -t: `stty size` printed {text:?}"
    );
    t.node
        .ctr_ok(&["task", "delete", "--force", "box"])
        .unwrap();
    t.node.ctr_ok(&["containers", "rm", "box"]).unwrap();
    t.assert_clean();
}

#[test]
fn stdin_reaches_the_container() {
    let Some(t) = ShimTest::start("stdin_reaches_the_container") else {
        return;
    };
    // Input only once the task runs: ctr drops an EOF that arrives before its task exists.
    let mut run = t
        .spawn_until("cat", &["sh", "-c", "echo ready; cat; echo done"], "ready")
        .unwrap();
    run.send(b"line1\nline2\n", true).unwrap();
    let (code, out) = run.finish(WAIT).unwrap();
    assert_eq!(
        code, 0,
        "exit status of cat after EOF on stdin; stdout {out:?}"
    );
    assert_eq!(
        out, "ready\nline1\nline2\ndone\n",
        "stdin forwarded and closed at EOF"
    );
    t.assert_clean();
}

#[test]
fn pause_and_resume() {
    let Some(t) = ShimTest::start("pause_and_resume") else {
        return;
    };
    t.run_detached("p", &["sh", "-c", "while true; do sleep 0.1; done"])
        .unwrap();
    t.node.ctr_ok(&["task", "pause", "p"]).unwrap();
    t.node.wait_for_status("p", "PAUSED", WAIT).unwrap();
    // A paused container cannot run an exec: the freezer holds it.
    t.node.ctr_ok(&["task", "resume", "p"]).unwrap();
    t.node.wait_for_status("p", "RUNNING", WAIT).unwrap();
    let out = t
        .node
        .ctr(&["task", "exec", "--exec-id", "after", "p", "echo", "alive"]);
    assert_exit(&out, 0, "exec after resume");
    assert_eq!(stdout(&out), "alive\n");
    t.node.ctr_ok(&["task", "delete", "--force", "p"]).unwrap();
    t.node.ctr_ok(&["containers", "rm", "p"]).unwrap();
    t.assert_clean();
}

#[test]
fn sigterm_reaches_the_process() {
    let Some(t) = ShimTest::start("sigterm_reaches_the_process") else {
        return;
    };
    let script = r#"trap "echo got-term; exit 7" TERM; echo ready; while true; do sleep 0.1; done"#;
    let run = t
        .spawn_until("term", &["sh", "-c", script], "ready")
        .unwrap();
    t.node
        .ctr_ok(&["task", "kill", "--signal", "SIGTERM", "term"])
        .unwrap();
    let (code, out) = run.finish(WAIT).unwrap();
    assert_eq!(code, 7, "exit status after SIGTERM; stdout {out:?}");
    assert!(out.contains("got-term"), "the trap did not run: {out:?}");
    t.assert_clean();
}

#[test]
fn sigkill_gives_137() {
    let Some(t) = ShimTest::start("sigkill_gives_137") else {
        return;
    };
    let run = t
        .spawn_until(
            "kill",
            &["sh", "-c", "echo ready; exec sleep 1000"],
            "ready",
        )
        .unwrap();
    t.node
        .ctr_ok(&["task", "kill", "--signal", "SIGKILL", "kill"])
        .unwrap();
    let (code, _) = run.finish(WAIT).unwrap();
    assert_eq!(code, 137, "exit status after SIGKILL");
    t.assert_clean();
}

#[test]
fn delete_leaves_nothing_behind() {
    let Some(t) = ShimTest::start("delete_leaves_nothing_behind") else {
        return;
    };
    t.run_detached("d", &["sleep", "1000"]).unwrap();
    assert!(
        !t.node.leftover_mounts().is_empty(),
        "a running container should have its rootfs mounted under the node"
    );
    assert!(
        !t.node.shims().is_empty(),
        "no shim found for the running container"
    );

    // A running task cannot be deleted without --force.
    let out = t.node.ctr(&["task", "delete", "d"]);
    assert!(
        !out.status.success(),
        "`ctr task delete` of a running task succeeded"
    );

    t.node
        .ctr_ok(&["task", "kill", "--signal", "SIGKILL", "d"])
        .unwrap();
    t.node.wait_for_status("d", "STOPPED", WAIT).unwrap();
    t.node.ctr_ok(&["task", "delete", "d"]).unwrap();
    assert_eq!(
        t.node.task_status("d").unwrap(),
        None,
        "task still listed after delete"
    );
    t.node.ctr_ok(&["containers", "rm", "d"]).unwrap();
    let left = t.node.ctr_ok(&["containers", "ls", "-q"]).unwrap();
    assert!(left.trim().is_empty(), "containers left: {left}");
    t.assert_clean();
}

#[test]
fn failed_start_reports_runc_error() {
    let Some(t) = ShimTest::start("failed_start_reports_runc_error") else {
        return;
    };
    let out = t.run("bad", &["/nonexistent"]);
    assert!(
        !out.status.success(),
        "running /nonexistent succeeded: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("no such file or directory") && err.contains("/nonexistent"),
        "ctr's error should carry runc's message naming the binary; got: {err}\nshim log:\n{}",
        t.node.log_lines_with("bad")
    );
    // `--rm` removes the container even when its task failed to start.
    let left = t.node.ctr_ok(&["containers", "ls", "-q"]).unwrap();
    for id in left.lines() {
        t.node.ctr_ok(&["containers", "rm", id]).unwrap();
    }
    t.assert_clean();
}

#[test]
fn ps_and_metrics() {
    let Some(t) = ShimTest::start("ps_and_metrics") else {
        return;
    };
    t.run_detached("m", &["sh", "-c", "sleep 1000 & wait"])
        .unwrap();
    let init = t
        .node
        .tasks()
        .unwrap()
        .into_iter()
        .find(|x| x.id == "m")
        .expect("task m listed")
        .pid;

    let ps = t.node.ctr_ok(&["task", "ps", "m"]).unwrap();
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        pids.contains(&init),
        "`ctr task ps` lacks the init pid {init}: {ps}"
    );
    assert!(
        pids.len() >= 2,
        "`ctr task ps` should list sh and its sleep: {ps}"
    );

    let metrics = t.node.ctr_ok(&["task", "metrics", "m"]).unwrap();
    assert!(
        metrics.contains("memory.usage"),
        "no memory usage in `ctr task metrics`: {metrics}"
    );
    assert!(
        metrics.contains("pids.current"),
        "no pid count in `ctr task metrics`: {metrics}"
    );
    let pid_count = metrics
        .lines()
        .find(|l| l.starts_with("pids.current"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok());
    assert_eq!(
        pid_count,
        Some(2),
        "pids.current should count sh and sleep: {metrics}"
    );

    t.node.ctr_ok(&["task", "delete", "--force", "m"]).unwrap();
    t.node.ctr_ok(&["containers", "rm", "m"]).unwrap();
    t.assert_clean();
}

#[test]
fn twenty_containers_at_once() {
    let Some(t) = ShimTest::start("twenty_containers_at_once") else {
        return;
    };
    let ids: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    let failures: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let t = &t;
                s.spawn(move || -> Result<(), String> {
                    t.run_detached(id, &["sleep", "1000"])
                        .map_err(|e| format!("{id}: start: {e:#}"))?;
                    let out = t
                        .node
                        .ctr(&["task", "exec", "--exec-id", "x", id, "echo", id]);
                    if stdout(&out).trim() != id {
                        return Err(format!(
                            "{id}: exec printed {:?} ({})",
                            stdout(&out),
                            stderr(&out).trim()
                        ));
                    }
                    t.node
                        .ctr_ok(&["task", "delete", "--force", id])
                        .map_err(|e| format!("{e:#}"))?;
                    t.node
                        .ctr_ok(&["containers", "rm", id])
                        .map_err(|e| format!("{e:#}"))?;
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("worker panicked").err())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of 20 failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let left = t.node.ctr_ok(&["containers", "ls", "-q"]).unwrap();
    assert!(left.trim().is_empty(), "containers left: {left}");
    t.assert_clean();
}
