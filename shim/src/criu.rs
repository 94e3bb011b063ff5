//! What the shim knows of the node's CRIU, and the CRIU configuration it gives runc.
//!
//! runc hands CRIU a configuration file: the one a container's annotation `org.criu.config`
//! names, else `/etc/criu/runc.conf`. The shim uses it for one setting runc has no flag for:
//! how CRIU locks the container's network while it dumps. CRIU's default runs the
//! `iptables-restore` and `ip6tables-restore` programs several times per dump and restore;
//! with `nftables` it locks through libnftables, in process (measured here on a 16 MiB
//! container: restore 162-178 ms -> 115-152 ms). The method is recorded in the images: a
//! restore unlocks with the method its dump locked with, whatever its own configuration says.
//!
//! It also keeps CRIU from archiving the masked directories under `/proc`. runc hides each
//! directory of the spec's `linux.maskedPaths` (`/proc/acpi`, `/proc/scsi`, ...) under an
//! empty read-only tmpfs, and CRIU dumps every tmpfs with `tar --gzip` and unpacks it on
//! restore: two programs per mount, 5-25 ms each way (`/proc/acpi` took 28 ms of a 161 ms
//! restore). The configuration names them external mounts instead: a dump records their mount
//! point and flags and nothing else; a restore binds the container's own empty directory
//! ([`MASKED_SOURCE`], mode 0555) there, read-only as the image says. The container sees the
//! same thing, an empty directory it cannot write to. Not under `/sys`: a container's `/sys` is
//! read-only, and a bind restored under it came back writable from its second dump on (seen
//! with CRIU 4.2.1), so those stay tmpfs. The shim checks every restore anyway
//! ([`writable_masks`]) and fails it rather than run a container with a writable mask. runc
//! handles masked files itself (binds of `/dev/null`). A dump that names them can only be
//! restored with this configuration (CRIU: "No mapping for ... mountpoint"); a restore with it
//! also takes images dumped without it.
//!
//! The facts (version, nftables support) come from running `criu`, ~30 ms each; they are kept
//! per node in `<state>/criu-facts.json`, keyed by the binary (path, size, mtime) and the boot
//! (kernel modules may differ), so a container's create does not pay for them again.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::{
    error::{Error, Result},
    node_cache,
    runc::run_watched,
};

/// The spec annotation runc reads for the path of CRIU's configuration file.
pub const CONFIG_ANNOTATION: &str = "org.criu.config";
/// The file runc gives CRIU when a container has no [`CONFIG_ANNOTATION`].
pub const RUNC_DEFAULT_CONFIG: &str = "/etc/criu/runc.conf";
/// The file, in the container's dir, the shim writes CRIU's configuration to.
pub const CONFIG_FILE: &str = "criu.conf";
/// The empty directory, in the container's dir, that a restore binds on each masked directory.
pub const MASKED_SOURCE: &str = "masked-empty";
/// What CRIU's images call a masked directory's mount (one source serves them all).
const MASKED_KEY: &str = "mig-masked";
const FACTS_FILE: &str = "criu-facts.json";

/// How CRIU locks a container's network during a dump (runtime option `CriuNetworkLock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkLock {
    /// nftables when this node's CRIU and kernel support it, else iptables.
    #[default]
    Auto,
    /// Always nftables: a dump fails if CRIU or the kernel cannot.
    Nftables,
    /// CRIU's default: the iptables programs.
    Iptables,
}

impl NetworkLock {
    /// Parses a configured value; `what` names where it came from, for the error.
    pub fn parse(s: &str, what: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "nftables" => Ok(Self::Nftables),
            "iptables" => Ok(Self::Iptables),
            other => Err(Error::InvalidArgument(format!(
                "{what}: unknown CRIU network lock {other:?}; expected auto, nftables or iptables"
            ))),
        }
    }
}

