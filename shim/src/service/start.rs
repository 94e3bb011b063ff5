//! Create and start: a container (from its image, or restored from a checkpoint) and its execs.

use containerd_shim::protos::types::mount::Mount;

use super::*;

/// What create (or a deferred start) put in place for a container's init.
struct Assembled {
    /// The root the shim mounted without an overlay of its own, if any.
    rootfs: Option<PathBuf>,
    /// The CRIU images to restore from at start.
    restore_from: Option<PathBuf>,
    /// The init: created by runc, or waiting for its restore.
    init: Process,
}

impl Service {
    /// `Create`: mounts the root filesystem and has runc create the container (or, with a
    /// checkpoint, prepares it to be restored at start). A container created ahead of its
    /// checkpoint (the node agent's incoming mark, on a migration's destination) does only
    /// what does not depend on the checkpoint; its start does the rest.
    pub async fn create(&self, req: &CreateTaskRequest) -> Result<u32> {
        validate_id(&req.id)?;
        if self.container(&req.id).is_ok() {
            return Err(Error::AlreadyExists(format!(
                "container {} already exists",
                req.id
            )));
        }
        let options = RuntimeOptions::from_any(req.options.as_ref())?;
        let runtime = self.factory.runtime(&options)?;
        let bundle = PathBuf::from(&req.bundle);
        let recorded = serde_json::to_string(&options).unwrap_or_default();
        std::fs::write(bundle.join(OPTIONS_FILE), recorded).map_err(Error::io(format!(
            "write {}",
            bundle.join(OPTIONS_FILE).display()
        )))?;
        let mut spec = load_spec(&bundle)?;
        let workload = match &spec {
            Some(s) if !workload::is_sandbox(s) => {
                Some(self.prepare_workload(req, &options, s, &bundle).await?)
            }
            _ => None,
        };
        let incoming = match &workload {
            Some(w) if req.checkpoint.is_empty() => w.node.incoming(&w.identity)?,
            _ => None,
        };
        let paths = Paths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let (assembled, deferred) = match incoming {
            Some(incoming) => {
                tracing::info!(container_id = %req.id, migration = %incoming.migration, "created ahead of its checkpoint; it is restored at start");
                let waiting = Assembled {
                    rootfs: None,
                    restore_from: None,
                    init: Process::new("", paths, Status::CreatedFromCheckpoint),
                };
                (waiting, Some(req.rootfs.to_vec()))
            }
            None => {
                let native = (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint));
                let assembled = self
                    .assemble(
                        &req.id,
                        &req.rootfs,
                        &bundle,
                        spec.as_mut(),
                        workload.as_ref(),
                        native,
                        &paths,
                        runtime.clone(),
                    )
                    .await?;
                (assembled, None)
            }
        };
        let pid = assembled.init.pid;
        let container = Container {
            id: req.id.clone(),
            bundle,
            rootfs: assembled.rootfs,
            runtime,
            init: assembled.init,
            execs: HashMap::new(),
            restore_from: assembled.restore_from,
            workload,
            deferred,
        };
        self.containers
            .lock()
            .expect("container map poisoned")
            .insert(req.id.clone(), Arc::new(AsyncMutex::new(container)));
        tracing::info!(container_id = %req.id, pid, "container created");
        self.events.send(
            TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: pid as u32,
                ..Default::default()
            },
        );
        Ok(pid as u32)
    }

    /// The part of create that depends on the checkpoint, if any: fills the container from it
    /// (upper layer, volumes, DMTCP images), mounts the root, wraps the entrypoint (DMTCP) and
    /// has runc create the container, unless a CRIU restore (from `native`, containerd's own
    /// checkpoint, or the workload's pending one) replaces runc's create and start. Undoes its
    /// mounts when it fails.
    #[allow(clippy::too_many_arguments)]
    async fn assemble(
        &self,
        id: &str,
        mounts: &[Mount],
        bundle: &Path,
        spec: Option<&mut oci_spec::runtime::Spec>,
        workload: Option<&Workload>,
        native: Option<PathBuf>,
        paths: &Paths,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Assembled> {
        let unmount_all = |rootfs: &Option<PathBuf>| {
            if let Some(w) = workload {
                w.unmount_tmpfs();
            }
            if let Some(r) = workload.and_then(|w| w.rootfs.as_ref()) {
                r.unmount();
            }
            if let Some(root) = rootfs {
                unmount_rootfs(root);
            }
        };
        let mounted: Result<Option<PathBuf>> = async {
            if let Some(w) = workload {
                w.mount_tmpfs(native.as_deref()).await?;
            }
            match workload.and_then(|w| w.rootfs.as_ref()) {
                Some(overlay) => {
                    workload.expect("checked above").unpack_pending().await?;
                    overlay.mount(mounts, bundle).await?;
                    Ok(None)
                }
                None => mount_rootfs(mounts, bundle).await,
            }
        }
        .await;
        let rootfs = match mounted {
            Ok(r) => r,
            Err(e) => {
                unmount_all(&None);
                return Err(e);
            }
        };
        if let (Some(w), Some(spec)) = (workload, spec)
            && let Err(e) = w.prepare_spec(spec, bundle)
        {
            unmount_all(&rootfs);
            return Err(e);
        }
        let dmtcp = workload.map(|w| w.engine.kind()) == Some(EngineKind::Dmtcp);
        let restore_from = match native {
            // A DMTCP container restarts from the images the hook finds; CRIU's are restored
            // by runc at start.
            Some(images) => (!dmtcp).then_some(images),
            None => workload
                .filter(|w| w.engine.kind() == EngineKind::Criu)
                .and_then(|w| w.pending.as_ref())
                .map(|c| c.images_dir()),
        };
        let init = match self
            .create_in(id, bundle, paths, runtime, restore_from.clone())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                unmount_all(&rootfs);
                return Err(e);
            }
        };
        if dmtcp && workload.is_some_and(|w| w.pending.is_some()) {
            // The restore-hook restarts from the images at start; the start decides whether
            // the restore worked.
            tracing::info!(container_id = %id, "DMTCP restart staged");
        }
        Ok(Assembled {
            rootfs,
            restore_from,
            init,
        })
    }

    async fn create_in(
        &self,
        id: &str,
        bundle: &Path,
        paths: &Paths,
        runtime: Arc<dyn Runtime>,
        restore_from: Option<PathBuf>,
    ) -> Result<Process> {
        if restore_from.is_some() {
            // runc restore replaces create + start: nothing runs until `start`.
            return Ok(Process::new(
                "",
                paths.clone(),
                Status::CreatedFromCheckpoint,
            ));
        }
        let (child, pending) = PendingIo::prepare(paths)?;
        let pid = match runtime.create(id, bundle, child).await {
            Ok(pid) => pid,
            Err(e) => {
                pending.abandon().await;
                let _ = runtime.delete(id, true).await;
                return Err(e);
            }
        };
        let io = match pending.attach().await {
            Ok(io) => io,
            Err(e) => {
                let _ = runtime.delete(id, true).await;
                return Err(e);
            }
        };
        let mut init = Process::new("", paths.clone(), Status::Created);
        init.pid = pid;
        init.io = Some(io);
        // Registered now: the init cannot run (and so cannot exit) before `start`.
        self.pids
            .lock()
            .expect("pid index poisoned")
            .register(pid, id, "");
        Ok(init)
    }

    /// The workload side of create: node configuration, identity, engine, the root's layout
    /// and a pending checkpoint to restore from (unless containerd restores its own).
    async fn prepare_workload(
        &self,
        req: &CreateTaskRequest,
        options: &RuntimeOptions,
        spec: &oci_spec::runtime::Spec,
        bundle: &Path,
    ) -> Result<Workload> {
        let node = NodeConfig::from_options(options)?;
        let scratch = node.container_dir(&self.namespace, &req.id)?;
        let rootfs = (!req.rootfs.is_empty()).then(|| overlay::plan(&req.rootfs, bundle, &scratch));
        let mut w = Workload::prepare(node, spec, &self.namespace, &req.id, rootfs).await?;
        if !req.checkpoint.is_empty() {
            // containerd restores its own checkpoint; the store's is not used.
            w.pending = None;
            w.stage_native_checkpoint(Path::new(&req.checkpoint))?;
        }
        Ok(w)
    }

    /// `Start` of the init or of an exec.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let mut c = container.lock().await;
        if !exec_id.is_empty() {
            return self.start_exec(&mut c, exec_id).await;
        }
        let (pid, fill) = self.start_init(&mut c).await?;
        drop(c);
        if let Some(fill) = fill {
            // The program runs; the container is unlocked (state, kill) while its memory
            // fills in.
            self.await_fill(&container, fill).await?;
        }
        Ok(pid)
    }

    /// Waits until a lazy restore's daemon has put every page in place: only then has the
    /// container all of its checkpoint, and may the checkpoint (here, and the origin's) go.
    /// If the daemon fails, the container is killed: its program must not run on with pages
    /// it lacks.
    async fn await_fill(
        &self,
        container: &tokio::sync::Mutex<Container>,
        fill: crate::lazy::Fill,
    ) -> Result<()> {
        let result = fill.wait().await;
        let mut c = container.lock().await;
        match result {
            Ok(took) => {
                tracing::info!(container_id = %c.id, filled_ms = took.as_millis() as u64, "lazy restore: every page is in place");
                if let Some(w) = c.workload.as_mut() {
                    w.consume_pending();
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(container_id = %c.id, error = %e, "lazy restore failed; killing the container");
                // The init of a pid namespace of its own takes every process in it along;
                // `runc kill --all` signals the whole cgroup, only needed without one.
                let all = !own_pid_namespace(&c.bundle);
                let _ = c.runtime.kill(&c.id, libc::SIGKILL as u32, all).await;
                Err(Error::Other(format!(
                    "container {} was restored, but not all of its memory: {e}; it was killed",
                    c.id
                )))
            }
        }
    }

    /// Starts the init; a lazy restore also returns its daemon, still filling in memory.
    async fn start_init(
        self: &Arc<Self>,
        c: &mut Container,
    ) -> Result<(u32, Option<crate::lazy::Fill>)> {
        if c.deferred.is_some() {
            self.assemble_deferred(c).await?;
        }
        let mut fill = None;
        match c.init.status {
            Status::Created => c.runtime.start(&c.id).await?,
            Status::CreatedFromCheckpoint => fill = self.restore_init(c).await?,
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot start container {}: it is {other:?}",
                    c.id
                )));
            }
        }
        c.init.status = Status::Running;
        if let (None, Some(w)) = (&fill, c.workload.as_mut()) {
            w.consume_pending();
        }
        tracing::info!(container_id = %c.id, pid = c.init.pid, "container started");
        // The container's lock is still held: an exit that raced this start is reported
        // only after the start event.
        self.events.send(
            TASK_START_EVENT_TOPIC,
            TaskStart {
                container_id: c.id.clone(),
                pid: c.init.pid as u32,
                ..Default::default()
            },
        );
        Ok((c.init.pid as u32, fill))
    }

    /// For a container created ahead of its checkpoint: the checkpoint must be here now; the
    /// rest of create ([`Service::assemble`]) happens with it. The init keeps its identity
    /// (containerd may already wait on it).
    async fn assemble_deferred(&self, c: &mut Container) -> Result<()> {
        let mounts = c.deferred.clone().unwrap_or_default();
        let w = c.workload.as_mut().ok_or_else(|| {
            Error::Other(format!(
                "container {} waits for a checkpoint but has no workload",
                c.id
            ))
        })?;
        w.load_pending(&c.id)?;
        if w.pending.is_none() {
            let store = w.node.store()?;
            return Err(Error::FailedPrecondition(format!(
                "container {} was created ahead of a migration's checkpoint (incoming mark of \
                 workload {}), but no checkpoint of it has arrived in {}: it cannot start; \
                 delete it, or start it once the checkpoint is there",
                c.id,
                w.identity.key(),
                store.path_for(&w.identity).display()
            )));
        }
        let mut spec = load_spec(&c.bundle)?;
        let mut assembled = self
            .assemble(
                &c.id,
                &mounts,
                &c.bundle,
                spec.as_mut(),
                c.workload.as_ref(),
                None,
                &c.init.paths,
                c.runtime.clone(),
            )
            .await?;
        c.deferred = None;
        c.rootfs = assembled.rootfs;
        c.restore_from = assembled.restore_from;
        c.init.pid = assembled.init.pid;
        c.init.io = assembled.init.io.take();
        c.init.status = assembled.init.status;
        Ok(())
    }

    async fn restore_init(
        self: &Arc<Self>,
        c: &mut Container,
    ) -> Result<Option<crate::lazy::Fill>> {
        let images = c
            .restore_from
            .clone()
            .ok_or_else(|| Error::Other(format!("container {} has no checkpoint", c.id)))?;
        add_loopback_hook(&c.bundle)?;
        let mode = c
            .workload
            .as_ref()
            .map(|w| w.node.criu_lazy_pages)
            .unwrap_or_default();
        let page_bytes = crate::lazy::page_bytes(&images);
        // Post-copy: the pages are on the origin, fetched through the socket the node agent
        // named in the incoming mark.
        let pages_socket = match &c.workload {
            Some(w) => w.node.incoming(&w.identity)?.and_then(|i| i.pages_socket),
            None => None,
        };
        let post_copy = crate::postcopy::is_post_copy(&images);
        if post_copy && pages_socket.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "container {}: its checkpoint {} was made for a post-copy migration: its memory \
                 pages stayed on the origin, which serves them only to that migration's \
                 destination; it cannot be restored from here",
                c.id,
                images.display()
            )));
        }
        let lazy = match &pages_socket {
            Some(_) if !crate::lazy::kernel_has_userfaultfd() => {
                return Err(Error::FailedPrecondition(format!(
                    "container {}: a post-copy restore needs userfaultfd, which this kernel \
                     lacks (no /proc/sys/vm/unprivileged_userfaultfd); migrate without post-copy",
                    c.id
                )));
            }
            Some(_) => true,
            None => mode.choose(page_bytes, crate::lazy::kernel_has_userfaultfd())?,
        };
        let work_path = c.bundle.join("criu-work");
        let (child, pending) = PendingIo::prepare(&c.init.paths)?;
        let started = match &pages_socket {
            Some(socket) => {
                Some(crate::lazy::Fill::start_remote(&images, &work_path, socket).await)
            }
            None if lazy => Some(crate::lazy::Fill::start(&images, &work_path).await),
            None => None,
        };
        let fill = if let Some(started) = started {
            match started {
                Ok(fill) => Some(fill),
                Err(e) => {
                    pending.abandon().await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        tracing::info!(container_id = %c.id, page_bytes, lazy, post_copy = pages_socket.is_some(), "restoring with CRIU");
        let opts = crate::runc::RestoreOpts {
            work_path,
            image_path: images,
            tcp_established: true,
            file_locks: true,
            lazy_pages: lazy,
            ..Default::default()
        };
        let restored = c.runtime.restore(&c.id, &c.bundle, &opts, child).await;
        let restored =
            restored.and_then(|pid| masks_read_only(&c.id, &c.bundle, pid).map(|()| pid));
        let pid = match restored {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(fill) = fill {
                    fill.abandon().await;
                }
                pending.abandon().await;
                let _ = c.runtime.delete(&c.id, true).await;
                return Err(e);
            }
        };
        c.init.pid = pid;
        c.init.io = Some(pending.attach().await?);
        if let Some(code) = self
            .pids
            .lock()
            .expect("pid index poisoned")
            .register(pid, &c.id, "")
        {
            self.finish_later(&c.id, "", code);
        }
        Ok(fill)
    }

    async fn start_exec(self: &Arc<Self>, c: &mut Container, exec_id: &str) -> Result<u32> {
        if !matches!(c.init.status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot start exec {exec_id}: container {} is not running",
                c.id
            )));
        }
        let (id, bundle, runtime) = (c.id.clone(), c.bundle.clone(), c.runtime.clone());
        let p = c.process_mut(exec_id)?;
        if p.status != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} in container {id} was already started"
            )));
        }
        let (child, pending) = PendingIo::prepare(&p.paths)?;
        let pid = match runtime.exec(&id, &bundle, exec_id, &p.spec, child).await {
            Ok(pid) => pid,
            Err(e) => {
                pending.abandon().await;
                return Err(e);
            }
        };
        p.pid = pid;
        p.io = Some(pending.attach().await?);
        p.status = Status::Running;
        let raced = self
            .pids
            .lock()
            .expect("pid index poisoned")
            .register(pid, &id, exec_id);
        self.events.send(
            TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: id.clone(),
                exec_id: exec_id.to_string(),
                pid: pid as u32,
                ..Default::default()
            },
        );
        if let Some(code) = raced {
            self.finish_later(&id, exec_id, code);
        }
        Ok(pid as u32)
    }

    /// Reports an exit that arrived before its process was registered; it runs once the caller
    /// releases the container's lock, so it follows the start event.
    fn finish_later(self: &Arc<Self>, container: &str, exec_id: &str, code: u32) {
        let (service, container, exec_id) =
            (self.clone(), container.to_string(), exec_id.to_string());
        tokio::spawn(async move { service.finish(&container, &exec_id, Exit::now(code)).await });
    }

    /// `Exec`: registers an exec process; it runs at its `Start`.
    pub async fn exec(&self, req: &ExecProcessRequest) -> Result<()> {
        validate_id(&req.exec_id)?;
        let c = self.container(&req.id)?;
        let mut c = c.lock().await;
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {} already exists in container {}",
                req.exec_id, req.id
            )));
        }
        c.init.ensure_alive("exec in")?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("exec {} has no process spec", req.exec_id))
            })?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            Error::InvalidArgument(format!(
                "exec {}: the process spec is not an OCI process: {e}",
                req.exec_id
            ))
        })?;
        let paths = Paths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let mut p = Process::new(&req.exec_id, paths, Status::Created);
        p.spec = spec;
        c.execs.insert(req.exec_id.clone(), p);
        self.events.send(
            TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }
}

