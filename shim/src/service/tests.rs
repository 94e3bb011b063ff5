//! The task service driven through a fake runc: lifecycle, event order, exit codes and errors,
//! without root or runc.

use std::sync::atomic::{AtomicI32, Ordering};

use containerd_shim::{
    asynchronous::monitor::monitor_notify_by_pid,
    protos::{protobuf::MessageDyn, types::task::Status as ApiStatus},
};
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::{
    events::Event,
    runc::{ChildStdio, RestoreOpts},
};

/// Pids far above anything the kernel hands out here, unique across the tests of this
/// process (the exit monitor is global).
static NEXT_PID: AtomicI32 = AtomicI32::new(4_000_000);

#[derive(Debug, Default)]
struct FakeRunc {
    calls: Mutex<Vec<String>>,
    fail_create: Option<String>,
    /// The pid the next exec gets, when a test needs to know it in advance.
    exec_pid: Mutex<Option<i32>>,
}

impl FakeRunc {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRunc {
    async fn create(&self, id: &str, _: &Path, _: ChildStdio) -> Result<i32> {
        self.record(format!("create {id}"));
        if let Some(msg) = &self.fail_create {
            return Err(Error::Runc {
                op: "create".into(),
                id: id.into(),
                message: msg.clone(),
            });
        }
        Ok(NEXT_PID.fetch_add(1, Ordering::SeqCst))
    }
    async fn start(&self, id: &str) -> Result<()> {
        self.record(format!("start {id}"));
        Ok(())
    }
    async fn exec(
        &self,
        id: &str,
        _: &Path,
        exec_id: &str,
        _: &[u8],
        _: ChildStdio,
    ) -> Result<i32> {
        self.record(format!("exec {id} {exec_id}"));
        let preset = self.exec_pid.lock().unwrap().take();
        Ok(preset.unwrap_or_else(|| NEXT_PID.fetch_add(1, Ordering::SeqCst)))
    }
    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        self.record(format!("kill {id} {signal} all={all}"));
        Ok(())
    }
    async fn delete(&self, id: &str, force: bool) -> Result<()> {
        self.record(format!("delete {id} force={force}"));
        Ok(())
    }
    async fn pause(&self, id: &str) -> Result<()> {
        self.record(format!("pause {id}"));
        Ok(())
    }
    async fn resume(&self, id: &str) -> Result<()> {
        self.record(format!("resume {id}"));
        Ok(())
    }
    async fn ps(&self, _: &str) -> Result<Vec<u32>> {
        Ok(vec![])
    }
    async fn update(&self, id: &str, _: &Path, _: &[u8]) -> Result<()> {
        self.record(format!("update {id}"));
        Ok(())
    }
    async fn stats(&self, _: &str) -> Result<serde_json::Value> {
        Ok(serde_json::json!({"memory": {"usage": {"usage": 1}}}))
    }
    async fn checkpoint(&self, id: &str, opts: &CheckpointOpts) -> Result<()> {
        self.record(format!(
            "checkpoint {id} {} leave_running={}",
            opts.image_path.display(),
            opts.leave_running
        ));
        Ok(())
    }
    async fn restore(&self, id: &str, _: &Path, opts: &RestoreOpts, _: ChildStdio) -> Result<i32> {
        self.record(format!("restore {id} {}", opts.image_path.display()));
        Ok(NEXT_PID.fetch_add(1, Ordering::SeqCst))
    }
}

struct Fake(Arc<FakeRunc>);

impl RuntimeFactory for Fake {
    fn runtime(&self, _: &RuntimeOptions) -> Result<Arc<dyn Runtime>> {
        Ok(self.0.clone())
    }
}

struct Harness {
    service: Arc<Service>,
    runc: Arc<FakeRunc>,
    events: UnboundedReceiver<Event>,
    bundle: tempfile::TempDir,
}

async fn harness_with(runc: FakeRunc) -> Harness {
    let runc = Arc::new(runc);
    let (sink, events) = EventSink::new();
    let service = Service::new(
        Box::new(Fake(runc.clone())),
        sink,
        Arc::new(ExitSignal::default()),
        "default",
    );
    service.watch_exits().await.unwrap();
    Harness {
        service,
        runc,
        events,
        bundle: tempfile::tempdir().unwrap(),
    }
}

async fn harness() -> Harness {
    harness_with(FakeRunc::default()).await
}

