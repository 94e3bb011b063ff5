//! The controller's Kubernetes migration driver (the ordering is described in [`super`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use super::{
    KubeApi, KubeError, KubeIdentity, KubeReport, KubeSendRequest, KubeStage as Stage,
    WorkloadAction, WorkloadStatus, WorkloadsRequest, label_selector, pin_patch, scale_patch,
};
use crate::controller::{Controller, ControllerError, MigrateRequest, lock};
use crate::migration::{Migration, Phase, Target};
use crate::node_client::NodeCallError;
use crate::registry::NodeInfo;

/// The Kubernetes API and how often to poll it.
#[derive(Clone)]
pub struct KubeSettings {
    /// The API.
    pub api: Arc<dyn KubeApi>,
    /// Interval between pod listings while waiting.
    pub poll: Duration,
}

/// What the driver moves; journaled in the record's [`KubeReport`], from which a restarted
/// controller rebuilds it ([`Plan::from_record`]).
pub(crate) struct Plan {
    pub(crate) namespace: String,
    pub(crate) deployment: String,
    pub(crate) selector: String,
    pub(crate) replicas: i32,
    pub(crate) identities: Vec<KubeIdentity>,
}

impl Plan {
    /// The plan a record journaled, or `None` for a record written before plans were
    /// journaled (or one that is not a Kubernetes migration).
    pub(crate) fn from_record(m: &Migration) -> Option<Self> {
        let k = m.kubernetes.as_ref()?;
        if k.selector.is_empty() || k.identities.is_empty() || k.stage.is_none() {
            return None;
        }
        Some(Self {
            namespace: m.namespace.clone(),
            deployment: k.deployment.clone(),
            selector: k.selector.clone(),
            replicas: k.replicas,
            identities: k.identities.clone(),
        })
    }
}

/// What a recovery did: its steps, and whether the workload runs on the origin again.
pub(crate) struct Undone {
    pub(crate) recovery: Vec<String>,
    pub(crate) restored: bool,
}

fn kube_err(e: KubeError) -> ControllerError {
    if e.status == Some(404) {
        ControllerError::NotFound(e.message)
    } else {
        ControllerError::Kube(e)
    }
}

fn bad(message: String) -> ControllerError {
    ControllerError::BadRequest {
        message,
        expected: "a Deployment with replicas: 1, a matchLabels selector and its pod on originNode"
            .into(),
    }
}

