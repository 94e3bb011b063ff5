//! A Kubernetes migration left unfinished by a controller that died, resolved by the next one
//! ([`crate::recovery`] hands it over, with the workload still claimed).
//!
//! The driver journals its stage *before* the Deployment patch that reaches it, so the journal
//! says which patch may have been made and the Deployment says whether it was:
//!
//! ```text
//! journaled    the Deployment now          so                then
//! before_stop  (not read)                  nothing stopped   origin unmarked           -> failed
//! stopped      replicas > 0                the scale to 0    origin unmarked, nothing  -> failed
//!                                          never landed (or  patched
//!                                          was undone)
//!              replicas 0                  stopped           wait until the origin has -> rolled_back
//!                                                            no pod (its checkpoint is
//!                                                            written), then roll back:
//!                                                            destination's copy removed,
//!                                                            origin unmarked, pinned to
//!                                                            the origin and scaled back
//! scaled_up    pinned to the destination,  scaled up         new pod ready there and   -> done (warning)
//!              replicas > 0                                  checkpoint consumed
//!                                                            (waited for): finish;
//!                                                            otherwise as the driver   -> failed
//!                                                            after the scale-up
//!              replicas 0, or pinned to    the scale-up      roll back as `stopped`    -> rolled_back
//!              the origin                  never landed (or
//!                                          was rolled back)
//!              anything else               changed by        nothing                   -> failed
//!                                          someone else
//! ```
//!
//! A record whose new pod already ran from the checkpoint (journaled `finishing`, whatever its
//! stage) never gets this far: it is only finished (origin's marks and checkpoint removed ->
//! done, with a warning), which needs the origin's agent, not the Deployment
//! ([`Controller::finish_kube_after_restart`]).
//!
//! Rolling back is preferred whenever the destination is not known to run the workload: the
//! origin keeps its checkpoint until a migration is done. The Deployment is only patched back
//! to the origin when it has no replica or is pinned there already, so a restart never starts
//! a second copy of the pod next to one that runs.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::migrate::{KubeSettings, Plan, Undone};
use super::{Deployment, KubeStage as Stage};
use crate::controller::Controller;
use crate::migration::{Migration, Phase};
use crate::registry::NodeInfo;

