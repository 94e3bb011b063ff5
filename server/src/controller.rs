//! [`Controller`]: accepts migrations, drives them through the node agents, keeps the records.
//!
//! The order of a migration is what keeps the workload safe: the origin's containers are only
//! deleted after the destination reports them running, and every failure after the origin
//! stopped ends with the destination cleaned (abort) and the origin restored from its own
//! checkpoint (rollback).
//!
//! With a [`Journal`] every record is written to disk before each step that stops or moves the
//! workload, so that a controller that restarts mid-migration resolves it
//! ([`crate::recovery`]); a step whose record cannot be written is not taken.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mig_checkpoint::SafeName;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::journal::{Journal, JournalError, KEEP_TERMINAL, past_history_cap};
use crate::kube::KubeApi;
use crate::kube::migrate::KubeSettings;
use crate::migration::{Migration, Phase, Target};
use crate::node_client::{NodeApi, NodeCallError};
use crate::protocol::{ContainersRequest, PrepareRequest, ResolveRequest, SendRequest};
use crate::registry::{NodeInfo, PodInfo, Registry, normalise_address};

/// `POST /migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateRequest {
    /// Containers labelled `mig.dev/workload=<deployment>`.
    pub deployment: Option<String>,
    /// Containers labelled `mig.dev/pod=<pod>`.
    pub pod: Option<String>,
    /// One container id.
    pub container: Option<String>,
    /// containerd namespace (default: the controller's `--namespace`).
    pub namespace: Option<String>,
    /// Node to leave.
    pub origin_node: String,
    /// Node to go to.
    pub dest_node: String,
    /// Post-copy (lazy) migration: the origin checkpoints everything but the memory pages,
    /// the destination runs the workload at once and fetches the pages from the frozen
    /// origin as it touches them.
    #[serde(default)]
    pub post_copy: bool,
}

/// Why a request was refused; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request is invalid (400).
    #[error("{message}")]
    BadRequest {
        /// What was wrong.
        message: String,
        /// What would be accepted.
        expected: String,
    },
    /// A node or workload does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The workload is already migrating (409).
    #[error("{0}")]
    Conflict(String),
    /// A node agent failed while checking the request (502).
    #[error(transparent)]
    Node(#[from] NodeCallError),
    /// The Kubernetes API failed while checking the request (502).
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
    /// The migration could not be journaled, so it was not started (500).
    #[error("{0}; the migration was not started")]
    Journal(#[from] JournalError),
}

fn bad(message: impl Into<String>, expected: impl Into<String>) -> ControllerError {
    ControllerError::BadRequest {
        message: message.into(),
        expected: expected.into(),
    }
}

/// How the controller behaves.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Namespace used when a request names none.
    pub default_namespace: String,
    /// Scheme for node addresses registered without one.
    pub default_scheme: String,
    /// A migration running longer fails (and rolls back).
    pub migration_timeout: Duration,
    /// Stream each checkpoint while it is written (the origin sends CRIU's page images as they
    /// grow) instead of after it. It overlaps the transfer with the dump, at the price of the
    /// two sharing the origin's CPU: on a node with few cores and a big workload the dump
    /// itself gets slower.
    pub stream_during_checkpoint: bool,
}

