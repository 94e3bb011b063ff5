//! Kubernetes mode against a fake API server on loopback that answers with recorded API
//! responses (`tests/fixtures/kube/`) and plays the kubelet and the shim: scaling to zero
//! stops the origin pod, which writes its checkpoint when the agent's mark is there; pinning
//! to the destination runs the new pod, which consumes the checkpoint the agent received.
//! Real controller, node agents, HttpNodes and HttpKube over HTTP. A real cluster is the only
//! end-to-end check of this path.
//!
//! The restart tests stop a controller at each stage of a migration (the fake API hangs on a
//! Deployment patch, before or after making it; the controller's runtime is then shut down,
//! like a process that dies) and start another on the same journal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use mig_checkpoint::{EngineInfo, Store, WorkloadIdentity};
use mig_server::agent::{AgentConfig, NodeAgent};
use mig_server::agent_routes::AgentState;
use mig_server::auth::Token;
use mig_server::containerd::{ContainerInfo, Containerd, ContainerdError, TaskStatus};
use mig_server::controller::{Controller, ControllerConfig, ControllerError, MigrateRequest};
use mig_server::journal::Journal;
use mig_server::kube::client::{HttpKube, KubeConfig};
use mig_server::kube::migrate::KubeSettings;
use mig_server::kube::{
    Deployment, KubeIdentity, KubeReport, KubeStage, WorkloadAction, WorkloadsRequest, pin_patch,
    scale_patch,
};
use mig_server::migration::{Migration, Phase};
use mig_server::node_client::{HttpNodes, NodeApi};
use mig_server::registry::NodeInfo;
use serde_json::Value;

#[path = "support/records.rs"]
mod records;

const TOKEN: &str = "test-token-0123456789";
const API_TOKEN: &str = "sa-token-abc";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

/// Containers are the kubelet's business in Kubernetes mode: the agent never calls these.
struct NoContainerd;

#[async_trait]
impl Containerd for NoContainerd {
    async fn list_by_label(
        &self,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<Vec<String>, ContainerdError> {
        Ok(vec![])
    }
    async fn info(&self, _: &str, id: &str) -> Result<ContainerInfo, ContainerdError> {
        Err(unused(id))
    }
    async fn task_status(&self, _: &str, id: &str) -> Result<Option<TaskStatus>, ContainerdError> {
        Err(unused(id))
    }
    async fn kill(&self, _: &str, id: &str, _: &str) -> Result<(), ContainerdError> {
        Err(unused(id))
    }
    async fn create(&self, info: &ContainerInfo, _: &str) -> Result<(), ContainerdError> {
        Err(unused(&info.id))
    }
    async fn create_task(&self, _: &str, id: &str) -> Result<(), ContainerdError> {
        Err(unused(id))
    }
    async fn start_task(&self, _: &str, id: &str) -> Result<(), ContainerdError> {
        Err(unused(id))
    }
    async fn delete_task(&self, _: &str, id: &str, _: bool) -> Result<(), ContainerdError> {
        Err(unused(id))
    }
    async fn delete_container(&self, _: &str, id: &str) -> Result<(), ContainerdError> {
        Err(unused(id))
    }
}

fn unused(id: &str) -> ContainerdError {
    ContainerdError::Command {
        command: format!("containerd call for {id}"),
        message: "not expected in Kubernetes mode".into(),
    }
}

/// Where the fake API stops answering: on the Deployment patch equal to `patch`, before or
/// after making it.
#[derive(Debug, Clone, PartialEq)]
struct Hang {
    patch: Value,
    after: bool,
}

struct ApiState {
    /// The Deployment as the API holds it: the recorded one, with every patch merged in.
    deployment: Value,
    /// method, path?query, content-type, body
    requests: Vec<(String, String, String, String)>,
    origin_state: PathBuf,
    dest_state: PathBuf,
    /// The origin's "shim" ignores the mark (a checkpoint that never happens).
    shim_broken: bool,
    /// The new pod on the destination never becomes ready.
    dest_never_ready: bool,
    /// What the destination's store held when the new pod's container was created.
    restored_from: Option<WorkloadIdentity>,
    hang: Option<Hang>,
    /// A request hung where `hang` said.
    hung: bool,
    /// A Deployment patch the API refuses (500), without making it.
    refuse: Option<Value>,
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn identity() -> WorkloadIdentity {
    WorkloadIdentity::kubernetes("default", "mosquitto", "mosquitto").expect("identity")
}

impl ApiState {
    /// Replicas and the node the Deployment is pinned to, as the controller reads them.
    fn deployment_state(&self) -> (i32, Option<String>) {
        let d: Deployment = serde_json::from_value(self.deployment.clone()).expect("deployment");
        (d.replicas(), d.pinned_to().map(String::from))
    }

