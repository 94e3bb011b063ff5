//! The container's own tmpfs mounts (`/dev/shm`, `/run`, a `--tmpfs` of the user's), mounted
//! by the shim on the node and bound into the container, so that their content travels as a
//! volume instead of through CRIU.
//!
//! CRIU dumps every tmpfs of a container by running `tar --gzip` on it, and unpacks it on
//! restore the same way: two programs per mount each way, 7-27 ms per mount here (a 16 MiB
//! container created by `ctr run` has four: `/dev`, `/dev/shm`, `/run`, `/sys/firmware`;
//! ~35 ms of its ~130 ms dump and ~45 ms of its ~105 ms restore, from CRIU's own logs). A
//! bind mount is one CRIU leaves alone: runc names it an external mount, the dump records
//! where it was and the restore binds what runc's configuration says there. So, for the CRIU
//! engine, the shim mounts each such tmpfs itself, with the spec's size and mode, under the
//! container's dir on the node (`tmpfs/<name>`), and replaces the spec's tmpfs by a bind of
//! it, with the same mount flags: the container sees a tmpfs of the same size, mode and flags.
//! Its content is carried like an emptyDir volume (`tmpfs-<name>` in the checkpoint), archived
//! by the shim in process after the dump and unpacked into the new container's tmpfs before
//! the restore.
//!
//! Left as they are: `/dev` (runc fills it with device nodes, which CRIU restores with it),
//! tmpfs mounts under `/sys` and `/proc` (read-only masks), read-only ones (nothing to carry),
//! any with an option that is neither a mount flag nor tmpfs's own (runc's `tmpcopyup`, a
//! propagation mode), and any whose name would clash with a carried volume's. In Kubernetes
//! `/dev/shm` is already a bind of the pod's shm and the CRI gives containers no `/run`, so
//! this matters mostly outside Kubernetes.

use std::path::{Path, PathBuf};

use mig_checkpoint::SafeName;
use nix::mount::MsFlags;
use oci_spec::runtime::{Mount, Spec};

use crate::error::{Error, Result};

/// The prefix of a carried tmpfs's volume name in the checkpoint.
pub const VOLUME_PREFIX: &str = "tmpfs-";

/// One of the container's tmpfs mounts, to be mounted on the node and bound in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// Where the container sees it.
    pub destination: PathBuf,
    /// Its name in the checkpoint ([`VOLUME_PREFIX`] + the destination, `/` as `-`).
    pub name: SafeName,
    /// Where the shim mounts it on the node.
    pub source: PathBuf,
    /// The tmpfs's own options (`size=`, `mode=`, `nr_inodes=`, ...).
    data: String,
    /// The mount flags (`nosuid`, `nodev`, `noexec`, atime), on the node's mount and on the
    /// bind.
    flags: Vec<String>,
}

/// The options that are mount flags, with the flag each sets (empty: one it clears).
const FLAGS: [(&str, MsFlags); 16] = [
    ("nosuid", MsFlags::MS_NOSUID),
    ("suid", MsFlags::empty()),
    ("nodev", MsFlags::MS_NODEV),
    ("dev", MsFlags::empty()),
    ("noexec", MsFlags::MS_NOEXEC),
    ("exec", MsFlags::empty()),
    ("rw", MsFlags::empty()),
    ("sync", MsFlags::MS_SYNCHRONOUS),
    ("async", MsFlags::empty()),
    ("dirsync", MsFlags::MS_DIRSYNC),
    ("noatime", MsFlags::MS_NOATIME),
    ("atime", MsFlags::empty()),
    ("nodiratime", MsFlags::MS_NODIRATIME),
    ("diratime", MsFlags::empty()),
    ("relatime", MsFlags::MS_RELATIME),
    ("strictatime", MsFlags::MS_STRICTATIME),
];

/// tmpfs's own options (`key=value` ones by their key).
const DATA_KEYS: [&str; 8] = [
    "size",
    "mode",
    "uid",
    "gid",
    "nr_inodes",
    "nr_blocks",
    "huge",
    "mpol",
];
const DATA_WORDS: [&str; 3] = ["inode64", "inode32", "noswap"];

fn is_flag(option: &str) -> bool {
    FLAGS.iter().any(|(name, _)| *name == option)
}

