//! Kubernetes mode of the controller: `POST /migrate {"deployment": ..., "namespace": ...}` moves
//! a Deployment's pod from one node to another with its state, when the controller runs with
//! a kubeconfig or in-cluster credentials (`--kube`).
//!
//! # Ordering
//!
//! The new pod must not start on the destination before the checkpoint has arrived there (the
//! shim only restores when, at create, a checkpoint is waiting for the workload; otherwise the
//! pod starts fresh and the state is lost). The simplest design that guarantees it needs no
//! change to the shim and works whatever the Deployment's strategy is: **scale to zero first**.
//!
//! ```text
//! 1 checkpointing  origin agent: migration mark for k8s_<ns>_<workload>_<container> (each
//!                  container of the pod); patch replicas: 0; poll pods on the origin until
//!                  none is left (the kubelet only forgets a pod after StopContainer returned,
//!                  and the shim checkpoints before it stops); origin agent: the checkpoint is
//!                  in its store
//! 2 transferring   origin agent streams the checkpoint(s) to the destination agent
//! 3 restoring      one patch: node affinity kubernetes.io/hostname In [destNode] + replicas
//!                  back to the original count; poll until the new pod is Running and ready on
//!                  the destination and the destination agent reports the checkpoint consumed
//!                  (the shim removes it after a successful restore)
//! 4 finishing      (the new pod runs from the checkpoint) origin agent: remove marks and the
//!                  origin's copy of the checkpoint; then done
//! ```
//!
//! Alternatives not taken: a rolling update starts the new pod before the old one stops (no
//! checkpoint yet); `Recreate` orders stop before start but leaves no gap for the transfer;
//! a shim that blocks at create until a pending mark is fulfilled needs a new protocol between
//! agent and shim and a bound on how long the kubelet tolerates a slow CreateContainer.
//! Scaling to zero costs the scheduling and image pull on the destination in the downtime.
//!
//! Failure before the scale-down: marks removed, nothing stopped (`failed`). Failure after it
//! (no checkpoint, transfer): the destination's copy is removed and the Deployment is pinned
//! to the *origin* and scaled back, so the pod restores from the origin's own checkpoint
//! (`rolled_back`; remove the affinity afterwards if wanted). Failure after the scale-up: the
//! record says so and the origin keeps its checkpoint.
//!
//! A controller that restarts mid-migration resolves it from the plan and stage the record
//! journals ([`KubeReport`], [`KubeStage`]): finished when the new pod already runs from the
//! checkpoint, otherwise recovered as above for the stage the Deployment shows it reached
//! (`resume.rs`).
//!
//! # Replicas
//!
//! The checkpoint key is per workload and container, not per replica, so replicas of one
//! Deployment would share it: only Deployments with `replicas: 1` are accepted (400 otherwise).
//!
//! # Client
//!
//! [`KubeApi`] is the seam (get and patch a Deployment, list pods by label and field selector;
//! pods are polled, not watched, which is enough at migration timescales). [`client::HttpKube`]
//! implements it with reqwest and JSON rather than kube-rs: the four calls need no generated
//! types, and kube-rs with k8s-openapi, hyper-util, tower and a TLS stack is several minutes of
//! extra build on 2 cores for them (the lean client adds only reqwest's `rustls-tls`).

pub mod agent;
pub mod client;
pub mod migrate;
mod resume;

use std::collections::BTreeMap;

use async_trait::async_trait;
use mig_checkpoint::WorkloadIdentity;
use serde::{Deserialize, Serialize};

/// The label the destination is chosen by.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// Pod annotation naming the workload a checkpoint is keyed by (as the shim reads it).
pub const WORKLOAD_ANNOTATION: &str = "mig.dev/workload";

/// A Kubernetes API call that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("kubernetes API: {message}")]
pub struct KubeError {
    /// HTTP status, when the API server answered.
    pub status: Option<u16>,
    /// What went wrong (the API server's `Status.message` when it sent one).
    pub message: String,
}

/// Object metadata (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Set while the object is being deleted.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
}

/// A container of a pod spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    /// Its name.
    pub name: String,
}

/// A pod spec (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Containers (init containers are not migrated).
    #[serde(default)]
    pub containers: Vec<Container>,
    /// The node the pod is bound to.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Scheduling constraints (read for the node a Deployment is pinned to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
}

/// A label selector.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Exact labels.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements (not supported here).
    #[serde(default)]
    pub match_expressions: Vec<serde_json::Value>,
}

/// A pod template.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodTemplate {
    /// Metadata of the pods.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec of the pods.
    #[serde(default)]
    pub spec: PodSpec,
}