impl Controller {
    /// Validates a Kubernetes migration of `req.deployment` and starts it in the background.
    pub(crate) async fn start_kube(
        self: &Arc<Self>,
        kube: KubeSettings,
        req: MigrateRequest,
    ) -> Result<Migration, ControllerError> {
        let (namespace, target) = self.validate(&req)?;
        let Target::Deployment(deployment) = target.clone() else {
            return Err(bad("Kubernetes mode migrates deployments only".into()));
        };
        let origin = self.node(&req.origin_node, "origin")?;
        let dest = self.node(&req.dest_node, "destination")?;
        let key = (namespace.clone(), target.clone());
        let id = self.claim(&key)?;
        let plan = match self.plan(&kube, &namespace, &deployment, &origin).await {
            Ok(p) => p,
            Err(e) => {
                lock(&self.active).remove(&key);
                return Err(e);
            }
        };
        let mut record = Migration::new(
            id.clone(),
            target,
            namespace,
            origin.name.clone(),
            dest.name.clone(),
        );
        record.containers = plan
            .identities
            .iter()
            .map(|i| i.container.clone())
            .collect();
        record.kubernetes = Some(KubeReport {
            deployment: deployment.clone(),
            replicas: plan.replicas,
            selector: plan.selector.clone(),
            identities: plan.identities.clone(),
            stage: Some(Stage::BeforeStop),
            ..KubeReport::default()
        });
        let old_pods = self
            .pods_on(&kube, &plan, &origin.name)
            .await
            .unwrap_or_default();
        if let Some(k) = record.kubernetes.as_mut() {
            k.old_pods = old_pods;
        }
        self.accept(&key, &record)?;
        info!(migration = %id, deployment = %deployment, origin = %origin.name, dest = %dest.name,
              "kubernetes migration accepted");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.drive_kube(&kube, &plan, &id, &origin, &dest).await;
            lock(&this.active).remove(&key);
        });
        Ok(record)
    }

    async fn plan(
        &self,
        kube: &KubeSettings,
        namespace: &str,
        deployment: &str,
        origin: &NodeInfo,
    ) -> Result<Plan, ControllerError> {
        let d = kube
            .api
            .get_deployment(namespace, deployment)
            .await
            .map_err(kube_err)?;
        let replicas = d.spec.replicas.unwrap_or(1);
        if replicas != 1 {
            return Err(bad(format!(
                "deployment {namespace}/{deployment} has {replicas} replicas; its replicas would share one checkpoint key, so only single-replica Deployments can be migrated with their state"
            )));
        }
        let selector = label_selector(&d.spec.selector).map_err(bad)?;
        let pods: Vec<_> = kube
            .api
            .list_pods(namespace, &selector, Some(&origin.name))
            .await
            .map_err(kube_err)?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if pods.is_empty() {
            return Err(ControllerError::NotFound(format!(
                "no pod of deployment {namespace}/{deployment} ({selector}) on node {}",
                origin.name
            )));
        }
        let identities = pods
            .iter()
            .flat_map(|p| {
                let workload = p.workload();
                p.spec.containers.iter().map(move |c| KubeIdentity {
                    namespace: namespace.to_string(),
                    workload: workload.clone(),
                    container: c.name.clone(),
                })
            })
            .collect();
        Ok(Plan {
            namespace: namespace.to_string(),
            deployment: deployment.to_string(),
            selector,
            replicas,
            identities,
        })
    }

    pub(crate) async fn pods_on(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        node: &str,
    ) -> Result<Vec<String>, KubeError> {
        Ok(kube
            .api
            .list_pods(&plan.namespace, &plan.selector, Some(node))
            .await?
            .into_iter()
            .map(|p| p.metadata.name)
            .collect())
    }

    pub(crate) fn step(&self, id: &str, step: String) {
        info!(migration = %id, "{step}");
        self.update(id, |m| {
            if let Some(k) = m.kubernetes.as_mut() {
                k.steps.push(step);
            }
        });
    }

    pub(crate) async fn workloads(
        &self,
        node: &NodeInfo,
        id: &str,
        plan: &Plan,
        action: WorkloadAction,
    ) -> Result<Vec<WorkloadStatus>, NodeCallError> {
        self.nodes_api
            .kube_workloads(
                node,
                &WorkloadsRequest {
                    migration: id.to_string(),
                    action,
                    identities: plan.identities.clone(),
                },
            )
            .await
    }

    async fn drive_kube(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        id: &str,
        origin: &NodeInfo,
        dest: &NodeInfo,
    ) {
        let stage = Mutex::new(Stage::BeforeStop);
        let run = self.run_kube(kube, plan, id, origin, dest, &stage);
        let outcome = self.within_timeout(id, run).await;
        let stage = *lock(&stage);
        match outcome {
            // As outside Kubernetes: `run_kube` enters `finishing` last, with no await after.
            Ok(()) => self.finish_kube(plan, id, origin).await,
            Err(reason) => {
                self.recover_kube(kube, plan, id, origin, dest, stage, reason)
                    .await
            }
        }
    }

    /// The new pod runs on the destination from the checkpoint (`finishing`): the origin's
    /// marks and checkpoint go, and the migration is done.
    pub(crate) async fn finish_kube(&self, plan: &Plan, id: &str, origin: &NodeInfo) {
        match self
            .workloads(origin, id, plan, WorkloadAction::Discard)
            .await
        {
            Ok(_) => self.step(id, format!("removed the checkpoint from {}", origin.name)),
            Err(e) => self.update(id, |m| m.warnings.push(format!("origin cleanup: {e}"))),
        }
        // Done only once the origin is cleaned up, as outside Kubernetes: a client that
        // sees `done` finds no mark nor checkpoint of the workload left on the origin.
        self.advance(id, Phase::Done);
        self.finished(id);
        info!(migration = %id, "kubernetes migration done");
    }

    /// Sets the journaled stage of `id` and writes the record before the patch that reaches
    /// it: the patch is not made unless a restarted controller would know it may have been.
    fn journal_stage(&self, id: &str, stage: Stage, step: &str) -> Result<(), String> {
        self.update(id, |m| {
            if let Some(k) = m.kubernetes.as_mut() {
                k.stage = Some(stage);
            }
        });
        self.persist_before(id, step)
    }

    async fn run_kube(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        id: &str,
        origin: &NodeInfo,
        dest: &NodeInfo,
        stage: &Mutex<Stage>,
    ) -> Result<(), String> {
        let (ns, name) = (plan.namespace.as_str(), plan.deployment.as_str());
        self.advance(id, Phase::Checkpointing);
        self.persist_before(id, "marking the workload")?;
        self.workloads(origin, id, plan, WorkloadAction::Mark)
            .await
            .map_err(|e| e.to_string())?;
        self.step(
            id,
            format!(
                "marked {} container(s) on {}",
                plan.identities.len(),
                origin.name
            ),
        );
        self.journal_stage(id, Stage::Stopped, "scaling to 0")?;
        *lock(stage) = Stage::Stopped;
        kube.api
            .patch_deployment(ns, name, &scale_patch(0))
            .await
            .map_err(|e| e.to_string())?;
        self.step(id, "scaled to 0 replicas".into());
        while !self
            .pods_on(kube, plan, &origin.name)
            .await
            .map_err(|e| e.to_string())?
            .is_empty()
        {
            tokio::time::sleep(kube.poll).await;
        }
        self.step(id, format!("pod gone from {}", origin.name));
        let status = self
            .workloads(origin, id, plan, WorkloadAction::Status)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(missing) = status.iter().find(|s| !s.pending) {
            return Err(format!(
                "the pod stopped but {} has no checkpoint of {}; did the shim see the mark?",
                origin.name, missing.identity
            ));
        }
        let bytes = status.iter().map(|s| s.bytes).sum();
        self.update(id, |m| m.checkpoint_bytes = bytes);
        self.advance(id, Phase::Transferring);
        self.persist_or_warn(id);
        let sent = self
            .nodes_api
            .kube_send(
                origin,
                &KubeSendRequest {
                    migration: id.to_string(),
                    identities: plan.identities.clone(),
                    destination: dest.address.clone(),
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        self.update(id, |m| m.bytes_transferred = sent.wire_bytes);
        self.step(id, format!("checkpoint streamed to {}", dest.name));
        self.advance(id, Phase::Restoring);
        self.journal_stage(id, Stage::ScaledUp, "the scale-up")?;
        kube.api
            .patch_deployment(ns, name, &pin_patch(&dest.name, plan.replicas))
            .await
            .map_err(|e| e.to_string())?;
        *lock(stage) = Stage::ScaledUp;
        self.step(
            id,
            format!(
                "pinned to {} and scaled to {} replica(s)",
                dest.name, plan.replicas
            ),
        );
        self.persist_or_warn(id);
        self.wait_restored(kube, plan, id, dest).await
    }

    /// Waits until the new pod is Running and ready on `dest` and `dest` reports every
    /// checkpoint consumed (the shim removes it once restored), then records it and enters
    /// `finishing`: from then on a restarted controller only finishes the migration.
    pub(crate) async fn wait_restored(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        id: &str,
        dest: &NodeInfo,
    ) -> Result<(), String> {
        let new_pods = loop {
            let running: Vec<String> = kube
                .api
                .list_pods(&plan.namespace, &plan.selector, Some(&dest.name))
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|p| p.is_running_and_ready())
                .map(|p| p.metadata.name)
                .collect();
            if !running.is_empty() {
                let status = self
                    .workloads(dest, id, plan, WorkloadAction::Status)
                    .await
                    .map_err(|e| e.to_string())?;
                if status.iter().all(|s| !s.pending) {
                    break running;
                }
            }
            tokio::time::sleep(kube.poll).await;
        };
        self.step(
            id,
            format!(
                "{} running on {} from the checkpoint",
                new_pods.join(","),
                dest.name
            ),
        );
        self.update(id, |m| {
            if let Some(k) = m.kubernetes.as_mut() {
                k.new_pods = new_pods;
                k.state_restored = true;
            }
        });
        self.enter_finishing(id);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn recover_kube(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        id: &str,
        origin: &NodeInfo,
        dest: &NodeInfo,
        stage: Stage,
        reason: String,
    ) {
        warn!(migration = %id, %reason, ?stage, "kubernetes migration failed; recovering");
        let Undone { recovery, restored } = self
            .undo_kube(kube, plan, id, origin, (&dest.name, Some(dest)), stage)
            .await;
        self.end_failed(id, reason, recovery, restored);
    }

    /// Undoes what the driver did up to `stage`: `recover_kube` without the record's end, which
    /// a restarted controller words itself. `dest` is the destination's name and, when it is
    /// registered, its agent.
    pub(crate) async fn undo_kube(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        id: &str,
        origin: &NodeInfo,
        dest: (&str, Option<&NodeInfo>),
        stage: Stage,
    ) -> Undone {
        let (dest_name, dest) = dest;
        let mut recovery = Vec::new();
        let mut restored = false;
        let note = |r: Result<Vec<WorkloadStatus>, NodeCallError>, done: String| match r {
            Ok(_) => done,
            Err(e) => format!("FAILED: {done}: {e}"),
        };
        match stage {
            Stage::BeforeStop => {
                let r = self
                    .workloads(origin, id, plan, WorkloadAction::Unmark)
                    .await;
                recovery.push(note(r, format!("removed the marks on {}", origin.name)));
            }
            Stage::Stopped => {
                match dest {
                    Some(dest) => {
                        let r = self
                            .workloads(dest, id, plan, WorkloadAction::Discard)
                            .await;
                        recovery.push(note(
                            r,
                            format!("removed the checkpoint from {}", dest.name),
                        ));
                    }
                    None => recovery.push(format!(
                        "{dest_name} is not registered: a copy of the checkpoint it may hold was not removed"
                    )),
                }
                let r = self
                    .workloads(origin, id, plan, WorkloadAction::Unmark)
                    .await;
                recovery.push(note(r, format!("removed the marks on {}", origin.name)));
                let patch = pin_patch(&origin.name, plan.replicas);
                match kube
                    .api
                    .patch_deployment(&plan.namespace, &plan.deployment, &patch)
                    .await
                {
                    Ok(_) => {
                        restored = true;
                        recovery.push(format!(
                            "pinned to {} and scaled back to {}: the pod restores from the origin's checkpoint",
                            origin.name, plan.replicas
                        ));
                    }
                    Err(e) => recovery.push(format!(
                        "SCALING BACK FAILED, the deployment has 0 replicas: {e}"
                    )),
                }
            }
            Stage::ScaledUp => recovery.push(format!(
                "the deployment stays pinned to {dest_name} with {} replica(s); {} keeps its checkpoint",
                plan.replicas, origin.name
            )),
        }
        Undone { recovery, restored }
    }
}
