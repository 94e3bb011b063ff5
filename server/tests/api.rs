//! The REST API and the whole migration flow without root: real controller and node agents
//! over HTTP on loopback, with a fake containerd whose "shim" writes a checkpoint on a kill
//! when a migration mark is present and restores (consumes) it on start, as the real one does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mig_checkpoint::{EngineInfo, Store, WorkloadIdentity};
use mig_server::agent::{AgentConfig, NodeAgent};
use mig_server::agent_routes::AgentState;
use mig_server::auth::Token;
use mig_server::containerd::{ContainerInfo, Containerd, ContainerdError, TaskStatus};
use mig_server::controller::{Controller, ControllerConfig};
use mig_server::node_client::HttpNodes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789";
const RUNTIME: &str = "io.containerd.mig.v2";
const NS: &str = "default";

/// One clock for the calls of every fake node, to check the order between nodes.
static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[derive(Default)]
struct FakeState {
    containers: BTreeMap<String, (ContainerInfo, Option<TaskStatus>)>,
    calls: Vec<String>,
    fail_restore: bool,
    /// The restore takes effect (the task runs) but its answer says it failed: a lost reply.
    restore_runs_but_fails: bool,
    /// Calls with their place in one order shared by all fakes (see [`SEQ`]).
    ordered: Vec<(usize, String)>,
    fail_checkpoint: bool,
    kill_delay: Duration,
    /// How long deleting a container takes (`ctr` takes 100-500 ms on a real node).
    delete_delay: Duration,
    /// Deleting a container fails.
    fail_delete_container: bool,
    payload_len: usize,
    /// The marks the shim was asked to checkpoint with, as it read them.
    marks: Vec<Value>,
    /// Post-copy, destination: the start fails before fetching any page.
    fail_before_pages: bool,
}

/// containerd plus our shim's checkpoint-on-kill / restore-on-start, in memory.
struct FakeContainerd {
    state_dir: PathBuf,
    inner: Arc<Mutex<FakeState>>,
}

impl FakeContainerd {
    fn new(state_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            state_dir: state_dir.to_path_buf(),
            inner: Arc::new(Mutex::new(FakeState {
                payload_len: 64 * 1024,
                ..Default::default()
            })),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.inner.lock().expect("lock"))
    }

    fn add_running(&self, id: &str, workload: &str) {
        let info = ContainerInfo {
            namespace: NS.into(),
            id: id.into(),
            image: "docker.io/library/busybox:latest".into(),
            runtime: RUNTIME.into(),
            labels: [("mig.dev/workload".to_string(), workload.to_string())].into(),
            spec: json!({"process": {"args": ["sh"]}}),
        };
        self.with(|s| {
            s.containers
                .insert(id.into(), (info, Some(TaskStatus::Running)))
        });
    }

    fn status(&self, id: &str) -> Option<Option<TaskStatus>> {
        self.with(|s| s.containers.get(id).map(|c| c.1))
    }

    fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// The node's store, with its root in memory as the agent's (a plain directory here).
    fn store(&self) -> Store {
        Store::open(self.state_dir.join("checkpoints"))
            .and_then(|s| s.with_memory(self.state_dir.join("memory")))
            .expect("store")
    }

    /// The shim's post-copy checkpoint: one without pages, the task left running (frozen),
    /// its pages served on `pages/<key>.sock` to one client. The fake protocol: the client
    /// sends `WANT`, gets `PAGES`, sends `DONE` and closes its writes; then the processes exit.
    /// A client that closes before `DONE` makes the shim abort: the workload resumes, the
    /// checkpoint is removed.
    async fn checkpoint_post_copy(&self, id: &str, identity: &WorkloadIdentity, mark: &Path) {
        let writer = self.store().begin(identity).expect("begin");
        let images = writer.images_dir().expect("images");
        std::fs::write(images.join("core-1.img"), b"registers, no pages").expect("write");
        writer
            .commit(EngineInfo::new("criu", "4.2.1"), "busybox")
            .expect("commit");
        std::fs::remove_file(mark).expect("consume mark");
        let dir = self.state_dir.join("pages");
        std::fs::create_dir_all(&dir).expect("pages dir");
        let socket = dir.join(format!("{}.sock", identity.safe_key()));
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let store = self.store();
        let identity = identity.clone();
        let id = id.to_string();
        let this = self.inner.clone();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            drop(listener);
            let mut want = [0u8; 4];
            let mut served = false;
            if conn.read_exact(&mut want).await.is_ok() && &want == b"WANT" {
                conn.write_all(b"PAGES").await.expect("serve");
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest).await;
                served = rest == b"DONE";
            }
            std::fs::remove_file(&socket).expect("remove socket");
            let mut s = this.lock().expect("lock");
            if served {
                s.calls.push("pages served".into());
                if let Some(c) = s.containers.get_mut(&id) {
                    c.1 = Some(TaskStatus::Stopped);
                }
            } else {
                s.calls.push("pages aborted".into());
                store.remove(&identity).expect("remove pageless checkpoint");
            }
        });
    }

    /// The destination shim's start in post-copy: fetches the pages through the socket its
    /// incoming mark names.
    async fn fetch_pages(&self, identity: &WorkloadIdentity) -> Result<(), ContainerdError> {
        let incoming = self
            .state_dir
            .join("incoming")
            .join(format!("{}.json", identity.safe_key()));
        let Ok(bytes) = std::fs::read(&incoming) else {
            return Ok(());
        };
        let mark: Value = serde_json::from_slice(&bytes).expect("incoming mark");
        let Some(socket) = mark["pages_socket"].as_str() else {
            return Ok(());
        };
        assert!(Path::new(socket).is_absolute(), "{socket}");
        let failed = |message: &str| ContainerdError::Command {
            command: "start".into(),
            message: message.into(),
        };
        if self.with(|s| s.fail_before_pages) {
            return Err(failed("lazy restore failed before its first page"));
        }
        let mut conn = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| failed(&format!("connect {socket}: {e}")))?;
        conn.write_all(b"WANT").await.expect("want");
        let mut pages = [0u8; 5];
        conn.read_exact(&mut pages)
            .await
            .map_err(|e| failed(&format!("no pages: {e}")))?;
        assert_eq!(&pages, b"PAGES");
        if self.with(|s| s.fail_restore) {
            // Closed without DONE: the origin aborts.
            return Err(failed("criu lazy restore failed"));
        }
        conn.write_all(b"DONE").await.expect("done");
        conn.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.expect("origin closes");
        self.with(|s| s.calls.push("pages fetched".into()));
        Ok(())
    }

    fn not_found(id: &str) -> ContainerdError {
        ContainerdError::NotFound {
            namespace: NS.into(),
            id: id.into(),
        }
    }
}