/// The controller.
pub struct Controller {
    pub(crate) config: ControllerConfig,
    pub(crate) nodes_api: Arc<dyn NodeApi>,
    registry: Mutex<Registry>,
    pub(crate) migrations: Mutex<BTreeMap<String, Migration>>,
    /// (namespace, target) -> migration id, for the 409 on a second migration of a workload.
    pub(crate) active: Mutex<HashMap<(String, Target), String>>,
    counter: AtomicU64,
    /// Kubernetes mode: deployments are resolved and moved through the API server.
    pub(crate) kube: Option<KubeSettings>,
    /// Where records and nodes are made durable; `None` keeps them in memory only.
    pub(crate) journal: Option<Journal>,
    /// Migrations found unfinished in the journal at start, which
    /// [`Controller::resume_interrupted`] resolves.
    pub(crate) interrupted: Mutex<Vec<String>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Controller {
    /// A controller reaching agents through `nodes_api`.
    pub fn new(config: ControllerConfig, nodes_api: Arc<dyn NodeApi>) -> Self {
        Self {
            config,
            nodes_api,
            registry: Mutex::default(),
            migrations: Mutex::default(),
            active: Mutex::default(),
            counter: AtomicU64::new(0),
            kube: None,
            journal: None,
            interrupted: Mutex::default(),
        }
    }

    /// Keeps records and node registrations in `journal`, starting from what it holds: the
    /// registered nodes, the migration history, and the migrations left unfinished by the
    /// previous controller, whose workloads stay claimed (a second migration of one is a 409)
    /// until [`Controller::resume_interrupted`] has resolved them.
    pub fn with_journal(mut self, journal: Journal) -> Self {
        let loaded = journal.load();
        // Not shared yet: no locking.
        let registry = self.registry.get_mut().unwrap_or_else(|p| p.into_inner());
        for node in loaded.nodes {
            match SafeName::new(node.name.as_str()) {
                Ok(_) => registry.restore_node(node),
                Err(e) => warn!(node = %node.name, error = %e, "skipping a journaled node"),
            }
        }
        let migrations = self.migrations.get_mut().unwrap_or_else(|p| p.into_inner());
        let active = self.active.get_mut().unwrap_or_else(|p| p.into_inner());
        let interrupted = self
            .interrupted
            .get_mut()
            .unwrap_or_else(|p| p.into_inner());
        for mut m in loaded.migrations {
            if !m.phase.is_terminal() {
                m.resume_clock();
                let key = (m.namespace.clone(), m.target.clone());
                if let Some(other) = active.insert(key, m.id.clone()) {
                    warn!(migration = %m.id, %other, "two unfinished migrations of one workload in the journal");
                }
                interrupted.push(m.id.clone());
            }
            migrations.insert(m.id.clone(), m);
        }
        let gone = past_history_cap(&migrations.values().collect::<Vec<_>>(), KEEP_TERMINAL);
        for id in &gone {
            migrations.remove(id);
        }
        journal.remove(&gone);
        self.journal = Some(journal);
        self
    }

    /// Kubernetes mode: `deployment` migrations go through `api` (see [`crate::kube`]),
    /// polling it every `poll`.
    pub fn with_kube(mut self, api: Arc<dyn KubeApi>, poll: Duration) -> Self {
        self.kube = Some(KubeSettings { api, poll });
        self
    }

    /// Registers a node agent; returns whether it is new.
    pub fn register_node(&self, name: &str, address: &str) -> Result<bool, ControllerError> {
        let name = SafeName::new(name).map_err(|e| {
            bad(
                format!("invalid node name {name:?}: {e}"),
                "a name of [A-Za-z0-9._-] starting with a letter or digit",
            )
        })?;
        let address = normalise_address(address, &self.config.default_scheme)
            .map_err(|e| bad(e.to_string(), "http://host:port or host:port"))?;
        let (new, changed) = {
            let mut registry = lock(&self.registry);
            let changed = registry.node(name.as_str()).map(|n| &n.address) != Some(&address);
            (registry.register_node(&name, address.clone()), changed)
        };
        if changed {
            info!(node = %name, %address, "node registered");
            // Re-registrations that change nothing are not written: agents repeat them.
            if let Some(journal) = &self.journal
                && let Err(e) = journal.save_nodes(|| self.nodes())
            {
                warn!(error = %e, "cannot journal the node registry; a restarted controller waits for agents to register again");
            }
        } else {
            tracing::debug!(node = %name, "node registered again");
        }
        Ok(new)
    }

    /// Registers a pod (original design); returns whether it is new.
    pub fn register_pod(&self, pod: PodInfo) -> Result<bool, ControllerError> {
        if let Err(e) = SafeName::new(pod.id.as_str()) {
            return Err(bad(
                format!("invalid pod id {:?}: {e}", pod.id),
                "a name of [A-Za-z0-9._-] starting with a letter or digit",
            ));
        }
        Ok(lock(&self.registry).register_pod(pod))
    }

    /// Registered nodes.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        lock(&self.registry).nodes()
    }

    /// Registered pods.
    pub fn pods(&self) -> Vec<PodInfo> {
        lock(&self.registry).pods()
    }

