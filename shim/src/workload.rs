//! A migratable container: who it is (its workload identity), which engine checkpoints it, where
//! its file changes and volumes are, and the checkpoint it is being restored from, if any.
//!
//! This is what turns a plain runc container into one that can move: at create it is prepared
//! ([`Workload::prepare`]), a pending checkpoint in the node's store is verified and unpacked
//! into the new container ([`Workload::unpack_pending`]), and on a stop for migration it is
//! checkpointed into the store ([`Workload::checkpoint`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use mig_checkpoint::{Checkpoint, EngineInfo, SafeName, Store, WorkloadIdentity};
use oci_spec::runtime::Spec;
use tokio::sync::OnceCell;

use crate::{
    criu,
    dmtcp::{self, DmtcpInstall, InjectDirs},
    error::{Error, Result},
    node::{EngineKind, NodeConfig},
    overlay::Rootfs,
    runc::{CheckpointOpts, Runtime},
    tmpfs::{self, Tmpfs},
};

/// The project's annotation prefix; the CRI copies pod annotations matching the runtime's
/// `pod_annotations = ["mig.dev/*"]` into the container's spec.
pub mod annotation {
    /// `criu` or `dmtcp`: overrides the runtime's default engine.
    pub const ENGINE: &str = "mig.dev/engine";
    /// `"true"`: every SIGTERM/SIGKILL of the container checkpoints it first.
    pub const CHECKPOINT_ON_STOP: &str = "mig.dev/checkpoint-on-stop";
    /// Comma-separated container paths of extra bind-mounted volumes (hostPath) to carry
    /// along; emptyDir volumes are always carried.
    pub const VOLUMES: &str = "mig.dev/volumes";
    /// The CRI's container type: `sandbox` for the pause container.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// The CRI's image name.
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// The file in a containerd checkpoint (`ctr c checkpoint`) that records the engine.
pub const NATIVE_ENGINE_RECORD: &str = "mig-engine.json";
/// The dir in a containerd checkpoint that holds the shim's tmpfs mounts ([`crate::tmpfs`]),
/// one archive each.
pub const NATIVE_TMPFS_DIR: &str = "mig-tmpfs";

/// How long a DMTCP checkpoint may take before it is reported as failed.
const DMTCP_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// A checkpoint engine, ready to use on this node.
#[derive(Debug, Clone)]
pub enum Engine {
    /// CRIU through runc.
    Criu {
        /// What the node's CRIU is and can do.
        facts: criu::Facts,
    },
    /// DMTCP through the restore-hook.
    Dmtcp {
        /// The node's DMTCP.
        install: DmtcpInstall,
        /// The container's DMTCP dirs on the node.
        dirs: InjectDirs,
    },
}

impl Engine {
    /// Name and version, as a checkpoint records them.
    pub fn info(&self) -> EngineInfo {
        match self {
            Engine::Criu { facts } => EngineInfo::new("criu", facts.version.clone()),
            Engine::Dmtcp { install, .. } => EngineInfo::new("dmtcp", install.version.clone()),
        }
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Criu { .. } => EngineKind::Criu,
            Engine::Dmtcp { .. } => EngineKind::Dmtcp,
        }
    }
}

/// A volume whose content travels with the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Its name in the checkpoint.
    pub name: SafeName,
    /// Its directory on the node.
    pub source: PathBuf,
}

/// A container that can be checkpointed and restored.
#[derive(Debug)]
pub struct Workload {
    /// Names its checkpoint, so the same workload finds it on another node.
    pub identity: WorkloadIdentity,
    /// The engine that checkpoints it.
    pub engine: Engine,
    /// Its image, recorded in the checkpoint.
    pub image: String,
    /// Its root filesystem, when the shim assembled one.
    pub rootfs: Option<Rootfs>,
    /// Its carried volumes (the tmpfs mounts the shim took over among them).
    pub volumes: Vec<Volume>,
    /// The tmpfs mounts the shim mounts on the node and binds in ([`crate::tmpfs`]).
    pub tmpfs: Vec<Tmpfs>,
    /// Checkpoint on every SIGTERM/SIGKILL (annotation), not only when marked.
    pub checkpoint_on_stop: bool,
    /// The node it runs on.
    pub node: NodeConfig,
    /// The shim's per-container dir on the node.
    pub scratch: PathBuf,
    /// The checkpoint it is being restored from, until the restore succeeded.
    pub pending: Option<Checkpoint>,
}

static DMTCP: OnceCell<DmtcpInstall> = OnceCell::const_new();

