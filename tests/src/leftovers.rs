//! What a node leaves behind: mounts under its directories and processes it started.

use std::fs;
use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Mounts of this process's mount namespace whose mount point is `dir` or below it.
pub fn mounts_under(dir: &Path) -> Vec<Mount> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&info)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// Parses mountinfo(5): `id parent major:minor root mount-point options [optional...] - type source super-options`.
pub fn parse_mountinfo(info: &str) -> Vec<Mount> {
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let code =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A live process, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub ppid: i32,
    pub cmdline: Vec<String>,
    /// Lines of /proc/PID/cgroup.
    pub cgroups: Vec<String>,
}

impl Process {
    pub fn read(pid: i32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: fields restart after the last ')'.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid = after.split(' ').nth(1)?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        Some(Self {
            pid,
            ppid,
            cmdline,
            cgroups,
        })
    }

    /// True when the command line has `flag` followed by `value` (shims get `-address SOCK`).
    pub fn has_arg_pair(&self, flag: &str, value: &str) -> bool {
        self.cmdline
            .windows(2)
            .any(|w| w[0] == flag && w[1] == value)
    }

    /// True when one of its cgroup paths lies in `/<segment>/...` (ctr puts a container of
    /// namespace NS in cgroup `/NS/ID`).
    pub fn in_cgroup_below(&self, segment: &str) -> bool {
        let prefix = format!("/{segment}/");
        self.cgroups.iter().any(|l| {
            l.splitn(3, ':')
                .nth(2)
                .is_some_and(|path| path.starts_with(&prefix))
        })
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (ppid {}): {}",
            self.pid,
            self.ppid,
            self.cmdline.join(" ")
        )
    }
}

/// Every process currently alive.
pub fn processes() -> Vec<Process> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(Process::read)
        .collect()
}

/// `roots` and all their descendants among `all`.
pub fn with_descendants(all: &[Process], roots: Vec<Process>) -> Vec<Process> {
    let mut found = roots;
    let mut i = 0;
    while i < found.len() {
        let parent = found[i].pid;
        for p in all {
            if p.ppid == parent && !found.iter().any(|f| f.pid == p.pid) {
                found.push(p.clone());
            }
        }
        i += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    100 30 0:50 / /tmp/n/state/x/rootfs rw,relatime - overlay overlay rw,lowerdir=/a\n";
        let mounts = parse_mountinfo(info);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[0].fs_type, "ext3");
        assert_eq!(mounts[1].fs_type, "overlay");
        assert!(mounts[1].mount_point.starts_with("/tmp/n"));
    }

    #[test]
    fn sees_our_own_process() {
        let me = Process::read(std::process::id() as i32).expect("our own /proc entry");
        assert!(!me.cmdline.is_empty());
        assert!(processes().iter().any(|p| p.pid == me.pid));
    }

    #[test]
    fn cgroup_and_argument_matching() {
        let p = Process {
            pid: 2,
            ppid: 1,
            cmdline: vec!["shim".into(), "-address".into(), "/x.sock".into()],
            cgroups: vec!["4:memory:/ns1/c1".into(), "0::/".into()],
        };
        assert!(p.has_arg_pair("-address", "/x.sock"));
        assert!(!p.has_arg_pair("-address", "/y.sock"));
        assert!(p.in_cgroup_below("ns1"));
        assert!(!p.in_cgroup_below("ns"));
    }

    #[test]
    fn descendants_are_followed() {
        let mk = |pid, ppid| Process {
            pid,
            ppid,
            cmdline: vec![],
            cgroups: vec![],
        };
        let all = vec![mk(10, 1), mk(11, 10), mk(12, 11), mk(13, 1)];
        let found = with_descendants(&all, vec![mk(10, 1)]);
        let pids: Vec<i32> = found.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![10, 11, 12]);
    }
}