impl Harness {
    fn create_req(&self, id: &str) -> CreateTaskRequest {
        CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle.path().to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    async fn next_event(&mut self) -> (&'static str, Box<dyn MessageDyn>) {
        tokio::time::timeout(Duration::from_secs(5), self.events.recv())
            .await
            .expect("an event within 5s")
            .expect("event channel open")
    }

    async fn topics(&mut self, n: usize) -> Vec<&'static str> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next_event().await.0);
        }
        out
    }
}

fn exit_of(event: &dyn MessageDyn) -> TaskExit {
    event
        .downcast_ref::<TaskExit>()
        .expect("a TaskExit")
        .clone()
}

#[tokio::test]
async fn lifecycle_emits_events_in_containerds_order() {
    let mut h = harness().await;
    let pid = h.service.create(&h.create_req("c1")).await.unwrap();
    assert_eq!(h.service.start("c1", "").await.unwrap(), pid);
    monitor_notify_by_pid(pid as i32, 3).await.unwrap();
    let exit = h.service.wait("c1", "").await.unwrap();
    assert_eq!(exit.status, 3);
    let state = h.service.state("c1", "").await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(ApiStatus::STOPPED));
    assert_eq!(state.exit_status, 3);
    let deleted = h.service.delete("c1", "").await.unwrap();
    assert_eq!(deleted.exit_status, 3);
    assert_eq!(
        h.topics(4).await,
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC,
            TASK_DELETE_EVENT_TOPIC
        ]
    );
    assert_eq!(
        *h.runc.calls.lock().unwrap(),
        ["create c1", "start c1", "delete c1 force=true"]
    );
    assert!(matches!(
        h.service.state("c1", "").await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn an_exit_that_races_start_is_reported_after_the_start_event() {
    let mut h = harness().await;
    let pid = h.service.create(&h.create_req("race")).await.unwrap();
    // The process exits the moment it starts: the reaper sees it before start returns.
    let c = h.service.container("race").unwrap();
    let guard = c.lock().await;
    monitor_notify_by_pid(pid as i32, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(guard);
    h.service.start("race", "").await.unwrap();
    assert_eq!(
        h.topics(3).await,
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC
        ]
    );
}

#[tokio::test]
async fn death_by_signal_is_128_plus_the_signal() {
    let mut h = harness().await;
    let pid = h.service.create(&h.create_req("sig")).await.unwrap();
    h.service.start("sig", "").await.unwrap();
    h.service.kill("sig", "", 9, false).await.unwrap();
    // What the shim library's reaper reports for a SIGKILLed child.
    monitor_notify_by_pid(pid as i32, 128 + 9).await.unwrap();
    h.topics(2).await;
    let (topic, ev) = h.next_event().await;
    assert_eq!(topic, TASK_EXIT_EVENT_TOPIC);
    let exit = exit_of(ev.as_ref());
    assert_eq!(
        (exit.container_id.as_str(), exit.id.as_str()),
        ("sig", "sig")
    );
    assert_eq!(exit.exit_status, 137);
    assert!(exit.exited_at.seconds > 0);
}

#[tokio::test]
async fn exec_lifecycle_and_an_exit_before_the_pid_is_known() {
    let mut h = harness().await;
    h.service.create(&h.create_req("c2")).await.unwrap();
    h.service.start("c2", "").await.unwrap();
    let spec = serde_json::json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    let req = ExecProcessRequest {
        id: "c2".into(),
        exec_id: "e1".into(),
        spec: MessageField::some(Any {
            value: serde_json::to_vec(&spec).unwrap(),
            ..Default::default()
        }),
        ..Default::default()
    };
    h.service.exec(&req).await.unwrap();
    assert!(matches!(
        h.service.exec(&req).await,
        Err(Error::AlreadyExists(_))
    ));
    // This exec "exits" before runc exec has returned its pid.
    let pid = NEXT_PID.fetch_add(1, Ordering::SeqCst);
    *h.runc.exec_pid.lock().unwrap() = Some(pid);
    monitor_notify_by_pid(pid, 4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = h.service.start("c2", "e1").await.unwrap();
    assert_eq!(started as i32, pid);
    assert_eq!(h.service.wait("c2", "e1").await.unwrap().status, 4);
    let topics = h.topics(5).await;
    assert_eq!(
        topics,
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXEC_ADDED_EVENT_TOPIC,
            TASK_EXEC_STARTED_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC
        ]
    );
    assert_eq!(h.service.delete("c2", "e1").await.unwrap().exit_status, 4);
    assert!(matches!(
        h.service.state("c2", "e1").await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn a_running_container_cannot_be_deleted_and_a_stopped_one_cannot_be_killed() {
    let h = harness().await;
    let pid = h.service.create(&h.create_req("c3")).await.unwrap();
    h.service.start("c3", "").await.unwrap();
    assert!(matches!(
        h.service.delete("c3", "").await,
        Err(Error::FailedPrecondition(_))
    ));
    monitor_notify_by_pid(pid as i32, 0).await.unwrap();
    h.service.wait("c3", "").await.unwrap();
    let err = h.service.kill("c3", "", 15, false).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(err.to_string().contains("already finished"), "{err}");
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_machine() {
    let mut h = harness().await;
    h.service.create(&h.create_req("p1")).await.unwrap();
    assert!(
        h.service.set_paused("p1", true).await.is_err(),
        "created, not running"
    );
    h.service.start("p1", "").await.unwrap();
    h.service.set_paused("p1", true).await.unwrap();
    let state = h.service.state("p1", "").await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(ApiStatus::PAUSED));
    assert!(h.service.set_paused("p1", true).await.is_err());
    h.service.set_paused("p1", false).await.unwrap();
    let topics = h.topics(4).await;
    assert_eq!(
        topics[2..],
        [TASK_PAUSED_EVENT_TOPIC, TASK_RESUMED_EVENT_TOPIC]
    );
}

#[tokio::test]
async fn a_failed_create_reports_runcs_error_and_leaves_nothing() {
    let h = harness_with(FakeRunc {
        fail_create: Some("exec: \"/nonexistent\": no such file or directory".into()),
        ..Default::default()
    })
    .await;
    let err = h.service.create(&h.create_req("bad")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("container bad") && msg.contains("/nonexistent"),
        "{msg}"
    );
    assert!(matches!(
        h.service.state("bad", "").await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        *h.runc.calls.lock().unwrap(),
        ["create bad", "delete bad force=true"]
    );
    // The id is free again.
    assert!(matches!(
        h.service.create(&h.create_req("bad")).await,
        Err(Error::Runc { .. })
    ));
}

#[tokio::test]
async fn bad_ids_and_unknown_options_are_invalid_arguments() {
    let h = harness().await;
    for id in ["", "..", "a/b", "x\0y"] {
        let err = h.service.create(&h.create_req(id)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{id:?}: {err}");
    }
    let mut req = h.create_req("opts");
    req.options = MessageField::some(Any {
        type_url: "example.com/Unknown".into(),
        ..Default::default()
    });
    let err = h.service.create(&req).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(
        h.runc.calls.lock().unwrap().is_empty(),
        "runc was never called"
    );
}

#[tokio::test]
async fn containerd_checkpoint_options_reach_runc() {
    let h = harness().await;
    h.service.create(&h.create_req("ck")).await.unwrap();
    h.service.start("ck", "").await.unwrap();
    let opts = CheckpointOptions {
        exit: true,
        open_tcp: true,
        ..Default::default()
    };
    let req = CheckpointTaskRequest {
        id: "ck".into(),
        path: "/var/lib/ckpt/ck".into(),
        options: MessageField::some(Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.write_to_bytes().unwrap(),
            ..Default::default()
        }),
        ..Default::default()
    };
    h.service.checkpoint(&req).await.unwrap();
    let calls = h.runc.calls.lock().unwrap();
    assert_eq!(
        calls.last().unwrap(),
        "checkpoint ck /var/lib/ckpt/ck leave_running=false"
    );
}

#[tokio::test]
async fn created_from_a_checkpoint_restores_at_start() {
    let mut h = harness().await;
    let mut req = h.create_req("rs");
    req.checkpoint = "/images/rs".into();
    h.service.create(&req).await.unwrap();
    let state = h.service.state("rs", "").await.unwrap();
    assert_eq!(state.status.enum_value(), Ok(ApiStatus::CREATED));
    let pid = h.service.start("rs", "").await.unwrap();
    assert!(pid > 0);
    assert_eq!(*h.runc.calls.lock().unwrap(), ["restore rs /images/rs"]);
    assert_eq!(
        h.topics(2).await,
        [TASK_CREATE_EVENT_TOPIC, TASK_START_EVENT_TOPIC]
    );
}

#[tokio::test]
async fn shutdown_waits_for_the_last_container() {
    let h = harness().await;
    h.service.create(&h.create_req("s1")).await.unwrap();
    h.service.shutdown(false);
    let exit = h.service.exit.clone();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), exit.wait())
            .await
            .is_err()
    );
    h.service.delete("s1", "").await.unwrap();
    h.service.shutdown(false);
    tokio::time::timeout(Duration::from_secs(1), exit.wait())
        .await
        .unwrap();
}
