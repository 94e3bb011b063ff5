//! The client subcommands: `migrate` (with a progress line while it runs), `status`, `nodes`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mig_server::auth::Token;
use mig_server::migration::{Migration, Phase};
use mig_server::protocol::ErrorBody;
use mig_server::registry::NodeInfo;

/// `--server`.
#[derive(clap::Args)]
pub struct ServerArg {
    /// The controller's URL.
    #[arg(long, env = "MIG_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
}

/// `migrate`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Deployment (containers labelled mig.dev/workload=NAME).
    #[arg(long, conflicts_with_all = ["pod", "container"], required_unless_present_any = ["pod", "container"])]
    deployment: Option<String>,
    /// Pod (containers labelled mig.dev/pod=NAME).
    #[arg(long, conflicts_with = "container")]
    pod: Option<String>,
    /// One container id.
    #[arg(long)]
    container: Option<String>,
    /// containerd namespace (default: the server's).
    #[arg(long)]
    namespace: Option<String>,
    /// Origin node.
    #[arg(long)]
    from: String,
    /// Destination node.
    #[arg(long)]
    to: String,
    /// Post-copy (lazy) migration: the workload runs on the destination at once and fetches
    /// its memory pages from the frozen origin (not in Kubernetes mode yet).
    #[arg(long)]
    post_copy: bool,
    /// Return once accepted instead of following the migration.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    server: ServerArg,
}

/// `status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// A migration id; all migrations when absent.
    id: Option<String>,
    #[command(flatten)]
    server: ServerArg,
}

fn client(ca: Option<&Path>) -> Result<reqwest::Client> {
    mig_server::tls::client_builder(ca)?
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

async fn answer<T: serde::de::DeserializeOwned>(r: reqwest::Response, what: &str) -> Result<T> {
    let status = r.status();
    let text = r.text().await.with_context(|| format!("reading {what}"))?;
    if !status.is_success() {
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => match b.expected {
                Some(exp) => bail!("{what}: {status}: {}\nexpected: {exp}", b.error),
                None => bail!("{what}: {status}: {}", b.error),
            },
            Err(_) => bail!("{what}: {status}: {text}"),
        }
    }
    serde_json::from_str(&text).with_context(|| format!("{what}: unexpected answer {text}"))
}

/// Starts a migration and follows it to the end; fails if the migration fails.
pub async fn migrate(args: MigrateArgs, token: &Token, ca: Option<&Path>) -> Result<()> {
    let http = client(ca)?;
    let base = args.server.server.trim_end_matches('/').to_string();
    let body = serde_json::json!({
        "deployment": args.deployment, "pod": args.pod, "container": args.container,
        "namespace": args.namespace, "originNode": args.from, "destNode": args.to,
        "postCopy": args.post_copy.then_some(true),
    });
    let body: serde_json::Value = body
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let r = http
        .post(format!("{base}/migrate"))
        .bearer_auth(token.secret())
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {base}"))?;
    let record: Migration = answer(r, "POST /migrate").await?;
    println!("migration {} accepted", record.id);
    if args.no_wait {
        return Ok(());
    }
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = String::new();
    let record = loop {
        let r = http
            .get(format!("{base}/migrations/{}", record.id))
            .send()
            .await
            .context("polling the migration")?;
        let m: Migration = answer(r, "GET /migrations/{id}").await?;
        let line = format!(
            "{:>6.1}s  {:<13} checkpoint {:>10}  sent {:>10}",
            start.elapsed().as_secs_f64(),
            m.phase.as_str(),
            human(m.checkpoint_bytes),
            human(m.bytes_transferred)
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if m.phase.as_str() != last {
            eprintln!("{line}");
        }
        last = m.phase.as_str().to_string();
        if m.phase.is_terminal() {
            if tty {
                eprintln!();
            }
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    print_record(&record);
    if record.phase != Phase::Done {
        bail!("migration {} ended {}", record.id, record.phase.as_str());
    }
    Ok(())
}

/// Prints one migration or a table of all.
pub async fn status(args: StatusArgs, ca: Option<&Path>) -> Result<()> {
    let http = client(ca)?;
    let base = args.server.server.trim_end_matches('/');
    match args.id {
        Some(id) => {
            let r = http
                .get(format!("{base}/migrations/{id}"))
                .send()
                .await
                .with_context(|| format!("cannot reach the controller at {base}"))?;
            print_record(&answer(r, "GET /migrations/{id}").await?);
        }
        None => {
            let r = http
                .get(format!("{base}/migrations"))
                .send()
                .await
                .with_context(|| format!("cannot reach the controller at {base}"))?;
            let all: Vec<Migration> = answer(r, "GET /migrations").await?;
            println!(
                "{:<24} {:<24} {:<8} {:<8} {:<12} {:>10} {:>10}",
                "ID", "TARGET", "FROM", "TO", "PHASE", "DOWNTIME", "SENT"
            );
            for m in all {
                println!(
                    "{:<24} {:<24} {:<8} {:<8} {:<12} {:>10} {:>10}",
                    m.id,
                    m.target.to_string(),
                    m.origin_node,
                    m.dest_node,
                    m.phase.as_str(),
                    m.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
                    human(m.bytes_transferred)
                );
            }
        }
    }
    Ok(())
}

/// Lists the registered nodes.
pub async fn nodes(args: ServerArg, ca: Option<&Path>) -> Result<()> {
    let base = args.server.trim_end_matches('/');
    let r = client(ca)?
        .get(format!("{base}/nodes"))
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {base}"))?;
    let nodes: Vec<NodeInfo> = answer(r, "GET /nodes").await?;
    println!("{:<16} ADDRESS", "NAME");
    for n in nodes {
        println!("{:<16} {}", n.name, n.address);
    }
    Ok(())
}

fn print_record(m: &Migration) {
    println!(
        "{} {} {} -> {}: {}",
        m.id,
        m.target,
        m.origin_node,
        m.dest_node,
        m.phase.as_str()
    );
    for t in &m.timings {
        if let Some(d) = t.duration_ms {
            println!("  {:<14} {d} ms", t.phase.as_str());
        }
    }
    if m.post_copy {
        println!("  post-copy      pages fetched from the origin after the restore");
    }
    if let Some(d) = m.downtime_ms {
        println!("  downtime       {d} ms");
    }
    let place = |in_memory: bool| if in_memory { "memory" } else { "disk" };
    println!(
        "  checkpoint     {}  transferred {}  (written to {} on {}, {} on {})",
        human(m.checkpoint_bytes),
        human(m.bytes_transferred),
        place(m.checkpoint_in_memory.origin),
        m.origin_node,
        place(m.checkpoint_in_memory.destination),
        m.dest_node
    );
    if let Some(f) = &m.failure {
        println!("  failed in {}: {}", f.phase.as_str(), f.reason);
        for r in &f.recovery {
            println!("    - {r}");
        }
    }
    for w in &m.warnings {
        println!("  warning: {w}");
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
