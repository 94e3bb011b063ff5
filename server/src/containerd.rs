//! The node agent's seam to containerd: the [`Containerd`] trait, its implementation [`Grpc`],
//! and the [`Ctr`] helper that implementation uses for container records.
//!
//! - [`Grpc`] ([`grpc`]) is the [`Containerd`] the agent uses. The task operations (status,
//!   kill, create, start, delete) are on a migration's critical path, so it speaks
//!   containerd's gRPC API directly over its unix socket: one call costs a round trip on a
//!   channel kept open, where spawning `ctr` costs 10-25 ms, and only the API can create a task
//!   without starting it ([`Containerd::create_task`]), so that the shim's Create can run ahead
//!   of the restore. The few messages it needs are declared by hand with prost (no protoc, no
//!   generated containerd protos).
//! - [`Ctr`] handles the container records (list by label, info, create, delete) through the
//!   `ctr` command line, for [`Grpc`]: they are off the critical path, and `ctr containers
//!   create` builds the OCI spec (image config, default mounts, namespaces) from the few
//!   options [`create_args`] rebuilds, which the API would leave to us. It has no task
//!   operations.
//!
//! Everything behind the trait is faked in the unit tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

pub mod grpc;

pub use grpc::Grpc;

/// The label that groups containers into a "deployment" outside Kubernetes.
pub const WORKLOAD_LABEL: &str = "mig.dev/workload";
/// The label that groups containers into a "pod" outside Kubernetes.
pub const POD_LABEL: &str = "mig.dev/pod";

/// What the destination needs to create a container again, as `ctr containers info` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// The containerd namespace.
    pub namespace: String,
    /// The container id.
    pub id: String,
    /// The image reference the container was created from.
    pub image: String,
    /// The runtime type (`io.containerd.mig.v2`).
    pub runtime: String,
    /// containerd labels (not OCI annotations).
    pub labels: BTreeMap<String, String>,
    /// The OCI runtime spec.
    pub spec: serde_json::Value,
}

/// A task's status as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused or pausing.
    Paused,
    /// Exited; the task still exists until deleted.
    Stopped,
    /// Anything else containerd reported.
    Unknown,
}

/// A containerd operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The container does not exist.
    #[error("container {namespace}/{id} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Container id.
        id: String,
    },
    /// The command failed or printed something unexpected.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its status and stderr, or what was wrong with its output.
        message: String,
    },
}

/// The containerd operations a migration needs. Implementations are per node (one socket):
/// [`Grpc`], and fakes in the tests.
#[async_trait]
pub trait Containerd: Send + Sync {
    /// Ids of the containers of `namespace` whose label `key` equals `value`.
    async fn list_by_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, ContainerdError>;
    /// The container's record.
    async fn info(&self, namespace: &str, id: &str) -> Result<ContainerInfo, ContainerdError>;
    /// The status of the container's task, or `None` when it has no task.
    async fn task_status(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<TaskStatus>, ContainerdError>;
    /// Sends `signal` (e.g. `SIGTERM`) to the task. With a migration mark in place our shim
    /// checkpoints before letting the task stop, and this returns only after that.
    async fn kill(&self, namespace: &str, id: &str, signal: &str) -> Result<(), ContainerdError>;
    /// Creates the container described by `info` (image, spec, labels) with `runtime`.
    async fn create(&self, info: &ContainerInfo, runtime: &str) -> Result<(), ContainerdError>;
    /// Creates the task of an existing container without starting it: containerd starts the
    /// shim and calls its Create (for our shim: the restore's preparation), and the task is
    /// then [`TaskStatus::Created`]. Its IO is discarded (no stdin, stdout, stderr nor
    /// terminal), as with `ctr tasks start --null-io`. Fails if the container already has a
    /// task, and with [`ContainerdError::NotFound`] if there is no such container.
    async fn create_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError>;
    /// Starts a task for an existing container, detached, with its IO discarded: the task made
    /// by [`Containerd::create_task`] if it is [`TaskStatus::Created`], else a new one (created
    /// and started). Fails if the container has a task in any other state.
    async fn start_task(&self, namespace: &str, id: &str) -> Result<(), ContainerdError>;
    /// Deletes the (stopped) task; `force` kills it first, and then a task that is not
    /// there, or goes away meanwhile, counts as deleted.
    async fn delete_task(
        &self,
        namespace: &str,
        id: &str,
        force: bool,
    ) -> Result<(), ContainerdError>;
    /// Deletes the container and its snapshot.
    async fn delete_container(&self, namespace: &str, id: &str) -> Result<(), ContainerdError>;
}

/// Container records (list by label, info, create, delete) through the `ctr` command line:
/// what [`Grpc`] delegates them to. Not a [`Containerd`]: it has no task operations.
#[derive(Debug, Clone)]
pub struct Ctr {
    /// `ctr` binary.
    pub binary: PathBuf,
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// How long one call may take, here and in [`Grpc`]'s API calls. A checkpoint-on-kill of a
    /// big container takes a while.
    pub timeout: Duration,
}

impl Ctr {
    /// `ctr` on PATH talking to `address`.
    pub fn new(address: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            binary: PathBuf::from("ctr"),
            address: address.into(),
            timeout,
        }
    }

