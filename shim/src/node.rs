//! What the shim knows about the node it runs on: where state and checkpoints live, which
//! checkpoint engine is the default, where DMTCP and the restore-hook are.

use std::path::{Path, PathBuf};

use mig_checkpoint::{SafeName, Store, WorkloadIdentity};
use serde::{Deserialize, Serialize};

use crate::{
    criu::NetworkLock,
    error::{Error, Result},
    lazy::LazyPages,
    options::RuntimeOptions,
};

/// The node's state root when neither the runtime options nor `MIG_STATE_DIR` name one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kubernetes-mig";
/// Where `scripts/setup.sh` and the DaemonSet install the restore-hook.
pub const DEFAULT_HOOK: &str = "/opt/kubernetes-mig/bin/mig-restore-hook";

/// A checkpoint engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// CRIU through `runc checkpoint` / `runc restore`.
    Criu,
    /// DMTCP in user space, through the restore-hook.
    Dmtcp,
}

impl EngineKind {
    /// Parses `criu` or `dmtcp`; `what` says where the value came from, for the error.
    pub fn parse(value: &str, what: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "criu" => Ok(Self::Criu),
            "dmtcp" => Ok(Self::Dmtcp),
            other => Err(Error::InvalidArgument(format!(
                "{what} names checkpoint engine {other:?}: expected \"criu\" or \"dmtcp\""
            ))),
        }
    }

    /// The engine's name as recorded in a checkpoint manifest.
    pub fn name(self) -> &'static str {
        match self {
            Self::Criu => "criu",
            Self::Dmtcp => "dmtcp",
        }
    }
}

/// The node-level configuration of the shim.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The state root: `checkpoints/`, `marks/`, `containers/` live below it.
    pub state_dir: PathBuf,
    /// The checkpoint store's root in memory, for migrations' checkpoints (see
    /// [`mig_checkpoint::Store::begin_transient`]); `None`: always on disk.
    pub memory_dir: Option<PathBuf>,
    /// The engine of containers that do not choose one by annotation.
    pub default_engine: EngineKind,
    /// Where DMTCP is installed, when configured.
    pub dmtcp_dir: Option<PathBuf>,
    /// The restore-hook binary injected into DMTCP containers.
    pub hook_binary: PathBuf,
    /// How CRIU locks a container's network while it dumps.
    pub criu_network_lock: NetworkLock,
    /// When a CRIU restore leaves the memory to a lazy pages daemon.
    pub criu_lazy_pages: LazyPages,
}

/// A migration mark: the node agent asks that the next stop of a workload checkpoint it first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The migration that asked for it.
    #[serde(default)]
    pub migration: String,
    /// Stop the workload even when its checkpoint fails.
    #[serde(default)]
    pub force: bool,
    /// Make the checkpoint's data durable (fsync, right after the stop: `crate::writeback`).
    /// The node agent sets it false for a migration: the checkpoint is streamed away at once
    /// and only has to outlive the migration, within this boot; flushing it would compete
    /// with the transfer for the disk and the CPU.
    #[serde(default = "durable_by_default")]
    pub durable: bool,
    /// Post-copy (CRIU only, see [`crate::postcopy`]): the checkpoint leaves the memory pages
    /// out, the processes stay frozen, and the pages are served to the destination on the
    /// workload's pages socket ([`NodeConfig::pages_socket`]) until it has them all.
    #[serde(default)]
    pub post_copy: bool,
}

fn durable_by_default() -> bool {
    true
}

/// An incoming mark: the node agent of a migration's destination created this workload's
/// container (and its task) ahead of the checkpoint, which is still on its way. Create then
/// leaves everything that depends on the checkpoint (unpacking it, mounting the root, runc) to
/// start, which restores from it, or fails when none has arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The migration the checkpoint comes with.
    #[serde(default)]
    pub migration: String,
    /// Post-copy: the checkpoint holds no memory pages; they are fetched from the origin
    /// while the workload already runs, through this unix socket (the node agent pipes it to
    /// the origin's pages socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_socket: Option<PathBuf>,
}