impl Controller {
    /// Resolves the interrupted Kubernetes migration `record`, whose plan the journal held.
    /// `why` says that the controller restarted and in which phase.
    pub(crate) async fn resume_kube(
        &self,
        kube: &KubeSettings,
        plan: Plan,
        record: &Migration,
        why: String,
    ) {
        let id = record.id.as_str();
        let journaled = record
            .kubernetes
            .as_ref()
            .and_then(|k| k.stage)
            .unwrap_or(Stage::BeforeStop);
        let (origin_name, dest_name) = (record.origin_node.as_str(), record.dest_node.as_str());
        let check = format!(
            "check deployment {}/{} (replicas, node affinity) and the migration marks and \
             checkpoints of its pod on {origin_name} and {dest_name}",
            plan.namespace, plan.deployment
        );
        let deadline = Instant::now() + self.config.migration_timeout;
        let Some(origin) = self.wait_node(origin_name, deadline).await else {
            let recovery = vec![format!(
                "ROLLBACK NOT POSSIBLE: origin node {origin_name} did not register within {:?}; {check}",
                self.config.migration_timeout
            )];
            return self.conclude(id, why, recovery, false);
        };
        // `at_zero`: the Deployment has no replica, so a pod on the origin is the old one, still
        // stopping; with replicas (a rollback already pinned it back) it is the restored one.
        let (stage, at_zero) = match journaled {
            Stage::BeforeStop => (Stage::BeforeStop, false),
            Stage::Stopped | Stage::ScaledUp => {
                let deployment = match self.read_deployment(kube, &plan, deadline).await {
                    Ok(d) => d,
                    Err(e) => {
                        let recovery = vec![format!(
                            "nothing was changed: the deployment could not be read ({e}); {check}"
                        )];
                        return self.conclude(id, why, recovery, false);
                    }
                };
                let (replicas, pinned) = (deployment.replicas(), deployment.pinned_to());
                self.step(
                    id,
                    format!(
                        "after the controller restarted: the deployment has {replicas} replica(s), pinned to {}",
                        pinned.unwrap_or("no node")
                    ),
                );
                let stage = match journaled {
                    Stage::Stopped if replicas > 0 => Stage::BeforeStop,
                    Stage::ScaledUp if replicas > 0 && pinned == Some(dest_name) => Stage::ScaledUp,
                    Stage::ScaledUp if replicas > 0 && pinned != Some(origin_name) => {
                        // Neither the driver nor its rollback leaves it so: someone else
                        // changed it, and a pod may run anywhere. Pinning it now could start a
                        // second copy.
                        let recovery = vec![format!(
                            "nothing was changed: the deployment has {replicas} replica(s) and is \
                             pinned to {}, which this migration did not do; {check}",
                            pinned.unwrap_or("no node")
                        )];
                        return self.conclude(id, why, recovery, false);
                    }
                    _ => Stage::Stopped,
                };
                (stage, replicas == 0)
            }
        };
        info!(migration = %id, journaled = journaled.as_str(), stage = stage.as_str(),
              "resuming an interrupted kubernetes migration");
        match stage {
            Stage::BeforeStop => {
                let dest = self.node(dest_name, "destination").ok();
                let Undone { recovery, .. } = self
                    .undo_kube(kube, &plan, id, &origin, (dest_name, dest.as_ref()), stage)
                    .await;
                let outcome = if journaled == Stage::BeforeStop {
                    format!("nothing had stopped: the pod still runs on {origin_name}")
                } else {
                    format!(
                        "the deployment still had replicas (the scale to 0 never happened, or \
                         was undone): its pod on {origin_name} was left as it was"
                    )
                };
                self.conclude(id, format!("{why}; {outcome}"), recovery, false);
            }
            Stage::Stopped => {
                let mut notes = Vec::new();
                // The origin's pod may still be stopping, its shim writing the checkpoint:
                // unmarked or replaced before that, it would restart without its state.
                if at_zero
                    && let Err(e) = self
                        .wait_origin_empty(kube, &plan, origin_name, deadline)
                        .await
                {
                    notes.push(format!(
                        "the pod on {origin_name} had not gone before the rollback: {e}"
                    ));
                }
                let dest = self.node(dest_name, "destination").ok();
                let Undone {
                    mut recovery,
                    restored,
                } = self
                    .undo_kube(kube, &plan, id, &origin, (dest_name, dest.as_ref()), stage)
                    .await;
                recovery.extend(notes);
                let outcome = if restored {
                    format!("rolled back to {origin_name}")
                } else {
                    format!("rolling back to {origin_name} failed")
                };
                self.conclude(id, format!("{why}; {outcome}"), recovery, restored);
            }
            Stage::ScaledUp => {
                // The destination decides: waited for, as it is the only node that may run
                // the workload.
                let Some(dest) = self.wait_node(dest_name, deadline).await else {
                    let Undone { recovery, .. } = self
                        .undo_kube(kube, &plan, id, &origin, (dest_name, None), stage)
                        .await;
                    let reason = format!(
                        "{why}; {dest_name} did not register within {:?}, so whether it runs \
                         the new pod from the checkpoint is unknown",
                        self.config.migration_timeout
                    );
                    return self.conclude(id, reason, recovery, false);
                };
                // A failed call is asked again: the API or the agent may be restarting too.
                let problem = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let waited =
                        tokio::time::timeout(left, self.wait_restored(kube, &plan, id, &dest))
                            .await;
                    match waited {
                        Ok(Ok(())) => {
                            self.finish_after_restart(&plan, id, Some(&origin), &why)
                                .await;
                            return;
                        }
                        Ok(Err(e)) if Instant::now() + kube.poll >= deadline => break e,
                        Ok(Err(e)) => {
                            warn!(migration = %id, error = %e, "cannot tell whether the new pod runs; asking again");
                            tokio::time::sleep(kube.poll).await;
                        }
                        Err(_) => {
                            break format!(
                                "the new pod was not running and ready from the checkpoint within {:?}",
                                self.config.migration_timeout
                            );
                        }
                    }
                };
                let Undone { recovery, .. } = self
                    .undo_kube(kube, &plan, id, &origin, (dest_name, Some(&dest)), stage)
                    .await;
                self.conclude(
                    id,
                    format!("{why}; on {dest_name}: {problem}"),
                    recovery,
                    false,
                );
            }
        }
    }

    /// The new pod ran from the checkpoint before the restart (the record is `finishing`, or
    /// an earlier controller journaled it running while `restoring`): only the origin's
    /// cleanup is left, which takes its agent, not the Kubernetes API.
    pub(crate) async fn finish_kube_after_restart(
        &self,
        plan: &Plan,
        record: &Migration,
        why: &str,
    ) {
        let deadline = Instant::now() + self.config.migration_timeout;
        let origin = self.wait_node(&record.origin_node, deadline).await;
        self.finish_after_restart(plan, &record.id, origin.as_ref(), why)
            .await;
    }

    /// The new pod runs on the destination from the checkpoint: what the interrupted driver
    /// had left to do. `origin` is `None` when it did not register in time: its cleanup is
    /// then left, and said so in a warning.
    async fn finish_after_restart(
        &self,
        plan: &Plan,
        id: &str,
        origin: Option<&NodeInfo>,
        why: &str,
    ) {
        self.enter_finishing(id);
        self.update(id, |m| {
            m.warnings.push(format!(
                "{why}; {} already ran the new pod from the checkpoint, so the new controller \
                 finished the migration",
                m.dest_node
            ))
        });
        let Some(origin) = origin else {
            warn!(migration = %id, "origin not registered; its cleanup is left");
            self.update(id, |m| {
                m.warnings.push(format!(
                    "origin cleanup not done: {} did not register within {:?}; the migration \
                     marks and checkpoint of deployment {}/{} are left there",
                    m.origin_node, self.config.migration_timeout, plan.namespace, plan.deployment
                ))
            });
            self.advance(id, Phase::Done);
            self.finished(id);
            return;
        };
        self.finish_kube(plan, id, origin).await;
    }

    /// The Deployment, asked again while the API cannot be reached, until `deadline`.
    async fn read_deployment(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        deadline: Instant,
    ) -> Result<Deployment, super::KubeError> {
        let mut pause = Duration::from_millis(200);
        loop {
            match kube
                .api
                .get_deployment(&plan.namespace, &plan.deployment)
                .await
            {
                Err(e) if e.status.is_none() && Instant::now() + pause < deadline => {
                    warn!(error = %e, "kubernetes API unreachable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Waits until no pod of the plan's is left on `node`, until `deadline`.
    async fn wait_origin_empty(
        &self,
        kube: &KubeSettings,
        plan: &Plan,
        node: &str,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            match self.pods_on(kube, plan, node).await {
                Ok(pods) if pods.is_empty() => return Ok(()),
                Ok(pods) if Instant::now() >= deadline => {
                    return Err(format!("{} still there", pods.join(",")));
                }
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                _ => tokio::time::sleep(kube.poll).await,
            }
        }
    }
}