    /// One migration record.
    pub fn migration(&self, id: &str) -> Option<Migration> {
        lock(&self.migrations).get(id).cloned()
    }

    /// All migration records, oldest first.
    pub fn migrations(&self) -> Vec<Migration> {
        let mut all: Vec<Migration> = lock(&self.migrations).values().cloned().collect();
        all.sort_by_key(|m| m.created_unix_ms);
        all
    }

    pub(crate) fn node(&self, name: &str, role: &str) -> Result<NodeInfo, ControllerError> {
        let registry = lock(&self.registry);
        registry.node(name).cloned().ok_or_else(|| {
            let known: Vec<String> = registry.nodes().into_iter().map(|n| n.name).collect();
            ControllerError::NotFound(format!(
                "unknown {role} node {name:?}; registered nodes: [{}]",
                known.join(", ")
            ))
        })
    }

    pub(crate) fn validate(
        &self,
        req: &MigrateRequest,
    ) -> Result<(String, Target), ControllerError> {
        const EXPECTED: &str = r#"{"deployment":"<name>","originNode":"<node>","destNode":"<other node>"} (or "pod" / "container" instead of "deployment"; optional "namespace")"#;
        let name_ok = |what: &str, name: &str| {
            SafeName::new(name)
                .map(|_| name.to_string())
                .map_err(|e| bad(format!("invalid {what} {name:?}: {e}"), EXPECTED))
        };
        let target = match (&req.deployment, &req.pod, &req.container) {
            (Some(n), None, None) => Target::Deployment(name_ok("deployment", n)?),
            (None, Some(n), None) => Target::Pod(name_ok("pod", n)?),
            (None, None, Some(n)) => Target::Container(name_ok("container", n)?),
            _ => {
                return Err(bad(
                    "exactly one of deployment, pod or container must be given",
                    EXPECTED,
                ));
            }
        };
        let namespace = req
            .namespace
            .clone()
            .unwrap_or_else(|| self.config.default_namespace.clone());
        name_ok("namespace", &namespace)?;
        name_ok("originNode", &req.origin_node)?;
        name_ok("destNode", &req.dest_node)?;
        if req.origin_node == req.dest_node {
            return Err(bad(
                format!(
                    "originNode and destNode are both {:?}; a migration needs two different nodes",
                    req.origin_node
                ),
                EXPECTED,
            ));
        }
        Ok((namespace, target))
    }

