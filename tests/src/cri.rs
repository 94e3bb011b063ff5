//! A client of the Kubernetes CRI (`runtime.v1`) over containerd's unix socket: the tests play
//! the kubelet with it, since no kubelet can run here.
//!
//! Only the messages and fields the tests use are declared, by hand, with their numbers from
//! the CRI's `api.proto` (k8s.io/cri-api, `runtime.v1`); protobuf skips whatever a reply carries
//! beyond them. This keeps `protoc` out of the build. Enums travel as their `int32` values (the
//! constants below).
//!
//! Calls block: the client owns a single-threaded tokio runtime and gives every call a
//! deadline, so a hung containerd fails a test instead of hanging it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tonic::transport::{Channel, Endpoint};

pub use api::*;

/// How long one CRI call may take, unless it says otherwise.
pub const CRI_TIMEOUT: Duration = Duration::from_secs(60);

/// `NamespaceMode` values.
pub mod namespace_mode {
    pub const POD: i32 = 0;
    pub const CONTAINER: i32 = 1;
    pub const NODE: i32 = 2;
    pub const TARGET: i32 = 3;
}

/// `ContainerState` values.
pub mod container_state {
    pub const CREATED: i32 = 0;
    pub const RUNNING: i32 = 1;
    pub const EXITED: i32 = 2;
    pub const UNKNOWN: i32 = 3;
}

/// `PodSandboxState` values.
pub mod sandbox_state {
    pub const READY: i32 = 0;
    pub const NOT_READY: i32 = 1;
}

/// A subset of the CRI's messages (package `runtime.v1`).
#[allow(missing_docs)]
pub mod api {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespaceOption {
        #[prost(int32, tag = "1")]
        pub network: i32,
        #[prost(int32, tag = "2")]
        pub pid: i32,
        #[prost(int32, tag = "3")]
        pub ipc: i32,
        #[prost(string, tag = "4")]
        pub target_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxSandboxSecurityContext {
        #[prost(message, optional, tag = "1")]
        pub namespace_options: Option<NamespaceOption>,
        #[prost(bool, tag = "6")]
        pub privileged: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxSandboxSecurityContext>,
        #[prost(map = "string, string", tag = "3")]
        pub sysctls: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "7")]
        pub annotations: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// StopPodSandbox, RemovePodSandbox.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        /// [`super::sandbox_state`].
        #[prost(int32, tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(map = "string, string", tag = "7")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "8")]
        pub annotations: HashMap<String, String>,
        #[prost(string, tag = "9")]
        pub runtime_handler: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
        #[prost(map = "string, string", tag = "2")]
        pub annotations: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(uint32, tag = "2")]
        pub attempt: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerSecurityContext {
        #[prost(bool, tag = "2")]
        pub privileged: bool,
        #[prost(message, optional, tag = "3")]
        pub namespace_options: Option<NamespaceOption>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxContainerConfig {
        #[prost(message, optional, tag = "2")]
        pub security_context: Option<LinuxContainerSecurityContext>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(message, optional, tag = "2")]
        pub image: Option<ImageSpec>,
        #[prost(string, repeated, tag = "3")]
        pub command: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub args: Vec<String>,
        #[prost(string, tag = "5")]
        pub working_dir: String,
        #[prost(message, repeated, tag = "6")]
        pub envs: Vec<KeyValue>,
        #[prost(map = "string, string", tag = "9")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "10")]
        pub annotations: HashMap<String, String>,
        #[prost(string, tag = "11")]
        pub log_path: String,
        #[prost(bool, tag = "12")]
        pub stdin: bool,
        #[prost(bool, tag = "13")]
        pub stdin_once: bool,
        #[prost(bool, tag = "14")]
        pub tty: bool,
        #[prost(message, optional, tag = "15")]
        pub linux: Option<LinuxContainerConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "2")]
        pub config: Option<ContainerConfig>,
        #[prost(message, optional, tag = "3")]
        pub sandbox_config: Option<PodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateContainerResponse {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    /// StartContainer, RemoveContainer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerIdRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StopContainerRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[prost(int64, tag = "2")]
        pub timeout: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatusRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<ContainerMetadata>,
        /// [`super::container_state`].
        #[prost(int32, tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(int64, tag = "5")]
        pub started_at: i64,
        #[prost(int64, tag = "6")]
        pub finished_at: i64,
        #[prost(int32, tag = "7")]
        pub exit_code: i32,
        #[prost(message, optional, tag = "8")]
        pub image: Option<ImageSpec>,
        #[prost(string, tag = "9")]
        pub image_ref: String,
        #[prost(string, tag = "10")]
        pub reason: String,
        #[prost(string, tag = "11")]
        pub message: String,
        #[prost(map = "string, string", tag = "12")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "13")]
        pub annotations: HashMap<String, String>,
        #[prost(string, tag = "15")]
        pub log_path: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<ContainerStatus>,
        /// With `verbose`: `info` is containerd's JSON about the container (pid, spec...).
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "3")]
        pub pod_sandbox_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<ContainerFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Container {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub pod_sandbox_id: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<ContainerMetadata>,
        #[prost(int32, tag = "6")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListContainersResponse {
        #[prost(message, repeated, tag = "1")]
        pub containers: Vec<Container>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(string, repeated, tag = "2")]
        pub cmd: Vec<String>,
        /// Seconds; 0 means none.
        #[prost(int64, tag = "3")]
        pub timeout: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExecSyncResponse {
        #[prost(bytes = "vec", tag = "1")]
        pub stdout: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub stderr: Vec<u8>,
        #[prost(int32, tag = "3")]
        pub exit_code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, repeated, tag = "2")]
        pub repo_tags: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageStatusResponse {
        /// None when the CRI does not know the image.
        #[prost(message, optional, tag = "1")]
        pub image: Option<Image>,
    }
}

