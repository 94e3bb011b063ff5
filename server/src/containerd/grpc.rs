//! [`Grpc`]: [`Containerd`] whose task operations speak containerd's gRPC API over its unix
//! socket; the container records go through [`Ctr`].
//!
//! The messages are declared by hand below, only with the fields used, their numbers taken
//! from containerd's API (`github.com/containerd/containerd/api`, as of v2.1):
//! `services/tasks/v1/tasks.proto`, `services/containers/v1/containers.proto`,
//! `services/snapshots/v1/snapshots.proto`, `types/mount.proto` and `types/task/task.proto`.
//! protobuf skips whatever a reply carries beyond them, and enums travel as their `int32`.
//!
//! Every call names its containerd namespace in the `containerd-namespace` header and carries
//! a deadline (`grpc-timeout`, enforced here too): [`Ctr::timeout`], which also bounds a kill
//! that our shim answers only once its checkpoint is written.
//!
//! A task is created the way `ctr tasks start --null-io --detach` creates it (containerd's Go
//! client, `container.NewTask` with `cio.NullIO`): the rootfs mounts of the container's
//! snapshot (`Snapshots.Mounts` of its `snapshotter` and `snapshot_key`; with an SELinux
//! `mountLabel` in the spec, `context="<label>"` appended to each mount's options), empty
//! stdin/stdout/stderr, no terminal, and no `options`: containerd then hands the shim the
//! runtime options of the container record (`Container.runtime.options`), for starting it and
//! in its Create. Only a spec with user-namespace mappings makes ctr send options (runc's
//! `io_uid`/`io_gid`, which own the IO pipes; with null IO there are none).

use std::time::Duration;

use async_trait::async_trait;
use http::uri::PathAndQuery;
use serde::Deserialize;
use tokio::sync::OnceCell;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{ContainerInfo, Containerd, ContainerdError, Ctr, TaskStatus};

/// How long connecting to containerd's socket may take (each call has its own deadline).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The header containerd reads a call's namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";

const TASKS_CREATE: &str = "/containerd.services.tasks.v1.Tasks/Create";
const TASKS_START: &str = "/containerd.services.tasks.v1.Tasks/Start";
const TASKS_DELETE: &str = "/containerd.services.tasks.v1.Tasks/Delete";
const TASKS_GET: &str = "/containerd.services.tasks.v1.Tasks/Get";
const TASKS_KILL: &str = "/containerd.services.tasks.v1.Tasks/Kill";
const TASKS_WAIT: &str = "/containerd.services.tasks.v1.Tasks/Wait";
const CONTAINERS_GET: &str = "/containerd.services.containers.v1.Containers/Get";
const SNAPSHOTS_MOUNTS: &str = "/containerd.services.snapshots.v1.Snapshots/Mounts";