async fn dmtcp_install(node: &NodeConfig) -> Result<DmtcpInstall> {
    let dir = node.dmtcp_dir.clone();
    let deps = node.state_dir.join("dmtcp-deps");
    let cache = node.state_dir.join(dmtcp::INSTALL_CACHE);
    DMTCP
        .get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || {
                dmtcp::set_command_runner(crate::runc::output_through_reaper);
                DmtcpInstall::discover_staged(dir.as_deref(), &deps, &cache)
            })
            .await
            .map_err(|e| Error::Other(format!("DMTCP discovery: {e}")))?
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "the DMTCP engine was chosen but DMTCP is not usable on this node: {e} \
                     (install DMTCP and put dmtcp_launch on PATH, or set DmtcpDir / MIG_DMTCP_DIR)"
                ))
            })
        })
        .await
        .cloned()
}

fn annotations(spec: &Spec) -> HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

/// Whether the spec is the pod's pause container, which passes through untouched.
pub fn is_sandbox(spec: &Spec) -> bool {
    annotations(spec)
        .get(annotation::CONTAINER_TYPE)
        .map(String::as_str)
        == Some("sandbox")
}

/// The volumes of `spec` whose content travels: emptyDirs, and bind mounts named by the
/// `mig.dev/volumes` annotation.
pub fn volumes(spec: &Spec) -> Result<Vec<Volume>> {
    let wanted: Vec<String> = annotations(spec)
        .get(annotation::VOLUMES)
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let (Some(source), dest) = (m.source(), m.destination()) else {
            continue;
        };
        let dest = dest.to_string_lossy();
        let src = source.to_string_lossy();
        let name = if let Some((_, name)) = src.split_once("/volumes/kubernetes.io~empty-dir/") {
            name.split('/').next().unwrap_or_default().to_string()
        } else if wanted.iter().any(|w| w == dest.as_ref()) {
            dest.trim_matches('/').replace('/', "-")
        } else {
            continue;
        };
        let name = SafeName::new(name.clone()).map_err(|e| {
            Error::InvalidArgument(format!(
                "volume {dest} cannot be carried: name {name:?}: {e}"
            ))
        })?;
        out.push(Volume {
            name,
            source: source.clone(),
        });
    }
    if let Some(missing) = wanted.iter().find(|w| {
        !spec
            .mounts()
            .iter()
            .flatten()
            .any(|m| m.destination().to_string_lossy() == **w)
    }) {
        return Err(Error::InvalidArgument(format!(
            "annotation {} names {missing}, which is not a mount of this container; expected \
             comma-separated mount destinations",
            annotation::VOLUMES
        )));
    }
    Ok(out)
}

impl Workload {
    /// Prepares a (non-pause) container: its identity, engine, root layout and volumes, and
    /// finds a pending checkpoint for it in the node's store, verified for this engine.
    pub async fn prepare(
        node: NodeConfig,
        spec: &Spec,
        namespace: &str,
        id: &str,
        rootfs: Option<Rootfs>,
    ) -> Result<Self> {
        let notes = annotations(spec);
        let identity = WorkloadIdentity::from_annotations(&notes, namespace, id)
            .map_err(|e| Error::InvalidArgument(format!("workload identity of {id}: {e}")))?;
        let kind = match notes.get(annotation::ENGINE) {
            Some(v) => EngineKind::parse(v, &format!("annotation {}", annotation::ENGINE))?,
            None => node.default_engine,
        };
        let scratch = node.container_dir(namespace, id)?;
        let engine = match kind {
            EngineKind::Criu => Engine::Criu {
                facts: criu::facts(&node.state_dir).await?,
            },
            EngineKind::Dmtcp => {
                let install = dmtcp_install(&node).await?;
                let dirs = InjectDirs {
                    tmp: scratch.join("dmtcp-tmp"),
                    ckpt: scratch.join("dmtcp-ckpt"),
                    ctl: scratch.join("dmtcp-ctl"),
                };
                // A restart must not see a previous run's temp files or images.
                for d in [&dirs.tmp, &dirs.ckpt, &dirs.ctl] {
                    let _ = std::fs::remove_dir_all(d);
                    std::fs::create_dir_all(d)
                        .map_err(Error::io(format!("create {}", d.display())))?;
                }
                Engine::Dmtcp { install, dirs }
            }
        };
        let mut volumes = volumes(spec)?;
        // CRIU archives a tmpfs with `tar --gzip`; DMTCP does not carry them at all.
        let tmpfs = match kind {
            EngineKind::Criu => {
                let taken: Vec<SafeName> = volumes.iter().map(|v| v.name.clone()).collect();
                tmpfs::plan(spec, &scratch.join("tmpfs"), &taken)
            }
            EngineKind::Dmtcp => Vec::new(),
        };
        volumes.extend(tmpfs.iter().map(|t| Volume {
            name: t.name.clone(),
            source: t.source.clone(),
        }));
        let mut w = Self {
            image: notes
                .get(annotation::IMAGE_NAME)
                .cloned()
                .unwrap_or_default(),
            checkpoint_on_stop: notes
                .get(annotation::CHECKPOINT_ON_STOP)
                .map(String::as_str)
                == Some("true"),
            volumes,
            tmpfs,
            identity,
            engine,
            rootfs,
            node,
            scratch,
            pending: None,
        };
        w.load_pending(id)?;
        Ok(w)
    }