const RUNTIME_SERVICE: &str = "runtime.v1.RuntimeService";
const IMAGE_SERVICE: &str = "runtime.v1.ImageService";

/// A blocking CRI client bound to one containerd socket.
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    socket: PathBuf,
}

impl CriClient {
    /// Connects to the CRI served on containerd's gRPC `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime for the CRI client")?;
        let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
            .context("CRI endpoint")?
            .connect_timeout(Duration::from_secs(5));
        let channel = runtime
            .block_on(endpoint.connect())
            .with_context(|| format!("connecting to the CRI on {}", socket.display()))?;
        Ok(Self {
            runtime,
            channel,
            socket: socket.to_path_buf(),
        })
    }

    /// One unary call of `service`/`method`, failing after `timeout`.
    fn call<Req, Resp>(
        &self,
        service: &str,
        method: &str,
        request: Req,
        timeout: Duration,
    ) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let path = http::uri::PathAndQuery::try_from(format!("/{service}/{method}"))?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| anyhow!("CRI {method}: channel not ready: {e}"))?;
            grpc.unary(
                tonic::Request::new(request),
                path,
                tonic_prost::ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| anyhow!("CRI {method}: {:?}: {}", s.code(), s.message()))
        };
        self.block_on(method, timeout, call)
    }

    fn block_on<T>(
        &self,
        method: &str,
        timeout: Duration,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
            .map_err(|_| {
                anyhow!(
                    "CRI {method} on {} did not answer within {timeout:?}",
                    self.socket.display()
                )
            })?
    }

    fn runtime_call<Req, Resp>(&self, method: &str, request: Req) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call(RUNTIME_SERVICE, method, request, CRI_TIMEOUT)
    }

    pub fn version(&self) -> Result<VersionResponse> {
        self.runtime_call(
            "Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
    }

    /// RunPodSandbox: the pod's sandbox id.
    pub fn run_pod_sandbox(
        &self,
        config: &PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String> {
        let r: RunPodSandboxResponse = self.runtime_call(
            "RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: runtime_handler.into(),
            },
        )?;
        Ok(r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, pod_sandbox_id: &str) -> Result<()> {
        let _: Empty = self.runtime_call(
            "StopPodSandbox",
            PodSandboxIdRequest {
                pod_sandbox_id: pod_sandbox_id.into(),
            },
        )?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, pod_sandbox_id: &str) -> Result<()> {
        let _: Empty = self.runtime_call(
            "RemovePodSandbox",
            PodSandboxIdRequest {
                pod_sandbox_id: pod_sandbox_id.into(),
            },
        )?;
        Ok(())
    }

    pub fn pod_sandbox_status(&self, pod_sandbox_id: &str) -> Result<PodSandboxStatusResponse> {
        self.runtime_call(
            "PodSandboxStatus",
            PodSandboxStatusRequest {
                pod_sandbox_id: pod_sandbox_id.into(),
                verbose: true,
            },
        )
    }

    /// CreateContainer: the container's id.
    pub fn create_container(
        &self,
        pod_sandbox_id: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String> {
        let r: CreateContainerResponse = self.runtime_call(
            "CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: pod_sandbox_id.into(),
                config: Some(config.clone()),
                sandbox_config: Some(sandbox_config.clone()),
            },
        )?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, container_id: &str) -> Result<()> {
        let _: Empty = self.runtime_call(
            "StartContainer",
            ContainerIdRequest {
                container_id: container_id.into(),
            },
        )?;
        Ok(())
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout` (what the kubelet does with the
    /// pod's grace period).
    pub fn stop_container(&self, container_id: &str, timeout: Duration) -> Result<()> {
        let _: Empty = self.call(
            RUNTIME_SERVICE,
            "StopContainer",
            StopContainerRequest {
                container_id: container_id.into(),
                timeout: timeout.as_secs() as i64,
            },
            timeout + CRI_TIMEOUT,
        )?;
        Ok(())
    }

    pub fn remove_container(&self, container_id: &str) -> Result<()> {
        let _: Empty = self.runtime_call(
            "RemoveContainer",
            ContainerIdRequest {
                container_id: container_id.into(),
            },
        )?;
        Ok(())
    }

    /// ContainerStatus, verbose (`info` carries containerd's view: pid, spec...).
    pub fn container_status(&self, container_id: &str) -> Result<ContainerStatusResponse> {
        self.runtime_call(
            "ContainerStatus",
            ContainerStatusRequest {
                container_id: container_id.into(),
                verbose: true,
            },
        )
    }

    /// The status of a container, which the reply must carry.
    pub fn status_of(&self, container_id: &str) -> Result<ContainerStatus> {
        self.container_status(container_id)?
            .status
            .ok_or_else(|| anyhow!("ContainerStatus of {container_id} carries no status"))
    }

    /// The containers of one pod (all of them with an empty id).
    pub fn list_containers(&self, pod_sandbox_id: &str) -> Result<Vec<Container>> {
        let r: ListContainersResponse = self.runtime_call(
            "ListContainers",
            ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: pod_sandbox_id.into(),
                    ..Default::default()
                }),
            },
        )?;
        Ok(r.containers)
    }

    /// ExecSync `cmd` in the container, with a deadline of `timeout` (whole seconds).
    pub fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecSyncResponse> {
        self.call(
            RUNTIME_SERVICE,
            "ExecSync",
            ExecSyncRequest {
                container_id: container_id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            },
            timeout + CRI_TIMEOUT,
        )
    }

    /// ExecSync that must exit 0: its stdout.
    pub fn exec_ok(&self, container_id: &str, cmd: &[&str]) -> Result<String> {
        let r = self.exec_sync(container_id, cmd, Duration::from_secs(10))?;
        if r.exit_code != 0 {
            bail!(
                "ExecSync {cmd:?} in {container_id} exited {}: {}{}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    /// ImageStatus: the image as the CRI knows it, or None.
    pub fn image_status(&self, image: &str) -> Result<Option<Image>> {
        let r: ImageStatusResponse = self.call(
            IMAGE_SERVICE,
            "ImageStatus",
            ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            },
            CRI_TIMEOUT,
        )?;
        Ok(r.image)
    }

    /// Waits until the CRI knows `image` (an image imported with ctr reaches the CRI's image
    /// store through an event, shortly after the import).
    pub fn wait_for_image(&self, image: &str, timeout: Duration) -> Result<Image> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.image_status(image)? {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("the CRI does not know image {image} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The containerd namespace in which the CRI keeps pods, containers and images.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// TOML for [`crate::NodeOptions::extra_config`] of a node serving the CRI: its sandbox (pause)
/// image, and `restrict_oom_score_adj`, which keeps the CRI from asking runc for an
/// `oom_score_adj` below containerd's own (-998 for a sandbox): that needs CAP_SYS_RESOURCE,
/// which a test machine running in a container may lack (runc then fails with "failed to
/// update /proc/self/oom_score_adj: Permission denied").
pub fn node_config(sandbox_image: &str) -> String {
    format!(
        "[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = '{sandbox_image}'\n\n\
         [plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = true\n"
    )
}

/// Imports `image` into the CRI's namespace ([`CRI_NAMESPACE`]) of `node`, unpacked for the
/// default snapshotter, as `ctr -n k8s.io images import` does for an air-gapped node.
pub fn import_for_cri(node: &crate::Node, image: &crate::TestImage) -> Result<()> {
    let mut cmd = std::process::Command::new("ctr");
    cmd.arg("--address")
        .arg(node.address())
        .args(["--namespace", CRI_NAMESPACE, "images", "import"])
        .arg(&image.archive);
    let out = crate::command::output_with_timeout(&mut cmd, crate::node::CTR_TIMEOUT)
        .with_context(|| format!("running {}", crate::command::describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` on node {} failed ({}): {}",
            crate::command::describe(&cmd),
            node.name(),
            crate::command::status_text(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
