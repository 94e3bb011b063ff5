//! End to end, as root, with runc and a real DMTCP: a counter checkpointed through the control
//! socket in one container continues counting in a brand-new container.
//!
//! It builds the OCI bundles the way the shim's `inject` does (same mounts and env). Skips
//! with a one-line reason when not root, or when runc, gcc or DMTCP (`MIG_DMTCP_DIR`, or
//! `dmtcp_launch` on PATH) is missing. The hook must be static to run in the minimal rootfs:
//! set `MIG_RESTORE_HOOK` to a static build; otherwise the test build is used and its shared
//! libraries are copied into the rootfs.
//!
//! ```text
//! sudo -E cargo test -p mig-restore-hook --test dmtcp_runc -- --nocapture
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const COUNTER_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
/* Writes an increasing number to argv[1] every 100 ms (by rename, so readers see whole numbers). */
int main(int argc, char **argv) {
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
  for (unsigned long n = 0;; n++) {
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); return 2; }
    fprintf(f, "%lu\n", n);
    fclose(f);
    rename(tmp, argv[1]);
    usleep(100000);
  }
}
"#;

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn dmtcp_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MIG_DMTCP_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(launch) = which("dmtcp_launch") {
        return Some(launch.parent()?.parent()?.to_path_buf());
    }
    // Where the other end-to-end tests (tests/src/dmtcp.rs) look last, too.
    let opt = Path::new("/opt/dmtcp");
    opt.join("bin/dmtcp_launch")
        .is_file()
        .then(|| opt.to_path_buf())
}

/// (soname, resolved path) of what `ldd` says `bin` needs.
fn ldd(bin: &Path) -> Vec<(String, PathBuf)> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some((name, rest)) = l.split_once(" => ") {
                let path = rest.split_whitespace().next()?;
                path.starts_with('/')
                    .then(|| (name.to_owned(), PathBuf::from(path)))
            } else {
                // The loader: "/lib64/ld-linux-x86-64.so.2 (0x...)".
                let path = l.split_whitespace().next()?;
                path.starts_with('/').then(|| {
                    let name = Path::new(path)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    (name, PathBuf::from(path))
                })
            }
        })
        .collect()
}

/// Copies `src` into `rootfs` at the same absolute path (`dest` when given).
fn install(rootfs: &Path, src: &Path, dest: Option<&Path>) {
    let dest = rootfs.join(dest.unwrap_or(src).strip_prefix("/").unwrap());
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(src, &dest)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dest.display()));
}