fn is_data(option: &str) -> bool {
    match option.split_once('=') {
        Some((key, _)) => DATA_KEYS.contains(&key),
        None => DATA_WORDS.contains(&option),
    }
}

/// The tmpfs mounts of `spec` the shim takes over, with their node dirs under `dir`.
/// `taken` are the names of the volumes carried already.
pub fn plan(spec: &Spec, dir: &Path, taken: &[SafeName]) -> Vec<Tmpfs> {
    let mut out: Vec<Tmpfs> = Vec::new();
    for m in spec.mounts().iter().flatten() {
        if m.typ().as_deref() != Some("tmpfs") {
            continue;
        }
        let dest = m.destination();
        let d = dest.to_string_lossy();
        if !dest.is_absolute()
            || d == "/dev"
            || ["/sys", "/proc"]
                .iter()
                .any(|p| d == *p || d.starts_with(&format!("{p}/")))
            || d.split('/').any(|c| c == "..")
        {
            continue;
        }
        let options = m.options().clone().unwrap_or_default();
        if options.iter().any(|o| !is_flag(o) && !is_data(o)) {
            continue;
        }
        let short = d.trim_matches('/').replace('/', "-");
        let Ok(name) = SafeName::new(format!("{VOLUME_PREFIX}{short}")) else {
            continue;
        };
        if taken.contains(&name) || out.iter().any(|t| t.name == name) {
            continue;
        }
        let (flags, data): (Vec<String>, Vec<String>) =
            options.into_iter().partition(|o| is_flag(o));
        out.push(Tmpfs {
            destination: dest.clone(),
            source: dir.join(name.as_str()),
            name,
            data: data.join(","),
            flags,
        });
    }
    out
}

