//! A controller that starts on a journal ([`crate::journal`]) with unfinished migrations in it
//! resolves each of them, in the background, before its workload can be migrated again: the
//! controller that drove it died, and the workload may be stopped on the origin.
//!
//! ```text
//! the destination runs every container      -> finishing: origin: finish         -> done, with a
//! (journaled as finishing, or it says so)   (cleanup); destination: restore         warning
//!                                           completes its bookkeeping
//! anything else                             destination: abort               -> rolled_back
//!                                           origin: rollback (restores from     (or failed)
//!                                           its own checkpoint; a no-op if it
//!                                           still runs)
//! ```
//!
//! A migration journaled as `finishing` runs on the destination (the driver journals that
//! phase when the restore returned): it is only finished, never rolled back, and an origin
//! that does not come back is a warning, not a failure. Only a migration journaled as
//! `restoring` may run on the destination without its record saying so: the restore is never
//! asked for before that phase is on disk. So only then is the destination asked, and waited
//! for while unreachable (up to the migration timeout); in earlier phases its abort is a
//! cleanup, tried once (its agent also removes what it created ahead when it restarts). The
//! destination is cleaned before the origin restores, so the two never run the workload
//! together. Nodes come from the journaled registry; one not there yet is waited for, up to
//! the migration timeout, as agents register again.
//!
//! A Kubernetes-mode migration is resolved from its journaled plan and stage by
//! [`crate::kube`]'s driver (`kube/resume.rs`); one whose new pod already ran is finished
//! (that takes the origin's agent only, not the Kubernetes API); one journaled before plans
//! were (or found by a controller not in Kubernetes mode) is only reported, naming what to
//! check.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::containerd::TaskStatus;
use crate::controller::{Controller, lock};
use crate::kube::migrate::{KubeSettings, Plan};
use crate::migration::{Migration, Phase};
use crate::node_client::NodeCallError;
use crate::protocol::ContainersRequest;
use crate::registry::NodeInfo;

/// What the destination said about the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// Every container runs there.
    Runs,
    /// It does not (or not every container).
    DoesNotRun,
    /// It could not be asked.
    Unknown,
}

impl Controller {
    /// Resolves, each in a background task, the migrations the journal held unfinished when
    /// this controller started ([`Controller::with_journal`]). Their outcome is in their
    /// records, logs and metrics like any other migration's.
    ///
    /// A controller in Kubernetes mode ([`Controller::with_kube`]) resumes its interrupted
    /// Kubernetes migrations from their journaled plan and stage; without it they are
    /// reported, not resumed.
    pub fn resume_interrupted(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        self.resume_all(self.kube.clone())
    }

    fn resume_all(
        self: &Arc<Self>,
        kube: Option<KubeSettings>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let ids = std::mem::take(&mut *lock(&self.interrupted));
        ids.into_iter()
            .map(|id| {
                let this = Arc::clone(self);
                let kube = kube.clone();
                tokio::spawn(async move {
                    // The claim `with_journal` took stays until the migration is resolved.
                    let key = this.migration(&id).map(|m| (m.namespace, m.target));
                    this.resume(&id, kube.as_ref()).await;
                    if let Some(key) = key {
                        let mut active = lock(&this.active);
                        if active.get(&key) == Some(&id) {
                            active.remove(&key);
                        }
                    }
                })
            })
            .collect()
    }