/// What the node's CRIU is and can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// `criu --version`.
    pub version: String,
    /// `criu check --feature nftables` succeeded: it can lock the network with nftables.
    pub nftables: bool,
}

/// What cached [`Facts`] were read from: the criu binary (path, size, mtime) and the boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct CacheKey {
    binary: PathBuf,
    size: u64,
    mtime_ns: i128,
    boot_id: String,
}

/// The facts with what they were read from, as cached on disk.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Cached {
    key: CacheKey,
    facts: Facts,
}

static FACTS: OnceCell<Facts> = OnceCell::const_new();

/// The facts of the `criu` on PATH: from this process's memory, the node's cache in
/// `state_dir`, or by running it (then cached).
pub async fn facts(state_dir: &Path) -> Result<Facts> {
    let state_dir = state_dir.to_path_buf();
    FACTS
        .get_or_try_init(|| async move {
            let binary = node_cache::find_on_path("criu").ok_or_else(|| {
                Error::FailedPrecondition(
                    "the CRIU engine needs criu on the node's PATH: not found".into(),
                )
            })?;
            let key = cache_key(&binary)?;
            let cache = state_dir.join(FACTS_FILE);
            if let Some(facts) = read_cache(&cache, &key) {
                return Ok(facts);
            }
            let facts = probe().await?;
            write_cache(
                &cache,
                &Cached {
                    key,
                    facts: facts.clone(),
                },
            );
            Ok(facts)
        })
        .await
        .cloned()
}

fn cache_key(binary: &Path) -> Result<CacheKey> {
    let meta =
        std::fs::metadata(binary).map_err(Error::io(format!("stat {}", binary.display())))?;
    Ok(CacheKey {
        binary: binary.to_path_buf(),
        size: meta.size(),
        mtime_ns: mig_checkpoint::mtime_ns(&meta),
        boot_id: mig_checkpoint::boot_id().unwrap_or_default(),
    })
}

/// The cached facts, when they were read from this binary in this boot (an unknown boot never
/// matches).
fn read_cache(path: &Path, key: &CacheKey) -> Option<Facts> {
    let cached: Cached = node_cache::read(path)?;
    (cached.key == *key && !key.boot_id.is_empty()).then_some(cached.facts)
}

/// Best effort: a cache that cannot be written is probed again next time.
fn write_cache(path: &Path, cached: &Cached) {
    node_cache::write(path, cached, "CRIU's facts");
}

async fn probe() -> Result<Facts> {
    let mut cmd = std::process::Command::new("criu");
    cmd.arg("--version");
    let done = run_watched(cmd, None).await.map_err(|e| {
        Error::FailedPrecondition(format!(
            "the CRIU engine needs criu on the node's PATH: {e}"
        ))
    })?;
    let version = done
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "`criu --version` printed no version (exit {}): {}",
                done.code,
                done.stderr.trim()
            ))
        })?;
    let mut cmd = std::process::Command::new("criu");
    cmd.args(["check", "--feature", "nftables"]);
    let nftables = run_watched(cmd, None).await.is_ok_and(|d| d.code == 0);
    Ok(Facts { version, nftables })
}

/// The network lock to configure: `None` leaves CRIU's default (iptables).
pub fn chosen_lock(lock: NetworkLock, facts: &Facts) -> Option<&'static str> {
    match lock {
        NetworkLock::Auto if facts.nftables => Some("nftables"),
        NetworkLock::Auto | NetworkLock::Iptables => None,
        NetworkLock::Nftables => Some("nftables"),
    }
}

/// The spec's masked paths that are directories under `/proc` (`is_dir` asks the node: the
/// container sees the node's kernel there) and that CRIU's configuration can name: absolute,
/// of plain characters.
fn masked_dirs(spec: &Spec, is_dir: impl Fn(&Path) -> bool) -> Vec<String> {
    let plain = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b))
            && !p.split('/').any(|c| c == "..")
    };
    let paths = spec.linux().as_ref().and_then(|l| l.masked_paths().clone());
    paths
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.starts_with("/proc/"))
        .filter(|p| plain(p) && is_dir(Path::new(p)))
        .collect()
}