/// Before a CRIU restore, has runc bring `lo` up in the restored container's own network
/// namespace, as it does when it creates a container (see [`crate::loopback`]).
fn add_loopback_hook(bundle: &std::path::Path) -> Result<()> {
    let Some(mut spec) = load_spec(bundle)? else {
        return Ok(());
    };
    let shim = std::env::current_exe()
        .map_err(|e| Error::Other(format!("find this shim's binary for the restore hook: {e}")))?;
    if crate::loopback::add_restore_hook(&mut spec, &shim).map_err(Error::Other)? {
        spec.save(bundle.join("config.json"))
            .map_err(|e| Error::Other(format!("write the spec with the restore hook: {e}")))?;
    }
    Ok(())
}

/// Whether the container of `bundle` has a pid namespace of its own (its spec asks for a new
/// one). Read from the spec, not from /proc: the init may already be a zombie, whose
/// namespaces /proc no longer shows, and guessing wrong would signal the whole cgroup.
fn own_pid_namespace(bundle: &Path) -> bool {
    use oci_spec::runtime::LinuxNamespaceType;
    load_spec(bundle)
        .ok()
        .flatten()
        .and_then(|spec| spec.linux().clone())
        .and_then(|linux| linux.namespaces().clone())
        .is_some_and(|nss| {
            nss.iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none())
        })
}

/// After a CRIU restore: every masked directory the container's CRIU configuration named
/// external ([`crate::criu`]) must be read-only in the restored container, or the restore
/// fails (the caller deletes the container) rather than run with a writable mask.
fn masks_read_only(id: &str, bundle: &Path, pid: i32) -> Result<()> {
    let annotations = load_spec(bundle)?.and_then(|spec| spec.annotations().clone());
    let Some(config) = annotations.and_then(|a| a.get(crate::criu::CONFIG_ANNOTATION).cloned())
    else {
        return Ok(());
    };
    let masks = crate::criu::external_masks(Path::new(&config));
    if masks.is_empty() {
        return Ok(());
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(Error::io(
        format!("read the mounts of restored container {id}"),
    ))?;
    let writable = crate::criu::writable_masks(&table, &masks);
    if writable.is_empty() {
        return Ok(());
    }
    Err(Error::Other(format!(
        "container {id}: CRIU restored its masked {} without the read-only flag; \
         refusing to run it so",
        writable.join(", ")
    )))
}
