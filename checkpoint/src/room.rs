//! Whether a checkpoint fits in memory: the room a memory store (tmpfs) has for it, and how
//! much memory a container holds, which bounds what its checkpoint writes.
//!
//! A migration's checkpoint only lives to be streamed away and restored (see
//! [`crate::Store::begin_transient`]). Written to disk, a GiB of images is throttled to the
//! disk's speed once the kernel's dirty-page limit is reached (~700 MB on the VMs this was
//! measured on: 6 s for 1 GiB at 180 MB/s, against 0.8 s into tmpfs), and every second of it
//! is downtime. Written to a tmpfs it costs memory instead, which cannot be reclaimed while
//! it is there, so a memory store is only used when there is room to spare:
//!
//! - the tmpfs has the space (`statvfs`);
//! - the node has the memory (`MemAvailable`), keeping back a reserve of
//!   `max(256 MiB, MemTotal / 16)` for everything else;
//! - the writer's own memory cgroup, to which tmpfs pages are charged, is not pushed past its
//!   limit (every ancestor's `memory.max`, or v1 `memory.limit_in_bytes`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where memory stores live by default: a directory per state root below it (see
/// [`memory_dir`]).
pub const DEFAULT_MEMORY_PARENT: &str = "/dev/shm/kubernetes-mig";

/// The memory store of the node whose state root is `state_dir`, from a setting: empty means
/// the default, `<DEFAULT_MEMORY_PARENT>/<16 hex digits of sha256(state_dir)>` (one per state
/// root, so that two "nodes" on one machine never share one), used only where
/// `/dev/shm` is a tmpfs; `off` (or `none`) means no memory store; anything else is the
/// directory to use.
pub fn memory_dir(setting: &str, state_dir: &Path) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::ffi::OsStrExt;
    match setting.trim() {
        "off" | "none" => None,
        "" => {
            if !is_tmpfs(Path::new("/dev/shm")) {
                return None;
            }
            let digest = Sha256::digest(state_dir.as_os_str().as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            Some(Path::new(DEFAULT_MEMORY_PARENT).join(hex))
        }
        dir => Some(PathBuf::from(dir)),
    }
}

fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is NUL-terminated and `st` is written by the call before it is read.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

/// The least memory left to everything else when a checkpoint goes to memory.
pub const MIN_RESERVE: u64 = 256 << 20;

/// What a node has for a memory store, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Free space of the memory store's filesystem.
    pub fs_free: u64,
    /// `MemAvailable` of /proc/meminfo.
    pub mem_available: u64,
    /// `MemTotal` of /proc/meminfo.
    pub mem_total: u64,
    /// Headroom of the writer's memory cgroup and its ancestors (limit - usage), if any has a
    /// limit.
    pub cgroup_free: Option<u64>,
}

impl Room {
    /// The room of the memory store at `dir`, for a writer in this process's cgroup.
    pub fn of(dir: &Path) -> io::Result<Room> {
        let (mem_total, mem_available) = meminfo(&fs::read_to_string("/proc/meminfo")?)?;
        Ok(Room {
            fs_free: fs_free(dir)?,
            mem_available,
            mem_total,
            cgroup_free: cgroup_free(
                &fs::read_to_string("/proc/self/cgroup")?,
                Path::new("/sys/fs/cgroup"),
            ),
        })
    }

    /// Whether `bytes` fit, keeping the reserve; `Err` says what is short.
    pub fn fits(&self, bytes: u64) -> Result<(), String> {
        let reserve = MIN_RESERVE.max(self.mem_total / 16);
        let mib = |b: u64| b >> 20;
        if bytes > self.fs_free {
            return Err(format!(
                "{} MiB needed, the memory store's filesystem has {} MiB free",
                mib(bytes),
                mib(self.fs_free)
            ));
        }
        if bytes.saturating_add(reserve) > self.mem_available {
            return Err(format!(
                "{} MiB needed and {} MiB kept in reserve, the node has {} MiB available",
                mib(bytes),
                mib(reserve),
                mib(self.mem_available)
            ));
        }
        if let Some(free) = self.cgroup_free
            && bytes.saturating_add(MIN_RESERVE) > free
        {
            return Err(format!(
                "{} MiB needed and {} MiB kept in reserve, this process's memory cgroup has {} MiB below its limit",
                mib(bytes),
                mib(MIN_RESERVE),
                mib(free)
            ));
        }
        Ok(())
    }
}