/// A Deployment's spec (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeploymentSpec {
    /// Desired replicas (the API defaults it to 1).
    #[serde(default)]
    pub replicas: Option<i32>,
    /// Which pods belong to it.
    #[serde(default)]
    pub selector: LabelSelector,
    /// The pod template.
    #[serde(default)]
    pub template: PodTemplate,
}

/// `apps/v1` Deployment (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Deployment {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: DeploymentSpec,
}

impl Deployment {
    /// Its desired replicas (the API defaults a missing count to 1).
    pub fn replicas(&self) -> i32 {
        self.spec.replicas.unwrap_or(1)
    }

    /// The node its pods are pinned to, when its affinity is exactly what [`pin_patch`] writes
    /// (one required term: `kubernetes.io/hostname In [node]`).
    pub fn pinned_to(&self) -> Option<&str> {
        let terms = self
            .spec
            .template
            .spec
            .affinity
            .as_ref()?
            .pointer(
                "/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms",
            )?
            .as_array()?;
        let [term] = terms.as_slice() else {
            return None;
        };
        let [expression] = term.get("matchExpressions")?.as_array()?.as_slice() else {
            return None;
        };
        if expression.get("key")?.as_str()? != HOSTNAME_LABEL
            || expression.get("operator")?.as_str()? != "In"
        {
            return None;
        }
        match expression.get("values")?.as_array()?.as_slice() {
            [node] => node.as_str(),
            _ => None,
        }
    }
}

/// A container's status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// Container name.
    pub name: String,
    /// Whether it passes its readiness probe (true when it has none and runs).
    #[serde(default)]
    pub ready: bool,
}

/// A pod's status (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Per-container status.
    #[serde(default)]
    pub container_statuses: Vec<ContainerStatus>,
}

/// A pod (the fields used here).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pod {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status.
    #[serde(default)]
    pub status: PodStatus,
}

impl Pod {
    /// The workload its checkpoints are keyed by, as the shim computes it.
    pub fn workload(&self) -> String {
        self.metadata
            .annotations
            .get(WORKLOAD_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| mig_checkpoint::workload_from_pod_name(&self.metadata.name).into())
    }

    /// Running, not being deleted, every container ready.
    pub fn is_running_and_ready(&self) -> bool {
        self.metadata.deletion_timestamp.is_none()
            && self.status.phase.as_deref() == Some("Running")
            && !self.status.container_statuses.is_empty()
            && self.status.container_statuses.iter().all(|c| c.ready)
    }
}

/// The Kubernetes API calls the controller needs.
#[async_trait]
pub trait KubeApi: Send + Sync {
    /// `GET /apis/apps/v1/namespaces/{ns}/deployments/{name}`.
    async fn get_deployment(&self, namespace: &str, name: &str) -> Result<Deployment, KubeError>;
    /// `GET /api/v1/namespaces/{ns}/pods?labelSelector=..&fieldSelector=spec.nodeName=..`.
    async fn list_pods(
        &self,
        namespace: &str,
        label_selector: &str,
        node: Option<&str>,
    ) -> Result<Vec<Pod>, KubeError>;
    /// `PATCH` of a Deployment with `application/merge-patch+json`.
    async fn patch_deployment(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Deployment, KubeError>;
}

/// `k=v,k2=v2` from a selector's `matchLabels`.
pub fn label_selector(selector: &LabelSelector) -> Result<String, String> {
    if !selector.match_expressions.is_empty() {
        return Err(
            "the Deployment's selector uses matchExpressions; only matchLabels is supported".into(),
        );
    }
    if selector.match_labels.is_empty() {
        return Err("the Deployment's selector has no matchLabels".into());
    }
    Ok(selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// The merge patch that pins a Deployment's pods to `node` with `replicas` replicas.
pub fn pin_patch(node: &str, replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "spec": {
            "replicas": replicas,
            "template": {"spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [
                        {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}
                    ]}
                ]}
            }}}}
        }
    })
}

/// The merge patch that scales a Deployment.
pub fn scale_patch(replicas: i32) -> serde_json::Value {
    serde_json::json!({"spec": {"replicas": replicas}})
}

/// One container of a Kubernetes workload, as the shim keys its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The workload (Deployment name, or the pod's `mig.dev/workload`).
    pub workload: String,
    /// The container's name.
    pub container: String,
}

impl KubeIdentity {
    /// The checkpoint identity.
    pub fn identity(&self) -> Result<WorkloadIdentity, mig_checkpoint::Error> {
        WorkloadIdentity::kubernetes(&self.namespace, &self.workload, &self.container)
    }
}

