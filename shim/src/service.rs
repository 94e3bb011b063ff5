//! The task service: every operation containerd asks of the shim, as plain methods over the
//! shim's own types. `task.rs` is only the ttrpc wrapper around it.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use containerd_shim::{
    ExitSignal,
    api::{
        CheckpointTaskRequest, CreateTaskRequest, DeleteResponse, ExecProcessRequest,
        StateResponse, UpdateTaskRequest,
    },
    asynchronous::{io::Stdio as Paths, monitor::monitor_subscribe},
    monitor::{Subject, Topic},
    protos::{
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
            TaskResumed, TaskStart,
        },
        protobuf::{Message, MessageDyn, MessageField, well_known_types::any::Any},
        shim::oci::{CheckpointOptions, ProcessDetails},
        topics::*,
        types::task::ProcessInfo,
    },
};
use tokio::sync::Mutex as AsyncMutex;

use crate::{
    container::Container,
    error::{Error, Result},
    events::EventSink,
    io::PendingIo,
    node::{EngineKind, NodeConfig},
    options::RuntimeOptions,
    overlay,
    process::{self, Exit, Process, Status},
    runc::{CheckpointOpts, Runtime},
    stats,
    workload::{self, Workload},
};

/// Makes the runc for a container from its runtime options. The real one builds a
/// [`crate::runc::RuncCli`]; unit tests return a fake.
pub trait RuntimeFactory: Send + Sync {
    /// The runtime for a container created with `options` in `namespace`.
    fn runtime(&self, options: &RuntimeOptions) -> Result<Arc<dyn Runtime>>;
}

/// Where the shim records a container's runtime options in its bundle, so that `delete` after
/// a crashed shim finds the same runc root.
pub const OPTIONS_FILE: &str = "mig-options.json";

/// How long an exited process's output may keep flowing before its exit is reported anyway
/// (a daemonized grandchild can hold the pipe open forever).
const IO_DRAIN: Duration = Duration::from_secs(2);

/// Exits of pids the service did not know (yet): an exec can exit before `runc exec` has told
/// us its pid. Bounded; the oldest are forgotten first.
#[derive(Default)]
struct PidIndex {
    owners: HashMap<i32, (String, String)>,
    unclaimed: VecDeque<(i32, u32)>,
}

const UNCLAIMED_EXITS: usize = 256;

impl PidIndex {
    /// Records that `pid` belongs to (container, exec); returns its exit status if it
    /// already exited.
    fn register(&mut self, pid: i32, container: &str, exec: &str) -> Option<u32> {
        if let Some(i) = self.unclaimed.iter().position(|(p, _)| *p == pid) {
            return self.unclaimed.remove(i).map(|(_, code)| code);
        }
        self.owners
            .insert(pid, (container.to_string(), exec.to_string()));
        None
    }

    /// The owner of an exited pid, or `None` (then the exit is kept for a later `register`).
    fn claim(&mut self, pid: i32, code: u32) -> Option<(String, String)> {
        let owner = self.owners.remove(&pid);
        if owner.is_none() {
            if self.unclaimed.len() == UNCLAIMED_EXITS {
                self.unclaimed.pop_front();
            }
            self.unclaimed.push_back((pid, code));
        }
        owner
    }

    fn forget_container(&mut self, container: &str) {
        self.owners.retain(|_, (c, _)| c != container);
    }
}

/// The shim's task service.
pub struct Service {
    factory: Box<dyn RuntimeFactory>,
    containers: Mutex<HashMap<String, Arc<AsyncMutex<Container>>>>,
    pids: Mutex<PidIndex>,
    events: EventSink,
    exit: Arc<ExitSignal>,
    namespace: String,
}

