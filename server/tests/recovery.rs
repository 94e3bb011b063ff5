//! A controller that dies mid-migration and one started on its state dir: the journal brings
//! the migration back and the new controller resolves it. The nodes are a scripted
//! [`NodeApi`] that remembers what each node runs across both controllers and can hang in any
//! call, as a controller that died there would leave it. Each controller lives in its own
//! runtime; shutting that runtime down drops everything it was doing, like a process that dies.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mig_server::containerd::{ContainerInfo, TaskStatus};
use mig_server::controller::{Controller, ControllerConfig, ControllerError, MigrateRequest};
use mig_server::journal::Journal;
use mig_server::migration::{Migration, Phase, Target};
use mig_server::node_client::{NodeApi, NodeCallError};
use mig_server::protocol::{
    ActionReport, CheckpointSummary, ContainerState, ContainersRequest, PrepareRequest,
    ResolveRequest, SendRequest, TransferSummary,
};
use mig_server::registry::NodeInfo;
use tokio::runtime::Runtime;

#[path = "support/records.rs"]
mod records;

const ORIGIN: &str = "node01";
const DEST: &str = "node02";

/// Where a scripted call stops.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hang {
    /// Before it does anything.
    Before(String),
    /// After it did what it does, before it answers.
    After(String),
}

#[derive(Default)]
struct World {
    /// node -> container -> task (`None`: created without a task).
    tasks: BTreeMap<String, BTreeMap<String, Option<TaskStatus>>>,
    calls: Vec<String>,
    hang: Option<Hang>,
    hung: bool,
    /// `"<node> <op>"` calls that wait while this is set.
    hold: Option<String>,
}

/// Both nodes, as the controllers see them through [`NodeApi`].
#[derive(Default)]
struct ScriptedNodes {
    world: Mutex<World>,
}

impl ScriptedNodes {
    fn new() -> Arc<Self> {
        let nodes = Self::default();
        nodes.with(|w| {
            w.tasks.insert(
                ORIGIN.into(),
                [("counter".to_string(), Some(TaskStatus::Running))].into(),
            );
            w.tasks.insert(DEST.into(), BTreeMap::new());
        });
        Arc::new(nodes)
    }

    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.lock().expect("world"))
    }

    fn task(&self, node: &str, id: &str) -> Option<Option<TaskStatus>> {
        self.with(|w| w.tasks[node].get(id).copied())
    }

    fn calls(&self) -> Vec<String> {
        self.with(|w| w.calls.clone())
    }

    /// Records the call, waits while it is held, hangs forever where scripted to before.
    async fn enter(&self, node: &NodeInfo, op: &str) {
        let call = format!("{} {op}", node.name);
        let hang = self.with(|w| {
            w.calls.push(call.clone());
            w.hang.clone()
        });
        while self.with(|w| w.hold.as_deref() == Some(call.as_str())) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if hang == Some(Hang::Before(call)) {
            self.hang_forever().await;
        }
    }

    /// Hangs forever where scripted to after the call's effect.
    async fn leave(&self, node: &NodeInfo, op: &str) {
        let call = format!("{} {op}", node.name);
        if self.with(|w| w.hang.clone()) == Some(Hang::After(call)) {
            self.hang_forever().await;
        }
    }

    async fn hang_forever(&self) {
        self.with(|w| w.hung = true);
        std::future::pending::<()>().await;
    }

    fn set(&self, node: &NodeInfo, id: &str, task: Option<Option<TaskStatus>>) {
        self.with(|w| {
            let tasks = w.tasks.get_mut(&node.name).expect("node");
            match task {
                Some(t) => tasks.insert(id.to_string(), t),
                None => tasks.remove(id),
            };
        });
    }
}

fn done(what: String) -> ActionReport {
    ActionReport {
        done: vec![what],
        ..Default::default()
    }
}

