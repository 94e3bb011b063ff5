//! Container statistics: runc's stats event turned into the cgroups metrics containerd decodes.

use containerd_shim::protos::{
    cgroups::metrics::{CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat},
    cgroups_v2::metrics::{
        CPUStat as CPUStatV2, MemoryStat as MemoryStatV2, Metrics as MetricsV2,
        PidsStat as PidsStatV2,
    },
    protobuf::{MessageDyn, MessageField},
};
use serde_json::Value;

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_u64)
        .unwrap_or_default()
}

/// Converts the `data` of `runc events --stats` into cgroups v1 metrics, or v2 metrics when
/// the host runs the unified hierarchy only.
pub fn metrics(data: &Value, unified: bool) -> Box<dyn MessageDyn> {
    if unified {
        let m = MetricsV2 {
            pids: MessageField::some(PidsStatV2 {
                current: num(data, &["pids", "current"]),
                limit: num(data, &["pids", "limit"]),
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStatV2 {
                usage_usec: num(data, &["cpu", "usage", "total"]) / 1000,
                user_usec: num(data, &["cpu", "usage", "user"]) / 1000,
                system_usec: num(data, &["cpu", "usage", "kernel"]) / 1000,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStatV2 {
                usage: num(data, &["memory", "usage", "usage"]),
                usage_limit: num(data, &["memory", "usage", "limit"]),
                max_usage: num(data, &["memory", "usage", "max"]),
                ..Default::default()
            }),
            ..Default::default()
        };
        return Box::new(m);
    }
    let entry = |k: &str| {
        MessageField::some(MemoryEntry {
            usage: num(data, &["memory", k, "usage"]),
            limit: num(data, &["memory", k, "limit"]),
            max: num(data, &["memory", k, "max"]),
            failcnt: num(data, &["memory", k, "failcnt"]),
            ..Default::default()
        })
    };
    let m = Metrics {
        pids: MessageField::some(PidsStat {
            current: num(data, &["pids", "current"]),
            limit: num(data, &["pids", "limit"]),
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: num(data, &["cpu", "usage", "total"]),
                kernel: num(data, &["cpu", "usage", "kernel"]),
                user: num(data, &["cpu", "usage", "user"]),
                per_cpu: data
                    .pointer("/cpu/usage/percpu")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            cache: num(data, &["memory", "cache"]),
            rss: num(data, &["memory", "raw", "rss"]),
            usage: entry("usage"),
            swap: entry("swap"),
            kernel: entry("kernel"),
            ..Default::default()
        }),
        ..Default::default()
    };
    Box::new(m)
}

/// Whether the host runs cgroup v2 only (not the v1/hybrid layout).
pub fn unified_hierarchy() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn v1_metrics_carry_memory_cpu_and_pids() {
        let data = serde_json::json!({
            "cpu": {"usage": {"total": 5000, "kernel": 1000, "user": 4000, "percpu": [2500, 2500]}},
            "memory": {"usage": {"usage": 4096, "limit": 1 << 20, "max": 8192, "failcnt": 0}},
            "pids": {"current": 2, "limit": 100}
        });
        let m = metrics(&data, false);
        let bytes = m.write_to_bytes_dyn().unwrap();
        let back = Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.memory.usage.usage, 4096);
        assert_eq!(back.cpu.usage.total, 5000);
        assert_eq!(back.cpu.usage.per_cpu, vec![2500, 2500]);
        assert_eq!(back.pids.current, 2);
    }

    #[test]
    fn v2_metrics_use_microseconds() {
        let data = serde_json::json!({"cpu": {"usage": {"total": 5_000_000}}});
        let bytes = metrics(&data, true).write_to_bytes_dyn().unwrap();
        assert_eq!(
            MetricsV2::parse_from_bytes(&bytes).unwrap().cpu.usage_usec,
            5000
        );
    }
}