/// Pseudo-random, so zstd cannot shrink it to nothing and a transfer takes a while.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[async_trait]
impl Containerd for FakeContainerd {
    async fn list_by_label(
        &self,
        _ns: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<String>, ContainerdError> {
        Ok(self.with(|s| {
            s.containers
                .values()
                .filter(|(i, _)| i.labels.get(key).map(String::as_str) == Some(value))
                .map(|(i, _)| i.id.clone())
                .collect()
        }))
    }

    async fn info(&self, _ns: &str, id: &str) -> Result<ContainerInfo, ContainerdError> {
        self.with(|s| s.containers.get(id).map(|c| c.0.clone()))
            .ok_or_else(|| Self::not_found(id))
    }

    async fn task_status(
        &self,
        _ns: &str,
        id: &str,
    ) -> Result<Option<TaskStatus>, ContainerdError> {
        Ok(self.status(id).flatten())
    }

    async fn kill(&self, ns: &str, id: &str, signal: &str) -> Result<(), ContainerdError> {
        let delay = self.with(|s| {
            s.calls.push(format!("kill {id} {signal}"));
            s.kill_delay
        });
        tokio::time::sleep(delay).await;
        let identity = WorkloadIdentity::container(ns, id).expect("identity");
        let mark = self
            .state_dir
            .join("marks")
            .join(format!("{}.json", identity.key()));
        if mark.exists() {
            let parsed: Value =
                serde_json::from_slice(&std::fs::read(&mark).expect("read mark")).expect("mark");
            self.with(|s| s.marks.push(parsed.clone()));
            if parsed["post_copy"] == true {
                self.checkpoint_post_copy(id, &identity, &mark).await;
                return Ok(());
            }
            if self.with(|s| s.fail_checkpoint) {
                return Err(ContainerdError::Command {
                    command: "kill".into(),
                    message: "criu dump failed".into(),
                });
            }
            // As the shim does for a migration: in memory where there is room.
            let len = self.with(|s| s.payload_len);
            let writer = self
                .store()
                .begin_transient(&identity, len as u64)
                .expect("begin");
            let images = writer.images_dir().expect("images");
            std::fs::write(images.join("pages-1.img"), noise(len)).expect("write");
            writer
                .commit(EngineInfo::new("criu", "4.2.1"), "busybox")
                .expect("commit");
            std::fs::remove_file(&mark).expect("consume mark");
        }
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(id) {
                c.1 = Some(TaskStatus::Stopped);
            }
        });
        Ok(())
    }

    async fn create(&self, info: &ContainerInfo, runtime: &str) -> Result<(), ContainerdError> {
        self.with(|s| {
            s.calls.push(format!("create {} {runtime}", info.id));
            if s.containers.contains_key(&info.id) {
                return Err(ContainerdError::Command {
                    command: "create".into(),
                    message: "already exists".into(),
                });
            }
            s.containers.insert(info.id.clone(), (info.clone(), None));
            Ok(())
        })
    }

    async fn create_task(&self, _ns: &str, id: &str) -> Result<(), ContainerdError> {
        self.with(|s| {
            s.calls.push(format!("create-task {id}"));
            match s.containers.get_mut(id) {
                Some(c) if c.1.is_none() => {
                    c.1 = Some(TaskStatus::Created);
                    Ok(())
                }
                Some(_) => Err(ContainerdError::Command {
                    command: "create-task".into(),
                    message: "already exists".into(),
                }),
                None => Err(Self::not_found(id)),
            }
        })
    }

    async fn start_task(&self, ns: &str, id: &str) -> Result<(), ContainerdError> {
        let identity = WorkloadIdentity::container(ns, id).expect("identity");
        let (fail, runs_but_fails) = self.with(|s| {
            s.calls.push(format!("start {id}"));
            let at = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s.ordered.push((at, format!("start {id}")));
            (s.fail_restore, s.restore_runs_but_fails)
        });
        if self.status(id).is_none() {
            return Err(Self::not_found(id));
        }
        self.fetch_pages(&identity).await?;
        if let Some(checkpoint) = self.store().pending(&identity).expect("pending") {
            if fail {
                return Err(ContainerdError::Command {
                    command: "start".into(),
                    message: "criu restore failed".into(),
                });
            }
            checkpoint.verify().expect("restored checkpoint verifies");
            self.store().consume(checkpoint).expect("consume");
        }
        self.with(|s| {
            if let Some(c) = s.containers.get_mut(id) {
                c.1 = Some(TaskStatus::Running);
            }
        });
        if runs_but_fails {
            return Err(ContainerdError::Command {
                command: "start".into(),
                message: "reply lost".into(),
            });
        }
        Ok(())
    }

    async fn delete_task(&self, _ns: &str, id: &str, _force: bool) -> Result<(), ContainerdError> {
        self.with(|s| {
            s.calls.push(format!("delete-task {id}"));
            let at = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s.ordered.push((at, format!("delete-task {id}")));
            match s.containers.get_mut(id) {
                Some(c) => {
                    c.1 = None;
                    Ok(())
                }
                None => Err(Self::not_found(id)),
            }
        })
    }

    async fn delete_container(&self, _ns: &str, id: &str) -> Result<(), ContainerdError> {
        let (delay, fail) = self.with(|s| {
            s.calls.push(format!("delete-container {id}"));
            (s.delete_delay, s.fail_delete_container)
        });
        tokio::time::sleep(delay).await;
        if fail {
            return Err(ContainerdError::Command {
                command: "containers delete".into(),
                message: "snapshot busy".into(),
            });
        }
        self.with(|s| {
            s.containers
                .remove(id)
                .map(drop)
                .ok_or_else(|| Self::not_found(id))
        })
    }
}

