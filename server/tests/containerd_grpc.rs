//! End to end, as root, against a real private containerd: the task operations of
//! [`Grpc`] (containerd's gRPC API), with runc's shim and with the runtime under test.
//!
//! Skips with one line when prerequisites are missing; `MIG_E2E_REQUIRED=1` makes that a
//! failure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mig_e2e::{Node, NodeOptions, RUNC_RUNTIME, TestImage, require_root_and_tools};
use mig_server::containerd::{Containerd, ContainerdError, Ctr, Grpc, TaskStatus};

const TEST: &str = "grpc_task_lifecycle_against_real_containerd";

async fn wait_for(api: &Grpc, ns: &str, id: &str, want: Option<TaskStatus>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = api.task_status(ns, id).await.expect("status");
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} is {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole lifecycle of tasks of `runtime` on `node`: create without start, start the
/// created task, kill, delete; start without create; force-delete a running and a created task.
async fn lifecycle(node: &Node, image: &TestImage, runtime: &str, tag: &str) {
    let ns = node.namespace().to_string();
    let (a, b, c) = (format!("a-{tag}"), format!("b-{tag}"), format!("c-{tag}"));
    for id in [&a, &b, &c] {
        node.ctr_ok(&[
            "containers",
            "create",
            "--runtime",
            runtime,
            &image.name,
            id,
            "sh",
            "-c",
            // PID 1 ignores SIGTERM without a handler.
            "trap 'exit 0' TERM; while :; do sleep 0.1; done",
        ])
        .expect("create container");
    }
    let api = Grpc::new(Ctr::new(node.address(), Duration::from_secs(60)));

    // Created, not started: containerd shows the task CREATED, and a second create fails.
    assert_eq!(api.task_status(&ns, &a).await.expect("status"), None);
    api.create_task(&ns, &a).await.expect("create task");
    assert_eq!(
        api.task_status(&ns, &a).await.expect("status"),
        Some(TaskStatus::Created)
    );
    assert_eq!(
        node.task_status(&a).expect("ctr status").as_deref(),
        Some("CREATED")
    );
    let again = api.create_task(&ns, &a).await;
    assert!(
        matches!(&again, Err(ContainerdError::Command { message, .. }) if message.contains("already exists")),
        "{again:?}"
    );
    // Starting the created task.
    api.start_task(&ns, &a).await.expect("start created task");
    assert_eq!(
        api.task_status(&ns, &a).await.expect("status"),
        Some(TaskStatus::Running)
    );
    assert_eq!(
        node.task_status(&a).expect("ctr status").as_deref(),
        Some("RUNNING")
    );
    // A running task cannot be started again, nor deleted without force.
    assert!(api.start_task(&ns, &a).await.is_err());
    assert!(api.delete_task(&ns, &a, false).await.is_err());
    api.kill(&ns, &a, "SIGKILL").await.expect("kill");
    wait_for(&api, &ns, &a, Some(TaskStatus::Stopped)).await;
    api.delete_task(&ns, &a, false).await.expect("delete task");
    assert_eq!(api.task_status(&ns, &a).await.expect("status"), None);
    assert!(
        api.delete_task(&ns, &a, false).await.is_err(),
        "deleting no task fails, as with ctr"
    );

    // No task yet: start_task creates and starts it; force-delete kills it first.
    api.start_task(&ns, &b).await.expect("create and start");
    assert_eq!(
        api.task_status(&ns, &b).await.expect("status"),
        Some(TaskStatus::Running)
    );
    api.kill(&ns, &b, "TERM").await.expect("kill TERM");
    wait_for(&api, &ns, &b, Some(TaskStatus::Stopped)).await;
    api.delete_task(&ns, &b, true)
        .await
        .expect("delete stopped");
    api.start_task(&ns, &b).await.expect("start again");
    api.delete_task(&ns, &b, true)
        .await
        .expect("force delete running");
    assert_eq!(api.task_status(&ns, &b).await.expect("status"), None);

    // A created task is force-deleted too (an abort of a prepared restore).
    api.create_task(&ns, &c).await.expect("create task");
    api.delete_task(&ns, &c, true)
        .await
        .expect("force delete created");
    assert_eq!(api.task_status(&ns, &c).await.expect("status"), None);
    // Forced, a task that is gone counts as deleted (a cleanup retried after an agent died
    // mid-delete); not forced, it is an error.
    api.delete_task(&ns, &c, true)
        .await
        .expect("force delete of a task that is gone");
    assert!(api.delete_task(&ns, &c, false).await.is_err());

    for id in [&a, &b, &c] {
        api.delete_container(&ns, id)
            .await
            .expect("delete container");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_task_lifecycle_against_real_containerd() {
    if let Some(skip) = require_root_and_tools() {
        skip.report(TEST);
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let node = Node::start_with(
        "grpc",
        NodeOptions {
            // Our shim's state root, should the runtime under test be ours.
            env: BTreeMap::from([(
                "MIG_STATE_DIR".to_string(),
                state.path().display().to_string(),
            )]),
            ..Default::default()
        },
    )
    .expect("node");
    let image = TestImage::busybox().expect("image");
    node.import(&image).expect("import");
    let ns = node.namespace().to_string();
    let api = Grpc::new(Ctr::new(node.address(), Duration::from_secs(60)));

    // Errors keep the kinds the trait documents.
    assert!(matches!(
        api.create_task(&ns, "nope").await,
        Err(ContainerdError::NotFound { .. })
    ));
    assert_eq!(api.task_status(&ns, "nope").await.expect("status"), None);
    assert!(api.kill(&ns, "nope", "SIGTERM").await.is_err());
    let bad = api.kill(&ns, "nope", "SIGNOPE").await;
    assert!(
        matches!(&bad, Err(ContainerdError::Command { message, .. }) if message.contains("invalid signal")),
        "{bad:?}"
    );

    lifecycle(&node, &image, RUNC_RUNTIME, "runc").await;
    let runtime = mig_e2e::runtime();
    if runtime != RUNC_RUNTIME {
        lifecycle(&node, &image, &runtime, "mig").await;
    }

    timings(&node, &image, &api).await;
    node.wait_until_clean(Duration::from_secs(20))
        .expect("clean node");
    node.stop().expect("stop");
}

/// Prints how long a start and a kill take through the API and through the `ctr` command line,
/// one process per call (no assertion: timings vary with the machine's load).
async fn timings(node: &Node, image: &TestImage, api: &Grpc) {
    let ns = node.namespace().to_string();
    node.ctr_ok(&[
        "containers",
        "create",
        "--runtime",
        RUNC_RUNTIME,
        &image.name,
        "t",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 0.1; done",
    ])
    .expect("create container");
    let mut lines = Vec::new();

    let t = Instant::now();
    api.task_status(&ns, "t").await.expect("status");
    let status = t.elapsed();
    let t = Instant::now();
    api.start_task(&ns, "t").await.expect("start");
    let start = t.elapsed();
    wait_for(api, &ns, "t", Some(TaskStatus::Running)).await;
    let t = Instant::now();
    api.kill(&ns, "t", "SIGTERM").await.expect("kill");
    let kill = t.elapsed();
    wait_for(api, &ns, "t", Some(TaskStatus::Stopped)).await;
    let t = Instant::now();
    api.delete_task(&ns, "t", false).await.expect("delete");
    let delete = t.elapsed();
    lines.push(format!(
        "grpc: task_status {status:?}, start_task {start:?}, kill {kill:?}, delete_task {delete:?}"
    ));

    let t = Instant::now();
    node.task_status("t").expect("ctr tasks ls");
    let status = t.elapsed();
    let t = Instant::now();
    node.ctr_ok(&["tasks", "start", "--detach", "--null-io", "t"])
        .expect("ctr tasks start");
    let start = t.elapsed();
    wait_for(api, &ns, "t", Some(TaskStatus::Running)).await;
    let t = Instant::now();
    node.ctr_ok(&["tasks", "kill", "--signal", "SIGTERM", "t"])
        .expect("ctr tasks kill");
    let kill = t.elapsed();
    wait_for(api, &ns, "t", Some(TaskStatus::Stopped)).await;
    let t = Instant::now();
    node.ctr_ok(&["tasks", "delete", "t"])
        .expect("ctr tasks delete");
    let delete = t.elapsed();
    lines.push(format!(
        "ctr: tasks ls {status:?}, tasks start {start:?}, tasks kill {kill:?}, tasks delete {delete:?}"
    ));

    api.delete_container(&ns, "t")
        .await
        .expect("delete container");
    eprintln!("timings (runc shim):\n  {}", lines.join("\n  "));
}