impl std::fmt::Display for KubeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} container {}",
            self.namespace, self.workload, self.container
        )
    }
}

/// What `POST /agent/v1/kube/workloads` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadAction {
    /// Write the migration marks: the next stop checkpoints.
    Mark,
    /// Remove the marks.
    Unmark,
    /// Remove the marks and the pending checkpoints.
    Discard,
    /// Only report.
    Status,
}

/// `POST /agent/v1/kube/workloads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadsRequest {
    /// The migration.
    pub migration: String,
    /// What to do.
    pub action: WorkloadAction,
    /// The containers.
    pub identities: Vec<KubeIdentity>,
}

/// One container's state on a node, after the action.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// The container.
    pub identity: KubeIdentity,
    /// A migration mark is set.
    pub marked: bool,
    /// A checkpoint is waiting in the store (not yet restored).
    pub pending: bool,
    /// Its size.
    pub bytes: u64,
}

/// `POST /agent/v1/kube/send`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubeSendRequest {
    /// The migration.
    pub migration: String,
    /// The containers whose checkpoints to send.
    pub identities: Vec<KubeIdentity>,
    /// The destination agent's base URL.
    pub destination: String,
}

/// How far a Kubernetes migration may have got, which decides its recovery.
///
/// The driver journals a stage *before* the Deployment patch that reaches it: a journaled
/// stage says the patch may have been made, and a controller that restarts reads the
/// Deployment to learn whether it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeStage {
    /// Nothing stopped yet (the origin may hold migration marks).
    BeforeStop,
    /// Scaled to zero: the pod stopped (or is stopping) on the origin, with a checkpoint.
    Stopped,
    /// Pinned to the destination and scaled back up.
    ScaledUp,
}

impl KubeStage {
    /// How the record and the log name it.
    pub fn as_str(self) -> &'static str {
        match self {
            KubeStage::BeforeStop => "before the stop",
            KubeStage::Stopped => "scaled to 0",
            KubeStage::ScaledUp => "pinned to the destination and scaled up",
        }
    }
}

/// The Kubernetes side of a migration record.
///
/// `selector`, `identities` and `stage` are what a restarted controller needs to resolve the
/// migration; records written before they existed read back without them (and are then not
/// resumed, only reported).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeReport {
    /// The Deployment.
    pub deployment: String,
    /// Its replicas before (and after) the migration.
    pub replicas: i32,
    /// Its pods' label selector (`k=v,...`).
    #[serde(default)]
    pub selector: String,
    /// The containers whose checkpoints move.
    #[serde(default)]
    pub identities: Vec<KubeIdentity>,
    /// How far the migration may have got (see [`KubeStage`]).
    #[serde(default)]
    pub stage: Option<KubeStage>,
    /// The pods that stopped on the origin.
    pub old_pods: Vec<String>,
    /// The pods running on the destination.
    pub new_pods: Vec<String>,
    /// Every container's checkpoint was restored (consumed) on the destination.
    pub state_restored: bool,
    /// What was done, in order.
    pub steps: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_journaled_before_plans_were_reads_back_without_one() {
        let old = serde_json::json!({
            "deployment": "mosquitto", "replicas": 1, "oldPods": ["p"], "newPods": [],
            "stateRestored": false, "steps": ["scaled to 0 replicas"]
        });
        let report: KubeReport = serde_json::from_value(old).expect("old record");
        assert_eq!(report.deployment, "mosquitto");
        assert!(report.selector.is_empty() && report.identities.is_empty());
        assert_eq!(report.stage, None);
        let mut new = report.clone();
        new.stage = Some(KubeStage::ScaledUp);
        let json = serde_json::to_value(&new).expect("json");
        assert_eq!(json["stage"], "scaled_up");
        assert_eq!(
            serde_json::from_value::<KubeReport>(json).expect("back"),
            new
        );
    }

    #[test]
    fn the_pinned_node_is_read_from_the_affinity_the_pin_patch_writes() {
        let mut d = Deployment::default();
        assert_eq!((d.replicas(), d.pinned_to()), (1, None));
        let patch = pin_patch("node02", 1);
        d.spec.template.spec.affinity = Some(patch["spec"]["template"]["spec"]["affinity"].clone());
        d.spec.replicas = Some(0);
        assert_eq!((d.replicas(), d.pinned_to()), (0, Some("node02")));
        // Any other affinity pins to no node the driver chose.
        let mut other = patch["spec"]["template"]["spec"]["affinity"].clone();
        other["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["values"] = serde_json::json!(["node01", "node02"]);
        d.spec.template.spec.affinity = Some(other);
        assert_eq!(d.pinned_to(), None);
    }
}