impl Service {
    /// A service that makes runtimes with `factory`, reports through `events` and signals
    /// `exit` when containerd shuts it down.
    pub fn new(
        factory: Box<dyn RuntimeFactory>,
        events: EventSink,
        exit: Arc<ExitSignal>,
        namespace: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            factory,
            containers: Mutex::new(HashMap::new()),
            pids: Mutex::new(PidIndex::default()),
            events,
            exit,
            namespace: namespace.to_string(),
        })
    }

    /// Starts the task that turns reaped pids into task exits. Call once.
    pub async fn watch_exits(self: &Arc<Self>) -> Result<()> {
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| Error::Other(format!("subscribe to process exits: {e}")))?;
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(e) = sub.rx.recv().await {
                let Subject::Pid(pid) = e.subject else {
                    continue;
                };
                let Some(service) = service.upgrade() else {
                    break;
                };
                let owner = service
                    .pids
                    .lock()
                    .expect("pid index poisoned")
                    .claim(pid, e.exit_code as u32);
                if let Some((container, exec)) = owner {
                    tokio::spawn(async move {
                        service
                            .finish(&container, &exec, Exit::now(e.exit_code as u32))
                            .await
                    });
                }
            }
        });
        Ok(())
    }

    fn container(&self, id: &str) -> Result<Arc<AsyncMutex<Container>>> {
        self.containers
            .lock()
            .expect("container map poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id} does not exist")))
    }

    /// Records a process's exit once its output has drained, and reports it.
    async fn finish(&self, container: &str, exec_id: &str, exit: Exit) {
        let Ok(c) = self.container(container) else {
            return;
        };
        let io = c
            .lock()
            .await
            .process(exec_id)
            .ok()
            .and_then(|p| p.io.clone());
        if let Some(io) = io
            && tokio::time::timeout(IO_DRAIN, io.drain()).await.is_err()
        {
            io.abort().await;
        }
        let mut c = c.lock().await;
        let id = c.id.clone();
        let Ok(p) = c.process_mut(exec_id) else {
            return;
        };
        p.set_exited(exit);
        tracing::info!(container_id = %id, exec_id, pid = p.pid, status = exit.status, "process exited");
        self.events.send(
            TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: id.clone(),
                id: if exec_id.is_empty() {
                    id
                } else {
                    exec_id.to_string()
                },
                pid: p.pid as u32,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            },
        );
    }

    /// `Create`: mounts the root filesystem and has runc create the container (or, with a
    /// checkpoint, prepares it to be restored at start).
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
        let rootfs = match workload.as_ref().and_then(|w| w.rootfs.as_ref()) {
            Some(overlay) => {
                let w = workload.as_ref().expect("checked above");
                w.unpack_pending().await?;
                overlay.mount(&req.rootfs, &bundle).await?;
                None
            }
            None => mount_rootfs(&req.rootfs, &bundle).await?,
        };
        let unmount_all = |workload: &Option<Workload>, rootfs: &Option<PathBuf>| {
            if let Some(r) = workload.as_ref().and_then(|w| w.rootfs.as_ref()) {
                r.unmount();
            }
            if let Some(root) = rootfs {
                unmount_rootfs(root);
            }
        };
        if let (Some(w), Some(spec)) = (&workload, spec.as_mut())
            && let Err(e) = w.wrap_entrypoint(spec, &bundle)
        {
            unmount_all(&workload, &rootfs);
            return Err(e);
        }
        let dmtcp = workload.as_ref().map(|w| w.engine.kind()) == Some(EngineKind::Dmtcp);
        let restore_from = if !req.checkpoint.is_empty() {
            // A DMTCP container restarts from the images the hook finds; CRIU's are restored
            // by runc at start.
            (!dmtcp).then(|| PathBuf::from(&req.checkpoint))
        } else {
            workload
                .as_ref()
                .filter(|w| w.engine.kind() == EngineKind::Criu)
                .and_then(|w| w.pending.as_ref())
                .map(|c| c.images_dir())
        };
        let paths = Paths::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let created = self
            .create_in(req, &bundle, &paths, runtime.clone(), restore_from.clone())
            .await;
        let init = match created {
            Ok(v) => v,
            Err(e) => {
                unmount_all(&workload, &rootfs);
                return Err(e);
            }
        };
        if dmtcp && workload.as_ref().is_some_and(|w| w.pending.is_some()) {
            // The restore-hook restarts from the images at start; the start decides whether
            // the restore worked.
            tracing::info!(container_id = %req.id, "DMTCP restart staged");
        }
        let pid = init.pid;
        let container = Container {
            id: req.id.clone(),
            bundle,
            rootfs,
            runtime,
            init,
            execs: HashMap::new(),
            restore_from,
            workload,
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

    async fn create_in(
        &self,
        req: &CreateTaskRequest,
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
        let pid = match runtime.create(&req.id, bundle, child).await {
            Ok(pid) => pid,
            Err(e) => {
                pending.abandon().await;
                let _ = runtime.delete(&req.id, true).await;
                return Err(e);
            }
        };
        let io = match pending.attach().await {
            Ok(io) => io,
            Err(e) => {
                let _ = runtime.delete(&req.id, true).await;
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
            .register(pid, &req.id, "");
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
        let c = self.container(id)?;
        let mut c = c.lock().await;
        if exec_id.is_empty() {
            self.start_init(&mut c).await
        } else {
            self.start_exec(&mut c, exec_id).await
        }
    }

    async fn start_init(self: &Arc<Self>, c: &mut Container) -> Result<u32> {
        match c.init.status {
            Status::Created => c.runtime.start(&c.id).await?,
            Status::CreatedFromCheckpoint => self.restore_init(c).await?,
            other => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot start container {}: it is {other:?}",
                    c.id
                )));
            }
        }
        c.init.status = Status::Running;
        if let Some(w) = c.workload.as_mut() {
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
        Ok(c.init.pid as u32)
    }

    async fn restore_init(self: &Arc<Self>, c: &mut Container) -> Result<()> {
        let images = c
            .restore_from
            .clone()
            .ok_or_else(|| Error::Other(format!("container {} has no checkpoint", c.id)))?;
        let (child, pending) = PendingIo::prepare(&c.init.paths)?;
        let opts = crate::runc::RestoreOpts {
            work_path: c.bundle.join("criu-work"),
            image_path: images,
            tcp_established: true,
            file_locks: true,
            ..Default::default()
        };
        let pid = match c.runtime.restore(&c.id, &c.bundle, &opts, child).await {
            Ok(pid) => pid,
            Err(e) => {
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
        Ok(())
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

    /// `Kill`: signals the init (or all the container's processes), or an exec.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let c = self.container(id)?;
        let c = c.lock().await;
        let p = c.process(exec_id)?;
        p.ensure_alive("signal")?;
        if exec_id.is_empty() {
            let force = match &c.workload {
                Some(w) if c.init.status == Status::Running => w.stop_needs_checkpoint(signal)?,
                _ => None,
            };
            if let (Some(force), Some(w)) = (force, &c.workload) {
                return self.checkpoint_then_stop(&c, w, signal, all, force).await;
            }
            return c.runtime.kill(id, signal, all).await;
        }
        if p.status == Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "cannot signal exec {exec_id} of container {id}: it has not started"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("{signal} is not a signal number")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig).map_err(|e| {
            Error::Other(format!(
                "signal exec {exec_id} (pid {}) of container {id}: {e}",
                p.pid
            ))
        })
    }

    /// A stop for migration: checkpoint into the node's store, which stops the container's
    /// processes (CRIU's dump kills them; DMTCP ends them right after their images, and the
    /// restore-hook exits). A checkpoint that fails before the processes were stopped leaves
    /// the container running and is reported, unless the mark forces the stop; one that fails
    /// after (DMTCP midway, or archiving) leaves it stopped without a checkpoint.
    async fn checkpoint_then_stop(
        &self,
        c: &Container,
        w: &Workload,
        signal: u32,
        all: bool,
        force: bool,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        match w.checkpoint(&c.id, c.runtime.as_ref()).await {
            Ok(ckpt) => {
                tracing::info!(container_id = %c.id, checkpoint = %ckpt.dir().display(), engine = %ckpt.engine(), elapsed_ms = started.elapsed().as_millis() as u64, "checkpointed before stop");
                w.node.clear_mark(&w.identity);
                if w.engine.kind() == EngineKind::Criu {
                    // CRIU has already stopped the container's processes.
                    return Ok(());
                }
                // DMTCP ended the application; its init, the hook, exits after replying.
                self.await_init_exit(c).await
            }
            Err(f) if f.stopped => {
                tracing::error!(container_id = %c.id, error = %f.error, "checkpoint before stop failed after the container's processes were stopped");
                if force {
                    w.node.clear_mark(&w.identity);
                }
                self.await_init_exit(c).await?;
                if force {
                    return Ok(());
                }
                Err(Error::FailedPrecondition(format!(
                    "container {} is stopped without a checkpoint: its checkpoint before stop \
                     failed after its processes had been stopped: {}",
                    c.id, f.error
                )))
            }
            Err(f) if force => {
                tracing::error!(container_id = %c.id, error = %f.error, "checkpoint before stop failed; stopping anyway (forced)");
                w.node.clear_mark(&w.identity);
                c.runtime.kill(&c.id, signal, all).await
            }
            Err(f) => Err(Error::FailedPrecondition(format!(
                "container {} was not stopped: its checkpoint before stop failed, and it keeps \
                 running: {}",
                c.id, f.error
            ))),
        }
    }

    /// Waits for the container's init to be gone after the engine ended it (DMTCP's hook exits
    /// right after answering); SIGKILLs what is left if it lingers.
    async fn await_init_exit(&self, c: &Container) -> Result<()> {
        const LINGER: Duration = Duration::from_secs(10);
        let pid = nix::unistd::Pid::from_raw(c.init.pid);
        let started = std::time::Instant::now();
        // Gone once the shim's reaper has reaped it (a zombie still answers signal 0).
        while c.init.pid > 0 && nix::sys::signal::kill(pid, None).is_ok() {
            if started.elapsed() >= LINGER {
                tracing::warn!(container_id = %c.id, pid = c.init.pid, "the init did not exit after its checkpoint; killing the container");
                return c.runtime.kill(&c.id, libc::SIGKILL as u32, true).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::debug!(container_id = %c.id, waited_ms = started.elapsed().as_millis() as u64, "the init exited after its checkpoint");
        Ok(())
    }

    /// `Delete`: removes an exited exec, or the container once its init is not running.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<DeleteResponse> {
        let c = self.container(id)?;
        let mut c = c.lock().await;
        if !exec_id.is_empty() {
            let p = c.process(exec_id)?;
            if matches!(p.status, Status::Running | Status::Paused) {
                return Err(Error::FailedPrecondition(format!(
                    "cannot delete exec {exec_id} of container {id}: it is still running"
                )));
            }
            let p = c.execs.remove(exec_id).expect("checked above");
            if let Some(io) = &p.io {
                io.abort().await;
            }
            return Ok(delete_response(&p));
        }
        if matches!(c.init.status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete container {id}: it is still running; kill it first"
            )));
        }
        if c.init.status != Status::CreatedFromCheckpoint {
            c.runtime.delete(id, true).await?;
        }
        if c.init.exit().is_none() {
            // Never started: runc delete killed its init before it ran.
            c.init.set_exited(Exit::now(137));
        }
        for p in std::iter::once(&c.init).chain(c.execs.values()) {
            if let Some(io) = &p.io {
                io.abort().await;
            }
        }
        if let Some(root) = c.rootfs.take() {
            unmount_rootfs(&root);
        }
        if let Some(w) = &c.workload {
            if let Some(r) = &w.rootfs {
                r.unmount();
            }
            w.remove_scratch();
        }
        self.containers
            .lock()
            .expect("container map poisoned")
            .remove(id);
        self.pids
            .lock()
            .expect("pid index poisoned")
            .forget_container(id);
        let resp = delete_response(&c.init);
        tracing::info!(container_id = %id, "container deleted");
        self.events.send(
            TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: id.to_string(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                id: id.to_string(),
                ..Default::default()
            },
        );
        Ok(resp)
    }

    /// `Wait`: blocks until the process exits.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let waiter = {
            let c = self.container(id)?;
            let c = c.lock().await;
            c.process(exec_id)?.waiter()
        };
        process::wait(waiter).await
    }

    /// `State` of the init or an exec.
    pub async fn state(&self, id: &str, exec_id: &str) -> Result<StateResponse> {
        let c = self.container(id)?;
        let c = c.lock().await;
        let p = c.process(exec_id)?;
        let exit = p.exit();
        Ok(StateResponse {
            id: if exec_id.is_empty() {
                id.to_string()
            } else {
                exec_id.to_string()
            },
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid as u32,
            status: p.status.to_api().into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| e.timestamp()).into(),
            exec_id: exec_id.to_string(),
            ..Default::default()
        })
    }

    /// `Pids`: the container's processes, execs marked with their exec id.
    pub async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.container(id)?;
        let c = c.lock().await;
        let pids = c.runtime.ps(id).await?;
        Ok(pids
            .into_iter()
            .map(|pid| {
                let exec = c.execs.values().find(|p| p.pid as u32 == pid);
                ProcessInfo {
                    pid,
                    info: exec
                        .and_then(|p| {
                            let details = ProcessDetails {
                                exec_id: p.exec_id.clone(),
                                ..Default::default()
                            };
                            to_any(Box::new(details)).ok()
                        })
                        .into(),
                    ..Default::default()
                }
            })
            .collect())
    }

    /// `Pause` (freeze) or `Resume` (thaw) the container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let c = self.container(id)?;
        let mut c = c.lock().await;
        let (from, to) = if paused {
            (Status::Running, Status::Paused)
        } else {
            (Status::Paused, Status::Running)
        };
        if c.init.status != from {
            return Err(Error::FailedPrecondition(format!(
                "cannot {} container {id}: it is {:?}",
                if paused { "pause" } else { "resume" },
                c.init.status
            )));
        }
        if paused {
            c.runtime.pause(id).await?;
            self.events.send(
                TASK_PAUSED_EVENT_TOPIC,
                TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                },
            );
        } else {
            c.runtime.resume(id).await?;
            self.events.send(
                TASK_RESUMED_EVENT_TOPIC,
                TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                },
            );
        }
        c.init.status = to;
        Ok(())
    }

    /// `Update`: new resource limits (OCI LinuxResources as JSON).
    pub async fn update(&self, req: &UpdateTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let c = c.lock().await;
        c.init.ensure_alive("update")?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources).map_err(|e| {
            Error::InvalidArgument(format!(
                "update of container {}: resources are not OCI LinuxResources JSON: {e}",
                req.id
            ))
        })?;
        c.runtime.update(&req.id, &c.bundle, &resources).await
    }

    /// `Stats`: cgroup metrics of the container.
    pub async fn stats(&self, id: &str) -> Result<Any> {
        let c = self.container(id)?;
        let c = c.lock().await;
        c.init.ensure_alive("collect stats of")?;
        let data = c.runtime.stats(id).await?;
        to_any(stats::metrics(&data, stats::unified_hierarchy()))
    }

    /// `CloseIO`: closes the process's stdin.
    pub async fn close_io(&self, id: &str, exec_id: &str) -> Result<()> {
        let c = self.container(id)?;
        let c = c.lock().await;
        if let Some(io) = &c.process(exec_id)?.io {
            io.close_stdin();
        }
        Ok(())
    }

    /// `ResizePty`.
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let c = self.container(id)?;
        let c = c.lock().await;
        match &c.process(exec_id)?.io {
            Some(io) => io.resize(width, height),
            None => Err(Error::FailedPrecondition(format!(
                "container {id} has no running process to resize"
            ))),
        }
    }

    /// `Checkpoint` through runc and CRIU, with containerd's checkpoint options.
    pub async fn checkpoint(&self, req: &CheckpointTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let c = c.lock().await;
        if !matches!(c.init.status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot checkpoint container {}: it is {:?}, not running",
                req.id, c.init.status
            )));
        }
        let o = match req.options.as_ref().filter(|a| !a.value.is_empty()) {
            Some(any) => CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| {
                Error::InvalidArgument(format!(
                    "checkpoint options of {} are not containerd.runc.v1.CheckpointOptions: {e}",
                    req.id
                ))
            })?,
            None => CheckpointOptions::default(),
        };
        let image_path = if o.image_path.is_empty() {
            &req.path
        } else {
            &o.image_path
        };
        if image_path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "checkpoint of {}: no image path given (request path or options.image_path)",
                req.id
            )));
        }
        let opts = CheckpointOpts {
            image_path: image_path.into(),
            work_path: if o.work_path.is_empty() {
                c.bundle.join("criu-work")
            } else {
                o.work_path.clone().into()
            },
            leave_running: !o.exit,
            tcp_established: o.open_tcp,
            external_unix_sockets: o.external_unix_sockets,
            shell_job: o.terminal,
            file_locks: o.file_locks,
            empty_namespaces: o.empty_namespaces.clone(),
            cgroups_mode: o.cgroups_mode.clone(),
        };
        tracing::info!(container_id = %req.id, image_path = %opts.image_path.display(), exit = o.exit, "checkpoint");
        match &c.workload {
            Some(w) if w.engine.kind() == EngineKind::Dmtcp => {
                // With exit, DMTCP ends the application with its images and the hook exits.
                w.checkpoint_native(&opts.image_path, o.exit).await?;
                if o.exit {
                    self.await_init_exit(&c).await?;
                }
                Ok(())
            }
            Some(w) => {
                c.runtime.checkpoint(&req.id, &opts).await?;
                w.mark_native_checkpoint(&opts.image_path)
            }
            None => c.runtime.checkpoint(&req.id, &opts).await,
        }
    }

    /// The init's pid, for `Connect`.
    pub async fn init_pid(&self, id: &str) -> Result<u32> {
        let c = self.container(id)?;
        let c = c.lock().await;
        Ok(c.init.pid as u32)
    }

    /// `Shutdown`: ends the shim once it serves no container (or at once with `now`).
    pub fn shutdown(&self, now: bool) {
        if now
            || self
                .containers
                .lock()
                .expect("container map poisoned")
                .is_empty()
        {
            self.exit.signal();
        }
    }
}