impl NodeConfig {
    /// The configuration from the runtime options, then the environment containerd gave the
    /// shim (`MIG_STATE_DIR`, `MIG_ENGINE`, `MIG_DMTCP_DIR`, `MIG_RESTORE_HOOK`), then defaults.
    pub fn from_options(o: &RuntimeOptions) -> Result<Self> {
        let pick = |configured: &str, var: &str| -> Option<String> {
            Some(configured.to_string())
                .filter(|s| !s.is_empty())
                .or_else(|| std::env::var(var).ok().filter(|s| !s.is_empty()))
        };
        let default_engine = match pick(&o.engine, "MIG_ENGINE") {
            Some(e) => EngineKind::parse(&e, "the runtime option Engine (or MIG_ENGINE)")?,
            None => EngineKind::Criu,
        };
        let criu_network_lock = match pick(&o.criu_network_lock, "MIG_CRIU_NETWORK_LOCK") {
            Some(l) => NetworkLock::parse(
                &l,
                "the runtime option CriuNetworkLock (or MIG_CRIU_NETWORK_LOCK)",
            )?,
            None => NetworkLock::default(),
        };
        let criu_lazy_pages = match pick(&o.criu_lazy_pages, "MIG_CRIU_LAZY_PAGES") {
            Some(l) => LazyPages::parse(
                &l,
                "the runtime option CriuLazyPages (or MIG_CRIU_LAZY_PAGES)",
            )?,
            None => LazyPages::default(),
        };
        let state_dir: PathBuf = pick(&o.state_dir, "MIG_STATE_DIR")
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
            .into();
        Ok(Self {
            memory_dir: mig_checkpoint::room::memory_dir(
                &pick(&o.memory_dir, "MIG_MEMORY_DIR").unwrap_or_default(),
                &state_dir,
            ),
            state_dir,
            default_engine,
            dmtcp_dir: pick(&o.dmtcp_dir, "MIG_DMTCP_DIR").map(PathBuf::from),
            hook_binary: pick("", "MIG_RESTORE_HOOK")
                .unwrap_or_else(|| DEFAULT_HOOK.into())
                .into(),
            criu_network_lock,
            criu_lazy_pages,
        })
    }

    /// The node's checkpoint store.
    pub fn store(&self) -> Result<Store> {
        let store = Store::open(self.state_dir.join("checkpoints"))
            .map_err(|e| Error::Other(format!("open the checkpoint store: {e}")))?;
        match &self.memory_dir {
            Some(dir) => store
                .with_memory(dir)
                .map_err(|e| Error::Other(format!("open the checkpoint store in memory: {e}"))),
            None => Ok(store),
        }
    }

    /// The per-container scratch dir (upper layer when containerd gives none, DMTCP dirs).
    pub fn container_dir(&self, namespace: &str, id: &str) -> Result<PathBuf> {
        let ns = SafeName::new(namespace).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let id = SafeName::new(id).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(self
            .state_dir
            .join("containers")
            .join(ns.as_str())
            .join(id.as_str()))
    }

    fn mark_path(&self, identity: &WorkloadIdentity) -> PathBuf {
        self.state_dir
            .join("marks")
            .join(format!("{}.json", identity.key()))
    }

    /// The migration mark for `identity`, if the node agent set one.
    pub fn mark(&self, identity: &WorkloadIdentity) -> Result<Option<Mark>> {
        read_mark(&self.mark_path(identity), "migration mark")
    }

    /// Where a post-copy checkpoint of `identity` serves its memory pages
    /// (`<state>/pages/<key>.sock`; see [`crate::postcopy`]).
    pub fn pages_socket(&self, identity: &WorkloadIdentity) -> PathBuf {
        self.state_dir
            .join("pages")
            .join(format!("{}.sock", identity.key()))
    }

    fn incoming_path(&self, identity: &WorkloadIdentity) -> PathBuf {
        self.state_dir
            .join("incoming")
            .join(format!("{}.json", identity.key()))
    }

    /// The incoming mark for `identity`, if the node agent set one (it removes it once the
    /// workload runs, or when the migration is aborted).
    pub fn incoming(&self, identity: &WorkloadIdentity) -> Result<Option<Incoming>> {
        read_mark(&self.incoming_path(identity), "incoming mark")
    }

    /// Sets an incoming mark (what the node agent does; also used by tests).
    pub fn set_incoming(&self, identity: &WorkloadIdentity, incoming: &Incoming) -> Result<()> {
        let path = self.incoming_path(identity);
        write_private(&path, &serde_json::to_vec(incoming).unwrap_or_default())
    }