#[async_trait]
impl NodeApi for ScriptedNodes {
    async fn resolve(
        &self,
        node: &NodeInfo,
        _req: &ResolveRequest,
    ) -> Result<Vec<String>, NodeCallError> {
        self.enter(node, "resolve").await;
        Ok(vec!["counter".into()])
    }
    async fn describe(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerInfo>, NodeCallError> {
        self.enter(node, "describe").await;
        Ok(req
            .containers
            .iter()
            .map(|id| ContainerInfo {
                namespace: req.namespace.clone(),
                id: id.clone(),
                image: "busybox".into(),
                runtime: "io.containerd.mig.v2".into(),
                labels: BTreeMap::new(),
                spec: serde_json::json!({}),
            })
            .collect())
    }
    async fn prepare(
        &self,
        node: &NodeInfo,
        req: &PrepareRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.enter(node, "prepare").await;
        for info in &req.containers {
            self.set(node, &info.id, Some(Some(TaskStatus::Created)));
        }
        self.leave(node, "prepare").await;
        Ok(ActionReport::default())
    }
    async fn checkpoint(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<CheckpointSummary>, NodeCallError> {
        self.enter(node, "checkpoint").await;
        for id in &req.containers {
            self.set(node, id, Some(Some(TaskStatus::Stopped)));
        }
        self.leave(node, "checkpoint").await;
        Ok(vec![])
    }
    async fn send(
        &self,
        node: &NodeInfo,
        _req: &SendRequest,
    ) -> Result<TransferSummary, NodeCallError> {
        self.enter(node, "send").await;
        self.leave(node, "send").await;
        Ok(TransferSummary::default())
    }
    async fn restore(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.enter(node, "restore").await;
        for id in &req.containers {
            self.set(node, id, Some(Some(TaskStatus::Running)));
        }
        self.leave(node, "restore").await;
        Ok(done("restored".into()))
    }
    async fn abort(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.enter(node, "abort").await;
        let mut report = ActionReport::default();
        for id in &req.containers {
            if self.task(&node.name, id).is_some() {
                self.set(node, id, None);
                report.done.push(format!("deleted container {id}"));
            }
        }
        Ok(report)
    }
    async fn rollback(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.enter(node, "rollback").await;
        let mut report = ActionReport::default();
        for id in &req.containers {
            if self.task(&node.name, id) == Some(Some(TaskStatus::Running)) {
                report.done.push(format!("{id} was still running"));
            } else {
                self.set(node, id, Some(Some(TaskStatus::Running)));
                report
                    .done
                    .push(format!("{id} restored from its own checkpoint"));
                report.restored.push(id.clone());
            }
        }
        Ok(report)
    }
    async fn finish(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.enter(node, "finish").await;
        for id in &req.containers {
            self.set(node, id, None);
        }
        Ok(done("removed".into()))
    }
    async fn status(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerState>, NodeCallError> {
        self.enter(node, "status").await;
        Ok(req
            .containers
            .iter()
            .map(|id| {
                let task = self.task(&node.name, id);
                ContainerState {
                    container: id.clone(),
                    exists: task.is_some(),
                    task: task.flatten(),
                }
            })
            .collect())
    }
}

fn controller(state: &Path, nodes: &Arc<ScriptedNodes>) -> Arc<Controller> {
    controller_timing_out(state, nodes, Duration::from_secs(20))
}

/// A controller on `state` whose migrations (and waits for nodes) time out after `timeout`.
fn controller_timing_out(
    state: &Path,
    nodes: &Arc<ScriptedNodes>,
    timeout: Duration,
) -> Arc<Controller> {
    let c = Controller::new(
        ControllerConfig {
            default_namespace: "default".into(),
            default_scheme: "http".into(),
            migration_timeout: timeout,
            stream_during_checkpoint: true,
        },
        nodes.clone(),
    )
    .with_journal(Journal::open(state).expect("journal"));
    Arc::new(c)
}

fn request() -> MigrateRequest {
    MigrateRequest {
        deployment: Some("counter".into()),
        origin_node: ORIGIN.into(),
        dest_node: DEST.into(),
        ..Default::default()
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A controller on `state` starts a migration that hangs where `hang` says; then the
/// controller dies (its runtime goes, with every task of it). Returns the migration's id.
fn die_mid_migration(state: &Path, nodes: &Arc<ScriptedNodes>, hang: Hang) -> String {
    nodes.with(|w| w.hang = Some(hang.clone()));
    let rt = runtime();
    let c = controller(state, nodes);
    c.register_node(ORIGIN, "10.0.0.1:7070").expect("register");
    c.register_node(DEST, "10.0.0.2:7070").expect("register");
    let id = rt.block_on(c.start(request())).expect("start").id;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes.with(|w| w.hung) {
        assert!(Instant::now() < deadline, "never reached {hang:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(c);
    rt.shutdown_timeout(Duration::from_secs(5));
    nodes.with(|w| {
        w.hang = None;
        w.calls.clear();
    });
    id
}

/// Resumes the interrupted migrations of `c` while the node call `hold` hangs, checks that a
/// new migration of the workload is refused as a conflict with `id` meanwhile, then lets the
/// call go and waits until the recovery is over.
async fn recover_while_claimed(c: &Arc<Controller>, nodes: &ScriptedNodes, hold: &str, id: &str) {
    nodes.with(|w| w.hold = Some(hold.to_string()));
    let handles = c.resume_interrupted();
    let refused = c.start(request()).await.expect_err("second migration");
    assert!(
        matches!(&refused, ControllerError::Conflict(m) if m.contains(id)),
        "{refused}"
    );
    nodes.with(|w| w.hold = None);
    for h in handles {
        h.await.expect("recovery");
    }
}

/// Starts a controller on `state` and lets it resolve what it finds; returns the record.
async fn recover(c: &Arc<Controller>, id: &str) -> Migration {
    for handle in c.resume_interrupted() {
        handle.await.expect("recovery task");
    }
    let m = c.migration(id).expect("record after restart");
    assert!(m.phase.is_terminal(), "{m:?}");
    m
}

#[test]
fn a_destination_that_runs_the_workload_is_kept_and_the_origin_cleaned() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    // The restore happened; its answer never reached the controller.
    let id = die_mid_migration(dir.path(), &nodes, Hang::After(format!("{DEST} restore")));
    assert_eq!(nodes.task(DEST, "counter"), Some(Some(TaskStatus::Running)));
    runtime().block_on(async {
        let c = controller(dir.path(), &nodes);
        // Nodes come back from the journal: no agent registered with this controller.
        assert_eq!(c.nodes().len(), 2);
        let m = recover(&c, &id).await;
        assert_eq!(m.phase, Phase::Done, "{m:?}");
        assert!(m.destination_running);
        assert!(
            m.warnings
                .iter()
                .any(|w| w.contains("the controller restarted while restoring")),
            "{m:?}"
        );
        let calls = nodes.calls();
        assert!(calls.contains(&format!("{DEST} status")), "{calls:?}");
        assert!(calls.contains(&format!("{ORIGIN} finish")), "{calls:?}");
        assert!(
            !calls
                .iter()
                .any(|c| c.ends_with("rollback") || c.ends_with("abort"))
        );
    });
    assert_eq!(nodes.task(ORIGIN, "counter"), None, "left on the origin");
    assert_eq!(nodes.task(DEST, "counter"), Some(Some(TaskStatus::Running)));
}

/// The record as the journal in `state` holds it.
fn journaled(state: &Path, id: &str) -> Migration {
    let path = state
        .join("controller/migrations")
        .join(format!("{id}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json")
}

#[test]
fn a_migration_journaled_finishing_is_finished_not_rolled_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    // The destination runs the workload; the controller dies as it asks the origin to clean up.
    let id = die_mid_migration(dir.path(), &nodes, Hang::Before(format!("{ORIGIN} finish")));
    let before = journaled(dir.path(), &id);
    assert_eq!(before.phase, Phase::Finishing, "{before:?}");
    assert!(before.destination_running && before.downtime_ms.is_some());
    assert_eq!(
        nodes.task(ORIGIN, "counter"),
        Some(Some(TaskStatus::Stopped))
    );
    runtime().block_on(async {
        let c = controller(dir.path(), &nodes);
        // Not terminal: the workload stays claimed until the origin is cleaned up.
        recover_while_claimed(&c, &nodes, &format!("{ORIGIN} finish"), &id).await;
        let m = c.migration(&id).expect("record");
        records::assert_done_after_restart_while(&m, "finishing");
        assert!(m.failure.is_none(), "{m:?}");
        assert_eq!(m.downtime_ms, before.downtime_ms, "the journaled downtime");
        let phases: Vec<Phase> = m.timings.iter().map(|t| t.phase).collect();
        assert_eq!(phases.last(), Some(&Phase::Finishing), "{m:?}");
        // The origin is only cleaned up: the destination is not asked, nothing is undone.
        assert_eq!(nodes.calls(), [format!("{ORIGIN} finish")]);
    });
    assert_eq!(nodes.task(ORIGIN, "counter"), None, "left on the origin");
    assert_eq!(nodes.task(DEST, "counter"), Some(Some(TaskStatus::Running)));
    assert_eq!(journaled(dir.path(), &id).phase, Phase::Done);
}

#[test]
fn a_migration_journaled_finishing_ends_done_when_its_origin_never_comes_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    let m = records::migration_at("counter", ORIGIN, DEST, Phase::Finishing);
    // Journaled without the nodes: neither registers with the new controller.
    Journal::open(dir.path())
        .expect("journal")
        .save(&m)
        .expect("save");
    let m = runtime().block_on(async {
        let c = controller_timing_out(dir.path(), &nodes, Duration::from_secs(1));
        recover(&c, "mig-1-0").await
    });
    assert_eq!(m.phase, Phase::Done, "{m:?}");
    assert!(m.failure.is_none(), "{m:?}");
    assert!(
        m.warnings.iter().any(|w| w.starts_with(&format!(
            "origin cleanup not done: {ORIGIN} did not register within 1s; its stopped \
             containers [counter]"
        ))),
        "{m:?}"
    );
    assert!(nodes.calls().is_empty(), "{:?}", nodes.calls());
}

#[test]
fn a_destination_that_does_not_run_it_is_aborted_and_the_origin_rolled_back() {
    for (hang, asks_destination) in [
        (Hang::Before(format!("{DEST} restore")), true),
        (Hang::After(format!("{ORIGIN} send")), false),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let nodes = ScriptedNodes::new();
        let id = die_mid_migration(dir.path(), &nodes, hang.clone());
        assert_eq!(
            nodes.task(ORIGIN, "counter"),
            Some(Some(TaskStatus::Stopped)),
            "{hang:?}"
        );
        let m = runtime().block_on(async {
            let c = controller(dir.path(), &nodes);
            recover(&c, &id).await
        });
        assert_eq!(m.phase, Phase::RolledBack, "{hang:?}: {m:?}");
        let failure = m.failure.as_ref().expect("failure");
        assert!(
            failure
                .reason
                .starts_with("the controller restarted while ")
                && failure
                    .reason
                    .ends_with(&format!("rolled back to {ORIGIN}")),
            "{hang:?}: {}",
            failure.reason
        );
        assert!(m.downtime_ms.is_some(), "{m:?}");
        let calls = nodes.calls();
        assert_eq!(
            calls.contains(&format!("{DEST} status")),
            asks_destination,
            "{hang:?}: {calls:?}"
        );
        // The destination is cleaned before the origin runs the workload again.
        let abort = calls.iter().position(|c| *c == format!("{DEST} abort"));
        let rollback = calls
            .iter()
            .position(|c| *c == format!("{ORIGIN} rollback"));
        assert!(abort.is_some() && abort < rollback, "{hang:?}: {calls:?}");
        assert_eq!(
            nodes.task(ORIGIN, "counter"),
            Some(Some(TaskStatus::Running))
        );
        assert_eq!(nodes.task(DEST, "counter"), None, "{hang:?}");
    }
}

#[test]
fn a_workload_being_recovered_cannot_be_migrated_and_history_survives_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    let id = die_mid_migration(dir.path(), &nodes, Hang::Before(format!("{DEST} restore")));
    runtime().block_on(async {
        let c = controller(dir.path(), &nodes);
        recover_while_claimed(&c, &nodes, &format!("{DEST} status"), &id).await;
        assert_eq!(c.migration(&id).expect("record").phase, Phase::RolledBack);
        // Resolved: the claim is released, and the workload moves.
        let next = c.start(request()).await.expect("migration after recovery");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.migration(&next.id).expect("record").phase.is_terminal() {
            assert!(Instant::now() < deadline, "stuck");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // A third controller shows both, as they ended, and resolves nothing.
    let c = controller(dir.path(), &nodes);
    let all = c.migrations();
    let phases: Vec<_> = all.iter().map(|m| (m.id.as_str(), m.phase)).collect();
    assert_eq!(phases.len(), 2, "{phases:?}");
    assert_eq!(phases[0], (id.as_str(), Phase::RolledBack));
    assert_eq!(phases[1].1, Phase::Done);
    assert!(
        runtime()
            .block_on(async { c.resume_interrupted() })
            .is_empty()
    );
    assert!(all[0].duration_ms.is_some());
}

#[test]
fn a_migration_that_cannot_be_journaled_is_not_started() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    runtime().block_on(async {
        let c = controller(dir.path(), &nodes);
        c.register_node(ORIGIN, "10.0.0.1:7070").expect("register");
        c.register_node(DEST, "10.0.0.2:7070").expect("register");
        let records = dir.path().join("controller/migrations");
        std::fs::remove_dir_all(&records).expect("rm");
        std::fs::write(&records, b"not a directory").expect("write");
        let err = c.start(request()).await.expect_err("started");
        assert!(matches!(err, ControllerError::Journal(_)), "{err}");
        assert!(c.migrations().is_empty());
        // Nothing was asked of the nodes beyond finding the workload, and it is not claimed.
        assert_eq!(nodes.calls(), [format!("{ORIGIN} resolve")]);
        std::fs::remove_file(&records).expect("rm");
        std::fs::create_dir(&records).expect("mkdir");
        c.start(request()).await.expect("journal back");
    });
}

#[test]
fn an_interrupted_kubernetes_migration_is_reported_not_resumed() {
    let dir = tempfile::tempdir().expect("tmp");
    let nodes = ScriptedNodes::new();
    let mut m = Migration::new(
        "mig-1-0".into(),
        Target::Deployment("mosquitto".into()),
        "default".into(),
        ORIGIN.into(),
        DEST.into(),
    );
    m.advance(Phase::Checkpointing).expect("advance");
    m.kubernetes = Some(mig_server::kube::KubeReport {
        deployment: "mosquitto".into(),
        replicas: 1,
        ..Default::default()
    });
    Journal::open(dir.path())
        .expect("journal")
        .save(&m)
        .expect("save");
    let m = runtime().block_on(async {
        let c = controller(dir.path(), &nodes);
        recover(&c, "mig-1-0").await
    });
    assert_eq!(m.phase, Phase::Failed);
    let failure = m.failure.expect("failure");
    assert!(failure.recovery[0].contains("not resumed"), "{failure:?}");
    assert!(
        failure.recovery[0].contains("default/mosquitto"),
        "{failure:?}"
    );
    assert!(nodes.calls().is_empty(), "{:?}", nodes.calls());
}