    async fn run(&self, namespace: &str, args: &[String]) -> Result<String, ContainerdError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let command = format!(
            "ctr --address {} --namespace {namespace} {}",
            self.address.display(),
            args.join(" ")
        );
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| ContainerdError::Command {
                command: command.clone(),
                message: format!("no answer within {:?}", self.timeout),
            })?
            .map_err(|e| ContainerdError::Command {
                command: command.clone(),
                message: format!("cannot run: {e}"),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ContainerdError::Command {
                command,
                message: format!("{}: {stderr}", out.status),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Ids of the containers of `namespace` whose label `key` equals `value`.
    pub async fn list_by_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, ContainerdError> {
        // containerd's filter syntax quotes field names with dots and slashes, and values with
        // anything but alphanumerics; callers pass validated names, so no quote can appear.
        let filter = format!("labels.\"{key}\"==\"{value}\"");
        let out = self
            .run(namespace, &strings(&["containers", "list", "-q", &filter]))
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// The container's record; [`ContainerdError::NotFound`] if there is no such container.
    pub async fn info(&self, namespace: &str, id: &str) -> Result<ContainerInfo, ContainerdError> {
        let out = match self
            .run(namespace, &strings(&["containers", "info", id]))
            .await
        {
            Err(ContainerdError::Command { message, .. }) if message.contains("not found") => {
                return Err(ContainerdError::NotFound {
                    namespace: namespace.into(),
                    id: id.into(),
                });
            }
            other => other?,
        };
        parse_info(namespace, id, &out)
    }

    /// Creates the container described by `info` (image, spec, labels) with `runtime`, from
    /// the options [`create_args`] rebuilds.
    pub async fn create(&self, info: &ContainerInfo, runtime: &str) -> Result<(), ContainerdError> {
        let args = create_args(info, runtime).map_err(|message| ContainerdError::Command {
            command: format!("ctr containers create ... {}", info.id),
            message,
        })?;
        self.run(&info.namespace, &args).await.map(drop)
    }

    /// Deletes the container and its snapshot; [`ContainerdError::NotFound`] if there is no
    /// such container.
    pub async fn delete_container(&self, namespace: &str, id: &str) -> Result<(), ContainerdError> {
        match self
            .run(namespace, &strings(&["containers", "delete", id]))
            .await
        {
            Err(ContainerdError::Command { message, .. }) if message.contains("not found") => {
                Err(ContainerdError::NotFound {
                    namespace: namespace.into(),
                    id: id.into(),
                })
            }
            other => other.map(drop),
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Parses `ctr containers info` output (containerd's `containers.Container` as JSON).
pub fn parse_info(namespace: &str, id: &str, json: &str) -> Result<ContainerInfo, ContainerdError> {
    let bad = |message: String| ContainerdError::Command {
        command: format!("ctr containers info {id}"),
        message,
    };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("output is not JSON: {e}")))?;
    let image = v["Image"].as_str().unwrap_or_default().to_string();
    let runtime = v["Runtime"]["Name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let labels = v["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let spec = v["Spec"].clone();
    if !spec.is_object() {
        return Err(bad("output has no Spec object".into()));
    }
    Ok(ContainerInfo {
        namespace: namespace.into(),
        id: id.into(),
        image,
        runtime,
        labels,
        spec,
    })
}

/// Mount destinations `ctr` sets up itself; everything else in the spec was asked for.
const DEFAULT_MOUNTS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
    "/run",
];

/// The `ctr containers create` arguments that recreate `info` with `runtime`.
///
/// `ctr containers create --config spec.json` would take the spec verbatim but then creates no
/// rootfs snapshot, so the container could not start; instead the options that matter for a
/// restore are rebuilt from the spec: process (args, env, cwd, user, terminal), hostname,
/// joined namespaces (or host networking), bind mounts, annotations and labels. Other spec
/// settings take ctr's defaults; documented as a limitation in the README.
pub fn create_args(info: &ContainerInfo, runtime: &str) -> Result<Vec<String>, String> {
    let spec = &info.spec;
    let mut args = strings(&["containers", "create"]);
    args.push(format!("--runtime={runtime}"));
    for (k, v) in &info.labels {
        args.push(format!("--label={k}={v}"));
    }
    if let Some(annotations) = spec["annotations"].as_object() {
        for (k, v) in annotations {
            if let Some(v) = v.as_str() {
                args.push(format!("--annotation={k}={v}"));
            }
        }
    }
    let process = &spec["process"];
    for env in process["env"].as_array().into_iter().flatten() {
        if let Some(env) = env.as_str() {
            args.push(format!("--env={env}"));
        }
    }
    if let Some(cwd) = process["cwd"].as_str() {
        args.push(format!("--cwd={cwd}"));
    }
    if let (Some(uid), Some(gid)) = (
        process["user"]["uid"].as_u64(),
        process["user"]["gid"].as_u64(),
    ) {
        args.push(format!("--user={uid}:{gid}"));
    }
    if process["terminal"].as_bool() == Some(true) {
        args.push("--tty".into());
    }
    if let Some(hostname) = spec["hostname"].as_str().filter(|h| !h.is_empty()) {
        args.push(format!("--hostname={hostname}"));
    }
    let namespaces = spec["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut has_net = false;
    for ns in &namespaces {
        let kind = ns["type"].as_str().unwrap_or_default();
        if kind == "network" {
            has_net = true;
        }
        if let Some(path) = ns["path"].as_str().filter(|p| !p.is_empty()) {
            args.push(format!("--with-ns={kind}:{path}"));
        }
    }
    if !has_net {
        args.push("--net-host".into());
    }
    for mount in spec["mounts"].as_array().into_iter().flatten() {
        let dst = mount["destination"].as_str().unwrap_or_default();
        let options: Vec<&str> = mount["options"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.as_str())
            .collect();
        let is_bind = mount["type"].as_str() == Some("bind")
            || options.iter().any(|o| *o == "bind" || *o == "rbind");
        if !is_bind || DEFAULT_MOUNTS.contains(&dst) || dst == "/etc/resolv.conf" {
            continue;
        }
        let src = mount["source"].as_str().unwrap_or_default();
        if src.contains(',') || dst.contains(',') {
            return Err(format!(
                "bind mount {src} -> {dst} has a ',' that ctr's --mount syntax cannot express"
            ));
        }
        args.push(format!(
            "--mount=type=bind,src={src},dst={dst},options={}",
            options.join(":")
        ));
    }
    if info.image.is_empty() || info.image.starts_with('-') {
        return Err(format!(
            "container {} has no usable image ({:?})",
            info.id, info.image
        ));
    }
    args.push(info.image.clone());
    args.push(info.id.clone());
    for arg in process["args"].as_array().into_iter().flatten() {
        args.push(arg.as_str().unwrap_or_default().to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"{
        "ID": "counter",
        "Labels": {"mig.dev/workload": "counter", "io.containerd.image.config.stop-signal": "SIGTERM"},
        "Image": "docker.io/library/busybox:latest",
        "Runtime": {"Name": "io.containerd.runc.v2", "Options": null},
        "SnapshotKey": "counter",
        "Spec": {
            "process": {"args": ["sh", "-c", "i=0; while :; do i=$((i+1)); sleep 1; done"],
                        "env": ["PATH=/bin", "A=b"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "hostname": "",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}]}
        }
    }"#;

    #[test]
    fn parses_ctr_info() {
        let info = parse_info("default", "counter", INFO).expect("parse");
        assert_eq!(info.image, "docker.io/library/busybox:latest");
        assert_eq!(info.runtime, "io.containerd.runc.v2");
        assert_eq!(info.labels["mig.dev/workload"], "counter");
    }

    #[test]
    fn create_args_rebuild_process_namespaces_and_mounts() {
        let info = parse_info("default", "counter", INFO).expect("parse");
        let args = create_args(&info, "io.containerd.mig.v2").expect("args");
        let has = |a: &str| args.iter().any(|x| x == a);
        assert!(has("--runtime=io.containerd.mig.v2"));
        assert!(has("--label=mig.dev/workload=counter"));
        assert!(has("--env=A=b"));
        assert!(has("--with-ns=network:/var/run/netns/x"));
        assert!(!has("--net-host"));
        assert!(has(
            "--mount=type=bind,src=/srv/data,dst=/data,options=rbind:rw"
        ));
        let image_at = args
            .iter()
            .position(|a| a == "docker.io/library/busybox:latest")
            .expect("image");
        assert_eq!(args[image_at + 1], "counter");
        assert_eq!(
            args[image_at + 2..],
            ["sh", "-c", "i=0; while :; do i=$((i+1)); sleep 1; done"]
        );
    }

    #[test]
    fn no_network_namespace_means_host_network() {
        let mut info = parse_info("default", "counter", INFO).expect("parse");
        info.spec["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]);
        assert!(
            create_args(&info, "r")
                .expect("args")
                .contains(&"--net-host".to_string())
        );
    }
}