    /// Looks up the workload's pending checkpoint in the node's store and verifies it for
    /// this engine (at create; for a container created ahead of its checkpoint, at start).
    pub fn load_pending(&mut self, id: &str) -> Result<()> {
        let store = self.node.store()?;
        let pending = store.pending(&self.identity).map_err(|e| {
            Error::Other(format!(
                "look up a checkpoint for {}: {e}",
                self.identity.key()
            ))
        })?;
        if let Some(ckpt) = &pending {
            let verified = ckpt.verify_for_restore(&self.engine.info()).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "container {id} has a checkpoint waiting ({}) but it cannot be restored: \
                     {e}; remove it to start the workload afresh",
                    ckpt.dir().display()
                ))
            })?;
            tracing::info!(container_id = %id, checkpoint = %ckpt.dir().display(), engine = %ckpt.engine(), ?verified, "restoring from checkpoint");
        }
        self.pending = pending;
        Ok(())
    }

    /// Fills the new container from its pending checkpoint before its root is mounted: the
    /// upper layer, the volumes, and (DMTCP) the images the restore-hook restarts from.
    pub async fn unpack_pending(&self) -> Result<()> {
        let Some(ckpt) = &self.pending else {
            return Ok(());
        };
        let mut jobs: Vec<(PathBuf, PathBuf)> = Vec::new();
        if let (Some(tar), Some(rootfs)) = (ckpt.upper_layer(), &self.rootfs) {
            jobs.push((tar, rootfs.upper.clone()));
        }
        for (name, tar) in ckpt.volumes() {
            let Some(v) = self.volumes.iter().find(|v| v.name == name) else {
                return Err(Error::FailedPrecondition(format!(
                    "the checkpoint carries volume {name}, but this container has no such volume"
                )));
            };
            jobs.push((tar, v.source.clone()));
        }
        let dmtcp_copy = match &self.engine {
            Engine::Dmtcp { dirs, .. } => Some((ckpt.images_dir(), dirs.ckpt.clone())),
            Engine::Criu { .. } => None,
        };
        tokio::task::spawn_blocking(move || -> Result<()> {
            for (tar, dest) in jobs {
                unpack_into(&tar, &dest)?;
            }
            if let Some((from, to)) = dmtcp_copy {
                copy_files(&from, &to)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Other(format!("unpack checkpoint: {e}")))?
    }

    /// Rewrites the bundle's spec for the engine. CRIU: the container's own CRIU
    /// configuration (network lock, see [`criu`]), when it needs one. DMTCP: checks the
    /// entrypoint can be wrapped and has the restore-hook run it.
    pub fn prepare_spec(&self, spec: &mut Spec, bundle: &Path) -> Result<()> {
        let (install, dirs) = match &self.engine {
            Engine::Criu { facts } => {
                let configured = criu::configure(
                    spec,
                    &self.scratch,
                    self.node.criu_network_lock,
                    facts,
                    Path::new(criu::RUNC_DEFAULT_CONFIG),
                )?;
                let rebound = tmpfs::rewrite(spec, &self.tmpfs);
                if configured || rebound {
                    spec.save(bundle.join("config.json"))
                        .map_err(|e| Error::Other(format!("write the spec: {e}")))?;
                }
                return Ok(());
            }
            Engine::Dmtcp { install, dirs } => (install, dirs),
        };
        let root = self
            .rootfs
            .as_ref()
            .map(|r| r.target.clone())
            .unwrap_or_else(|| bundle.join("rootfs"));
        dmtcp::check_wrappable(&root, spec)
            .map_err(|e| Error::FailedPrecondition(format!("engine dmtcp: {e}")))?;
        dmtcp::check_hook_binary(&self.node.hook_binary)
            .map_err(|e| Error::FailedPrecondition(format!("engine dmtcp: {e}")))?;
        // In its own network namespace the coordinator can use the fixed port; sharing one
        // (host network, a pod's) it must let the kernel pick.
        let port = if crate::loopback::has_own_network_namespace(spec) {
            dmtcp::DEFAULT_COORD_PORT
        } else {
            0
        };
        dmtcp::inject(spec, install, &self.node.hook_binary, dirs, port)
            .map_err(|e| Error::InvalidArgument(format!("engine dmtcp: {e}")))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| Error::Other(format!("write the wrapped spec: {e}")))
    }

    /// Whether a stop with `signal` must checkpoint first (SIGTERM or SIGKILL, with a
    /// migration mark from the node agent or the checkpoint-on-stop annotation), and if so
    /// whether the stop is forced when the checkpoint fails.
    ///
    /// SIGKILL forces: it is what the kubelet sends when the grace period after SIGTERM ran
    /// out, and what an operator sends to end a container; refusing it would leave a pod
    /// Terminating forever (e.g. once its sandbox is gone and no checkpoint can succeed). A
    /// SIGTERM with a failed checkpoint is refused and the container keeps running.
    pub fn stop_needs_checkpoint(&self, signal: u32) -> Result<Option<StopCheckpoint>> {
        let sigkill = signal == libc::SIGKILL as u32;
        if signal != libc::SIGTERM as u32 && !sigkill {
            return Ok(None);
        }
        if let Some(mark) = self.node.mark(&self.identity)? {
            return Ok(Some(StopCheckpoint {
                force: mark.force || sigkill,
                durable: mark.durable,
                post_copy: mark.post_copy,
            }));
        }
        // The annotation's checkpoint may wait for a long time (until the workload is
        // created again): it is made durable.
        Ok(self.checkpoint_on_stop.then_some(StopCheckpoint {
            force: sigkill,
            durable: true,
            post_copy: false,
        }))
    }

    /// Checkpoints the running container into the node's store for a stop: afterwards its
    /// processes are gone (CRIU's dump kills them; DMTCP ends them with their images), so the
    /// upper layer and the volumes are archived once the application can no longer write to
    /// them, and the checkpoint is consistent with them.
    ///
    /// With DMTCP the container's init (the restore-hook) exits right after the checkpoint
    /// (status 137); the caller should wait for that exit rather than signal it. A failure
    /// says whether the processes were already stopped: before the engine stopped them
    /// nothing is installed in the store and the container keeps running.
    ///
    /// The checkpoint is installed without waiting for its data to reach the disk; the caller
    /// decides whether it must become durable ([`crate::writeback`]).
    pub async fn checkpoint(
        &self,
        id: &str,
        runtime: &dyn Runtime,
        post_copy: bool,
        transient: Option<u32>,
    ) -> std::result::Result<Checkpoint, StopCheckpointError> {
        let running = |error| StopCheckpointError {
            error,
            stopped: false,
        };
        let stopped = |error| StopCheckpointError {
            error,
            stopped: true,
        };
        let store = self.node.store().map_err(running)?;
        // A migration's CRIU checkpoint (`transient`: the init's pid) goes to memory when the
        // node has room for what the container holds (its memory, but for post-copy, whose
        // checkpoint holds no pages; its upper layer and volumes): written to disk, a GiB of
        // images is throttled to the disk's speed, all of it downtime. DMTCP's images are
        // written in the container's own directory and moved into the checkpoint, which must
        // then be on the same filesystem.
        let writer = match transient.filter(|_| self.engine.kind() == EngineKind::Criu) {
            Some(pid) => {
                use mig_checkpoint::room::{process_memory, tree_size};
                const UNKNOWN: u64 = u64::MAX / 4;
                let mut hint: u64 = if post_copy {
                    1 << 20
                } else {
                    process_memory(pid).unwrap_or(UNKNOWN)
                };
                let trees = self.rootfs.iter().map(|r| &r.upper);
                for dir in trees.chain(self.volumes.iter().map(|v| &v.source)) {
                    hint = hint.saturating_add(tree_size(dir, UNKNOWN));
                }
                store.begin_transient(&self.identity, hint)
            }
            None => store.begin(&self.identity),
        };
        let mut writer = writer
            .map_err(|e| running(Error::Other(format!("start a checkpoint of {id}: {e}"))))?;
        tracing::info!(container_id = %id, dir = %writer.dir().display(), in_memory = writer.in_memory(), "checkpoint begun");
        writer.set_durable(false);
        let mut serving = None;
        if post_copy && self.engine.kind() != EngineKind::Criu {
            return Err(running(Error::FailedPrecondition(format!(
                "container {id} runs under {}: post-copy needs CRIU; migrate it without post-copy",
                self.engine.kind().name()
            ))));
        }
        let images = writer
            .images_dir()
            .map_err(|e| running(Error::Other(format!("checkpoint of {id}: {e}"))))?;
        match &self.engine {
            Engine::Criu { .. } => {
                let opts = CheckpointOpts {
                    image_path: images,
                    work_path: self.scratch.join("criu-work"),
                    tcp_established: true,
                    file_locks: true,
                    ..Default::default()
                };
                writer
                    .hash_images_while_written()
                    .map_err(|e| running(Error::Other(format!("checkpoint of {id}: {e}"))))?;
                // A failed dump leaves the processes running (CRIU resumes them).
                let began = std::time::Instant::now();
                if post_copy {
                    serving = Some(
                        self.dump_lazily(id, runtime, &opts)
                            .await
                            .map_err(running)?,
                    );
                } else {
                    runtime.checkpoint(id, &opts).await.map_err(running)?;
                }
                tracing::info!(container_id = %id, elapsed_ms = began.elapsed().as_millis() as u64, post_copy, "CRIU dump done");
                writer.images_written();
            }
            Engine::Dmtcp { dirs, .. } => {
                let socket = dirs.ctl_socket();
                writer
                    .hash_dmtcp_images_while_written(&dirs.ckpt)
                    .map_err(|e| running(Error::Other(format!("checkpoint of {id}: {e}"))))?;
                if let Err(e) = dmtcp::checkpoint_and_stop(&socket, DMTCP_CHECKPOINT_TIMEOUT).await
                {
                    let gone = match &e {
                        dmtcp::DmtcpError::StopFailed { stopped, .. } => *stopped,
                        // No (valid) answer: ask whether the application is still there.
                        _ => hook_reports_app_gone(&socket).await,
                    };
                    return Err(StopCheckpointError {
                        error: Error::Other(format!("DMTCP checkpoint of {id}: {e}")),
                        stopped: gone,
                    });
                }
                let (from, to) = (dirs.ckpt.clone(), images);
                // The application is gone: its images move to the store. (A second link, left
                // behind and removed with the container later, would change the files' ctime
                // and void the stamp the commit writes, so the restore would hash them again.)
                tokio::task::spawn_blocking(move || move_files(&from, &to))
                    .await
                    .map_err(|e| stopped(Error::Other(format!("move DMTCP images: {e}"))))?
                    .map_err(stopped)?;
                writer.images_written();
            }
        }
        // From here on the application is gone, whatever fails.
        let upper = self.rootfs.as_ref().map(|r| r.upper.clone());
        let volumes = self.volumes.clone();
        let (engine, image) = (self.engine.info(), self.image.clone());
        let id = id.to_string();
        let committed = tokio::task::spawn_blocking(move || -> Result<Checkpoint> {
            let fail = |e: mig_checkpoint::Error| Error::Other(format!("checkpoint of {id}: {e}"));
            if let Some(upper) = upper {
                writer.add_upper_layer(&upper).map_err(fail)?;
            }
            for v in &volumes {
                writer.add_volume(&v.name, &v.source).map_err(fail)?;
            }
            writer.commit(engine, &image).map_err(fail)
        })
        .await
        .map_err(|e| Error::Other(format!("checkpoint: {e}")))
        .and_then(|r| r);
        match (committed, serving) {
            (Ok(ckpt), Some(serving)) => {
                self.serve_pages(serving, ckpt.dir().to_path_buf());
                Ok(ckpt)
            }
            (Ok(ckpt), None) => Ok(ckpt),
            // The processes are still frozen: resetting the page server resumes them.
            (Err(e), Some(serving)) => {
                serving.abort().await;
                Err(running(e))
            }
            (Err(e), None) => Err(stopped(e)),
        }
    }

    /// The lazy dump of a post-copy checkpoint ([`crate::postcopy`]): returns once CRIU has
    /// written everything but the pages, with its page server connected and the workload's
    /// pages socket bound.
    async fn dump_lazily(
        &self,
        id: &str,
        runtime: &dyn Runtime,
        opts: &CheckpointOpts,
    ) -> Result<Serving> {
        crate::postcopy::check_pipe_size()?;
        let store = self.node.store()?;
        let socket = self.node.pages_socket(&self.identity);
        let listener = crate::postcopy::bind(&socket)
            .map_err(Error::io(format!("bind {}", socket.display())))?;
        let port = crate::postcopy::free_port()
            .map_err(Error::io("find a free port for CRIU's page server"))?;
        let dump = match runtime
            .checkpoint_lazy(id, opts, &format!("127.0.0.1:{port}"))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
        // CRIU serves the first connection: ours, at once.
        let criu = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(criu) => criu,
            Err(e) => {
                // Unconnected, CRIU would wait for ever with the processes frozen.
                let _ = std::fs::remove_file(&socket);
                return Err(Error::Other(format!(
                    "connect to CRIU's page server on 127.0.0.1:{port}: {e}; the processes of \
                     {id} stay frozen until the dump (runc, pid {}) is killed",
                    dump.pid()
                )));
            }
        };
        let serving = Serving {
            id: id.to_string(),
            listener,
            criu,
            dump,
            socket,
            store,
            identity: self.identity.clone(),
        };
        let marker = opts.image_path.join(crate::postcopy::MARKER);
        match std::fs::write(
            &marker,
            "post-copy checkpoint: its memory pages stayed on the origin\n",
        ) {
            Ok(()) => Ok(serving),
            Err(e) => {
                serving.abort().await;
                Err(Error::Io {
                    context: format!("write {}", marker.display()),
                    source: e,
                })
            }
        }
    }

    /// Serves the pages of a committed post-copy checkpoint in the background; when the dump
    /// ends without serving them all, the workload resumes and its page-less checkpoint goes.
    fn serve_pages(&self, serving: Serving, dir: PathBuf) {
        tokio::spawn(async move {
            let Serving {
                id,
                listener,
                criu,
                dump,
                socket,
                store,
                identity,
            } = serving;
            let served =
                crate::postcopy::serve(listener, criu, crate::postcopy::CONNECT_TIMEOUT).await;
            let _ = std::fs::remove_file(&socket);
            match (dump.wait().await, served) {
                (Ok(()), crate::postcopy::Served::Complete) => {
                    tracing::info!(container_id = %id, "post-copy: every page served; the origin's processes ended");
                }
                (result, served) => {
                    tracing::warn!(container_id = %id, ?served, result = ?result.err().map(|e| e.to_string()), checkpoint = %dir.display(), "post-copy: the pages were not all served; the workload resumes here and its page-less checkpoint is removed");
                    if let Err(e) = store.remove(&identity) {
                        tracing::error!(container_id = %id, error = %e, "remove the page-less checkpoint");
                    }
                }
            }
        });
    }

    /// containerd's own checkpoint (`Task.Checkpoint`) of a DMTCP container: the images go to
    /// containerd's image path with a record of the engine that made them. With `exit` the
    /// application ends with its images (as [`Workload::checkpoint`]; the hook exits next),
    /// else it runs on.
    pub async fn checkpoint_native(&self, image_path: &Path, exit: bool) -> Result<()> {
        let Engine::Dmtcp { dirs, .. } = &self.engine else {
            return Err(Error::Other("not a DMTCP container".into()));
        };
        let socket = dirs.ctl_socket();
        if exit {
            dmtcp::checkpoint_and_stop(&socket, DMTCP_CHECKPOINT_TIMEOUT).await
        } else {
            dmtcp::checkpoint(&socket, DMTCP_CHECKPOINT_TIMEOUT).await
        }
        .map_err(|e| Error::Other(format!("DMTCP checkpoint: {e}")))?;
        let (from, to) = (dirs.ckpt.clone(), image_path.to_path_buf());
        tokio::task::spawn_blocking(move || copy_files(&from, &to))
            .await
            .map_err(|e| Error::Other(format!("copy DMTCP images: {e}")))??;
        self.mark_native_checkpoint(image_path)
    }

    /// Records in a containerd checkpoint which engine (and version) made it, and adds the
    /// content of the container's tmpfs mounts, which CRIU left out ([`crate::tmpfs`]).
    pub fn mark_native_checkpoint(&self, image_path: &Path) -> Result<()> {
        if !self.tmpfs.is_empty() {
            let dir = image_path.join(NATIVE_TMPFS_DIR);
            crate::node::create_private_dir(&dir)?;
            for t in &self.tmpfs {
                let tar = dir.join(format!("{}.tar", t.name));
                mig_checkpoint::pack_tree(&t.source, &tar).map_err(|e| {
                    Error::Other(format!(
                        "archive the tmpfs at {} ({}) into {}: {e}",
                        t.destination.display(),
                        t.source.display(),
                        tar.display()
                    ))
                })?;
            }
        }
        let info = self.engine.info();
        let record = serde_json::json!({"engine": info.name, "version": info.version});
        crate::node::write_private(
            &image_path.join(NATIVE_ENGINE_RECORD),
            record.to_string().as_bytes(),
        )
    }

    /// Checks that containerd's checkpoint at `images` was made by this container's engine and
    /// version, and for DMTCP puts its images where the restore-hook restarts from.
    pub fn stage_native_checkpoint(&self, images: &Path) -> Result<()> {
        let made_by = match std::fs::read(images.join(NATIVE_ENGINE_RECORD)) {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{}: not an engine record: {e}",
                        images.join(NATIVE_ENGINE_RECORD).display()
                    ))
                })?;
                let field = |k: &str| {
                    v.get(k)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                EngineInfo::new(field("engine"), field("version"))
            }
            // A checkpoint of containerd's own runc shim: CRIU, version unknown.
            Err(_) => EngineInfo::new("criu", ""),
        };
        let ours = self.engine.info();
        let version_differs = !made_by.version.is_empty() && made_by.version != ours.version;
        if made_by.name != ours.name || version_differs {
            return Err(Error::FailedPrecondition(format!(
                "checkpoint {} was made by {} {}, but this container restores with {}; \
                 refusing to restore",
                images.display(),
                made_by.name,
                made_by.version,
                ours
            )));
        }
        if let Engine::Dmtcp { dirs, .. } = &self.engine {
            copy_files(images, &dirs.ckpt)?;
            let _ = std::fs::remove_file(dirs.ckpt.join(NATIVE_ENGINE_RECORD));
        }
        Ok(())
    }

    /// Marks the pending checkpoint consumed after a successful restore.
    pub fn consume_pending(&mut self) {
        let Some(ckpt) = self.pending.take() else {
            return;
        };
        let dir = ckpt.dir().to_path_buf();
        match self.node.store().and_then(|s| {
            s.consume_detached(ckpt)
                .map_err(|e| Error::Other(format!("consume {}: {e}", dir.display())))
        }) {
            // Out of the workload's place at once; its data is deleted after the start.
            Ok(doomed) => crate::writeback::remove_later(doomed),
            Err(e) => {
                tracing::warn!(error = %e, "restored, but the checkpoint could not be removed")
            }
        }
    }

    /// Mounts the container's tmpfs mounts on the node ([`crate::tmpfs`]) and, for a restore
    /// from containerd's own checkpoint at `native`, fills them from it. Before the root is
    /// filled and mounted; on failure nothing stays mounted.
    pub async fn mount_tmpfs(&self, native: Option<&Path>) -> Result<()> {
        if self.tmpfs.is_empty() {
            return Ok(());
        }
        let planned = self.tmpfs.clone();
        let archives = native.map(|n| n.join(NATIVE_TMPFS_DIR));
        tokio::task::spawn_blocking(move || -> Result<()> {
            tmpfs::mount_all(&planned)?;
            let Some(dir) = archives else {
                return Ok(());
            };
            let unpacked = planned.iter().try_for_each(|t| {
                let tar = dir.join(format!("{}.tar", t.name));
                if tar.exists() {
                    unpack_into(&tar, &t.source)
                } else {
                    Ok(())
                }
            });
            if unpacked.is_err() {
                tmpfs::unmount_all(&planned);
            }
            unpacked
        })
        .await
        .map_err(|e| Error::Other(format!("mount the container's tmpfs mounts: {e}")))?
    }

    /// Unmounts what [`Self::mount_tmpfs`] mounted.
    pub fn unmount_tmpfs(&self) {
        tmpfs::unmount_all(&self.tmpfs);
    }

    /// Removes the shim's own per-container dirs (never containerd's snapshot), unmounting
    /// the container's tmpfs mounts first.
    pub fn remove_scratch(&self) {
        self.unmount_tmpfs();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Unpacks the archive `tar` (an upper layer or a volume) into `dest`, creating it.
fn unpack_into(tar: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(Error::io(format!("create {}", dest.display())))?;
    mig_checkpoint::unpack_tree(tar, dest).map_err(|e| {
        Error::Other(format!(
            "unpack {} into {}: {e}",
            tar.display(),
            dest.display()
        ))
    })
}

/// How a stop must checkpoint first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopCheckpoint {
    /// Stop even when the checkpoint fails.
    pub force: bool,
    /// Make the checkpoint's data durable (right after the stop, see [`crate::writeback`]).
    pub durable: bool,
    /// Leave the memory pages out and serve them to the destination ([`crate::postcopy`]).
    pub post_copy: bool,
}