struct Cluster {
    controller_url: String,
    origin_url: String,
    dest_url: String,
    origin: Arc<FakeContainerd>,
    dest: Arc<FakeContainerd>,
    http: reqwest::Client,
    _dirs: Vec<tempfile::TempDir>,
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

async fn agent(
    name: &str,
    http: &reqwest::Client,
) -> (String, Arc<FakeContainerd>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = FakeContainerd::new(dir.path());
    let agent = NodeAgent::new(
        AgentConfig {
            name: name.into(),
            state_dir: dir.path().into(),
            runtime: RUNTIME.into(),
            zstd_level: 1,
            wait_timeout: Duration::from_secs(5),
            memory_dir: Some(dir.path().join("memory")),
        },
        fake.clone(),
    )
    .expect("agent");
    let state = AgentState {
        agent: Arc::new(agent),
        http: http.clone(),
        token: token(),
    };
    let url = serve(mig_server::app(None, Some(state), token())).await;
    (url, fake, dir)
}

async fn cluster() -> Cluster {
    cluster_streaming(true).await
}

/// A cluster whose controller streams checkpoints while they are written, or after.
async fn cluster_streaming(stream_during_checkpoint: bool) -> Cluster {
    let http = reqwest::Client::new();
    let (origin_url, origin, d1) = agent("node01", &http).await;
    let (dest_url, dest, d2) = agent("node02", &http).await;
    let controller = Arc::new(Controller::new(
        ControllerConfig {
            default_namespace: NS.into(),
            default_scheme: "http".into(),
            migration_timeout: Duration::from_secs(20),
            stream_during_checkpoint,
        },
        Arc::new(HttpNodes::new(
            http.clone(),
            token(),
            Duration::from_secs(20),
        )),
    ));
    controller
        .register_node("node01", &origin_url)
        .expect("register");
    controller
        .register_node("node02", &dest_url)
        .expect("register");
    let controller_url = serve(mig_server::app(Some(controller), None, token())).await;
    origin.add_running("counter", "counter");
    Cluster {
        controller_url,
        origin_url,
        dest_url,
        origin,
        dest,
        http,
        _dirs: vec![d1, d2],
    }
}

impl Cluster {
    async fn post(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.controller_url))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A node agent's call, as the controller makes it.
    async fn agent_call(&self, agent_url: &str, op: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{agent_url}/agent/v1/{op}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.controller_url))
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), r.text().await.expect("text"))
    }

    async fn migrate(&self, body: Value) -> (u16, Value) {
        self.post("/migrate", &body.to_string(), Some(TOKEN)).await
    }

    /// The record of `id` once it is in `phase`; fails if it ends without being seen there.
    async fn wait_phase(&self, id: &str, phase: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, text) = self.get(&format!("/migrations/{id}")).await;
            assert_eq!(status, 200, "{text}");
            let m: Value = serde_json::from_str(&text).expect("json");
            let now = m["phase"].as_str().unwrap_or("");
            if now == phase {
                return m;
            }
            assert!(
                !["done", "failed", "rolled_back"].contains(&now),
                "ended without being seen {phase}: {m}"
            );
            assert!(Instant::now() < deadline, "migration stuck: {m}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_terminal(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, text) = self.get(&format!("/migrations/{id}")).await;
            assert_eq!(status, 200, "{text}");
            let m: Value = serde_json::from_str(&text).expect("json");
            if ["done", "failed", "rolled_back"].contains(&m["phase"].as_str().unwrap_or("")) {
                return m;
            }
            assert!(Instant::now() < deadline, "migration stuck: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn counter_to(dest: &str) -> Value {
    json!({"deployment": "counter", "originNode": "node01", "destNode": dest})
}

/// Neither of the node's checkpoint stores (on disk, in memory) holds anything.
fn no_checkpoint(state: &Path) -> bool {
    dir_is_empty(&state.join("checkpoints")) && dir_is_empty(&state.join("memory"))
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[tokio::test]
async fn migration_moves_the_workload_and_removes_it_from_the_origin() {
    migrates_and_cleans_up(cluster().await).await;
}

#[tokio::test]
async fn migration_streaming_after_the_checkpoint_moves_the_workload_too() {
    migrates_and_cleans_up(cluster_streaming(false).await).await;
}

async fn migrates_and_cleans_up(c: Cluster) {
    c.origin.with(|s| s.payload_len = 2 << 20);
    let (status, body) = c.migrate(counter_to("node02")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let m = c.wait_terminal(&id).await;
    assert_eq!(m["phase"], "done", "{m}");
    assert!(m["downtimeMs"].is_u64(), "{m}");
    assert!(
        m["bytesTransferred"].as_u64().expect("bytes") > 1 << 20,
        "{m}"
    );
    assert_eq!(phases_timed(&m), SUCCESS_PHASES);
    assert_eq!(c.dest.status("counter"), Some(Some(TaskStatus::Running)));
    assert_eq!(c.origin.status("counter"), None, "still on the origin");
    assert_eq!(m["postCopy"], false, "{m}");
    // The fake shim writes in memory, as the shim does for a migration with room for it; so
    // did the destination.
    assert_eq!(
        m["checkpointInMemory"],
        json!({"origin": true, "destination": true}),
        "{m}"
    );
    let marks = c.origin.with(|s| s.marks.clone());
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(marks[0].get("post_copy").is_none(), "{marks:?}");
    assert_eq!(marks[0]["durable"], false, "{marks:?}");
    assert!(
        c.dest
            .calls()
            .contains(&format!("create counter {RUNTIME}"))
    );
    // Checkpoints consumed (dest) and removed (origin); no migration records left behind.
    for fake in [&c.origin, &c.dest] {
        assert!(dir_is_empty(&fake.state_dir.join("checkpoints")));
        assert!(dir_is_empty(&fake.state_dir.join("migrations")));
        assert!(dir_is_empty(&fake.state_dir.join("marks")));
    }
    let (_, metrics) = c.get("/metrics").await;
    assert!(
        metrics.contains("mig_migrations{phase=\"done\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("mig_phase_duration_seconds_count{phase=\"transferring\"} 1"));
    assert!(metrics.contains("mig_phase_duration_seconds_count{phase=\"finishing\"} 1"));
    assert!(metrics.contains("mig_migrations{phase=\"finishing\"} 0"));
}

/// The phases a successful migration is timed in, in order (`done` ends it).
const SUCCESS_PHASES: [&str; 5] = [
    "pending",
    "checkpointing",
    "transferring",
    "restoring",
    "finishing",
];

/// The phases of a record's timings, in order.
fn phases_timed(m: &Value) -> Vec<&str> {
    m["timings"]
        .as_array()
        .expect("timings")
        .iter()
        .map(|t| t["phase"].as_str().expect("phase"))
        .collect()
}

/// How long `phase` took, from a record's timings.
fn took_ms(m: &Value, phase: &str) -> u64 {
    m["timings"]
        .as_array()
        .expect("timings")
        .iter()
        .find(|t| t["phase"] == phase)
        .and_then(|t| t["duration_ms"].as_u64())
        .unwrap_or_else(|| panic!("no duration of {phase}: {m}"))
}

/// The origin's cleanup (deleting its stopped container and its checkpoint, slow with `ctr`)
/// is timed as `finishing`, entered when the destination runs the workload: `restoring` is the
/// restore alone, and the downtime is over before the cleanup starts.
#[tokio::test]
async fn the_origin_cleanup_is_timed_as_finishing_not_restoring() {
    const CLEANUP: Duration = Duration::from_millis(300);
    let c = cluster().await;
    c.origin.with(|s| s.delete_delay = CLEANUP);
    let (_, body) = c.migrate(counter_to("node02")).await;
    let id = body["id"].as_str().expect("id").to_string();
    let finishing = c.wait_phase(&id, "finishing").await;
    assert_eq!(finishing["destinationRunning"], true, "{finishing}");
    assert!(finishing["downtimeMs"].is_u64(), "{finishing}");
    assert_eq!(c.dest.status("counter"), Some(Some(TaskStatus::Running)));
    let m = c.wait_terminal(&id).await;
    assert_eq!(m["phase"], "done", "{m}");
    assert_eq!(phases_timed(&m), SUCCESS_PHASES);
    let cleanup = u64::try_from(CLEANUP.as_millis()).expect("ms");
    assert!(took_ms(&m, "restoring") < cleanup, "{m}");
    assert!(took_ms(&m, "finishing") >= cleanup, "{m}");
    assert_eq!(m["downtimeMs"], finishing["downtimeMs"], "{m}");
    assert_eq!(c.origin.status("counter"), None, "still on the origin");
}

/// An origin cleanup that fails leaves the migration `done` through `finishing`, with a
/// warning: the workload runs on the destination and is not rolled back. A cleanup asked again
/// (as a restarted controller does) once the container is gone removes what is left.
#[tokio::test]
async fn a_failed_origin_cleanup_is_a_warning_after_finishing() {
    let c = cluster().await;
    c.origin.with(|s| s.fail_delete_container = true);
    let (_, body) = c.migrate(counter_to("node02")).await;
    let id = body["id"].as_str().expect("id").to_string();
    let m = c.wait_terminal(&id).await;
    assert_eq!(m["phase"], "done", "{m}");
    assert!(m["failure"].is_null(), "{m}");
    assert_eq!(phases_timed(&m), SUCCESS_PHASES);
    let warnings = m["warnings"].as_array().expect("warnings");
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.starts_with("origin cleanup: ") && w.contains("snapshot busy"))),
        "{m}"
    );
    assert_eq!(c.dest.status("counter"), Some(Some(TaskStatus::Running)));
    assert!(
        !c.origin.calls().contains(&"start counter".to_string()),
        "rolled back: {:?}",
        c.origin.calls()
    );
    assert!(!no_checkpoint(&c.origin.state_dir));
    // The container went after all (the delete landed, its answer did not).
    c.origin.with(|s| {
        s.fail_delete_container = false;
        s.containers.remove("counter")
    });
    let req = json!({"migration": id, "namespace": NS, "containers": ["counter"]});
    let (s, report) = c.agent_call(&c.origin_url, "finish", req).await;
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["done"], json!(["counter already gone from node01"]));
    assert!(no_checkpoint(&c.origin.state_dir));
}

