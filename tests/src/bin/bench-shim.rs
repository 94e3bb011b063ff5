//! The shim benchmark of the issue, side by side on one private containerd:
//! - latency of `ctr run --rm --runtime R IMAGE ID /bin/true`, median and p90 over N runs,
//!   interleaved between the runtimes (and alternating which goes first) to cancel drift;
//! - memory of the shim serving one sleeping container: RSS (/proc/PID/status) and PSS
//!   (/proc/PID/smaps_rollup), which splits shared pages fairly between processes.
//!
//! Goals: the mig shim no slower than containerd's runc shim, and at most a third of its memory.
//!
//! Usage: bench-shim [--runs N] [--check]   (root; MIG_SHIM_DIR locates containerd-shim-mig-v2)
//! `--check` exits 1 when a goal is not met.

use std::collections::BTreeMap;
use std::fs;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mig_e2e::command::{describe, output_with_timeout, status_text};
use mig_e2e::{MIG_RUNTIME, Node, RUNC_RUNTIME, TestImage};

/// "No slower" with room for noise: a median within 5% of runc's counts as met.
const LATENCY_TOLERANCE: f64 = 1.05;

#[derive(Default)]
struct Sample {
    latencies_ms: Vec<f64>,
    failures: Vec<String>,
    memory: Option<Memory>,
    memory_error: Option<String>,
}

#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    pss_kib: u64,
    /// Anonymous memory (heap, stacks): what the shim itself allocates, as opposed to its code.
    anon_kib: u64,
    threads: u64,
    /// How many shim processes serve the one container (a shim may fork a helper).
    processes: usize,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench-shim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut runs = 30usize;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs needs a number")?
                    .parse()
                    .context("--runs")?
            }
            "--check" => check = true,
            "-h" | "--help" => {
                println!("usage: bench-shim [--runs N] [--check]");
                return Ok(true);
            }
            other => bail!("unknown argument {other:?} (usage: bench-shim [--runs N] [--check])"),
        }
    }
    if let Some(skip) = mig_e2e::require_root_and_tools() {
        bail!("cannot run: {skip}");
    }
    let runtimes = [RUNC_RUNTIME, MIG_RUNTIME];
    let mig_shim = mig_e2e::shim_dir().join("containerd-shim-mig-v2");
    eprintln!(
        "bench-shim: {runs} runs per runtime; mig shim {}",
        mig_shim.display()
    );

    let image = TestImage::busybox()?;
    let node = Node::start("bench")?;
    node.import(&image)?;
    let mut samples: BTreeMap<&str, Sample> =
        runtimes.iter().map(|r| (*r, Sample::default())).collect();

    // Warm the page cache and containerd's snapshot paths before measuring.
    for rt in runtimes {
        let _ = time_run(&node, &image, rt, &format!("warm-{}", short(rt)));
    }
    for i in 0..runs {
        let order: Vec<&str> = if i % 2 == 0 {
            runtimes.to_vec()
        } else {
            runtimes.iter().rev().copied().collect()
        };
        for rt in order {
            let sample = samples.get_mut(rt).expect("known runtime");
            match time_run(&node, &image, rt, &format!("{}-{i}", short(rt))) {
                Ok(ms) => sample.latencies_ms.push(ms),
                Err(e) => sample.failures.push(format!("{e:#}")),
            }
        }
    }
    for rt in runtimes {
        let sample = samples.get_mut(rt).expect("known runtime");
        match shim_memory(&node, &image, rt) {
            Ok(m) => sample.memory = Some(m),
            Err(e) => sample.memory_error = Some(format!("{e:#}")),
        }
    }
    let ok = report(&samples, runs);
    if let Err(e) = node.stop() {
        eprintln!("bench-shim: {e:#}");
    }
    Ok(ok || !check)
}