    async fn resume(&self, id: &str, kube: Option<&KubeSettings>) {
        let Some(record) = self.migration(id) else {
            return;
        };
        let why = format!("the controller restarted while {}", record.phase.as_str());
        warn!(migration = %id, phase = record.phase.as_str(), origin = %record.origin_node,
              dest = %record.dest_node, "resolving a migration interrupted by a controller restart");
        if let Some(k) = &record.kubernetes {
            match (kube, Plan::from_record(&record)) {
                (_, Some(plan)) if record.destination_running => {
                    return self.finish_kube_after_restart(&plan, &record, &why).await;
                }
                (Some(kube), Some(plan)) => {
                    return self.resume_kube(kube, plan, &record, why).await;
                }
                _ => {}
            }
            let not = if kube.is_none() {
                "this controller is not in Kubernetes mode"
            } else {
                "its record has no journaled plan (written by an older controller)"
            };
            let recovery = vec![format!(
                "Kubernetes-mode migration not resumed ({not}): check deployment {}/{} \
                 (replicas, node affinity) and the migration marks and checkpoints of its pod \
                 on {} and {}",
                record.namespace, k.deployment, record.origin_node, record.dest_node
            )];
            return self.conclude(id, why, recovery, false);
        }
        let deadline = Instant::now() + self.config.migration_timeout;
        // A destination that runs the workload decides without the origin, which is only to
        // be cleaned up then.
        let origin = self.wait_node(&record.origin_node, deadline).await;
        if origin.is_none() && !record.destination_running && record.phase != Phase::Restoring {
            return self.conclude(id, why, self.origin_missing(&record), false);
        }
        // Only a destination that may run the workload decides anything worth waiting for.
        let dest = if record.phase == Phase::Restoring && !record.destination_running {
            self.wait_node(&record.dest_node, deadline).await
        } else {
            self.node(&record.dest_node, "destination").ok()
        };
        let req = ContainersRequest {
            migration: id.to_string(),
            namespace: record.namespace.clone(),
            containers: record.containers.clone(),
            post_copy: record.post_copy,
            pages_from: None,
        };
        let destination = match (&dest, record.phase) {
            _ if record.destination_running => Destination::Runs,
            (Some(dest), Phase::Restoring) => self.destination(dest, &req, deadline).await,
            (None, Phase::Restoring) => Destination::Unknown,
            _ => Destination::DoesNotRun,
        };
        match (destination, origin) {
            (Destination::Runs, origin) => {
                self.complete(
                    id,
                    &record,
                    origin.as_ref(),
                    dest.as_ref(),
                    &req,
                    why,
                    deadline,
                )
                .await
            }
            (destination, Some(origin)) => {
                self.roll_back(id, &origin, dest.as_ref(), &req, destination, why, deadline)
                    .await
            }
            (_, None) => self.conclude(id, why, self.origin_missing(&record), false),
        }
    }

    /// The recovery of a migration whose origin did not register in time, and whose
    /// destination does not run the workload.
    fn origin_missing(&self, record: &Migration) -> Vec<String> {
        vec![format!(
            "ROLLBACK NOT POSSIBLE: origin node {} did not register within {:?}; the workload \
             may be stopped there with its checkpoint (starting its containers' tasks again \
             restores them)",
            record.origin_node, self.config.migration_timeout
        )]
    }

