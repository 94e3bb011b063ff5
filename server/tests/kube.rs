//! Kubernetes mode against a fake API server on loopback that answers with recorded API
//! responses (`tests/fixtures/kube/`) and plays the kubelet and the shim: scaling to zero
//! stops the origin pod, which writes its checkpoint when the agent's mark is there; pinning
//! to the destination runs the new pod, which consumes the checkpoint the agent received.
//! Real controller, node agents, HttpNodes and HttpKube over HTTP. A real cluster is the only
//! end-to-end check of this path.

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
use mig_server::kube::client::{HttpKube, KubeConfig};
use mig_server::kube::{pin_patch, scale_patch};
use mig_server::migration::{Migration, Phase};
use mig_server::node_client::HttpNodes;
use serde_json::Value;

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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cluster {
    Running,
    ScaledDown,
    Pinned,
}

struct ApiState {
    cluster: Cluster,
    /// method, path?query, content-type, body
    requests: Vec<(String, String, String, String)>,
    origin_state: PathBuf,
    dest_state: PathBuf,
    /// The origin's "shim" ignores the mark (a checkpoint that never happens).
    shim_broken: bool,
    /// What the destination's store held when the new pod's container was created.
    restored_from: Option<WorkloadIdentity>,
    replicas: i64,
}

fn identity() -> WorkloadIdentity {
    WorkloadIdentity::kubernetes("default", "mosquitto", "mosquitto").expect("identity")
}

impl ApiState {
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
    let mut s = state.lock().expect("lock");
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
        String::from_utf8_lossy(&body).into(),
    ));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {API_TOKEN}"))
    {
        return (StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    let deployments = "/apis/apps/v1/namespaces/default/deployments/";
    let json = |v: Value| axum::Json(v).into_response();
    match (method.as_str(), uri.path()) {
        ("GET", p) if p == format!("{deployments}mosquitto") => {
            let mut d = fixture("deployment.json");
            d["spec"]["replicas"] = s.replicas.into();
            json(d)
        }
        ("GET", p) if p.starts_with(deployments) => (
            StatusCode::NOT_FOUND,
            axum::Json(fixture("status-not-found.json")),
        )
            .into_response(),
        ("PATCH", p) if p == format!("{deployments}mosquitto") => {
            let patch: Value = serde_json::from_slice(&body).expect("patch json");
            if patch == scale_patch(0) {
                s.stop_origin_pod();
                s.cluster = Cluster::ScaledDown;
            } else if patch["spec"]["template"]["spec"]["affinity"].is_object() {
                s.cluster = Cluster::Pinned;
            }
            json(fixture("deployment-patched.json"))
        }
        ("GET", "/api/v1/namespaces/default/pods") => {
            let query = uri.query().unwrap_or("");
            let on = |node: &str| query.contains(&format!("spec.nodeName%3D{node}"));
            let list = match s.cluster {
                Cluster::Running if on("node01") => fixture("pods-origin.json"),
                Cluster::Pinned if on("node02") => {
                    s.start_dest_pod();
                    fixture("pods-dest-running.json")
                }
                _ => fixture("pods-empty.json"),
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
}

async fn setup(replicas: i64, shim_broken: bool) -> Setup {
    let http = reqwest::Client::new();
    let (origin_url, origin) = agent("node01", &http).await;
    let (dest_url, dest) = agent("node02", &http).await;
    let api = Arc::new(Mutex::new(ApiState {
        cluster: Cluster::Running,
        requests: vec![],
        origin_state: origin.path().into(),
        dest_state: dest.path().into(),
        shim_broken,
        restored_from: None,
        replicas,
    }));
    let api_url = serve(
        axum::Router::new()
            .fallback(fake_api)
            .with_state(api.clone()),
    )
    .await;
    let kube = HttpKube::new(&KubeConfig {
        server: api_url,
        token: Some(API_TOKEN.into()),
        ..KubeConfig::default()
    })
    .expect("client");
    let controller = Controller::new(
        ControllerConfig {
            default_namespace: "default".into(),
            default_scheme: "http".into(),
            migration_timeout: Duration::from_secs(20),
            stream_during_checkpoint: true,
        },
        Arc::new(HttpNodes::new(http, token(), Duration::from_secs(20))),
    )
    .with_kube(Arc::new(kube), Duration::from_millis(20));
    let controller = Arc::new(controller);
    controller
        .register_node("node01", &origin_url)
        .expect("register");
    controller
        .register_node("node02", &dest_url)
        .expect("register");
    Setup {
        controller,
        api,
        origin,
        dest,
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
            Phase::Restoring
        ]
    );

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