#[tokio::test]
async fn unauthenticated_or_wrong_token_is_401() {
    let c = cluster().await;
    let body = counter_to("node02").to_string();
    let (status, err) = c.post("/migrate", &body, None).await;
    assert_eq!(status, 401);
    assert!(err["error"].as_str().expect("error").contains("missing"));
    let (status, _) = c.post("/migrate", &body, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = c
        .post("/register", r#"{"name":"x","address":"1.2.3.4:1"}"#, None)
        .await;
    assert_eq!(status, 401);
    assert_eq!(c.origin.calls(), Vec::<String>::new(), "nothing may happen");
}

#[tokio::test]
async fn bad_requests_are_4xx_with_a_reason() {
    let c = cluster().await;
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "invalid JSON"),
        (
            r#"{"originNode":"node01","destNode":"node02"}"#,
            400,
            "exactly one",
        ),
        (
            r#"{"deployment":"counter","originNode":"node01","destNode":"node01"}"#,
            400,
            "two different nodes",
        ),
        (
            r#"{"deployment":"counter","originNode":"node01","destNode":"node09"}"#,
            404,
            "unknown destination node",
        ),
        (
            r#"{"deployment":"../etc","originNode":"node01","destNode":"node02"}"#,
            400,
            "invalid deployment",
        ),
        (
            r#"{"deployment":"nope","originNode":"node01","destNode":"node02"}"#,
            404,
            "not found on origin",
        ),
        (
            r#"{"container":"nope","originNode":"node01","destNode":"node02"}"#,
            404,
            "not found on origin",
        ),
        (
            r#"{"deployment":"counter","namespace":"a/b","originNode":"node01","destNode":"node02"}"#,
            400,
            "invalid namespace",
        ),
        (
            r#"{"deployment":"counter","originNode":"node01","destNode":"node02","x":1}"#,
            400,
            "unknown field",
        ),
    ];
    for (body, want, needle) in cases {
        let (status, err) = c.post("/migrate", body, Some(TOKEN)).await;
        assert_eq!(status, want, "{body}: {err}");
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    let (status, err) = c
        .post(
            "/register",
            r#"{"name":"n/1","address":"h:1"}"#,
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = c.post("/register", r#"{"foo":1}"#, Some(TOKEN)).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["expected"].is_string());
    let (status, _) = c.get("/migrations/nope").await;
    assert_eq!(status, 404);
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
}

#[tokio::test]
async fn register_is_idempotent_and_lists_nodes() {
    let c = cluster().await;
    let body = r#"{"name":"node03","address":"127.0.0.1:9"}"#;
    let (s1, r1) = c.post("/register", body, Some(TOKEN)).await;
    let (s2, r2) = c.post("/register", body, Some(TOKEN)).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(
        (r1["new"].as_bool(), r2["new"].as_bool()),
        (Some(true), Some(false))
    );
    let (_, nodes) = c.get("/nodes").await;
    let nodes: Value = serde_json::from_str(&nodes).expect("json");
    assert_eq!(nodes.as_array().expect("array").len(), 3);
    assert_eq!(nodes[2]["address"], "http://127.0.0.1:9");
    let (s, _) = c
        .post(
            "/register",
            r#"{"id":"mosquitto-1","env":{"A":"b"}}"#,
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, 200);
    let (s, doc) = c.get("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(doc.contains("\"/migrate\""));
    let (s, _) = c.get("/healthz").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn second_migration_of_the_same_workload_is_409() {
    let c = cluster().await;
    c.origin.with(|s| s.kill_delay = Duration::from_millis(500));
    let (s1, first) = c.migrate(counter_to("node02")).await;
    assert_eq!(s1, 202, "{first}");
    let (s2, second) = c.migrate(counter_to("node02")).await;
    assert_eq!(s2, 409, "{second}");
    assert!(
        second["error"]
            .as_str()
            .expect("error")
            .contains("already being migrated")
    );
    let m = c.wait_terminal(first["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "done");
    // Once over, the workload can move again (back).
    let (s3, _) = c
        .migrate(json!({"deployment": "counter", "originNode": "node02", "destNode": "node01"}))
        .await;
    assert_eq!(s3, 202);
}

/// A destination that dies after taking part of the stream: it accepts the containers created
/// ahead (`prepare`), then reads a little of every other request and drops the connection.
async fn dying_destination() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let mut head = vec![0u8; 64];
            if conn.read_exact(&mut head).await.is_ok()
                && String::from_utf8_lossy(&head).starts_with("POST /agent/v1/prepare ")
            {
                let body = r#"{"done":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                continue;
            }
            // Small requests (the abort) get no answer either, without hanging the caller.
            let _ =
                tokio::time::timeout(Duration::from_millis(300), conn.read_exact(&mut buf)).await;
            drop(conn);
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn unreachable_destination_fails_before_the_workload_stops() {
    let c = cluster().await;
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (s, _) = c
        .post(
            "/register",
            &json!({"name": "node03", "address": format!("http://{closed}")}).to_string(),
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, 200);
    let (_, body) = c.migrate(counter_to("node03")).await;
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "failed", "{m}");
    assert_eq!(m["failure"]["phase"], "pending", "{m}");
    let reason = m["failure"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("node03") && reason.contains("prepare"),
        "{reason}"
    );
    assert!(m["downtimeMs"].is_null(), "{m}");
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    assert!(
        !c.origin.calls().iter().any(|call| call.starts_with("kill")),
        "the origin was stopped: {:?}",
        c.origin.calls()
    );
}

#[tokio::test]
async fn destination_dying_mid_transfer_rolls_back_on_the_origin() {
    let c = cluster().await;
    c.origin.with(|s| s.payload_len = 8 << 20);
    let dead = dying_destination().await;
    let (s, _) = c
        .post(
            "/register",
            &json!({"name": "node03", "address": dead}).to_string(),
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, 200);
    let (_, body) = c.migrate(counter_to("node03")).await;
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert_eq!(m["failure"]["phase"], "transferring", "{m}");
    let reason = m["failure"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("node03") || reason.contains("send"),
        "{reason}"
    );
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    let calls = c.origin.calls();
    assert!(
        calls.contains(&"delete-task counter".to_string()),
        "{calls:?}"
    );
    assert!(calls.contains(&"start counter".to_string()), "{calls:?}");
    assert!(m["downtimeMs"].is_u64());
    // The origin's checkpoint was consumed by its restore.
    assert!(no_checkpoint(&c.origin.state_dir));
}

#[tokio::test]
async fn restore_failure_cleans_the_destination_and_rolls_back() {
    let c = cluster().await;
    c.dest.with(|s| s.fail_restore = true);
    let (_, body) = c.migrate(counter_to("node02")).await;
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert_eq!(m["failure"]["phase"], "restoring");
    assert!(
        m["failure"]["reason"]
            .as_str()
            .expect("reason")
            .contains("criu restore failed")
    );
    assert_eq!(
        c.dest.status("counter"),
        None,
        "partial container left on destination"
    );
    assert!(no_checkpoint(&c.dest.state_dir), "partial data left");
    assert!(dir_is_empty(&c.dest.state_dir.join("migrations")));
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
}

/// A restore that took effect although its call failed: the destination's copy is removed
/// before the origin resumes, so the workload never runs on both nodes.
#[tokio::test]
async fn a_failed_restore_is_cleared_on_the_destination_before_the_origin_resumes() {
    let c = cluster().await;
    c.dest.with(|s| s.restore_runs_but_fails = true);
    let (_, body) = c.migrate(counter_to("node02")).await;
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert_eq!(m["failure"]["phase"], "restoring", "{m}");
    assert_eq!(
        c.dest.status("counter"),
        None,
        "the copy on the destination is left"
    );
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    let find = |fake: &FakeContainerd, call: &str| {
        fake.with(|s| s.ordered.iter().find(|(_, c)| c == call).map(|(at, _)| *at))
    };
    let cleared = find(&c.dest, "delete-task counter").expect("destination cleared");
    let resumed = find(&c.origin, "start counter").expect("origin resumed");
    assert!(
        cleared < resumed,
        "the origin resumed before the destination's copy was removed"
    );
}

#[tokio::test]
async fn checkpoint_failure_leaves_the_workload_running() {
    let c = cluster().await;
    c.origin.with(|s| s.fail_checkpoint = true);
    let (_, body) = c.migrate(counter_to("node02")).await;
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "failed", "{m}");
    assert_eq!(m["failure"]["phase"], "checkpointing");
    assert!(
        m["failure"]["reason"]
            .as_str()
            .expect("reason")
            .contains("criu dump failed")
    );
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    assert!(
        dir_is_empty(&c.origin.state_dir.join("marks")),
        "mark left behind"
    );
    // The destination created the container ahead, and deleted it again; it never ran.
    let calls = c.dest.calls();
    assert!(
        calls.contains(&format!("create counter {RUNTIME}")),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|call| call.starts_with("start")),
        "{calls:?}"
    );
    assert_eq!(c.dest.status("counter"), None, "{calls:?}");
    assert!(dir_is_empty(&c.dest.state_dir.join("migrations")));
}

#[tokio::test]
async fn a_container_created_ahead_from_another_record_is_refused_when_its_checkpoint_arrives() {
    let c = cluster().await;
    let req = json!({"migration": "m-1", "namespace": NS, "containers": ["counter"]});
    let (s, infos) = c.agent_call(&c.origin_url, "describe", req.clone()).await;
    assert_eq!(s, 200, "{infos}");
    // The record the destination creates the container from, damaged on its way.
    let mut info = infos[0].clone();
    info["image"] = json!("docker.io/library/other:1");
    let (s, body) = c
        .agent_call(
            &c.dest_url,
            "prepare",
            json!({"migration": "m-1", "containers": [info]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = c.agent_call(&c.origin_url, "checkpoint", req.clone()).await;
    assert_eq!(s, 200, "{body}");
    let mut send = req.clone();
    send["destination"] = json!(c.dest_url);
    let (s, body) = c.agent_call(&c.origin_url, "send", send).await;
    assert!(s >= 400, "{s} {body}");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.contains("differs from the one its checkpoint carries"),
        "{error}"
    );
    // What the controller does next: the destination's container and data go.
    let (s, body) = c.agent_call(&c.dest_url, "abort", req).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(c.dest.status("counter"), None);
    assert!(no_checkpoint(&c.dest.state_dir));
}

#[tokio::test]
async fn status_reports_each_container_and_a_restore_asked_again_starts_nothing() {
    use mig_server::containerd::Containerd;
    let c = cluster().await;
    let req = json!({"migration": "m-2", "namespace": NS, "containers": ["counter", "nope"]});
    let (s, states) = c.agent_call(&c.origin_url, "status", req).await;
    assert_eq!(s, 200, "{states}");
    assert_eq!(
        states,
        json!([
            {"container": "counter", "exists": true, "task": "running"},
            {"container": "nope", "exists": false, "task": null},
        ])
    );
    let req = json!({"migration": "m-2", "namespace": NS, "containers": ["counter"]});
    let (_, infos) = c.agent_call(&c.origin_url, "describe", req.clone()).await;
    let (s, body) = c
        .agent_call(
            &c.dest_url,
            "prepare",
            json!({"migration": "m-2", "containers": infos}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (_, states) = c.agent_call(&c.dest_url, "status", req.clone()).await;
    assert_eq!(states[0]["task"], "created", "{states}");
    let (s, body) = c.agent_call(&c.origin_url, "checkpoint", req.clone()).await;
    assert_eq!(s, 200, "{body}");
    let mut send = req.clone();
    send["destination"] = json!(c.dest_url);
    let (s, body) = c.agent_call(&c.origin_url, "send", send).await;
    assert_eq!(s, 200, "{body}");
    // The restore a controller asked for started the task, and the controller died before
    // the agent finished the restore's bookkeeping: the one its successor asks for completes
    // it without starting the task twice.
    c.dest.start_task(NS, "counter").await.expect("start");
    let (s, body) = c.agent_call(&c.dest_url, "restore", req.clone()).await;
    assert_eq!(s, 200, "{body}");
    let starts = c
        .dest
        .calls()
        .iter()
        .filter(|c| *c == "start counter")
        .count();
    assert_eq!(starts, 1, "{:?}", c.dest.calls());
    assert!(dir_is_empty(&c.dest.state_dir.join("incoming")));
    assert!(dir_is_empty(&c.dest.state_dir.join("migrations")));
    // Asked once more, there is nothing left to restore.
    let (s, body) = c.agent_call(&c.dest_url, "restore", req).await;
    assert_eq!(s, 404, "{body}");
}

#[tokio::test]
async fn a_rollback_waits_for_a_checkpoint_the_shim_is_still_writing() {
    let c = cluster().await;
    // The shim, still writing a checkpoint of the counter that a controller, now gone, asked
    // for: its temp directory is named by its pid, for a second. Like a shim, the process
    // outlives the writing (a process that ended first would void the directory before the
    // commit below, and the rollback could look too early).
    let identity = WorkloadIdentity::container(NS, "counter").expect("identity");
    let mut shim = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let writing = c.origin.state_dir.join("checkpoints").join(format!(
        ".tmp-{}-{}-1-0",
        identity.safe_key(),
        shim.id()
    ));
    std::fs::create_dir(&writing).expect("mkdir");
    let origin = c.origin.clone();
    let shim_done = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        // What the shim does at the end: commit, and the dump has stopped the task.
        let writer = origin.store().begin(&identity).expect("begin");
        std::fs::write(
            writer.images_dir().expect("images").join("pages-1.img"),
            b"x",
        )
        .expect("write");
        writer
            .commit(EngineInfo::new("criu", "4.2.1"), "busybox")
            .expect("commit");
        origin.with(|s| {
            s.containers.get_mut("counter").expect("counter").1 = Some(TaskStatus::Stopped)
        });
        std::fs::remove_dir(&writing).expect("rmdir");
        shim.kill().expect("kill");
        shim.wait().expect("wait");
    });
    let req = json!({"migration": "m-3", "namespace": NS, "containers": ["counter"]});
    let (s, report) = c.agent_call(&c.origin_url, "rollback", req).await;
    shim_done.await.expect("shim");
    assert_eq!(s, 200, "{report}");
    assert_eq!(report["restored"], json!(["counter"]), "{report}");
    assert!(c.origin.calls().contains(&"start counter".to_string()));
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    assert!(no_checkpoint(&c.origin.state_dir));
}

fn post_copy_to(dest: &str) -> Value {
    json!({"deployment": "counter", "originNode": "node01", "destNode": dest, "postCopy": true})
}

fn pages_dir_is_empty(fake: &FakeContainerd) -> bool {
    dir_is_empty(&fake.state_dir.join("pages"))
}

#[tokio::test]
async fn post_copy_migration_fetches_the_pages_from_the_frozen_origin() {
    let c = cluster().await;
    let (status, body) = c.migrate(post_copy_to("node02")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["postCopy"], true, "{body}");
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "done", "{m}");
    assert_eq!(m["postCopy"], true, "{m}");
    // The checkpoint was asked for without pages, and the pages went through both agents.
    let marks = c.origin.with(|s| s.marks.clone());
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0]["post_copy"], true, "{marks:?}");
    assert_eq!(marks[0]["migration"], m["id"], "{marks:?}");
    assert!(c.origin.calls().contains(&"pages served".to_string()));
    assert!(c.dest.calls().contains(&"pages fetched".to_string()));
    assert_eq!(c.dest.status("counter"), Some(Some(TaskStatus::Running)));
    assert_eq!(c.origin.status("counter"), None, "still on the origin");
    for fake in [&c.origin, &c.dest] {
        assert!(pages_dir_is_empty(fake), "a page socket is left");
        assert!(dir_is_empty(&fake.state_dir.join("checkpoints")));
        assert!(dir_is_empty(&fake.state_dir.join("migrations")));
        assert!(dir_is_empty(&fake.state_dir.join("incoming")));
    }
}

/// A post-copy rollback resumes the frozen workload and never restores it from the pageless
/// checkpoint.
fn assert_resumed_on_origin(c: &Cluster, m: &Value) {
    assert_eq!(m["phase"], "rolled_back", "{m}");
    assert_eq!(m["failure"]["phase"], "restoring", "{m}");
    let recovery = m["failure"]["recovery"].to_string();
    assert!(recovery.contains("counter resumed on node01"), "{recovery}");
    assert!(!recovery.contains("from its own checkpoint"), "{recovery}");
    assert!(m["downtimeMs"].is_u64(), "{m}");
    assert_eq!(c.origin.status("counter"), Some(Some(TaskStatus::Running)));
    let calls = c.origin.calls();
    assert!(calls.contains(&"pages aborted".to_string()), "{calls:?}");
    assert!(
        !calls
            .iter()
            .any(|call| call.starts_with("start") || call.starts_with("delete-task")),
        "the origin was restarted: {calls:?}"
    );
    assert!(no_checkpoint(&c.origin.state_dir));
    assert!(pages_dir_is_empty(&c.origin));
    assert!(pages_dir_is_empty(&c.dest));
    assert_eq!(c.dest.status("counter"), None, "left on the destination");
}

#[tokio::test]
async fn a_post_copy_restore_failing_mid_pages_resumes_the_workload_on_the_origin() {
    let c = cluster().await;
    // The destination shim fetches a page, then fails: its connection closes, the origin shim
    // aborts on its own.
    c.dest.with(|s| s.fail_restore = true);
    let (status, body) = c.migrate(post_copy_to("node02")).await;
    assert_eq!(status, 202, "{body}");
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_resumed_on_origin(&c, &m);
}

#[tokio::test]
async fn a_post_copy_rollback_closes_the_page_socket_so_the_shim_resumes() {
    let c = cluster().await;
    // The destination fails before connecting: the origin's page server still waits, until
    // the rollback connects and closes.
    c.dest.with(|s| s.fail_before_pages = true);
    let (status, body) = c.migrate(post_copy_to("node02")).await;
    assert_eq!(status, 202, "{body}");
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_resumed_on_origin(&c, &m);
    assert!(
        m["failure"]["reason"]
            .to_string()
            .contains("before its first page"),
        "{m}"
    );
}

#[tokio::test]
async fn post_copy_must_be_a_boolean() {
    let c = cluster().await;
    let (status, body) = c
        .migrate(json!({"deployment": "counter", "originNode": "node01", "destNode": "node02", "postCopy": "yes"}))
        .await;
    assert_eq!(status, 400, "{body}");
}

/// The page pipe alone: a unix socket plays the origin shim, the origin agent's real router
/// serves `POST /agent/v1/pages` on loopback, and the destination side's pipe is fed by one
/// end of a socket pair whose other end plays the destination shim.
#[tokio::test]
async fn the_page_pipe_carries_bytes_both_ways_and_passes_half_closes_on() {
    use mig_server::pages::{PagesOrigin, pipe_to_origin};
    use mig_server::protocol::PagesRequest;

    let http = reqwest::Client::new();
    let (url, _fake, dir) = agent("node01", &http).await;
    let identity = WorkloadIdentity::container(NS, "counter").expect("identity");
    let key = identity.safe_key();
    let req = PagesRequest {
        migration: "m-1".into(),
        namespace: NS.into(),
        id: "counter".into(),
    };
    let origin = PagesOrigin {
        http: http.clone(),
        token: token(),
        url: url.clone(),
    };

    // No record of the migration on the origin: refused, and the shim's end is closed.
    let (shim_end, mut dest_shim) = tokio::net::UnixStream::pair().expect("pair");
    let err = pipe_to_origin(shim_end, &origin, &req)
        .await
        .expect_err("no record");
    assert!(err.contains("404") && err.contains("no record"), "{err}");
    let mut rest = Vec::new();
    assert_eq!(dest_shim.read_to_end(&mut rest).await.expect("eof"), 0);

    // A record but no page server: 404 naming the socket.
    let records = dir.path().join("migrations").join("m-1");
    std::fs::create_dir_all(&records).expect("records");
    let info = ContainerInfo {
        namespace: NS.into(),
        id: "counter".into(),
        image: "busybox".into(),
        runtime: RUNTIME.into(),
        labels: Default::default(),
        spec: json!({}),
    };
    std::fs::write(
        records.join(format!("{key}.json")),
        serde_json::to_vec(&info).expect("json"),
    )
    .expect("record");
    let (shim_end, _dest_shim) = tokio::net::UnixStream::pair().expect("pair");
    let err = pipe_to_origin(shim_end, &origin, &req)
        .await
        .expect_err("no socket");
    assert!(err.contains("404") && err.contains(".sock"), "{err}");

    // Without the token: 401, as every agent route.
    let r = http
        .post(format!("{url}/agent/v1/pages"))
        .header("connection", "upgrade")
        .header("upgrade", "mig-pages")
        .json(&req)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    // Not an upgrade: refused before the shim is connected to (that would abort it).
    let r = http
        .post(format!("{url}/agent/v1/pages"))
        .bearer_auth(TOKEN)
        .header("upgrade", "mig-pages")
        .json(&req)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("Connection: upgrade"),
        "{body}"
    );

    // The origin shim's page server.
    let pages = dir.path().join("pages");
    std::fs::create_dir_all(&pages).expect("pages");
    let listener = tokio::net::UnixListener::bind(pages.join(format!("{key}.sock"))).expect("bind");
    let (shim_end, mut dest_shim) = tokio::net::UnixStream::pair().expect("pair");
    let piping = tokio::spawn(async move { pipe_to_origin(shim_end, &origin, &req).await });
    let (mut origin_shim, _) = listener.accept().await.expect("accept");

    dest_shim.write_all(b"fault 0x7f00").await.expect("write");
    let mut got = [0u8; 12];
    origin_shim.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"fault 0x7f00");
    origin_shim.write_all(b"page bytes").await.expect("write");
    let mut got = [0u8; 10];
    dest_shim.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"page bytes");

    // The destination shim ends its writes: the origin shim reads the end, and can still
    // answer (a half-close, not a close).
    dest_shim.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    origin_shim.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty(), "{rest:?}");
    origin_shim
        .write_all(b"last")
        .await
        .expect("write after half-close");
    drop(origin_shim);
    let mut rest = Vec::new();
    dest_shim.read_to_end(&mut rest).await.expect("eof");
    assert_eq!(rest, b"last");
    let (up, down) = tokio::time::timeout(Duration::from_secs(10), piping)
        .await
        .expect("the pipe ends with both sides")
        .expect("join")
        .expect("piped");
    assert_eq!((up, down), (12, 14));
}