    /// The destination runs the workload: the migration is `finishing`, and what the
    /// interrupted controller had left to do is done. `origin` is `None` when it did not
    /// register in time: its cleanup is then left, and said so in a warning.
    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        id: &str,
        record: &Migration,
        origin: Option<&NodeInfo>,
        dest: Option<&NodeInfo>,
        req: &ContainersRequest,
        why: String,
        deadline: Instant,
    ) {
        self.enter_finishing(id);
        let mut warnings = Vec::new();
        if let (false, Some(dest)) = (record.destination_running, dest) {
            // The restore's own end (incoming marks, its records) may not have happened; asked
            // again, it starts nothing that runs. Nothing left to complete is a 404.
            match self.nodes_api.restore(dest, req).await {
                Ok(_) => {}
                Err(e) if e.status == Some(404) => {}
                Err(e) => warnings.push(format!("completing the restore on {}: {e}", dest.name)),
            }
        }
        match origin {
            Some(origin) => {
                if let Err(e) = self
                    .patiently(deadline, || self.nodes_api.finish(origin, req))
                    .await
                {
                    warn!(migration = %id, error = %e, "origin cleanup failed");
                    warnings.push(format!("origin cleanup: {e}"));
                }
            }
            None => {
                warn!(migration = %id, origin = %record.origin_node, "origin not registered; its cleanup is left");
                warnings.push(format!(
                    "origin cleanup not done: {} did not register within {:?}; its stopped \
                     containers [{}] and their checkpoint are left there",
                    record.origin_node,
                    self.config.migration_timeout,
                    req.containers.join(", ")
                ));
            }
        }
        self.update(id, |m| {
            m.warnings.push(format!(
                "{why}; {} already ran the workload, so the new controller finished the migration",
                m.dest_node
            ));
            m.warnings.extend(warnings);
            if let Err(e) = m.advance(Phase::Done) {
                warn!(migration = %id, error = %e, "state machine refused a transition");
            }
        });
        self.finished(id);
        info!(migration = %id, "interrupted migration finished: the workload runs on the destination");
    }

    /// The destination does not run the workload (or cannot say): it is cleaned, then the
    /// origin runs the workload again.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        id: &str,
        origin: &NodeInfo,
        dest: Option<&NodeInfo>,
        req: &ContainersRequest,
        destination: Destination,
        why: String,
        deadline: Instant,
    ) {
        let mut recovery = Vec::new();
        match dest {
            Some(dest) => {
                self.abort_destination(dest, req, &mut recovery).await;
            }
            None => recovery.push("the destination node is not registered: not cleaned".into()),
        }
        if destination == Destination::Unknown {
            let name = dest.map_or("the destination", |d| d.name.as_str());
            recovery.push(format!(
                "{name} could not be asked whether it runs the workload; if it comes back with \
                 containers [{}] running, delete them there: the origin runs the workload again",
                req.containers.join(", ")
            ));
        }
        let (outcome, restored) = match self
            .patiently(deadline, || self.nodes_api.rollback(origin, req))
            .await
        {
            Ok(report) => {
                let restored = !report.restored.is_empty();
                recovery.extend(report.done);
                let outcome = if restored {
                    format!("rolled back to {}", origin.name)
                } else {
                    format!("the workload still ran on {}", origin.name)
                };
                (outcome, restored)
            }
            Err(e) => {
                recovery.push(format!(
                    "ROLLBACK FAILED, the workload may not be running: {e}"
                ));
                (format!("rolling back to {} failed", origin.name), false)
            }
        };
        self.conclude(id, format!("{why}; {outcome}"), recovery, restored);
    }

    /// Ends an interrupted migration as failed or rolled back.
    pub(crate) fn conclude(&self, id: &str, reason: String, recovery: Vec<String>, restored: bool) {
        warn!(migration = %id, %reason, ?recovery, "interrupted migration resolved");
        self.end_failed(id, reason, recovery, restored);
    }

    /// Whether the destination runs every container of the migration.
    async fn destination(
        &self,
        dest: &NodeInfo,
        req: &ContainersRequest,
        deadline: Instant,
    ) -> Destination {
        match self
            .patiently(deadline, || self.nodes_api.status(dest, req))
            .await
        {
            Ok(states) => {
                let runs = !states.is_empty()
                    && states.iter().all(|s| s.task == Some(TaskStatus::Running));
                info!(migration = %req.migration, dest = %dest.name, ?states, "destination asked");
                if runs {
                    Destination::Runs
                } else {
                    Destination::DoesNotRun
                }
            }
            Err(e) => {
                warn!(migration = %req.migration, error = %e, "cannot ask the destination");
                Destination::Unknown
            }
        }
    }

    /// The node `name` once it is registered (the journal's registry, or an agent registering
    /// again), or `None` past `deadline`.
    pub(crate) async fn wait_node(&self, name: &str, deadline: Instant) -> Option<NodeInfo> {
        let mut logged = false;
        loop {
            if let Ok(node) = self.node(name, "") {
                return Some(node);
            }
            if Instant::now() >= deadline {
                return None;
            }
            if !logged {
                info!(node = %name, "waiting for the node to register");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Repeats `call` while its node cannot be reached, until `deadline`: after a restart the
    /// agents may be restarting too (in `--role all`, this very process's).
    async fn patiently<T, F, Fut>(&self, deadline: Instant, call: F) -> Result<T, NodeCallError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, NodeCallError>>,
    {
        let mut pause = Duration::from_millis(200);
        loop {
            match call().await {
                Err(e) if e.status.is_none() && Instant::now() + pause < deadline => {
                    warn!(error = %e, "node unreachable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }
}