/// The masked directories CRIU's configuration at `config` names external (see the module's
/// doc): none when the file is absent or is not one the shim wrote.
pub fn external_masks(config: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("external mnt[/"))
        .filter_map(|l| l.strip_suffix(&format!("]:{MASKED_KEY}")))
        .map(|p| format!("/{p}"))
        .collect()
}

/// Which of `masks` is, in the mount table `mountinfo` (`/proc/<pid>/mountinfo`), mounted
/// without the read-only flag, or not mounted at all.
pub fn writable_masks(mountinfo: &str, masks: &[String]) -> Vec<String> {
    masks
        .iter()
        .filter(|m| {
            // The last mount on a point is the one the container sees.
            let options = mountinfo.lines().rev().find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(4) == Some(&m.as_str())).then(|| f.get(5).copied().unwrap_or(""))
            });
            !options.is_some_and(|o| o.split(',').any(|x| x == "ro"))
        })
        .cloned()
        .collect()
}

/// Gives the container a CRIU configuration of its own, in `dir`, when it needs one: the
/// content of runc's default file (which the annotation replaces for this container), plus
/// the network lock (unless runc's default file already chooses one: the administrator's
/// choice stands) and the masked directories as external mounts (with their empty source,
/// made in `dir`). Leaves the spec alone when the container names its own configuration
/// (annotation), or when there is nothing to add. Returns whether the spec changed.
pub fn configure(
    spec: &mut Spec,
    dir: &Path,
    lock: NetworkLock,
    facts: &Facts,
    runc_default: &Path,
) -> Result<bool> {
    configure_with(spec, dir, lock, facts, runc_default, |p| p.is_dir())
}