/// Replaces each planned tmpfs of `spec` by a bind of its node dir. Returns whether the spec
/// changed.
pub fn rewrite(spec: &mut Spec, planned: &[Tmpfs]) -> bool {
    if planned.is_empty() {
        return false;
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut changed = false;
    for m in mounts.iter_mut() {
        let Some(t) = planned
            .iter()
            .find(|t| m.typ().as_deref() == Some("tmpfs") && t.destination == *m.destination())
        else {
            continue;
        };
        let mut options = vec!["rbind".to_string()];
        options.extend(t.flags.iter().cloned());
        let mut bind = Mount::default();
        bind.set_destination(t.destination.clone())
            .set_typ(Some("bind".into()))
            .set_source(Some(t.source.clone()))
            .set_options(Some(options));
        *m = bind;
        changed = true;
    }
    spec.set_mounts(Some(mounts));
    changed
}

/// Mounts each planned tmpfs at its node dir (again, should a crashed shim have left one).
/// On failure nothing stays mounted.
pub fn mount_all(planned: &[Tmpfs]) -> Result<()> {
    for (i, t) in planned.iter().enumerate() {
        if let Err(e) = mount(t) {
            unmount_all(&planned[..i]);
            return Err(e);
        }
    }
    Ok(())
}

fn mount(t: &Tmpfs) -> Result<()> {
    crate::overlay::unmount(&t.source);
    std::fs::create_dir_all(&t.source)
        .map_err(Error::io(format!("create {}", t.source.display())))?;
    let flags = t
        .flags
        .iter()
        .filter_map(|o| FLAGS.iter().find(|(name, _)| name == o))
        .fold(MsFlags::empty(), |acc, (_, f)| acc | *f);
    let data = (!t.data.is_empty()).then_some(t.data.as_str());
    nix::mount::mount(Some("tmpfs"), &t.source, Some("tmpfs"), flags, data).map_err(|e| {
        Error::Other(format!(
            "mount the container's tmpfs for {} at {} (options {:?}): {e}",
            t.destination.display(),
            t.source.display(),
            t.data
        ))
    })
}

/// Unmounts each planned tmpfs (its content goes with it); one not mounted is left alone.
pub fn unmount_all(planned: &[Tmpfs]) {
    for t in planned {
        crate::overlay::unmount(&t.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": mounts}))
            .unwrap()
    }

    fn ctr_mounts() -> serde_json::Value {
        serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys/fs/x", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/ro", "type": "tmpfs", "source": "tmpfs", "options": ["ro"]},
            {"destination": "/copied", "type": "tmpfs", "source": "tmpfs",
             "options": ["tmpcopyup", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["exec", "nr_inodes=1000", "inode64"]},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]}
        ])
    }

    #[test]
    fn takes_over_the_writable_tmpfs_mounts_but_dev_sys_proc_and_read_only_ones() {
        let s = spec(ctr_mounts());
        let p = plan(&s, Path::new("/state/c1/tmpfs"), &[]);
        let names: Vec<&str> = p.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["tmpfs-dev-shm", "tmpfs-run", "tmpfs-tmp"]);
        assert_eq!(p[0].source, Path::new("/state/c1/tmpfs/tmpfs-dev-shm"));
        assert_eq!(p[0].data, "mode=1777,size=65536k");
        assert_eq!(p[0].flags, ["nosuid", "noexec", "nodev"]);
        assert_eq!(p[1].flags, ["nosuid", "strictatime"]);
        assert_eq!(p[2].flags, ["exec"]);
        assert_eq!(p[2].data, "nr_inodes=1000,inode64");
    }

    #[test]
    fn a_name_a_volume_already_has_is_left_to_the_volume() {
        let s = spec(ctr_mounts());
        let taken = [SafeName::new("tmpfs-run".to_string()).unwrap()];
        let p = plan(&s, Path::new("/t"), &taken);
        let names: Vec<&str> = p.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["tmpfs-dev-shm", "tmpfs-tmp"]);
    }

    #[test]
    fn rewrite_binds_the_node_dir_with_the_same_flags_in_place() {
        let mut s = spec(ctr_mounts());
        let p = plan(&s, Path::new("/state/c1/tmpfs"), &[]);
        assert!(rewrite(&mut s, &p));
        let mounts = s.mounts().clone().unwrap();
        assert_eq!(mounts.len(), 9, "no mount added or lost");
        let shm = &mounts[2];
        assert_eq!(shm.destination(), Path::new("/dev/shm"));
        assert_eq!(shm.typ().as_deref(), Some("bind"));
        assert_eq!(
            shm.source().as_deref(),
            Some(Path::new("/state/c1/tmpfs/tmpfs-dev-shm"))
        );
        assert_eq!(
            shm.options().clone().unwrap(),
            ["rbind", "nosuid", "noexec", "nodev"]
        );
        assert_eq!(mounts[1].typ().as_deref(), Some("tmpfs"), "/dev stays");
        assert_eq!(
            mounts[4].typ().as_deref(),
            Some("tmpfs"),
            "under /sys stays"
        );
        assert_eq!(mounts[5].typ().as_deref(), Some("tmpfs"), "read-only stays");
        assert_eq!(mounts[6].typ().as_deref(), Some("tmpfs"), "tmpcopyup stays");
        assert_eq!(mounts[7].typ().as_deref(), Some("bind"));
        assert!(!rewrite(&mut s, &[]));
    }

    #[test]
    fn mounts_a_tmpfs_with_the_specs_size_and_mode_and_unmounts_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let s = spec(ctr_mounts());
        let p = plan(&s, dir.path(), &[]);
        mount_all(&p).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.contains(&*p[0].source.to_string_lossy()))
            .expect("the tmpfs is mounted");
        assert!(line.contains(" - tmpfs "), "{line}");
        assert!(line.contains("size=65536k"), "{line}");
        assert!(
            line.contains("nosuid,nodev,noexec"),
            "the spec's flags: {line}"
        );
        let tmp = info
            .lines()
            .find(|l| l.contains(&*p[2].source.to_string_lossy()))
            .expect("the exec tmpfs is mounted");
        assert!(!tmp.contains("noexec") && !tmp.contains("nosuid"), "{tmp}");
        use std::os::unix::fs::PermissionsExt;
        let run = std::fs::metadata(&p[1].source)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(run & 0o7777, 0o755, "/run's mode=755");
        let shm = std::fs::metadata(&p[0].source)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(shm & 0o7777, 0o1777, "/dev/shm's mode=1777");
        std::fs::write(p[0].source.join("f"), b"x").unwrap();
        unmount_all(&p);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.contains(&*p[0].source.to_string_lossy()));
        assert!(
            !p[0].source.join("f").exists(),
            "the content went with the mount"
        );
    }
}
