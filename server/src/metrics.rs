//! `GET /metrics` in the Prometheus text format, computed from the migration records on each
//! scrape: the records are the single source of truth and there are few of them, so no
//! separate counters can drift from what `GET /migrations` shows.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::migration::{Migration, Phase};

/// Renders the metrics of `migrations` and `nodes` registered nodes.
pub fn render(migrations: &[Migration], nodes: usize) -> String {
    let mut out = String::new();
    let mut by_phase: BTreeMap<&str, u64> = Phase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
    let mut durations: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
    let (mut wire, mut raw, mut downtime_sum, mut downtime_count) = (0u64, 0u64, 0f64, 0u64);
    for m in migrations {
        *by_phase.entry(m.phase.as_str()).or_default() += 1;
        for t in &m.timings {
            if let Some(ms) = t.duration_ms {
                let e = durations.entry(t.phase.as_str()).or_default();
                e.0 += 1;
                e.1 += ms as f64 / 1000.0;
            }
        }
        wire += m.bytes_transferred;
        raw += m.checkpoint_bytes;
        if let Some(d) = m.downtime_ms {
            downtime_sum += d as f64 / 1000.0;
            downtime_count += 1;
        }
    }
    let _ = writeln!(
        out,
        "# HELP mig_migrations Migrations by current phase (done, failed and rolled_back are results).\n# TYPE mig_migrations gauge"
    );
    for (phase, n) in &by_phase {
        let _ = writeln!(out, "mig_migrations{{phase=\"{phase}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP mig_phase_duration_seconds Time spent in each phase of finished phases.\n# TYPE mig_phase_duration_seconds summary"
    );
    for (phase, (count, sum)) in &durations {
        let _ = writeln!(
            out,
            "mig_phase_duration_seconds_sum{{phase=\"{phase}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "mig_phase_duration_seconds_count{{phase=\"{phase}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP mig_downtime_seconds Workload downtime per migration.\n# TYPE mig_downtime_seconds summary\nmig_downtime_seconds_sum {downtime_sum}\nmig_downtime_seconds_count {downtime_count}"
    );
    let _ = writeln!(
        out,
        "# HELP mig_transferred_bytes_total Compressed bytes streamed between nodes.\n# TYPE mig_transferred_bytes_total counter\nmig_transferred_bytes_total {wire}"
    );
    let _ = writeln!(
        out,
        "# HELP mig_checkpoint_bytes_total Checkpoint bytes before compression.\n# TYPE mig_checkpoint_bytes_total counter\nmig_checkpoint_bytes_total {raw}"
    );
    let _ = writeln!(
        out,
        "# HELP mig_nodes Registered node agents.\n# TYPE mig_nodes gauge\nmig_nodes {nodes}"
    );
    out
}