    /// Sets a migration mark (what the node agent does; also used by tests).
    pub fn set_mark(&self, identity: &WorkloadIdentity, mark: &Mark) -> Result<()> {
        let path = self.mark_path(identity);
        write_private(&path, &serde_json::to_vec(mark).unwrap_or_default())
    }

    /// Removes the mark once it has been acted on.
    pub fn clear_mark(&self, identity: &WorkloadIdentity) {
        let _ = std::fs::remove_file(self.mark_path(identity));
    }
}

/// Reads the node agent's mark at `path` (`what` names it in errors); `None` when absent.
fn read_mark<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::InvalidArgument(format!(
                "{what} {} is not valid JSON ({e}); expected {{\"migration\": \"ID\"}}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            context: format!("read {what} {}", path.display()),
            source: e,
        }),
    }
}

/// Creates `dir` (and its parents) readable by root only.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("create {}", dir.display())))
}

/// Writes `data` to `path` atomically, readable by root only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(format!("write {}", tmp.display())))?;
    std::io::Write::write_all(&mut f, data)
        .map_err(Error::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("install {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_parse_and_bad_names_say_what_is_expected() {
        assert_eq!(EngineKind::parse("CRIU", "x").unwrap(), EngineKind::Criu);
        assert_eq!(EngineKind::parse("dmtcp", "x").unwrap(), EngineKind::Dmtcp);
        let err = EngineKind::parse("podman", "annotation mig.dev/engine").unwrap_err();
        assert!(
            err.to_string().contains("annotation mig.dev/engine"),
            "{err}"
        );
        assert!(err.to_string().contains("\"criu\" or \"dmtcp\""), "{err}");
    }

    #[test]
    fn options_override_the_environment_and_defaults() {
        let o = RuntimeOptions {
            state_dir: "/srv/mig".into(),
            engine: "dmtcp".into(),
            ..Default::default()
        };
        let n = NodeConfig::from_options(&o).unwrap();
        assert_eq!(n.state_dir, PathBuf::from("/srv/mig"));
        assert_eq!(n.default_engine, EngineKind::Dmtcp);
        let bad = RuntimeOptions {
            engine: "nope".into(),
            ..Default::default()
        };
        assert!(NodeConfig::from_options(&bad).is_err());
    }

    fn node_in(state_dir: &Path) -> NodeConfig {
        NodeConfig {
            state_dir: state_dir.into(),
            memory_dir: None,
            default_engine: EngineKind::Criu,
            dmtcp_dir: None,
            hook_binary: DEFAULT_HOOK.into(),
            criu_network_lock: NetworkLock::Auto,
            criu_lazy_pages: LazyPages::Auto,
        }
    }

    #[test]
    fn marks_round_trip_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let node = node_in(dir.path());
        let id = WorkloadIdentity::container("default", "counter").unwrap();
        assert_eq!(node.mark(&id).unwrap(), None);
        let mark = Mark {
            migration: "m-1".into(),
            force: false,
            durable: false,
            post_copy: true,
        };
        node.set_mark(&id, &mark).unwrap();
        assert_eq!(node.mark(&id).unwrap(), Some(mark));
        // A mark that does not say is durable (what an older agent wrote).
        std::fs::write(node.mark_path(&id), r#"{"migration":"m-2"}"#).unwrap();
        assert!(node.mark(&id).unwrap().unwrap().durable);
        let mode = std::fs::metadata(node.mark_path(&id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        node.clear_mark(&id);
        assert_eq!(node.mark(&id).unwrap(), None);
    }

    #[test]
    fn incoming_marks_round_trip_and_bad_ones_say_what_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let node = node_in(dir.path());
        let id = WorkloadIdentity::container("default", "counter").unwrap();
        assert_eq!(node.incoming(&id).unwrap(), None);
        let incoming = Incoming {
            migration: "m-1".into(),
            pages_socket: Some("/run/x/pages.sock".into()),
        };
        node.set_incoming(&id, &incoming).unwrap();
        assert_eq!(node.incoming(&id).unwrap(), Some(incoming));
        std::fs::write(node.incoming_path(&id), "not json").unwrap();
        let err = node.incoming(&id).unwrap_err().to_string();
        assert!(err.contains("expected {\"migration\""), "{err}");
    }
}