    /// The kubelet stops the origin pod: StopContainer -> the shim checkpoints when marked.
    fn stop_origin_pod(&mut self) {
        let mark = self
            .origin_state
            .join("marks")
            .join(format!("{}.json", identity().key()));
        if mark.exists() && !self.shim_broken {
            let store = Store::open(self.origin_state.join("checkpoints")).expect("store");
            let writer = store.begin(&identity()).expect("begin");
            let images = writer.images_dir().expect("images");
            std::fs::write(images.join("pages-1.img"), vec![7u8; 300_000]).expect("write");
            std::fs::write(images.join("core.img"), b"core").expect("write");
            writer
                .commit(EngineInfo::new("criu", "4.2.1"), "eclipse-mosquitto:2.0")
                .expect("commit");
            std::fs::remove_file(&mark).expect("shim clears the mark");
        }
    }

    /// The kubelet creates the new pod's container: the shim restores and consumes.
    fn start_dest_pod(&mut self) {
        let store = Store::open(self.dest_state.join("checkpoints")).expect("store");
        if let Some(c) = store.pending(&identity()).expect("pending") {
            self.restored_from = Some(c.manifest().identity.clone());
            store.remove(&identity()).expect("consume");
        }
    }
}

async fn fake_api(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<ApiState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let (response, hang) = {
        let mut s = state.lock().expect("lock");
        let hang = match &s.hang {
            Some(h) if method == Method::PATCH => {
                serde_json::from_slice::<Value>(&body).ok().as_ref() == Some(&h.patch)
            }
            _ => false,
        };
        let apply = !hang || s.hang.as_ref().is_some_and(|h| h.after);
        let response = answer(&mut s, &method, &uri, &headers, &body, apply);
        s.hung |= hang;
        (response, hang)
    };
    if hang {
        // The controller waits for an answer until it dies.
        std::future::pending::<()>().await;
    }
    response
}

/// What the API answers; `apply`: the request takes effect (a patch is made).
fn answer(
    s: &mut ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    apply: bool,
) -> axum::response::Response {
    let path_query = uri.to_string();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    s.requests.push((
        method.to_string(),
        path_query.clone(),
        content_type,
        String::from_utf8_lossy(body).into(),
    ));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {API_TOKEN}"))
    {
        return (StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    let deployments = "/apis/apps/v1/namespaces/default/deployments/";
    let json = |v: Value| axum::Json(v).into_response();
    match (method.as_str(), uri.path()) {
        ("GET", p) if p == format!("{deployments}mosquitto") => json(s.deployment.clone()),
        ("GET", p) if p.starts_with(deployments) => (
            StatusCode::NOT_FOUND,
            axum::Json(fixture("status-not-found.json")),
        )
            .into_response(),
        ("PATCH", p) if p == format!("{deployments}mosquitto") => {
            let patch: Value = serde_json::from_slice(body).expect("patch json");
            if s.refuse.as_ref() == Some(&patch) {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(serde_json::json!({"kind": "Status", "message": "etcdserver: request timed out"})),
                )
                    .into_response();
            }
            if apply {
                merge(&mut s.deployment, &patch);
                if patch == scale_patch(0) {
                    s.stop_origin_pod();
                }
            }
            json(fixture("deployment-patched.json"))
        }
        ("GET", "/api/v1/namespaces/default/pods") => {
            let query = uri.query().unwrap_or("");
            let on = |node: &str| query.contains(&format!("spec.nodeName%3D{node}"));
            // The pod runs where the Deployment puts it: the origin unless pinned elsewhere.
            let (replicas, pinned) = s.deployment_state();
            let node = pinned.unwrap_or_else(|| "node01".into());
            let list = if replicas == 0 || !on(&node) {
                fixture("pods-empty.json")
            } else if node == "node01" {
                fixture("pods-origin.json")
            } else {
                s.start_dest_pod();
                let mut pods = fixture("pods-dest-running.json");
                if s.dest_never_ready {
                    pods["items"][0]["status"]["containerStatuses"][0]["ready"] = false.into();
                }
                pods
            };
            json(list)
        }
        _ => (StatusCode::NOT_FOUND, "unexpected request").into_response(),
    }
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn token() -> Token {
    Token::new(TOKEN, "test").expect("token")
}

async fn agent(name: &str, http: &reqwest::Client) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let agent = NodeAgent::new(
        AgentConfig {
            name: name.into(),
            state_dir: dir.path().into(),
            runtime: "io.containerd.mig.v2".into(),
            zstd_level: 1,
            wait_timeout: Duration::from_secs(5),
            memory_dir: None,
        },
        Arc::new(NoContainerd),
    )
    .expect("agent");
    let state = AgentState {
        agent: Arc::new(agent),
        http: http.clone(),
        token: token(),
    };
    (
        serve(mig_server::app(None, Some(state), token())).await,
        dir,
    )
}

struct Setup {
    controller: Arc<Controller>,
    api: Arc<Mutex<ApiState>>,
    origin: tempfile::TempDir,
    dest: tempfile::TempDir,
    /// The controllers' state dir (their journal).
    state: tempfile::TempDir,
    api_url: String,
    nodes: [NodeInfo; 2],
}

async fn setup(replicas: i64, shim_broken: bool) -> Setup {
    let http = reqwest::Client::new();
    let (origin_url, origin) = agent("node01", &http).await;
    let (dest_url, dest) = agent("node02", &http).await;
    let mut deployment = fixture("deployment.json");
    deployment["spec"]["replicas"] = replicas.into();
    let api = Arc::new(Mutex::new(ApiState {
        deployment,
        requests: vec![],
        origin_state: origin.path().into(),
        dest_state: dest.path().into(),
        shim_broken,
        dest_never_ready: false,
        restored_from: None,
        hang: None,
        hung: false,
        refuse: None,
    }));
    let api_url = serve(
        axum::Router::new()
            .fallback(fake_api)
            .with_state(api.clone()),
    )
    .await;
    let state = tempfile::tempdir().expect("tmp");
    let nodes = [("node01", origin_url), ("node02", dest_url)].map(|(name, address)| NodeInfo {
        name: name.into(),
        address,
        registered_unix: 0,
    });
    // The tests' controllers that restart journal in `state`; this one keeps no journal.
    let controller = Arc::new(controller(&api_url, None, Duration::from_secs(20)));
    for node in &nodes {
        controller
            .register_node(&node.name, &node.address)
            .expect("register");
    }
    Setup {
        controller,
        api,
        origin,
        dest,
        state,
        api_url,
        nodes,
    }
}

fn kube_settings(api_url: &str) -> KubeSettings {
    let kube = HttpKube::new(&KubeConfig {
        server: api_url.into(),
        token: Some(API_TOKEN.into()),
        ..KubeConfig::default()
    })
    .expect("client");
    KubeSettings {
        api: Arc::new(kube),
        poll: Duration::from_millis(20),
    }
}

/// A controller in Kubernetes mode journaling in `state` (if any), with its own HTTP clients (a
/// controller that dies takes its connections with it).
fn controller(api_url: &str, state: Option<&Path>, timeout: Duration) -> Controller {
    let kube = kube_settings(api_url);
    let c = Controller::new(
        ControllerConfig {
            default_namespace: "default".into(),
            default_scheme: "http".into(),
            migration_timeout: timeout,
            stream_during_checkpoint: true,
        },
        Arc::new(HttpNodes::new(
            reqwest::Client::new(),
            token(),
            Duration::from_secs(20),
        )),
    )
    .with_kube(kube.api, kube.poll);
    match state {
        Some(dir) => c.with_journal(Journal::open(dir).expect("journal")),
        None => c,
    }
}

fn request(deployment: &str) -> MigrateRequest {
    MigrateRequest {
        deployment: Some(deployment.into()),
        namespace: Some("default".into()),
        origin_node: "node01".into(),
        dest_node: "node02".into(),
        ..MigrateRequest::default()
    }
}

async fn wait_terminal(c: &Controller, id: &str) -> Migration {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = c.migration(id).expect("record");
        if m.phase.is_terminal() {
            return m;
        }
        assert!(Instant::now() < deadline, "stuck: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deployment_moves_with_its_checkpoint() {
    let s = setup(1, false).await;
    let started = s
        .controller
        .start(request("mosquitto"))
        .await
        .expect("start");
    assert_eq!(started.phase, Phase::Pending);
    let k = started.kubernetes.as_ref().expect("kubernetes report");
    assert_eq!(k.old_pods, vec!["mosquitto-7d4b9c8f5-x2x9q"]);
    assert_eq!(started.containers, vec!["mosquitto"]);

    let m = wait_terminal(&s.controller, &started.id).await;
    assert_eq!(m.phase, Phase::Done, "{m:?}");
    let k = m.kubernetes.as_ref().expect("kubernetes report");
    assert_eq!(k.new_pods, vec!["mosquitto-7d4b9c8f5-q8zkp"]);
    assert!(k.state_restored);
    assert_eq!(k.replicas, 1);
    assert!(m.checkpoint_bytes >= 300_000, "{m:?}");
    assert!(m.bytes_transferred > 0 && m.bytes_transferred < m.checkpoint_bytes);
    let phases: Vec<Phase> = m.timings.iter().map(|t| t.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Pending,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
            Phase::Finishing
        ]
    );
    assert!(m.downtime_ms.is_some(), "{m:?}");

    let api = s.api.lock().expect("lock");
    // The new pod was created from the checkpoint streamed to the destination.
    assert_eq!(api.restored_from, Some(identity()));
    // The requests, in order (pod listings repeat while polling).
    let mut seen: Vec<String> = api
        .requests
        .iter()
        .map(|(m, p, _, _)| format!("{m} {p}"))
        .collect();
    seen.dedup();
    let selector = "labelSelector=app%3Dmosquitto";
    assert_eq!(
        seen,
        [
            "GET /apis/apps/v1/namespaces/default/deployments/mosquitto".to_string(),
            format!(
                "GET /api/v1/namespaces/default/pods?{selector}&fieldSelector=spec.nodeName%3Dnode01"
            ),
            "PATCH /apis/apps/v1/namespaces/default/deployments/mosquitto".to_string(),
            format!(
                "GET /api/v1/namespaces/default/pods?{selector}&fieldSelector=spec.nodeName%3Dnode01"
            ),
            "PATCH /apis/apps/v1/namespaces/default/deployments/mosquitto".to_string(),
            format!(
                "GET /api/v1/namespaces/default/pods?{selector}&fieldSelector=spec.nodeName%3Dnode02"
            ),
        ]
    );
    let patches: Vec<(Value, &str)> = api
        .requests
        .iter()
        .filter(|r| r.0 == "PATCH")
        .map(|r| (serde_json::from_str(&r.3).expect("json"), r.2.as_str()))
        .collect();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[0], (scale_patch(0), "application/merge-patch+json"));
    assert_eq!(patches[1].0, pin_patch("node02", 1));
    assert_eq!(
        patches[1].0["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0],
        serde_json::json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["node02"]})
    );
    // Nothing left behind: the origin's checkpoint and marks are gone, the destination's consumed.
    for dir in [s.origin.path(), s.dest.path()] {
        let store = Store::open(dir.join("checkpoints")).expect("store");
        assert!(store.pending(&identity()).expect("pending").is_none());
        assert_eq!(
            std::fs::read_dir(dir.join("marks")).expect("marks").count(),
            0
        );
    }
}

#[tokio::test]
async fn missing_checkpoint_rolls_back_to_the_origin() {
    let s = setup(1, true).await;
    let started = s
        .controller
        .start(request("mosquitto"))
        .await
        .expect("start");
    let m = wait_terminal(&s.controller, &started.id).await;
    assert_eq!(m.phase, Phase::RolledBack, "{m:?}");
    let failure = m.failure.expect("failure");
    assert!(failure.reason.contains("no checkpoint"), "{failure:?}");
    assert!(
        failure
            .recovery
            .iter()
            .any(|r| r.contains("pinned to node01")),
        "{failure:?}"
    );
    let api = s.api.lock().expect("lock");
    let last_patch = api
        .requests
        .iter()
        .rev()
        .find(|r| r.0 == "PATCH")
        .expect("patch");
    assert_eq!(
        serde_json::from_str::<Value>(&last_patch.3).expect("json"),
        pin_patch("node01", 1)
    );
    assert!(api.restored_from.is_none());
    // The mark the broken shim left is removed, so a later stop does not checkpoint.
    assert_eq!(
        std::fs::read_dir(s.origin.path().join("marks"))
            .expect("marks")
            .count(),
        0
    );
}

#[tokio::test]
async fn refusals_name_the_problem() {
    let s = setup(3, false).await;
    match s.controller.start(request("mosquitto")).await {
        Err(ControllerError::BadRequest { message, .. }) => {
            assert!(message.contains("3 replicas"), "{message}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
    match s.controller.start(request("nope")).await {
        Err(ControllerError::NotFound(message)) => {
            assert!(
                message.contains("deployments.apps \"nope\" not found"),
                "{message}"
            )
        }
        other => panic!("expected 404, got {other:?}"),
    }
    // Nothing was patched, and the refused workload can be migrated later (no 409).
    let api = s.api.lock().expect("lock");
    assert!(api.requests.iter().all(|r| r.0 == "GET"));
}

/// A controller journaling in `s.state` starts the migration of the Deployment and dies where
/// `hang` says: its runtime is shut down, with every task of it. Returns the migration's id.
async fn die_mid_migration(s: &Setup, hang: Hang) -> String {
    s.api.lock().expect("lock").hang = Some(hang.clone());
    let (api, api_url, state, nodes) = (
        s.api.clone(),
        s.api_url.clone(),
        s.state.path().to_path_buf(),
        s.nodes.clone(),
    );
    let id = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let c = Arc::new(controller(&api_url, Some(&state), Duration::from_secs(20)));
        for node in &nodes {
            c.register_node(&node.name, &node.address)
                .expect("register");
        }
        let id = rt
            .block_on(c.start(request("mosquitto")))
            .expect("start")
            .id;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !api.lock().expect("lock").hung {
            assert!(Instant::now() < deadline, "never reached {hang:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(c);
        rt.shutdown_timeout(Duration::from_secs(5));
        id
    })
    .await
    .expect("the first controller");
    let mut api = s.api.lock().expect("lock");
    api.hang = None;
    api.requests.clear();
    id
}

/// A controller started on the journal the dead one left.
fn restarted(s: &Setup, timeout: Duration) -> Arc<Controller> {
    Arc::new(controller(&s.api_url, Some(s.state.path()), timeout))
}

/// Resolves what `c` found unfinished; returns the record of `id`.
async fn resume(c: &Arc<Controller>, id: &str) -> Migration {
    for handle in c.resume_interrupted() {
        handle.await.expect("recovery task");
    }
    let m = c.migration(id).expect("record after restart");
    assert!(m.phase.is_terminal(), "{m:?}");
    m
}

fn patches_made(s: &Setup) -> Vec<Value> {
    let api = s.api.lock().expect("lock");
    api.requests
        .iter()
        .filter(|r| r.0 == "PATCH")
        .map(|r| serde_json::from_str(&r.3).expect("json"))
        .collect()
}

fn has_checkpoint(node: &tempfile::TempDir) -> bool {
    let store = Store::open(node.path().join("checkpoints")).expect("store");
    store.pending(&identity()).expect("pending").is_some()
}

fn marks(node: &tempfile::TempDir) -> usize {
    std::fs::read_dir(node.path().join("marks"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn identities() -> Vec<KubeIdentity> {
    vec![KubeIdentity {
        namespace: "default".into(),
        workload: "mosquitto".into(),
        container: "mosquitto".into(),
    }]
}

/// Journals, with the registered nodes, the Kubernetes migration of `mosquitto` advanced up
/// to `phase` with `report` (its plan and stage) added to the defaults below, and marks the
/// origin's workload for it as the controller had; the record's id.
async fn journaled(s: &Setup, phase: Phase, report: KubeReport) -> String {
    let mut m = records::migration_at("mosquitto", "node01", "node02", phase);
    m.kubernetes = Some(KubeReport {
        deployment: "mosquitto".into(),
        replicas: 1,
        selector: "app=mosquitto".into(),
        identities: identities(),
        ..report
    });
    let journal = Journal::open(s.state.path()).expect("journal");
    journal.save(&m).expect("save");
    journal.save_nodes(|| s.nodes.to_vec()).expect("nodes");
    HttpNodes::new(reqwest::Client::new(), token(), Duration::from_secs(20))
        .kube_workloads(
            &s.nodes[0],
            &WorkloadsRequest {
                migration: m.id.clone(),
                action: WorkloadAction::Mark,
                identities: identities(),
            },
        )
        .await
        .expect("mark");
    m.id
}

/// A record journaled before the scale-down: the origin is marked, nothing else happened.
async fn journaled_before_stop(s: &Setup) -> String {
    let report = KubeReport {
        stage: Some(KubeStage::BeforeStop),
        ..KubeReport::default()
    };
    journaled(s, Phase::Checkpointing, report).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_before_the_pod_stopped_unmarks_the_origin_and_patches_nothing() {
    for scale_down_sent in [false, true] {
        let s = setup(1, false).await;
        let id = if scale_down_sent {
            // Journaled as scaled to 0; the patch never reached the API.
            die_mid_migration(
                &s,
                Hang {
                    patch: scale_patch(0),
                    after: false,
                },
            )
            .await
        } else {
            journaled_before_stop(&s).await
        };
        assert_eq!(marks(&s.origin), 1, "{scale_down_sent}");
        let c = restarted(&s, Duration::from_secs(20));
        let m = resume(&c, &id).await;
        assert_eq!(m.phase, Phase::Failed, "{scale_down_sent}: {m:?}");
        let failure = m.failure.as_ref().expect("failure");
        assert!(
            failure
                .reason
                .starts_with("the controller restarted while checkpointing; "),
            "{failure:?}"
        );
        assert!(
            failure
                .recovery
                .iter()
                .any(|r| r == "removed the marks on node01"),
            "{failure:?}"
        );
        assert_eq!(marks(&s.origin), 0, "a later stop would checkpoint");
        // Journaled as scaled to 0, the Deployment was asked whether it had been.
        let steps = &m.kubernetes.as_ref().expect("kubernetes report").steps;
        assert_eq!(
            steps.iter().any(|step| step
                == "after the controller restarted: the deployment has 1 replica(s), pinned to no node"),
            scale_down_sent,
            "{steps:?}"
        );
        assert!(patches_made(&s).is_empty(), "{:?}", patches_made(&s));
        let api = s.api.lock().expect("lock");
        assert_eq!(api.deployment_state(), (1, None));
        assert!(api.restored_from.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_scale_to_zero_rolls_back_to_the_origin() {
    for (hang, phase) in [
        // The pod stopped with its checkpoint; the answer never came back.
        (
            Hang {
                patch: scale_patch(0),
                after: true,
            },
            "checkpointing",
        ),
        // The checkpoint reached the destination; the scale-up was journaled, never sent.
        (
            Hang {
                patch: pin_patch("node02", 1),
                after: false,
            },
            "restoring",
        ),
    ] {
        let s = setup(1, false).await;
        let id = die_mid_migration(&s, hang.clone()).await;
        assert!(has_checkpoint(&s.origin));
        assert_eq!(has_checkpoint(&s.dest), phase == "restoring");
        assert_eq!(s.api.lock().expect("lock").deployment_state(), (0, None));
        let c = restarted(&s, Duration::from_secs(20));
        let m = resume(&c, &id).await;
        assert_eq!(m.phase, Phase::RolledBack, "{hang:?}: {m:?}");
        let failure = m.failure.as_ref().expect("failure");
        assert_eq!(
            failure.reason,
            format!("the controller restarted while {phase}; rolled back to node01")
        );
        assert!(m.downtime_ms.is_some(), "{m:?}");
        // The destination's copy goes before the origin runs the pod again from its own.
        assert_eq!(patches_made(&s), [pin_patch("node01", 1)]);
        assert!(!has_checkpoint(&s.dest), "{hang:?}");
        assert!(has_checkpoint(&s.origin), "the origin restores from it");
        assert_eq!(marks(&s.origin), 0);
        let api = s.api.lock().expect("lock");
        assert_eq!(api.deployment_state(), (1, Some("node01".into())));
        assert!(api.restored_from.is_none(), "nothing ran on node02");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_scale_up_finishes_when_the_new_pod_runs_from_the_checkpoint() {
    let s = setup(1, false).await;
    let id = die_mid_migration(
        &s,
        Hang {
            patch: pin_patch("node02", 1),
            after: true,
        },
    )
    .await;
    let c = restarted(&s, Duration::from_secs(20));
    let m = resume(&c, &id).await;
    records::assert_done_after_restart_while(&m, "restoring");
    let k = m.kubernetes.as_ref().expect("kubernetes report");
    assert!(k.state_restored);
    assert_eq!(k.new_pods, vec!["mosquitto-7d4b9c8f5-q8zkp"]);
    assert!(m.destination_running);
    assert!(patches_made(&s).is_empty(), "{:?}", patches_made(&s));
    assert_eq!(s.api.lock().expect("lock").restored_from, Some(identity()));
    // Finished as the driver does: nothing left on either node.
    for node in [&s.origin, &s.dest] {
        assert!(!has_checkpoint(node));
        assert_eq!(marks(node), 0);
    }
}

/// The new pod ran and the controller died while removing the origin's checkpoint: the next
/// one only removes it, without reading or patching the Deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_finishing_only_removes_the_origins_checkpoint() {
    let s = setup(1, false).await;
    let report = KubeReport {
        stage: Some(KubeStage::ScaledUp),
        state_restored: true,
        ..KubeReport::default()
    };
    let id = journaled(&s, Phase::Finishing, report).await;
    // The origin's checkpoint, as its pod's stop left it.
    s.api.lock().expect("lock").stop_origin_pod();
    assert!(has_checkpoint(&s.origin));
    let c = restarted(&s, Duration::from_secs(20));
    let m = resume(&c, &id).await;
    records::assert_done_after_restart_while(&m, "finishing");
    let steps = &m.kubernetes.as_ref().expect("kubernetes report").steps;
    assert!(
        steps
            .iter()
            .any(|step| step == "removed the checkpoint from node01"),
        "{steps:?}"
    );
    assert!(!has_checkpoint(&s.origin));
    assert_eq!(marks(&s.origin), 0);
    let api = s.api.lock().expect("lock");
    assert!(api.requests.is_empty(), "{:?}", api.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_scale_up_without_a_ready_pod_fails_and_the_origin_keeps_its_checkpoint()
 {
    let s = setup(1, false).await;
    s.api.lock().expect("lock").dest_never_ready = true;
    let id = die_mid_migration(
        &s,
        Hang {
            patch: pin_patch("node02", 1),
            after: true,
        },
    )
    .await;
    let c = restarted(&s, Duration::from_secs(1));
    let handles = c.resume_interrupted();
    // The workload stays claimed while it is being resolved.
    match c.start(request("mosquitto")).await {
        Err(ControllerError::Conflict(message)) => assert!(message.contains(&id), "{message}"),
        other => panic!("expected 409, got {other:?}"),
    }
    for handle in handles {
        handle.await.expect("recovery task");
    }
    let m = c.migration(&id).expect("record");
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    let failure = m.failure.as_ref().expect("failure");
    assert!(
        failure
            .reason
            .starts_with("the controller restarted while restoring; on node02: ")
            && failure.reason.contains("not running and ready"),
        "{failure:?}"
    );
    assert!(
        failure
            .recovery
            .iter()
            .any(|r| r.contains("stays pinned to node02")),
        "{failure:?}"
    );
    // Never pinned back: a second copy of the pod must not start on the origin.
    assert!(patches_made(&s).is_empty(), "{:?}", patches_made(&s));
    assert!(has_checkpoint(&s.origin));
    // Resolved: the claim is released (the pod is no longer on node01, hence 404).
    match c.start(request("mosquitto")).await {
        Err(ControllerError::NotFound(_)) => {}
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_rollback_finishes_the_rollback() {
    let s = setup(1, false).await;
    // The scale-up is refused, so the driver rolls back; it dies once the Deployment is pinned
    // back to the origin, its journal still saying "pinned to the destination and scaled up".
    s.api.lock().expect("lock").refuse = Some(pin_patch("node02", 1));
    let id = die_mid_migration(
        &s,
        Hang {
            patch: pin_patch("node01", 1),
            after: true,
        },
    )
    .await;
    assert_eq!(
        s.api.lock().expect("lock").deployment_state(),
        (1, Some("node01".into()))
    );
    // The origin's pod is back (the restored one): not waited for as if it were stopping.
    let c = restarted(&s, Duration::from_secs(3));
    let m = resume(&c, &id).await;
    assert_eq!(m.phase, Phase::RolledBack, "{m:?}");
    let failure = m.failure.as_ref().expect("failure");
    assert_eq!(
        failure.reason,
        "the controller restarted while restoring; rolled back to node01"
    );
    assert!(
        !failure.recovery.iter().any(|r| r.contains("had not gone")),
        "{failure:?}"
    );
    assert_eq!(patches_made(&s), [pin_patch("node01", 1)]);
    assert!(!has_checkpoint(&s.dest));
    assert!(has_checkpoint(&s.origin));
}

#[tokio::test]
async fn post_copy_is_refused_in_kubernetes_mode() {
    // Refused before anything is asked of the API server or the nodes.
    let c = controller("http://127.0.0.1:9", None, Duration::from_secs(5));
    let req = MigrateRequest {
        post_copy: true,
        ..request("mosquitto")
    };
    match Arc::new(c).start(req).await {
        Err(ControllerError::BadRequest { message, .. }) => {
            assert_eq!(message, "postCopy is not supported in Kubernetes mode yet")
        }
        other => panic!("expected 400, got {other:?}"),
    }
}
