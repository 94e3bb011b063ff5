//! The task service: every operation containerd asks of the shim, as plain methods over the
//! shim's own types. `task.rs` is only the ttrpc wrapper around it.
//!
//! This file holds the service's state, the exit pump and the queries; `start.rs` creates and
//! starts containers and execs (restoring from a checkpoint when one waits), `stop.rs` signals,
//! checkpoints and deletes them.

mod start;
mod stop;

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
    workload::{self, StopCheckpoint, Workload},
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
mod tests;