    /// Validates and starts a migration in the background; returns its record (pending).
    pub async fn start(
        self: &Arc<Self>,
        req: MigrateRequest,
    ) -> Result<Migration, ControllerError> {
        if let (Some(kube), Some(_)) = (&self.kube, &req.deployment) {
            if req.post_copy {
                return Err(bad(
                    "postCopy is not supported in Kubernetes mode yet",
                    "no \"postCopy\" (or false) for a deployment in Kubernetes mode; a pod or container is migrated through the node agents and may use it",
                ));
            }
            return self.start_kube(kube.clone(), req).await;
        }
        let (namespace, target) = self.validate(&req)?;
        let origin = self.node(&req.origin_node, "origin")?;
        let dest = self.node(&req.dest_node, "destination")?;
        let key = (namespace.clone(), target.clone());
        let id = self.claim(&key)?;
        let resolved = self
            .nodes_api
            .resolve(
                &origin,
                &ResolveRequest {
                    namespace: namespace.clone(),
                    target: target.clone(),
                },
            )
            .await;
        let containers = match resolved {
            Ok(c) => c,
            Err(e) => {
                lock(&self.active).remove(&key);
                return Err(if e.status == Some(404) {
                    ControllerError::NotFound(format!(
                        "{target} not found on origin node {}: {}",
                        origin.name, e.message
                    ))
                } else {
                    e.into()
                });
            }
        };
        let mut record = Migration::new(
            id.clone(),
            target,
            namespace,
            origin.name.clone(),
            dest.name.clone(),
        );
        record.containers = containers;
        record.post_copy = req.post_copy;
        self.accept(&key, &record)?;
        info!(migration = %id, origin = %origin.name, dest = %dest.name, "migration accepted");
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.drive(&id, &origin, &dest).await;
            lock(&this.active).remove(&key);
        });
        Ok(record)
    }

    /// Reserves a migration id for the workload `key` (namespace, target); a workload already
    /// being migrated is a conflict.
    pub(crate) fn claim(&self, key: &(String, Target)) -> Result<String, ControllerError> {
        let mut active = lock(&self.active);
        if let Some(other) = active.get(key) {
            let (namespace, target) = key;
            return Err(ControllerError::Conflict(format!(
                "{target} in namespace {namespace} is already being migrated by {other}; wait for it to finish"
            )));
        }
        let id = self.new_id();
        active.insert(key.clone(), id.clone());
        Ok(id)
    }

    pub(crate) fn new_id(&self) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        // The counter starts again at 0 with each process: an id the journal already has
        // (a clock set back) is skipped.
        let migrations = lock(&self.migrations);
        loop {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let id = format!("mig-{ms}-{n}");
            if !migrations.contains_key(&id) {
                return id;
            }
        }
    }

    /// Records a new migration (journal first): from here on it is the background task's.
    pub(crate) fn accept(
        &self,
        key: &(String, Target),
        record: &Migration,
    ) -> Result<(), ControllerError> {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.save(record)
        {
            lock(&self.active).remove(key);
            return Err(e.into());
        }
        lock(&self.migrations).insert(record.id.clone(), record.clone());
        Ok(())
    }

    /// Writes the record of `id` to the journal, if there is one.
    pub(crate) fn persist(&self, id: &str) -> Result<(), JournalError> {
        match &self.journal {
            Some(journal) => journal.save_latest(|| self.migration(id)),
            None => Ok(()),
        }
    }

    /// Writes the record of `id` where losing the write changes nothing a recovery decides.
    pub(crate) fn persist_or_warn(&self, id: &str) {
        if let Err(e) = self.persist(id) {
            warn!(migration = %id, error = %e, "cannot journal the migration");
        }
    }

    /// Writes the record of `id` before a step that stops or moves the workload: the step is
    /// not taken (the migration fails) unless a restarted controller would know of it.
    pub(crate) fn persist_before(&self, id: &str, step: &str) -> Result<(), String> {
        self.persist(id)
            .map_err(|e| format!("{e}; {step} was not started"))
    }

    /// Journals the terminal record of `id` and trims the history to [`KEEP_TERMINAL`]
    /// terminal records.
    pub(crate) fn finished(&self, id: &str) {
        self.persist_or_warn(id);
        let gone = {
            let mut migrations = lock(&self.migrations);
            let gone = past_history_cap(&migrations.values().collect::<Vec<_>>(), KEEP_TERMINAL);
            for id in &gone {
                migrations.remove(id);
            }
            gone
        };
        if let Some(journal) = &self.journal {
            journal.remove(&gone);
        }
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut Migration)) {
        if let Some(m) = lock(&self.migrations).get_mut(id) {
            f(m);
        }
    }

    pub(crate) fn advance(&self, id: &str, phase: Phase) {
        self.update(id, |m| {
            if let Err(e) = m.advance(phase) {
                warn!(migration = %id, error = %e, "state machine refused a transition");
            }
        });
    }

    async fn drive(&self, id: &str, origin: &NodeInfo, dest: &NodeInfo) {
        let Some(record) = self.migration(id) else {
            return;
        };
        let req = ContainersRequest {
            migration: id.to_string(),
            namespace: record.namespace.clone(),
            containers: record.containers.clone(),
            post_copy: record.post_copy,
            pages_from: None,
        };
        let outcome = self
            .within_timeout(id, self.run(id, origin, dest, &req))
            .await;
        match outcome {
            // `run` enters `finishing` last, with no await after it, so no timeout or failure
            // can come once the workload runs on the destination; `Migration::fail` refuses
            // `finishing` too.
            Ok(()) => self.finish(id, origin, &req).await,
            Err(reason) => self.recover(id, origin, dest, &req, reason).await,
        }
    }

    /// Moves `id` to `finishing` (the workload runs on the destination, see
    /// [`Migration::advance`]) and journals it; a record already there is left as it is.
    pub(crate) fn enter_finishing(&self, id: &str) {
        self.update(id, |m| {
            if m.phase != Phase::Finishing
                && let Err(e) = m.advance(Phase::Finishing)
            {
                warn!(migration = %id, error = %e, "state machine refused a transition");
            }
        });
        self.persist_or_warn(id);
    }

    /// The workload runs on the destination (`finishing`): the origin's stopped containers
    /// and their checkpoint are removed, and the migration is done. Cleanup problems are
    /// warnings.
    async fn finish(&self, id: &str, origin: &NodeInfo, req: &ContainersRequest) {
        if let Err(e) = self.nodes_api.finish(origin, req).await {
            warn!(migration = %id, error = %e, "origin cleanup failed");
            self.update(id, |m| m.warnings.push(format!("origin cleanup: {e}")));
        }
        // Done only once the origin is cleaned up: a client that sees `done` finds the
        // workload on the destination alone.
        self.advance(id, Phase::Done);
        self.finished(id);
        info!(migration = %id, "migration done");
    }

    /// Runs a migration's work within the migration timeout; when it runs out, the reason names
    /// the phase it was in.
    pub(crate) async fn within_timeout(
        &self,
        id: &str,
        work: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<(), String> {
        let timeout = self.config.migration_timeout;
        match tokio::time::timeout(timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let phase = self
                    .migration(id)
                    .map(|m| m.phase)
                    .unwrap_or(Phase::Pending);
                Err(format!(
                    "timed out after {timeout:?} while {}",
                    phase.as_str()
                ))
            }
        }
    }

    async fn run(
        &self,
        id: &str,
        origin: &NodeInfo,
        dest: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<(), String> {
        // The destination creates the containers now, while they still run on the origin:
        // creating them is then no part of the downtime.
        let infos = self
            .nodes_api
            .describe(origin, req)
            .await
            .map_err(|e| e.to_string())?;
        self.nodes_api
            .prepare(
                dest,
                &PrepareRequest {
                    migration: req.migration.clone(),
                    containers: infos,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        self.advance(id, Phase::Checkpointing);
        self.persist_before(id, "the checkpoint")?;
        // With `stream_during_checkpoint` the send starts with the checkpoint: the origin
        // streams the page images while the engine writes them, and the rest once each
        // checkpoint is committed. A failed checkpoint fails the send too (the origin agent
        // tells its sender); its error is the one reported.
        let live = self.config.stream_during_checkpoint;
        let send_req = SendRequest {
            migration: req.migration.clone(),
            namespace: req.namespace.clone(),
            containers: req.containers.clone(),
            destination: dest.address.clone(),
            live,
        };
        let checkpoint = async {
            let summaries = self
                .nodes_api
                .checkpoint(origin, req)
                .await
                .map_err(|e| e.to_string())?;
            let bytes = summaries.iter().map(|s| s.bytes).sum();
            let in_memory = !summaries.is_empty() && summaries.iter().all(|s| s.in_memory);
            self.update(id, |m| {
                m.checkpoint_bytes = bytes;
                m.checkpoint_in_memory.origin = in_memory;
            });
            self.advance(id, Phase::Transferring);
            self.persist_or_warn(id);
            Ok::<_, String>(())
        };
        let sent = if live {
            let (checkpointed, sent) =
                tokio::join!(checkpoint, self.nodes_api.send(origin, &send_req));
            checkpointed?;
            sent
        } else {
            checkpoint.await?;
            self.nodes_api.send(origin, &send_req).await
        };
        let sent = sent.map_err(|e| e.to_string())?;
        self.update(id, |m| {
            m.bytes_transferred = sent.wire_bytes;
            m.bytes_sent_while_checkpointing = sent.live_bytes;
            m.checkpoint_in_memory.destination = sent.in_memory;
        });
        self.advance(id, Phase::Restoring);
        self.persist_before(id, "the restore")?;
        // Post-copy: the destination fetches the pages from the origin's agent.
        let restore_req = ContainersRequest {
            pages_from: req.post_copy.then(|| origin.address.clone()),
            ..req.clone()
        };
        let restored = self
            .nodes_api
            .restore(dest, &restore_req)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(ms) = restored.running_ms_before {
            self.update(id, |m| m.running_before(Duration::from_millis(ms)));
        }
        // The workload runs on the destination: the restore ends here (the downtime here or
        // when the destination saw it running, if earlier: a lazy restore), and the origin's
        // cleanup is `finishing`, not `restoring`.
        self.enter_finishing(id);
        Ok(())
    }

    async fn recover(
        &self,
        id: &str,
        origin: &NodeInfo,
        dest: &NodeInfo,
        req: &ContainersRequest,
        reason: String,
    ) {
        warn!(migration = %id, %reason, "migration failed; recovering");
        let mut recovery = Vec::new();
        // Never `finishing` here (see `drive`): the workload does not run on the destination
        // yet, or may (`restoring`).
        // Once the destination was asked to restore, it may run the workload even though the
        // call failed (a lost answer, a timeout): it is cleared first, so that the origin
        // never resumes beside a copy. Before that, the origin first: its restart is the
        // downtime, and it does not depend on the destination, which may be dead (and make
        // the abort wait for its timeout).
        let restoring = self.migration(id).map(|m| m.phase) == Some(Phase::Restoring);
        if restoring && req.post_copy {
            // Post-copy: the origin decides. Until the destination had every page the origin
            // only froze the workload, and its rollback resumes it (which also ends the
            // destination's fill). Once every page was served, the destination holds the
            // only copy: it must not be cleared, whatever its answer was.
            match self.nodes_api.rollback(origin, req).await {
                Ok(report) => {
                    recovery.extend(report.done);
                    let restored = !report.restored.is_empty();
                    self.abort_destination(dest, req, &mut recovery).await;
                    self.end_failed(id, reason, recovery, restored);
                }
                Err(e) => {
                    recovery.push(format!("the origin did not resume the workload: {e}"));
                    recovery.push(format!(
                        "{} was left as it is: after a post-copy checkpoint whose pages were \
                         all served it holds the only copy of the workload; check it there",
                        dest.name
                    ));
                    self.end_failed(id, reason, recovery, false);
                }
            }
            return;
        }
        let mut dest_cleared = None;
        if restoring {
            dest_cleared = Some(self.abort_destination(dest, req, &mut recovery).await);
        }
        // Also after a failed checkpoint: with several containers some may have stopped.
        let restored = match self.nodes_api.rollback(origin, req).await {
            Ok(report) => {
                recovery.extend(report.done);
                !report.restored.is_empty()
            }
            Err(e) => {
                recovery.push(format!(
                    "ROLLBACK FAILED, the workload may not be running: {e}"
                ));
                false
            }
        };
        match dest_cleared {
            Some(false) if restored => recovery.push(format!(
                "WARNING: {} could not be cleared after it was asked to restore; if its \
                 restore started the workload, it runs there too: check that node",
                dest.name
            )),
            Some(_) => {}
            // Whatever failed, the destination may hold containers created ahead of the
            // checkpoint, or received data.
            None => {
                self.abort_destination(dest, req, &mut recovery).await;
            }
        }
        self.end_failed(id, reason, recovery, restored);
    }

    /// Records a migration as failed (rolled back when `restored`) with what its recovery
    /// did, and releases its workload.
    pub(crate) fn end_failed(
        &self,
        id: &str,
        reason: String,
        recovery: Vec<String>,
        restored: bool,
    ) {
        self.update(id, |m| {
            if let Err(e) = m.fail(reason, recovery, restored) {
                warn!(migration = %id, error = %e, "state machine refused failure");
            }
        });
        self.finished(id);
    }

    /// Removes what the destination holds of the migration (containers created ahead, data
    /// received, a restored workload); says what in `recovery`. Whether it answered.
    pub(crate) async fn abort_destination(
        &self,
        dest: &NodeInfo,
        req: &ContainersRequest,
        recovery: &mut Vec<String>,
    ) -> bool {
        match self.nodes_api.abort(dest, req).await {
            Ok(report) if report.done.is_empty() => {
                recovery.push(format!("nothing to clean on {}", dest.name));
                true
            }
            Ok(report) => {
                recovery.extend(report.done);
                true
            }
            Err(e) => {
                recovery.push(format!("cleaning the destination failed: {e}"));
                false
            }
        }
    }
}