fn configure_with(
    spec: &mut Spec,
    dir: &Path,
    lock: NetworkLock,
    facts: &Facts,
    runc_default: &Path,
    is_dir: impl Fn(&Path) -> bool,
) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let mut notes = spec.annotations().clone().unwrap_or_default();
    if notes.contains_key(CONFIG_ANNOTATION) {
        return Ok(false);
    }
    let mut text = std::fs::read_to_string(runc_default).unwrap_or_default();
    let admin_lock = text.lines().any(|l| {
        l.trim_start()
            .trim_start_matches('-')
            .starts_with("network-lock")
    });
    let method = chosen_lock(lock, facts).filter(|_| !admin_lock);
    // The empty source, where CRIU's configuration can name it, and the masks it serves.
    let source = dir.join(MASKED_SOURCE);
    let masked = source
        .to_str()
        .filter(|s| !s.contains(|c: char| c.is_whitespace() || "]\"'#".contains(c)))
        .map(|text| (text, masked_dirs(spec, is_dir)))
        .filter(|(_, paths)| !paths.is_empty());
    if method.is_none() && masked.is_none() {
        return Ok(false);
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if let Some(method) = method {
        text.push_str(&format!("network-lock {method}\n"));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    if let Some((source_text, masked)) = masked {
        std::fs::create_dir_all(&source)
            .and_then(|()| {
                std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o555))
            })
            .map_err(Error::io(format!("create {}", source.display())))?;
        for path in &masked {
            // Dump: the mount at `path` is external, called MASKED_KEY in the images.
            // Restore: MASKED_KEY is `source`. Each line is ignored by the other.
            text.push_str(&format!("external mnt[{path}]:{MASKED_KEY}\n"));
        }
        text.push_str(&format!("external mnt[{MASKED_KEY}]:{source_text}\n"));
    }
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))?;
    notes.insert(
        CONFIG_ANNOTATION.into(),
        path.to_string_lossy().into_owned(),
    );
    spec.set_annotations(Some(notes));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn facts(nftables: bool) -> Facts {
        Facts {
            version: "4.2.1".into(),
            nftables,
        }
    }

    fn spec(annotations: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"}, "annotations": annotations
        }))
        .unwrap()
    }

    #[test]
    fn network_lock_values_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(NetworkLock::parse("auto", "x").unwrap(), NetworkLock::Auto);
        assert_eq!(
            NetworkLock::parse("nftables", "x").unwrap(),
            NetworkLock::Nftables
        );
        assert_eq!(
            NetworkLock::parse("iptables", "x").unwrap(),
            NetworkLock::Iptables
        );
        let e = NetworkLock::parse("nft", "the runtime option CriuNetworkLock")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CriuNetworkLock") && e.contains("\"nft\""),
            "{e}"
        );
        assert!(e.contains("expected auto, nftables or iptables"), "{e}");
    }

    #[test]
    fn auto_uses_nftables_only_where_criu_supports_it() {
        assert_eq!(
            chosen_lock(NetworkLock::Auto, &facts(true)),
            Some("nftables")
        );
        assert_eq!(chosen_lock(NetworkLock::Auto, &facts(false)), None);
        assert_eq!(chosen_lock(NetworkLock::Iptables, &facts(true)), None);
        assert_eq!(
            chosen_lock(NetworkLock::Nftables, &facts(false)),
            Some("nftables")
        );
    }

    #[test]
    fn configure_writes_the_lock_after_runcs_default_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("runc.conf");
        std::fs::write(&default, "tcp-close").unwrap();
        let mut s = spec(serde_json::json!({"a": "b"}));
        let ctr = dir.path().join("ctr");
        assert!(configure(&mut s, &ctr, NetworkLock::Auto, &facts(true), &default).unwrap());
        let notes = s.annotations().clone().unwrap();
        let path = ctr.join(CONFIG_FILE);
        assert_eq!(notes[CONFIG_ANNOTATION], path.to_string_lossy());
        assert_eq!(notes["a"], "b");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "tcp-close\nnetwork-lock nftables\n"
        );
    }

    #[test]
    fn configure_leaves_the_spec_alone_when_nothing_is_to_change() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("absent.conf");
        let ctr = dir.path().join("ctr");
        // The container names its own configuration.
        let mut s = spec(serde_json::json!({CONFIG_ANNOTATION: "/etc/mine.conf"}));
        assert!(!configure(&mut s, &ctr, NetworkLock::Nftables, &facts(true), &none).unwrap());
        assert_eq!(
            s.annotations().clone().unwrap()[CONFIG_ANNOTATION],
            "/etc/mine.conf"
        );
        // CRIU's default lock is wanted, or is all this CRIU can do.
        for (lock, nft) in [(NetworkLock::Iptables, true), (NetworkLock::Auto, false)] {
            let mut s = spec(serde_json::json!({}));
            assert!(!configure(&mut s, &ctr, lock, &facts(nft), &none).unwrap());
            assert!(
                !s.annotations()
                    .clone()
                    .unwrap()
                    .contains_key(CONFIG_ANNOTATION)
            );
        }
        // runc's default file already chooses a lock: the administrator's choice stands.
        let default = dir.path().join("runc.conf");
        std::fs::write(&default, "network-lock iptables\n").unwrap();
        let mut s = spec(serde_json::json!({}));
        assert!(!configure(&mut s, &ctr, NetworkLock::Auto, &facts(true), &default).unwrap());
        assert!(!ctr.join(CONFIG_FILE).exists());
    }

    #[test]
    fn masked_directories_become_external_mounts_bound_from_an_empty_dir_of_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("absent.conf");
        let ctr = dir.path().join("ctr");
        let mut s: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "linux": {"maskedPaths": [
                "/proc/acpi", "/proc/kcore", "/sys/firmware", "/etc/hidden",
                "/proc/a]b", "/proc/../etc", "/proc/absent"
            ]}
        }))
        .unwrap();
        // The node's view: kcore is a file, absent is not there; the rest are directories.
        // Only /proc's are named: /sys is read-only in a container, see the module's doc.
        let is_dir = |p: &Path| !p.ends_with("kcore") && !p.ends_with("absent");
        let iptables = NetworkLock::Iptables;
        assert!(configure_with(&mut s, &ctr, iptables, &facts(true), &none, is_dir).unwrap());
        let source = ctr.join(MASKED_SOURCE);
        assert_eq!(
            std::fs::read_to_string(ctr.join(CONFIG_FILE)).unwrap(),
            format!(
                "external mnt[/proc/acpi]:mig-masked\n\
                 external mnt[mig-masked]:{}\n",
                source.display()
            ),
            "only directories under /proc, of plain names; no lock asked for"
        );
        assert_eq!(external_masks(&ctr.join(CONFIG_FILE)), ["/proc/acpi"]);
        assert!(external_masks(&dir.path().join("absent")).is_empty());
        let meta = std::fs::metadata(&source).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o555);
        assert_eq!(std::fs::read_dir(&source).unwrap().count(), 0);

        // With the administrator's lock in runc's default file: kept, and the masks added.
        let default = dir.path().join("runc.conf");
        std::fs::write(&default, "network-lock iptables").unwrap();
        let mut s2: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "linux": {"maskedPaths": ["/proc/acpi"]}
        }))
        .unwrap();
        let auto = NetworkLock::Auto;
        assert!(configure_with(&mut s2, &ctr, auto, &facts(true), &default, is_dir).unwrap());
        let text = std::fs::read_to_string(ctr.join(CONFIG_FILE)).unwrap();
        assert!(
            text.starts_with("network-lock iptables\nexternal mnt[/proc/acpi]:mig-masked\n"),
            "{text}"
        );
        assert_eq!(text.matches("network-lock").count(), 1, "{text}");
    }

    #[test]
    fn a_mask_that_is_writable_or_missing_after_a_restore_is_found() {
        let table = "\
101 100 0:5 / /proc rw,nosuid - proc proc rw
111 101 254:0 /s/masked-empty /proc/acpi ro,relatime - ext4 /dev/vda rw
112 101 254:0 /s/masked-empty /proc/scsi rw,relatime - ext4 /dev/vda rw
113 101 0:9 / /proc/asound rw - tmpfs tmpfs rw
114 113 254:0 /s/masked-empty /proc/asound ro - ext4 /dev/vda rw
";
        let masks = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(writable_masks(table, &masks(&["/proc/acpi", "/proc/asound"])).is_empty());
        assert_eq!(
            writable_masks(table, &masks(&["/proc/acpi", "/proc/scsi", "/proc/keys"])),
            masks(&["/proc/scsi", "/proc/keys"])
        );
    }

    #[test]
    fn the_cache_answers_only_for_the_same_binary_and_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FACTS_FILE);
        let key = CacheKey {
            binary: "/usr/bin/criu".into(),
            size: 10,
            mtime_ns: 20,
            boot_id: "boot-1".into(),
        };
        write_cache(
            &path,
            &Cached {
                key: key.clone(),
                facts: facts(true),
            },
        );
        assert_eq!(read_cache(&path, &key), Some(facts(true)));
        let other = CacheKey {
            size: 11,
            ..key.clone()
        };
        assert_eq!(read_cache(&path, &other), None, "another binary");
        let other = CacheKey {
            boot_id: "boot-2".into(),
            ..key.clone()
        };
        assert_eq!(read_cache(&path, &other), None, "another boot");
        let unknown_boot = CacheKey {
            boot_id: String::new(),
            ..key.clone()
        };
        write_cache(
            &path,
            &Cached {
                key: unknown_boot.clone(),
                facts: facts(true),
            },
        );
        assert_eq!(read_cache(&path, &unknown_boot), None, "an unknown boot");
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(
            read_cache(&path, &key),
            None,
            "a damaged cache is probed again"
        );
    }
}