/// `(MemTotal, MemAvailable)` in bytes from the text of /proc/meminfo.
fn meminfo(text: &str) -> io::Result<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
            .ok_or_else(|| io::Error::other(format!("/proc/meminfo has no {name}")))
    };
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

fn fs_free(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path holds a NUL byte"))?;
    // SAFETY: `path` is NUL-terminated and `st` is written by the call before it is read.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The memory cgroup directory of a process whose /proc/<pid>/cgroup reads `cgroup`, under
/// the cgroup mount `fs` (v2's unified line `0::/path`, else v1's `memory` controller).
fn memory_cgroup(cgroup: &str, fs: &Path) -> Option<PathBuf> {
    let rel = |p: &str| p.trim_start_matches('/').to_owned();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some(fs.join("memory").join(rel(path)));
        }
    }
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|path| fs.join(rel(path)))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The least headroom (limit - usage) of the memory cgroup in `cgroup` (a /proc/<pid>/cgroup
/// text) and its ancestors up to the mount `fs`; `None` when none has a limit.
fn cgroup_free(cgroup: &str, fs: &Path) -> Option<u64> {
    let mut dir = memory_cgroup(cgroup, fs)?;
    let mut least: Option<u64> = None;
    loop {
        let (limit, usage) = if dir.join("memory.max").exists() {
            (
                read_u64(&dir.join("memory.max")),
                read_u64(&dir.join("memory.current")),
            )
        } else {
            (
                read_u64(&dir.join("memory.limit_in_bytes")),
                read_u64(&dir.join("memory.usage_in_bytes")),
            )
        };
        // v1 says "no limit" with a number near i64::MAX.
        if let (Some(limit), Some(usage)) = (limit, usage)
            && limit < (1 << 62)
        {
            let free = limit.saturating_sub(usage);
            least = Some(least.map_or(free, |l| l.min(free)));
        }
        if dir == fs || dir == fs.join("memory") || !dir.pop() || !dir.starts_with(fs) {
            return least;
        }
    }
}

/// The memory a process's checkpoint will hold, roughly: the anonymous and shared memory of
/// its memory cgroup (v2 `anon` + `shmem`, v1 `total_rss` + `total_shmem`), else the process's
/// resident set. An upper bound for what the engine writes of a container whose processes
/// are all in that cgroup, which is what a container is.
pub fn process_memory(pid: u32) -> Option<u64> {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
    let from_cgroup = cgroup
        .as_deref()
        .and_then(|c| memory_cgroup(c, Path::new("/sys/fs/cgroup")))
        .and_then(|dir| fs::read_to_string(dir.join("memory.stat")).ok())
        .and_then(|stat| cgroup_memory(&stat));
    from_cgroup.or_else(|| {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
    })
}

/// The bytes of the regular files under `dir` (not following symlinks), counting stops once
/// it passes `cap`: what packing the tree into a checkpoint writes, roughly. 0 if it does
/// not exist.
pub fn tree_size(dir: &Path, cap: u64) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
                if total > cap {
                    return total;
                }
            }
        }
    }
    total
}

