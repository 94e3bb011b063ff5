//! The shim binary's side of containerd's runtime v2 protocol: `start` (spawn or join the
//! server for this container's group), `delete` (clean up after a dead server), and serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use containerd_shim::{
    Config, DeleteResponse, ExitSignal, Flags, StartOpts,
    asynchronous::{Shim, spawn},
    publisher::RemotePublisher,
    util::write_str_to_file,
};

use crate::{
    error::{Error, Result},
    events::{self, EventSink},
    options::RuntimeOptions,
    process::timestamp,
    runc::{RuncCli, Runtime},
    service::{OPTIONS_FILE, RuntimeFactory, Service},
    task::TaskApi,
};

/// The CRI annotation that names a container's pod sandbox: containers of one pod share a shim.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// containerd-shim-mig-v2.
pub struct MigShim {
    namespace: String,
    id: String,
    address: String,
    exit: Arc<ExitSignal>,
}

/// runc's state root for containers of `namespace` under the containerd at `address`.
///
/// Distinct per containerd instance, so that several "nodes" on one machine (each its own
/// containerd) never share runc state even when their container ids coincide.
pub fn runc_root(address: &str, namespace: &str, configured: &str) -> PathBuf {
    if !configured.is_empty() {
        return Path::new(configured).join(namespace);
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = address.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    PathBuf::from(format!("/run/containerd/mig/{hash:016x}/{namespace}"))
}

struct Runc {
    address: String,
    namespace: String,
}

impl RuntimeFactory for Runc {
    fn runtime(&self, o: &RuntimeOptions) -> Result<Arc<dyn Runtime>> {
        let binary = if o.binary_name.is_empty() {
            "runc"
        } else {
            &o.binary_name
        };
        let root = runc_root(&self.address, &self.namespace, &o.root);
        std::fs::create_dir_all(&root)
            .map_err(Error::io(format!("create runc root {}", root.display())))?;
        Ok(Arc::new(RuncCli::new(
            binary,
            root,
            o.systemd_cgroup,
            o.no_pivot_root,
            o.no_new_keyring,
        )))
    }
}

#[async_trait]
impl Shim for MigShim {
    type T = TaskApi;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = group_of(Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir().map_err(|e| containerd_shim::Error::IoError {
            context: "bundle directory".into(),
            err: e,
        })?;
        let options = std::fs::read_to_string(bundle.join(OPTIONS_FILE))
            .ok()
            .and_then(|s| serde_json::from_str::<RuntimeOptions>(&s).ok())
            .unwrap_or_default();
        let factory = Runc {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
        };
        if let Ok(runtime) = factory.runtime(&options)
            && let Err(e) = runtime.delete(&self.id, true).await
        {
            tracing::warn!(container_id = %self.id, error = %e, "force delete after shim exit");
        }
        if let Some(rootfs) = crate::overlay::Rootfs::recorded(&bundle) {
            rootfs.unmount();
        }
        crate::service::unmount_rootfs(&bundle.join("rootfs"));
        // The container's tmpfs mounts on the node (crate::tmpfs), under its dir.
        if let Ok(dir) = crate::node::NodeConfig::from_options(&options)
            .and_then(|node| node.container_dir(&self.namespace, &self.id))
        {
            crate::service::unmount_rootfs(&dir.join("tmpfs"));
        }
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: Some(timestamp(std::time::SystemTime::now())).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // A checkpoint's data still on its way to the disk keeps the shim.
        let _ = tokio::task::spawn_blocking(crate::writeback::wait_all).await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let (sink, rx) = EventSink::new();
        events::forward(publisher, self.namespace.clone(), rx);
        let factory = Runc {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
        };
        let service = Service::new(Box::new(factory), sink, self.exit.clone(), &self.namespace);
        if let Err(e) = service.watch_exits().await {
            tracing::error!(error = %e, "cannot watch process exits");
        }
        TaskApi(service)
    }
}

/// The pod a container belongs to, from the CRI annotation in its spec.
fn group_of(spec: &Path) -> Option<String> {
    let text = std::fs::read_to_string(spec).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    spec.pointer("/annotations")?
        .get(SANDBOX_ID)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_of_a_pod_share_a_shim() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("config.json");
        std::fs::write(
            &spec,
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(group_of(&spec).as_deref(), Some("pod1"));
        std::fs::write(&spec, r#"{"annotations":{}}"#).unwrap();
        assert_eq!(group_of(&spec), None);
        assert_eq!(group_of(&dir.path().join("missing")), None);
    }

    #[test]
    fn runc_roots_differ_between_containerd_instances() {
        let a = runc_root("/run/a/containerd.sock", "default", "");
        let b = runc_root("/run/b/containerd.sock", "default", "");
        assert_ne!(a, b);
        assert!(a.ends_with("default"));
        assert_eq!(
            runc_root("/x", "k8s.io", "/run/custom"),
            PathBuf::from("/run/custom/k8s.io")
        );
    }
}