/// A lazy dump serving its pages ([`Workload::checkpoint`] with post-copy).
struct Serving {
    id: String,
    listener: tokio::net::UnixListener,
    criu: tokio::net::TcpStream,
    dump: crate::runc::LazyDump,
    socket: PathBuf,
    store: Store,
    identity: WorkloadIdentity,
}

impl Serving {
    /// Resets the page server (the dump fails, the processes resume) and waits for the dump.
    async fn abort(self) {
        crate::postcopy::reset_connection(self.criu);
        drop(self.listener);
        let _ = std::fs::remove_file(&self.socket);
        let _ = self.dump.wait().await;
    }
}

/// A checkpoint for a stop that failed.
#[derive(Debug)]
pub struct StopCheckpointError {
    /// What failed.
    pub error: Error,
    /// The container's processes were already stopped (CRIU dumped them, or DMTCP had begun
    /// ending them): it is stopped without a checkpoint. Else it keeps running.
    pub stopped: bool,
}

/// After a `checkpoint-stop` without a valid answer: whether the application is gone (the
/// hook is gone, or reports no process under DMTCP). A hook that does not answer is taken
/// to be alive: the container is then reported as still running, and is not killed.
async fn hook_reports_app_gone(socket: &Path) -> bool {
    match dmtcp::status(socket).await {
        Ok(status) => status.get("peers").map(String::as_str) == Some("0"),
        Err(dmtcp::DmtcpError::Control { .. }) => true,
        Err(_) => false,
    }
}