/// The subset of containerd's API messages used here.
#[allow(missing_docs)]
pub mod api {
    /// `containerd.types.Mount`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mount {
        #[prost(string, tag = "1")]
        pub r#type: String,
        #[prost(string, tag = "2")]
        pub source: String,
        #[prost(string, tag = "3")]
        pub target: String,
        #[prost(string, repeated, tag = "4")]
        pub options: Vec<String>,
    }

    /// `google.protobuf.Any`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// `google.protobuf.Empty`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    /// `containerd.services.tasks.v1.CreateTaskRequest` (without `checkpoint` = 8).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateTaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(message, repeated, tag = "3")]
        pub rootfs: Vec<Mount>,
        #[prost(string, tag = "4")]
        pub stdin: String,
        #[prost(string, tag = "5")]
        pub stdout: String,
        #[prost(string, tag = "6")]
        pub stderr: String,
        #[prost(bool, tag = "7")]
        pub terminal: bool,
        #[prost(message, optional, tag = "9")]
        pub options: Option<Any>,
        #[prost(string, tag = "10")]
        pub runtime_path: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateTaskResponse {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(uint32, tag = "2")]
        pub pid: u32,
    }

    /// `StartRequest`, `GetRequest`, `WaitRequest`: a container id and an exec id (empty: the
    /// task's init process).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ProcessRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StartResponse {
        #[prost(uint32, tag = "1")]
        pub pid: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteTaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteResponse {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(uint32, tag = "2")]
        pub pid: u32,
        #[prost(uint32, tag = "3")]
        pub exit_status: u32,
    }

    /// `containerd.v1.types.Process`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Process {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, tag = "2")]
        pub id: String,
        #[prost(uint32, tag = "3")]
        pub pid: u32,
        /// `containerd.v1.types.Status`: see [`super::task_status`].
        #[prost(int32, tag = "4")]
        pub status: i32,
        #[prost(uint32, tag = "9")]
        pub exit_status: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetResponse {
        #[prost(message, optional, tag = "1")]
        pub process: Option<Process>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KillRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
        #[prost(uint32, tag = "3")]
        pub signal: u32,
        #[prost(bool, tag = "4")]
        pub all: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WaitResponse {
        #[prost(uint32, tag = "1")]
        pub exit_status: u32,
    }

    /// `containerd.services.containers.v1.GetContainerRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetContainerRequest {
        #[prost(string, tag = "1")]
        pub id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetContainerResponse {
        #[prost(message, optional, tag = "1")]
        pub container: Option<Container>,
    }

    /// `containerd.services.containers.v1.Container.Runtime`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Runtime {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub options: Option<Any>,
    }

    /// `containerd.services.containers.v1.Container` (without labels, timestamps, extensions).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "3")]
        pub image: String,
        #[prost(message, optional, tag = "4")]
        pub runtime: Option<Runtime>,
        /// The OCI runtime spec, as JSON.
        #[prost(message, optional, tag = "5")]
        pub spec: Option<Any>,
        #[prost(string, tag = "6")]
        pub snapshotter: String,
        #[prost(string, tag = "7")]
        pub snapshot_key: String,
        #[prost(string, tag = "11")]
        pub sandbox: String,
    }

    /// `containerd.services.snapshots.v1.MountsRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MountsRequest {
        #[prost(string, tag = "1")]
        pub snapshotter: String,
        #[prost(string, tag = "2")]
        pub key: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MountsResponse {
        #[prost(message, repeated, tag = "1")]
        pub mounts: Vec<Mount>,
    }
}

/// `containerd.v1.types.Status` values.
pub mod status {
    pub const UNKNOWN: i32 = 0;
    pub const CREATED: i32 = 1;
    pub const RUNNING: i32 = 2;
    pub const STOPPED: i32 = 3;
    pub const PAUSED: i32 = 4;
    pub const PAUSING: i32 = 5;
}

/// A task's [`TaskStatus`] from containerd's `Status` value.
pub fn task_status(value: i32) -> TaskStatus {
    match value {
        status::CREATED => TaskStatus::Created,
        status::RUNNING => TaskStatus::Running,
        status::STOPPED => TaskStatus::Stopped,
        status::PAUSED | status::PAUSING => TaskStatus::Paused,
        _ => TaskStatus::Unknown,
    }
}