/// Milliseconds of one `ctr run --rm ... /bin/true`, which must succeed.
fn time_run(node: &Node, image: &TestImage, runtime: &str, id: &str) -> Result<f64> {
    let mut cmd = node.ctr_command();
    cmd.args([
        "run",
        "--rm",
        "--runtime",
        runtime,
        &image.name,
        id,
        "/bin/true",
    ]);
    let start = Instant::now();
    let out = output_with_timeout(&mut cmd, Duration::from_secs(60))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

/// Memory of the shim process(es) serving one idle `sleep` container of `runtime`.
fn shim_memory(node: &Node, image: &TestImage, runtime: &str) -> Result<Memory> {
    let id = format!("mem-{}", short(runtime));
    node.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        &image.name,
        &id,
        "sleep",
        "100000",
    ])?;
    node.wait_for_status(&id, "RUNNING", Duration::from_secs(30))?;
    // Let start-up allocations settle (Go's runtime grows its heap lazily, so does tokio's).
    thread::sleep(Duration::from_secs(2));
    let shims: Vec<_> = node
        .shims()
        .into_iter()
        .filter(|p| p.has_arg_pair("-id", &id))
        .collect();
    let result = if shims.is_empty() {
        Err(anyhow::anyhow!("no shim process with `-id {id}` found"))
    } else {
        let mut m = Memory {
            rss_kib: 0,
            pss_kib: 0,
            anon_kib: 0,
            threads: 0,
            processes: shims.len(),
        };
        for p in &shims {
            m.rss_kib += kib_field(&format!("/proc/{}/status", p.pid), "VmRSS:")?;
            m.pss_kib += kib_field(&format!("/proc/{}/smaps_rollup", p.pid), "Pss:")?;
            m.anon_kib += kib_field(&format!("/proc/{}/smaps_rollup", p.pid), "Anonymous:")?;
            m.threads += kib_field(&format!("/proc/{}/status", p.pid), "Threads:")?;
        }
        Ok(m)
    };
    node.ctr_ok(&["task", "delete", "--force", &id])?;
    node.ctr_ok(&["containers", "rm", &id])?;
    result
}

/// The number after `key` at the start of a line of a /proc file (kB for sizes).
fn kib_field(path: &str, key: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

fn short(runtime: &str) -> &str {
    runtime
        .trim_start_matches("io.containerd.")
        .split('.')
        .next()
        .unwrap_or(runtime)
}

/// Prints the table and the verdicts; true when both goals are met.
fn report(samples: &BTreeMap<&str, Sample>, runs: usize) -> bool {
    struct Row {
        median: Option<f64>,
        p90: Option<f64>,
        mem: Option<Memory>,
    }
    let row = |rt: &str| {
        let s = &samples[rt];
        let mut l = s.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        Row {
            median: percentile(&l, 50.0),
            p90: percentile(&l, 90.0),
            mem: s.memory,
        }
    };
    let (runc, mig) = (row(RUNC_RUNTIME), row(MIG_RUNTIME));
    let num = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    let kib = |m: Option<Memory>, f: fn(Memory) -> u64| num(m.map(|m| f(m) as f64), 0);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };

    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8}",
        "runtime", "median ms", "p90 ms", "RSS KiB", "PSS KiB", "anon KiB", "procs", "threads"
    );
    for (rt, r) in [(RUNC_RUNTIME, &runc), (MIG_RUNTIME, &mig)] {
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8}",
            rt,
            num(r.median, 1),
            num(r.p90, 1),
            kib(r.mem, |m| m.rss_kib),
            kib(r.mem, |m| m.pss_kib),
            kib(r.mem, |m| m.anon_kib),
            r.mem.map_or("-".to_string(), |m| m.processes.to_string()),
            kib(r.mem, |m| m.threads),
        );
    }
    let mem_ratio =
        |f: fn(Memory) -> u64| ratio(mig.mem.map(|m| f(m) as f64), runc.mem.map(|m| f(m) as f64));
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "mig/runc",
        num(ratio(mig.median, runc.median), 2),
        num(ratio(mig.p90, runc.p90), 2),
        num(mem_ratio(|m| m.rss_kib), 2),
        num(mem_ratio(|m| m.pss_kib), 2),
        num(mem_ratio(|m| m.anon_kib), 2),
    );
    println!();
    for rt in [RUNC_RUNTIME, MIG_RUNTIME] {
        let s = &samples[rt];
        if !s.failures.is_empty() {
            println!(
                "{rt}: {} of {runs} runs failed; first: {}",
                s.failures.len(),
                s.failures[0]
            );
        }
        if let Some(e) = &s.memory_error {
            println!("{rt}: memory not measured: {e}");
        }
    }

    let latency_ok = ratio(mig.median, runc.median).is_some_and(|r| r <= LATENCY_TOLERANCE)
        && samples[MIG_RUNTIME].failures.is_empty();
    let memory_ok = mem_ratio(|m| m.pss_kib).is_some_and(|r| r <= 1.0 / 3.0);
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!(
        "goal latency (mig median <= runc median, {:.0}% noise allowance): {}",
        (LATENCY_TOLERANCE - 1.0) * 100.0,
        verdict(latency_ok)
    );
    println!(
        "goal memory  (mig PSS <= 1/3 of runc PSS):                  {}",
        verdict(memory_ok)
    );
    latency_ok && memory_ok
}