/// Moves the regular files of `from` (not recursively) into `to`.
fn move_files(from: &Path, to: &Path) -> Result<()> {
    transfer_files(from, to, true)
}

/// Copies the regular files of `from` (not recursively) into `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    transfer_files(from, to, false)
}

fn transfer_files(from: &Path, to: &Path, remove_source: bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(Error::io(format!("create {}", to.display())))?;
    for entry in std::fs::read_dir(from).map_err(Error::io(format!("list {}", from.display())))? {
        let entry = entry.map_err(Error::io(format!("list {}", from.display())))?;
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let (src, dest) = (entry.path(), to.join(entry.file_name()));
        // Same filesystem (both under the state root): a rename or a hard link costs nothing.
        let linked = if remove_source {
            std::fs::rename(&src, &dest)
        } else {
            std::fs::hard_link(&src, &dest)
        };
        if linked.is_err() {
            std::fs::copy(&src, &dest).map_err(Error::io(format!("copy {}", src.display())))?;
            if remove_source {
                std::fs::remove_file(&src)
                    .map_err(Error::io(format!("remove {}", src.display())))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn empty_dirs_travel_and_annotated_binds_too() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"mig.dev/volumes": "/data"},
            "mounts": [
                {"destination": "/cache", "type": "bind",
                 "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache"},
                {"destination": "/data", "type": "bind", "source": "/srv/data"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/x/hosts"}
            ]
        }));
        let v = volumes(&s).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name.as_str(), "cache");
        assert_eq!(v[1].name.as_str(), "data");
        assert_eq!(v[1].source, PathBuf::from("/srv/data"));
    }

    #[test]
    fn an_annotated_volume_that_is_not_mounted_is_an_error() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"mig.dev/volumes": "/nope"},
            "mounts": []
        }));
        let err = volumes(&s).unwrap_err().to_string();
        assert!(
            err.contains("/nope") && err.contains("mig.dev/volumes"),
            "{err}"
        );
    }

    #[test]
    fn the_pause_container_is_recognised() {
        let pause = spec(serde_json::json!({"ociVersion": "1.0.2",
            "annotations": {"io.kubernetes.cri.container-type": "sandbox"}}));
        assert!(is_sandbox(&pause));
        let app = spec(serde_json::json!({"ociVersion": "1.0.2",
            "annotations": {"io.kubernetes.cri.container-type": "container"}}));
        assert!(!is_sandbox(&app));
    }

    fn criu_workload(dir: &Path, version: &str) -> Workload {
        Workload {
            identity: WorkloadIdentity::container("default", "c1").unwrap(),
            engine: Engine::Criu {
                facts: criu::Facts {
                    version: version.into(),
                    nftables: false,
                },
            },
            image: String::new(),
            rootfs: None,
            volumes: vec![],
            tmpfs: vec![],
            checkpoint_on_stop: false,
            node: NodeConfig {
                state_dir: dir.into(),
                memory_dir: None,
                default_engine: EngineKind::Criu,
                dmtcp_dir: None,
                hook_binary: dir.join("hook"),
                criu_network_lock: criu::NetworkLock::Auto,
                criu_lazy_pages: crate::lazy::LazyPages::Auto,
            },
            scratch: dir.join("scratch"),
            pending: None,
        }
    }

    #[test]
    fn containerd_checkpoints_record_their_engine_and_other_engines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        // Made by containerd's own runc shim: no record, CRIU assumed.
        criu_workload(dir.path(), "4.2.1")
            .stage_native_checkpoint(&images)
            .unwrap();
        criu_workload(dir.path(), "4.2.1")
            .mark_native_checkpoint(&images)
            .unwrap();
        criu_workload(dir.path(), "4.2.1")
            .stage_native_checkpoint(&images)
            .unwrap();
        let err = criu_workload(dir.path(), "4.1.1")
            .stage_native_checkpoint(&images)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("criu 4.2.1") && err.contains("criu 4.1.1"),
            "{err}"
        );
        std::fs::write(
            images.join(NATIVE_ENGINE_RECORD),
            r#"{"engine":"dmtcp","version":"4.2.0"}"#,
        )
        .unwrap();
        let err = criu_workload(dir.path(), "4.2.1")
            .stage_native_checkpoint(&images)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dmtcp 4.2.0") && err.contains("refusing"),
            "{err}"
        );
    }

    fn stop(force: bool, durable: bool) -> StopCheckpoint {
        StopCheckpoint {
            force,
            durable,
            post_copy: false,
        }
    }

    #[test]
    fn sigterm_checkpoints_strictly_and_sigkill_forces() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = criu_workload(dir.path(), "4.2.1");
        let (term, kill) = (libc::SIGTERM as u32, libc::SIGKILL as u32);
        assert_eq!(
            w.stop_needs_checkpoint(term).unwrap(),
            None,
            "no mark, no annotation"
        );
        assert_eq!(w.stop_needs_checkpoint(kill).unwrap(), None);
        w.checkpoint_on_stop = true;
        assert_eq!(
            w.stop_needs_checkpoint(term).unwrap(),
            Some(stop(false, true))
        );
        assert_eq!(
            w.stop_needs_checkpoint(kill).unwrap(),
            Some(stop(true, true))
        );
        assert_eq!(w.stop_needs_checkpoint(libc::SIGINT as u32).unwrap(), None);
        w.checkpoint_on_stop = false;
        let mark = crate::node::Mark {
            migration: "m1".into(),
            force: false,
            durable: false,
            post_copy: false,
        };
        w.node.set_mark(&w.identity, &mark).unwrap();
        assert_eq!(
            w.stop_needs_checkpoint(term).unwrap(),
            Some(stop(false, false))
        );
        w.node.clear_mark(&w.identity);
        assert_eq!(w.stop_needs_checkpoint(term).unwrap(), None);
    }
}