/// The number of a signal named as `ctr tasks kill --signal` takes it (moby's `ParseSignal`):
/// a name with or without `SIG`, in any case (`SIGTERM`, `TERM`, `sigkill`), `RTMIN+n` /
/// `RTMAX-n`, or a number. `None` for anything else, and for 0.
pub fn signal_number(name: &str) -> Option<u32> {
    let rt_min = libc::SIGRTMIN();
    let rt_max = libc::SIGRTMAX();
    let in_range = |n: i32| (1..=rt_max).contains(&n).then_some(n as u32);
    if let Ok(n) = name.parse::<i32>() {
        return in_range(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match bare {
        "ABRT" | "IOT" => libc::SIGABRT,
        "ALRM" => libc::SIGALRM,
        "BUS" => libc::SIGBUS,
        "CHLD" | "CLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "FPE" => libc::SIGFPE,
        "HUP" => libc::SIGHUP,
        "ILL" => libc::SIGILL,
        "INT" => libc::SIGINT,
        "IO" | "POLL" => libc::SIGIO,
        "KILL" => libc::SIGKILL,
        "PIPE" => libc::SIGPIPE,
        "PROF" => libc::SIGPROF,
        "PWR" => libc::SIGPWR,
        "QUIT" => libc::SIGQUIT,
        "SEGV" => libc::SIGSEGV,
        "STOP" => libc::SIGSTOP,
        "SYS" => libc::SIGSYS,
        "TERM" => libc::SIGTERM,
        "TRAP" => libc::SIGTRAP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "VTALRM" => libc::SIGVTALRM,
        "WINCH" => libc::SIGWINCH,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "RTMIN" => rt_min,
        "RTMAX" => rt_max,
        other => {
            let offset = |s: &str| s.parse::<u8>().ok().map(i32::from);
            let n = if let Some(k) = other.strip_prefix("RTMIN+").and_then(offset) {
                rt_min + k
            } else if let Some(k) = other.strip_prefix("RTMAX-").and_then(offset) {
                rt_max - k
            } else {
                return None;
            };
            if !(rt_min..=rt_max).contains(&n) {
                return None;
            }
            n
        }
    };
    in_range(n)
}

/// What task creation reads from the container's OCI spec.
#[derive(Debug, Default, Deserialize)]
struct SpecBits {
    #[serde(default)]
    process: Option<ProcessBits>,
    #[serde(default)]
    linux: Option<LinuxBits>,
}

#[derive(Debug, Default, Deserialize)]
struct ProcessBits {
    #[serde(default)]
    terminal: bool,
}

#[derive(Debug, Default, Deserialize)]
struct LinuxBits {
    #[serde(default, rename = "mountLabel")]
    mount_label: String,
}

/// The mount option that gives a rootfs mount the spec's SELinux `mountLabel`, as go-selinux's
/// `label.FormatMountLabel("", label)` writes it (a Go-quoted string).
fn mount_label_option(label: &str) -> String {
    format!("context={label:?}")
}

/// The [`Containerd`] implementation: the task operations over containerd's gRPC API; the
/// container records (list, info, create, delete) go through the wrapped [`Ctr`] helper, whose
/// socket and timeout it shares.
#[derive(Debug)]
pub struct Grpc {
    ctr: Ctr,
    /// Connected on first use, then shared by every call (a tonic channel multiplexes them).
    channel: OnceCell<Channel>,
}

impl Grpc {
    /// The API on `ctr.address`, calls bounded by `ctr.timeout`.
    pub fn new(ctr: Ctr) -> Self {
        Self {
            ctr,
            channel: OnceCell::new(),
        }
    }

    async fn channel(&self) -> Result<Channel, Status> {
        self.channel
            .get_or_try_init(|| async {
                let uri = format!("unix://{}", self.ctr.address.display());
                let endpoint = Endpoint::from_shared(uri.clone())
                    .map_err(|e| Status::invalid_argument(format!("endpoint {uri}: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT);
                // Connects on the first call and reconnects when containerd restarts.
                Ok(endpoint.connect_lazy())
            })
            .await
            .cloned()
    }

    /// One unary call in `namespace`, within [`Ctr::timeout`].
    async fn call<Req, Resp>(
        &self,
        namespace: &str,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let timeout = self.ctr.timeout;
        let channel = self.channel().await?;
        let call = async move {
            let ns = MetadataValue::try_from(namespace).map_err(|_| {
                Status::invalid_argument(format!("namespace {namespace:?} is not a header value"))
            })?;
            let mut request = tonic::Request::new(request);
            request.metadata_mut().insert(NAMESPACE_HEADER, ns);
            request.set_timeout(timeout);
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
            grpc.unary(
                request,
                PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no answer within {timeout:?}")))?
    }

    /// A failed call as a [`ContainerdError::Command`]; containerd's message says e.g.
    /// `task c1 not found: not found`, as `ctr` would print it.
    fn failed(&self, namespace: &str, path: &str, id: &str, status: Status) -> ContainerdError {
        let method = path.rsplit('/').next().unwrap_or(path);
        let service = path
            .trim_start_matches("/containerd.services.")
            .split('.')
            .next()
            .unwrap_or_default();
        ContainerdError::Command {
            command: format!(
                "containerd {service}.{method} {id} (namespace {namespace}, {})",
                self.ctr.address.display()
            ),
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    }

    fn refused(&self, namespace: &str, what: &str, id: &str, message: String) -> ContainerdError {
        ContainerdError::Command {
            command: format!(
                "containerd {what} {id} (namespace {namespace}, {})",
                self.ctr.address.display()
            ),
            message,
        }
    }

    /// The task's init process, or `None` when the container has no task (or does not exist).
    async fn process(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<api::Process>, ContainerdError> {
        let request = api::ProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        };
        match self
            .call::<_, api::GetResponse>(namespace, TASKS_GET, request)
            .await
        {
            Ok(r) => Ok(Some(r.process.unwrap_or_default())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.failed(namespace, TASKS_GET, id, s)),
        }
    }

    async fn kill_number(
        &self,
        namespace: &str,
        id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), Status> {
        let request = api::KillRequest {
            container_id: id.into(),
            exec_id: String::new(),
            signal,
            all,
        };
        self.call::<_, api::Empty>(namespace, TASKS_KILL, request)
            .await
            .map(drop)
    }

    /// `ctr tasks delete --force`'s kill (containerd's `WithProcessKill`): SIGKILL to every
    /// process of the task, then wait until it has exited. A task that is gone already, or
    /// cannot be signalled (stopped), is fine.
    async fn force_stop(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        match self
            .kill_number(namespace, id, libc::SIGKILL as u32, true)
            .await
        {
            Ok(()) => {}
            Err(s) if s.code() == Code::FailedPrecondition => return Ok(()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(self.failed(namespace, TASKS_KILL, id, s)),
        }
        let request = api::ProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        };
        match self
            .call::<_, api::WaitResponse>(namespace, TASKS_WAIT, request)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.failed(namespace, TASKS_WAIT, id, s)),
        }
    }

    async fn start_created(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        let request = api::ProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        };
        self.call::<_, api::StartResponse>(namespace, TASKS_START, request)
            .await
            .map(drop)
            .map_err(|s| self.failed(namespace, TASKS_START, id, s))
    }
}

#[async_trait]
impl Containerd for Grpc {
    async fn list_by_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, ContainerdError> {
        self.ctr.list_by_label(namespace, key, value).await
    }

    async fn info(&self, namespace: &str, id: &str) -> Result<ContainerInfo, ContainerdError> {
        self.ctr.info(namespace, id).await
    }

    async fn task_status(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<TaskStatus>, ContainerdError> {
        Ok(self
            .process(namespace, id)
            .await?
            .map(|p| task_status(p.status)))
    }

    async fn kill(&self, namespace: &str, id: &str, signal: &str) -> Result<(), ContainerdError> {
        let number = signal_number(signal).ok_or_else(|| {
            self.refused(
                namespace,
                "Tasks.Kill",
                id,
                format!("invalid signal {signal:?}; expected a name like SIGTERM or a number"),
            )
        })?;
        self.kill_number(namespace, id, number, false)
            .await
            .map_err(|s| self.failed(namespace, TASKS_KILL, id, s))
    }

    async fn create(&self, info: &ContainerInfo, runtime: &str) -> Result<(), ContainerdError> {
        self.ctr.create(info, runtime).await
    }

    async fn create_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        let request = api::GetContainerRequest { id: id.into() };
        let container = match self
            .call::<_, api::GetContainerResponse>(namespace, CONTAINERS_GET, request)
            .await
        {
            Ok(r) => r.container.unwrap_or_default(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(ContainerdError::NotFound {
                    namespace: namespace.into(),
                    id: id.into(),
                });
            }
            Err(s) => return Err(self.failed(namespace, CONTAINERS_GET, id, s)),
        };
        let spec: SpecBits = container
            .spec
            .as_ref()
            .map(|any| serde_json::from_slice(&any.value))
            .transpose()
            .map_err(|e| {
                self.refused(
                    namespace,
                    "Tasks.Create",
                    id,
                    format!("the container's spec is not JSON: {e}"),
                )
            })?
            .unwrap_or_default();
        if spec.process.is_some_and(|p| p.terminal) {
            // What ctr answers too: a terminal needs a console, and the IO is discarded.
            return Err(self.refused(
                namespace,
                "Tasks.Create",
                id,
                "tty and null-io cannot be used together".into(),
            ));
        }
        let mut rootfs = Vec::new();
        if !container.snapshot_key.is_empty() {
            if container.snapshotter.is_empty() {
                return Err(self.refused(
                    namespace,
                    "Tasks.Create",
                    id,
                    "unable to resolve rootfs mounts without snapshotter on container".into(),
                ));
            }
            let request = api::MountsRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            };
            rootfs = self
                .call::<_, api::MountsResponse>(namespace, SNAPSHOTS_MOUNTS, request)
                .await
                .map_err(|s| self.failed(namespace, SNAPSHOTS_MOUNTS, id, s))?
                .mounts;
            let label = spec.linux.map(|l| l.mount_label).unwrap_or_default();
            if !label.is_empty() {
                for mount in &mut rootfs {
                    mount.options.push(mount_label_option(&label));
                }
            }
        }
        let request = api::CreateTaskRequest {
            container_id: id.into(),
            rootfs,
            // Null IO: no stdin, stdout, stderr, terminal. No options: containerd passes the
            // shim the container record's runtime options.
            ..Default::default()
        };
        self.call::<_, api::CreateTaskResponse>(namespace, TASKS_CREATE, request)
            .await
            .map(drop)
            .map_err(|s| self.failed(namespace, TASKS_CREATE, id, s))
    }

    async fn start_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        match self.process(namespace, id).await? {
            None => self.create_task(namespace, id).await?,
            Some(p) if p.status == status::CREATED => {}
            Some(p) => {
                return Err(self.refused(
                    namespace,
                    "Tasks.Start",
                    id,
                    format!(
                        "task {id} already exists and is {:?}, not created: already exists",
                        task_status(p.status)
                    ),
                ));
            }
        }
        self.start_created(namespace, id).await
    }

    /// As `ctr tasks delete [--force]`: no task is an error; without `force` the task must be
    /// stopped (or created and never given a process).
    async fn delete_task(
        &self,
        namespace: &str,
        id: &str,
        force: bool,
    ) -> Result<(), ContainerdError> {
        let not_found = || {
            self.failed(
                namespace,
                TASKS_GET,
                id,
                Status::not_found(format!("no running task found: task {id} not found")),
            )
        };
        // Forced, the point is that no task is left: one that is not there, or goes away
        // meanwhile (its shim exiting, a delete of another caller, e.g. an agent killed
        // mid-delete and started again), is deleted.
        let Some(mut process) = self.process(namespace, id).await? else {
            return if force { Ok(()) } else { Err(not_found()) };
        };
        if force && process.pid != 0 && process.status != status::STOPPED {
            self.force_stop(namespace, id).await?;
            match self.process(namespace, id).await? {
                Some(p) => process = p,
                None => return Ok(()),
            }
        }
        let deletable = match process.status {
            status::STOPPED | status::UNKNOWN => true,
            status::CREATED => process.pid == 0,
            _ => false,
        };
        if !deletable {
            return Err(self.refused(
                namespace,
                "Tasks.Delete",
                id,
                format!(
                    "task must be stopped before deletion: {:?}: failed precondition",
                    task_status(process.status)
                ),
            ));
        }
        let request = api::DeleteTaskRequest {
            container_id: id.into(),
        };
        match self
            .call::<_, api::DeleteResponse>(namespace, TASKS_DELETE, request)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if force && s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.failed(namespace, TASKS_DELETE, id, s)),
        }
    }

    async fn delete_container(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        self.ctr.delete_container(namespace, id).await
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn signal_names_and_numbers() {
        for (name, number) in [
            ("SIGTERM", 15),
            ("TERM", 15),
            ("sigterm", 15),
            ("SIGKILL", 9),
            ("KILL", 9),
            ("SIGINT", 2),
            ("HUP", 1),
            ("SIGUSR1", libc::SIGUSR1 as u32),
            ("SIGCHLD", libc::SIGCHLD as u32),
            ("CLD", libc::SIGCHLD as u32),
            ("IOT", 6),
            ("9", 9),
            ("15", 15),
            ("RTMIN", libc::SIGRTMIN() as u32),
            ("SIGRTMIN+2", libc::SIGRTMIN() as u32 + 2),
            ("RTMAX-1", libc::SIGRTMAX() as u32 - 1),
        ] {
            assert_eq!(signal_number(name), Some(number), "{name}");
        }
        for bad in [
            "", "0", "-9", "SIG", "SIGFOO", "TERM ", "999", "RTMIN+99", "RTMAX-99", "RTMIN-1",
        ] {
            assert_eq!(signal_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn containerd_status_values() {
        assert_eq!(task_status(0), TaskStatus::Unknown);
        assert_eq!(task_status(1), TaskStatus::Created);
        assert_eq!(task_status(2), TaskStatus::Running);
        assert_eq!(task_status(3), TaskStatus::Stopped);
        assert_eq!(task_status(4), TaskStatus::Paused);
        assert_eq!(task_status(5), TaskStatus::Paused);
        assert_eq!(task_status(6), TaskStatus::Unknown);
        assert_eq!(task_status(-1), TaskStatus::Unknown);
    }

    #[test]
    fn get_reply_decodes_status_and_pid() {
        // containerd.v1.types.Process{container_id: "c1", pid: 42, status: RUNNING} inside
        // GetResponse.process (field 1), as protobuf bytes.
        let process = [
            0x0a, 2, b'c', b'1', // 1: container_id
            0x18, 42, // 3: pid
            0x20, 2, // 4: status
        ];
        let mut reply = vec![0x0a, process.len() as u8];
        reply.extend_from_slice(&process);
        let r = api::GetResponse::decode(reply.as_slice()).expect("decode");
        let p = r.process.expect("process");
        assert_eq!((p.container_id.as_str(), p.pid), ("c1", 42));
        assert_eq!(task_status(p.status), TaskStatus::Running);
    }

    #[test]
    fn create_request_carries_rootfs_and_null_io() {
        let request = api::CreateTaskRequest {
            container_id: "c".into(),
            rootfs: vec![api::Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["ro".into()],
            }],
            ..Default::default()
        };
        let bytes = request.encode_to_vec();
        // 1: "c"; 3: Mount{1: "overlay", 2: "overlay", 4: "ro"}; nothing else (null IO, no
        // terminal, no options, no runtime path).
        let mount = [
            &[0x0a, 7][..],
            b"overlay",
            &[0x12, 7],
            b"overlay",
            &[0x22, 2],
            b"ro",
        ]
        .concat();
        let expected = [&[0x0a, 1, b'c', 0x1a, mount.len() as u8][..], &mount].concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn spec_bits_and_mount_label() {
        let spec: SpecBits = serde_json::from_str(
            r#"{"ociVersion": "1.2.0", "process": {"terminal": true, "args": ["sh"]},
                "linux": {"mountLabel": "system_u:object_r:container_file_t:s0:c1,c2"}}"#,
        )
        .expect("spec");
        assert!(spec.process.expect("process").terminal);
        let label = spec.linux.expect("linux").mount_label;
        assert_eq!(
            mount_label_option(&label),
            r#"context="system_u:object_r:container_file_t:s0:c1,c2""#
        );
        let bare: SpecBits = serde_json::from_str(r#"{"process": {}}"#).expect("spec");
        assert!(!bare.process.expect("process").terminal);
        assert!(bare.linux.is_none());
    }
}