/// What the shim's `DmtcpInstall` stages: DMTCP's non-glibc dependencies.
fn stage_deps(dmtcp: &Path, deps: &Path) {
    fs::create_dir_all(deps).unwrap();
    let mut objects: Vec<PathBuf> = fs::read_dir(dmtcp.join("bin"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    objects.extend(
        fs::read_dir(dmtcp.join("lib/dmtcp"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    // libc and the loader must be the image's own (the application already runs on them);
    // everything else, libm included, may be missing from a minimal image.
    let glibc = ["libc.so", "ld-linux"];
    let mut seen = BTreeSet::new();
    for o in objects {
        for (name, path) in ldd(&o) {
            if glibc.iter().any(|g| name.starts_with(g)) || !seen.insert(name.clone()) {
                continue;
            }
            fs::copy(&path, deps.join(&name)).unwrap();
        }
    }
}

struct Env {
    dir: PathBuf,
    dmtcp: PathBuf,
    hook: PathBuf,
}

impl Env {
    fn bundle(&self, name: &str, hostname: &str, args: &[&str]) -> PathBuf {
        let bundle = self.dir.join(name);
        fs::create_dir_all(self.dir.join(format!("{name}-tmp"))).unwrap();
        fs::create_dir_all(self.dir.join(format!("{name}-ctl"))).unwrap();
        let template = self.dir.join("spec-template");
        if !template.join("config.json").exists() {
            let status = Command::new("runc")
                .arg("spec")
                .current_dir(&template)
                .status();
            assert!(status.unwrap().success(), "runc spec failed");
        }
        let mut spec: Value =
            serde_json::from_slice(&fs::read(self.dir.join("spec-template/config.json")).unwrap())
                .unwrap();
        let bind = |src: PathBuf, dst: &str, ro: bool| {
            json!({"destination": dst, "type": "bind", "source": src,
                   "options": [ "rbind", if ro { "ro" } else { "rw" }, "nosuid", "nodev"]})
        };
        let mounts = spec["mounts"].as_array_mut().unwrap();
        mounts.push(bind(self.hook.clone(), "/.mig/restore-hook", true));
        mounts.push(bind(self.dmtcp.clone(), "/.mig/dmtcp", true));
        mounts.push(bind(self.dir.join("deps"), "/.mig/deps", true));
        mounts.push(bind(
            self.dir.join(format!("{name}-tmp")),
            "/.mig/tmp",
            false,
        ));
        mounts.push(bind(self.dir.join("ckpt"), "/.mig/ckpt", false));
        mounts.push(bind(
            self.dir.join(format!("{name}-ctl")),
            "/.mig/ctl",
            false,
        ));
        mounts.push(bind(self.dir.join("data"), "/data", false));
        spec["root"] = json!({"path": self.dir.join("rootfs"), "readonly": true});
        spec["hostname"] = json!(hostname);
        let p = &mut spec["process"];
        p["terminal"] = json!(false);
        let mut argv = vec!["/.mig/restore-hook", "--"];
        argv.extend_from_slice(args);
        p["args"] = json!(argv);
        p["env"].as_array_mut().unwrap().extend(
            [
                "MIG_DMTCP_DIR=/.mig/dmtcp",
                "MIG_DMTCP_DEPS=/.mig/deps",
                "DMTCP_TMPDIR=/.mig/tmp",
                "MIG_CKPT_DIR=/.mig/ckpt",
                "MIG_CTL_DIR=/.mig/ctl",
                "MIG_COORD_PORT=7779",
            ]
            .map(Value::from),
        );
        fs::create_dir_all(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap(),
        )
        .unwrap();
        bundle
    }

    /// `runc run` in the foreground: its exit status is the container's init's.
    fn run(&self, bundle: &Path, id: &str) -> Child {
        let log = fs::File::create(self.dir.join(format!("{id}.log"))).unwrap();
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log(&self, id: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default()
    }

    fn count(&self) -> Option<u64> {
        fs::read_to_string(self.dir.join("data/count"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits for the counter file to satisfy `pred`, failing early if the container exits.
    fn wait_count(
        &self,
        id: &str,
        runc: &mut Child,
        pred: impl Fn(u64) -> bool,
        timeout: Duration,
    ) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(n) = self.count().filter(|n| pred(*n)) {
                return n;
            }
            if let Some(status) = runc.try_wait().unwrap() {
                panic!("container {id} exited ({status}); log:\n{}", self.log(id));
            }
            assert!(
                start.elapsed() < timeout,
                "counter did not advance; log of {id}:\n{}",
                self.log(id)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn request(socket: &Path, line: &str) -> String {
    let mut s =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    reply.trim_end().to_owned()
}

fn runc(args: &[&str]) {
    let _ = Command::new("runc")
        .args(args)
        .stderr(Stdio::null())
        .status();
}

fn exit_of(child: &mut Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The test's environment, or `None` (after printing why) when it cannot run here.
fn setup() -> Option<(tempfile::TempDir, Env)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (runc containers)");
        return None;
    }
    let Some(dmtcp) = dmtcp_dir().filter(|d| d.join("bin/dmtcp_launch").is_file()) else {
        skip(
            "DMTCP not installed (MIG_DMTCP_DIR unset, no dmtcp_launch on PATH, nothing in /opt/dmtcp)",
        );
        return None;
    };
    for tool in ["runc", "gcc", "ldd"] {
        if which(tool).is_none() {
            skip(&format!("{tool} not on PATH"));
            return None;
        }
    }
    let hook = std::env::var_os("MIG_RESTORE_HOOK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mig-restore-hook")));

    let tmp = tempfile::Builder::new()
        .prefix("mig-dmtcp-e2e")
        .tempdir()
        .unwrap();
    let env = Env {
        dir: tmp.path().to_path_buf(),
        dmtcp: dmtcp.clone(),
        hook: hook.clone(),
    };
    let rootfs = env.dir.join("rootfs");
    for d in ["rootfs", "data", "ckpt", "spec-template"] {
        fs::create_dir_all(env.dir.join(d)).unwrap();
    }
    fs::write(env.dir.join("counter.c"), COUNTER_C).unwrap();
    let counter = env.dir.join("counter");
    let cc = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&counter)
        .arg(env.dir.join("counter.c"))
        .status();
    assert!(cc.unwrap().success(), "gcc failed");
    // A minimal image: the counter and what it links against, nothing else (no shell, no
    // libatomic or libstdc++: those come from the node's DMTCP deps).
    install(&rootfs, &counter, Some(Path::new("/bin/counter")));
    let mut libs = ldd(&counter);
    if !ldd(&hook).is_empty() {
        println!(
            "note: {} is dynamic (set MIG_RESTORE_HOOK to a static build); copying its libraries",
            hook.display()
        );
        libs.extend(ldd(&hook));
    }
    for (_, path) in libs {
        install(&rootfs, &path, None);
    }
    stage_deps(&dmtcp, &env.dir.join("deps"));
    Some((tmp, env))
}

#[test]
fn counter_continues_in_a_new_container() {
    let Some((_tmp, env)) = setup() else { return };

    // --- container A: launch, count, checkpoint, kill --------------------------------------
    let bundle_a = env.bundle("a", "node-a", &["/bin/counter", "/data/count"]);
    let id_a = format!("mig-e2e-a-{}", std::process::id());
    let mut a = env.run(&bundle_a, &id_a);
    let started = Instant::now();
    env.wait_count(&id_a, &mut a, |n| n >= 10, Duration::from_secs(20));
    println!(
        "container A counting after {} ms",
        started.elapsed().as_millis()
    );
    let sock_a = env.dir.join("a-ctl/ctl.sock");
    let version = request(&sock_a, "version\n");
    assert!(version.starts_with("ok dmtcp="), "{version}");
    let before = env.count().unwrap();
    let t = Instant::now();
    let reply = request(&sock_a, "checkpoint 30000\n");
    let checkpoint_ms = t.elapsed().as_millis();
    let after = env.count().unwrap();
    assert!(
        reply.starts_with("ok ckpt_"),
        "checkpoint failed: {reply}\nlog:\n{}",
        env.log(&id_a)
    );
    let status = request(&sock_a, "status\n");
    assert!(
        status.contains("state=running") && status.contains("mode=launch"),
        "{status}"
    );
    let image_bytes: u64 = fs::read_dir(env.dir.join("ckpt"))
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    env.wait_count(&id_a, &mut a, |n| n > after + 3, Duration::from_secs(5));
    runc(&["kill", &id_a, "KILL"]);
    let code_a = exit_of(&mut a, Duration::from_secs(10));
    let killed_at = env.count().unwrap();
    runc(&["delete", "-f", &id_a]);
    assert_eq!(
        code_a,
        Some(137),
        "container A should die of SIGKILL; log:\n{}",
        env.log(&id_a)
    );

    // --- container B: a new container restarts from the images -----------------------------
    fs::remove_file(env.dir.join("data/count")).unwrap();
    let bundle_b = env.bundle("b", "node-b", &["/bin/counter", "/data/count"]);
    let id_b = format!("mig-e2e-b-{}", std::process::id());
    let t = Instant::now();
    let mut b = env.run(&bundle_b, &id_b);
    let first = env.wait_count(&id_b, &mut b, |_| true, Duration::from_secs(20));
    let restart_ms = t.elapsed().as_millis();
    let later = env.wait_count(&id_b, &mut b, |n| n >= first + 5, Duration::from_secs(10));
    let status = request(&env.dir.join("b-ctl/ctl.sock"), "status\n");
    println!(
        "checkpoint: {checkpoint_ms} ms ({image_bytes} bytes of images; count {before}..{after}); \
         restart to first count: {restart_ms} ms (runc run included); counts: killed at \
         {killed_at}, restored at {first}, then {later}; status after restart: {status}"
    );
    assert!(
        first >= before && first <= after + 2 && first < killed_at,
        "restored counter should resume from the checkpoint ({before}..{after}), not from {first}"
    );
    assert!(status.contains("mode=restart"), "{status}");

    // A restored process checkpoints again (a second migration hop): its image replaces the
    // first one, and container C resumes from the second checkpoint.
    let sock_b = env.dir.join("b-ctl/ctl.sock");
    let t = Instant::now();
    let reply = request(&sock_b, "checkpoint 30000\n");
    let second_ms = t.elapsed().as_millis();
    let second = env.count().unwrap();
    assert!(
        reply.starts_with("ok ckpt_"),
        "second checkpoint failed: {reply}\nlog:\n{}",
        env.log(&id_b)
    );
    env.wait_count(&id_b, &mut b, |n| n > second + 3, Duration::from_secs(5));
    // SIGTERM goes through the hook to the restored process; the hook reports how it died.
    runc(&["kill", &id_b, "TERM"]);
    let code_b = exit_of(&mut b, Duration::from_secs(10));
    runc(&["delete", "-f", &id_b]);
    assert_eq!(
        code_b,
        Some(143),
        "hook should exit 128+SIGTERM; log:\n{}",
        env.log(&id_b)
    );

    fs::remove_file(env.dir.join("data/count")).unwrap();
    let bundle_c = env.bundle("c", "node-c", &["/bin/counter", "/data/count"]);
    let id_c = format!("mig-e2e-c-{}", std::process::id());
    let t = Instant::now();
    let mut c = env.run(&bundle_c, &id_c);
    let third = env.wait_count(&id_c, &mut c, |_| true, Duration::from_secs(20));
    let restart2_ms = t.elapsed().as_millis();
    println!(
        "second checkpoint (of the restored process): {second_ms} ms at count {second}; \
         second restart: {restart2_ms} ms, resumed at {third}"
    );
    assert!(
        third + 1 >= second && third <= second + 3,
        "C should resume from the second checkpoint ({second}), not from {third}"
    );
    env.wait_count(&id_c, &mut c, |n| n >= third + 3, Duration::from_secs(5));

    // A checkpoint for a stop (migration): DMTCP ends the counter with its image, the hook
    // answers, then exits. Nothing counts after the image: D continues exactly after it.
    let sock_c = env.dir.join("c-ctl/ctl.sock");
    let t = Instant::now();
    let reply = request(&sock_c, "checkpoint-stop 30000\n");
    let stop_ms = t.elapsed().as_millis();
    assert!(
        reply.starts_with("ok ckpt_"),
        "checkpoint-stop failed: {reply}\nlog:\n{}",
        env.log(&id_c)
    );
    let stopped = env.count().unwrap();
    let code_c = exit_of(&mut c, Duration::from_secs(10));
    let exited_ms = t.elapsed().as_millis();
    runc(&["delete", "-f", &id_c]);
    assert_eq!(
        code_c,
        Some(137),
        "the hook should exit 137 after a checkpoint-stop; log:\n{}",
        env.log(&id_c)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        env.count(),
        Some(stopped),
        "the counter ran on after checkpoint-stop"
    );
    let manifest = fs::read_to_string(env.dir.join("ckpt/mig-images.txt")).unwrap();
    assert_eq!(
        reply
            .trim_start_matches("ok ")
            .split(' ')
            .collect::<Vec<_>>(),
        manifest.lines().collect::<Vec<_>>()
    );

    fs::remove_file(env.dir.join("data/count")).unwrap();
    let bundle_d = env.bundle("d", "node-d", &["/bin/counter", "/data/count"]);
    let id_d = format!("mig-e2e-d-{}", std::process::id());
    let mut d = env.run(&bundle_d, &id_d);
    let fourth = env.wait_count(&id_d, &mut d, |_| true, Duration::from_secs(20));
    println!(
        "checkpoint-stop: {stop_ms} ms to the reply, {exited_ms} ms to the container's exit, \
         stopped at {stopped}; D resumed at {fourth}"
    );
    assert_eq!(
        fourth,
        stopped + 1,
        "D should continue right after the count C stopped at"
    );
    env.wait_count(&id_d, &mut d, |n| n >= fourth + 2, Duration::from_secs(5));
    runc(&["kill", &id_d, "TERM"]);
    let code_d = exit_of(&mut d, Duration::from_secs(10));
    runc(&["delete", "-f", &id_d]);
    assert_eq!(code_d, Some(143), "log:\n{}", env.log(&id_d));
}

#[test]
fn static_entrypoint_is_refused_with_a_reason() {
    let Some((_tmp, env)) = setup() else { return };
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        skip("/bin/busybox (busybox-static) not installed");
        return;
    }
    install(
        &env.dir.join("rootfs"),
        busybox,
        Some(Path::new("/bin/static-sleep")),
    );
    let bundle = env.bundle("s", "node-s", &["/bin/static-sleep", "sleep", "30"]);
    let id = format!("mig-e2e-s-{}", std::process::id());
    let mut c = env.run(&bundle, &id);
    let code = exit_of(&mut c, Duration::from_secs(10));
    runc(&["delete", "-f", &id]);
    let log = env.log(&id);
    println!("{}", log.trim());
    assert_eq!(code, Some(127), "log:\n{log}");
    assert!(log.contains("DMTCP cannot checkpoint statically linked program /bin/static-sleep"));
}

/// Says why this test is skipped: on stderr, and appended to `MIG_SKIP_LOG` (cargo test hides
/// a passing test's output; scripts/test.sh prints that file), so a skip is never silent.
fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("restore-hook dmtcp_runc")
        .to_string();
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("MIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write: concurrent tests append whole lines.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}