fn delete_response(p: &Process) -> DeleteResponse {
    let exit = p.exit();
    DeleteResponse {
        pid: p.pid as u32,
        exit_status: exit.map(|e| e.status).unwrap_or_default(),
        exited_at: exit.map(|e| e.timestamp()).into(),
        ..Default::default()
    }
}

fn to_any(m: Box<dyn MessageDyn>) -> Result<Any> {
    containerd_shim::util::convert_to_any(m).map_err(|e| Error::Other(format!("encode {e}")))
}

/// Container and exec ids become file names (pid files, sockets): refuse anything that could
/// escape the bundle.
fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid id {id:?}: expected 1-256 characters of [A-Za-z0-9_.+-]"
        )))
    }
}

/// The bundle's OCI spec; `None` when there is none (a bundle prepared by hand).
fn load_spec(bundle: &Path) -> Result<Option<oci_spec::runtime::Spec>> {
    let path = bundle.join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    oci_spec::runtime::Spec::load(&path)
        .map(Some)
        .map_err(|e| Error::InvalidArgument(format!("{} is not an OCI spec: {e}", path.display())))
}

/// Mounts containerd's rootfs mounts at `<bundle>/rootfs`; `None` when containerd passed none
/// (the bundle then already holds the root).
async fn mount_rootfs(
    mounts: &[containerd_shim::protos::types::mount::Mount],
    bundle: &Path,
) -> Result<Option<PathBuf>> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).map_err(Error::io(format!("create {}", target.display())))?;
    for m in mounts {
        if let Err(e) = containerd_shim::util::mount_rootfs(m, &target).await {
            unmount_rootfs(&target);
            return Err(Error::Other(format!(
                "mount {} ({}) at {}: {e}",
                m.source,
                m.type_,
                target.display()
            )));
        }
    }
    Ok(Some(target))
}

/// Unmounts everything at and under `root`; a failure is logged, never fatal (delete must
/// proceed so containerd can clean up).
pub fn unmount_rootfs(root: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(root.to_str(), libc::MNT_DETACH) {
        tracing::warn!(path = %root.display(), error = %e, "unmount rootfs");
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