/// Anonymous + shared memory from a memory.stat text (v2 or v1 names).
fn cgroup_memory(stat: &str) -> Option<u64> {
    let field = |name: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("anon"), field("shmem")) {
        (Some(anon), shmem) => Some(anon + shmem.unwrap_or(0)),
        _ => Some(field("total_rss")? + field("total_shmem").unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn room(fs_free: u64, available: u64, cgroup_free: Option<u64>) -> Room {
        Room {
            fs_free,
            mem_available: available,
            mem_total: 16 * GIB,
            cgroup_free,
        }
    }

    #[test]
    fn fits_keeps_a_reserve_and_says_what_is_short() {
        // Reserve: 16 GiB / 16 = 1 GiB.
        assert_eq!(room(8 * GIB, 8 * GIB, None).fits(GIB), Ok(()));
        let short = room(8 * GIB, 2 * GIB - 1, None).fits(GIB).unwrap_err();
        assert!(short.contains("node has 2047 MiB available"), "{short}");
        let fs = room(GIB / 2, 8 * GIB, None).fits(GIB).unwrap_err();
        assert!(fs.contains("filesystem has 512 MiB free"), "{fs}");
        let cg = room(8 * GIB, 8 * GIB, Some(GIB)).fits(GIB).unwrap_err();
        assert!(cg.contains("memory cgroup has 1024 MiB"), "{cg}");
        assert_eq!(room(8 * GIB, 8 * GIB, Some(2 * GIB)).fits(GIB), Ok(()));
    }

    #[test]
    fn memory_dir_is_one_per_state_root_or_off() {
        assert_eq!(memory_dir("off", Path::new("/var/lib/x")), None);
        assert_eq!(
            memory_dir("/mnt/ram", Path::new("/var/lib/x")),
            Some(PathBuf::from("/mnt/ram"))
        );
        if is_tmpfs(Path::new("/dev/shm")) {
            let a = memory_dir("", Path::new("/a")).expect("default");
            let b = memory_dir("", Path::new("/b")).expect("default");
            assert!(a.starts_with(DEFAULT_MEMORY_PARENT), "{}", a.display());
            assert_ne!(a, b);
            assert_eq!(memory_dir("", Path::new("/a")), Some(a));
        }
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text =
            "MemTotal:       24683520 kB\nMemFree:        1 kB\nMemAvailable:   24214204 kB\n";
        assert_eq!(
            meminfo(text).expect("parse"),
            (24683520 << 10, 24214204 << 10)
        );
        assert!(meminfo("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn cgroup_headroom_is_the_least_of_the_cgroup_and_its_ancestors() {
        let fs_root = tempfile::tempdir().expect("tmp");
        let root = fs_root.path();
        let write = |rel: &str, file: &str, v: &str| {
            let d = root.join(rel);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join(file), v).expect("write");
        };
        // v2: the parent's limit is the tighter one; the leaf has none.
        write("kubepods", "memory.max", "1073741824\n");
        write("kubepods", "memory.current", "536870912\n");
        write("kubepods/pod1", "memory.max", "max\n");
        write("kubepods/pod1", "memory.current", "1\n");
        assert_eq!(cgroup_free("0::/kubepods/pod1\n", root), Some(512 << 20));
        // v1: no limit reads as a huge number.
        write(
            "memory/agent",
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write("memory/agent", "memory.usage_in_bytes", "10\n");
        assert_eq!(cgroup_free("4:memory:/agent\n0::/\n", root), None);
        write("memory/agent", "memory.limit_in_bytes", "110\n");
        assert_eq!(cgroup_free("4:memory:/agent\n0::/\n", root), Some(100));
    }

    #[test]
    fn tree_size_adds_files_and_stops_past_the_cap() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        fs::write(dir.path().join("a/one"), [0u8; 100]).expect("write");
        fs::write(dir.path().join("a/b/two"), [0u8; 50]).expect("write");
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).expect("symlink");
        assert_eq!(tree_size(dir.path(), u64::MAX), 150);
        assert!(tree_size(dir.path(), 10) > 10);
        assert_eq!(tree_size(&dir.path().join("none"), u64::MAX), 0);
    }

    #[test]
    fn container_memory_is_anon_plus_shmem() {
        assert_eq!(cgroup_memory("anon 100\nfile 7\nshmem 20\n"), Some(120));
        assert_eq!(
            cgroup_memory("cache 5\nrss 1\ntotal_rss 300\ntotal_shmem 4\n"),
            Some(304)
        );
        assert_eq!(cgroup_memory("file 7\n"), None);
        // This test process has a resident set at least.
        assert!(process_memory(std::process::id()).is_some_and(|b| b > 0));
    }
}