#[tokio::test]
async fn a_post_copy_origin_that_served_its_pages_is_not_restarted_from_its_pageless_checkpoint() {
    let c = cluster().await;
    // Every page reaches the destination, whose start runs the workload but answers an error.
    c.dest.with(|s| s.restore_runs_but_fails = true);
    let (status, body) = c.migrate(post_copy_to("node02")).await;
    assert_eq!(status, 202, "{body}");
    let m = c.wait_terminal(body["id"].as_str().expect("id")).await;
    assert_eq!(m["phase"], "failed", "{m}");
    let recovery = m["failure"]["recovery"].to_string();
    assert!(
        recovery.contains("did not resume") && recovery.contains("no pages"),
        "{recovery}"
    );
    // The destination holds the only copy: it is left alone, not cleared.
    assert!(recovery.contains("left as it is"), "{recovery}");
    let dest_calls = c.dest.calls();
    assert!(
        !dest_calls
            .iter()
            .any(|call| call.starts_with("delete-task") || call.starts_with("kill")),
        "the destination's only copy was cleared: {dest_calls:?}"
    );
    let calls = c.origin.calls();
    assert!(calls.contains(&"pages served".to_string()), "{calls:?}");
    assert!(
        !calls.iter().any(|call| call.starts_with("start")),
        "restarted from a pageless checkpoint: {calls:?}"
    );
}

#[tokio::test]
async fn a_receive_with_a_bad_memory_hint_is_400_and_stores_nothing() {
    let c = cluster().await;
    let r = c
        .http
        .post(format!("{}/agent/v1/receive/mig-1-0", c.dest_url))
        .bearer_auth(TOKEN)
        .header("x-mig-memory-hint", "lots")
        .body("not a stream")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("json");
    let error = body["error"].as_str().expect("error");
    assert!(
        error.contains("x-mig-memory-hint") && error.contains("byte count"),
        "{error}"
    );
    assert!(no_checkpoint(&c.dest.state_dir));
}
