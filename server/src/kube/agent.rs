//! The node agent's Kubernetes routes, `/agent/v1/kube/...`: marks keyed by Kubernetes
//! identities (`k8s_<ns>_<workload>_<container>`) and the transfer of their checkpoints. The
//! kubelet, not the agent, stops and creates the containers; the shim checkpoints at the stop
//! (mark) and restores at the create (pending checkpoint).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router, middleware};
use mig_checkpoint::{SafeName, WorkloadIdentity};
use tracing::info;

use super::{KubeIdentity, KubeSendRequest, WorkloadAction, WorkloadStatus, WorkloadsRequest};
use crate::agent::{AgentError, NodeAgent, safe, write_json};
use crate::agent_routes::AgentState;
use crate::auth::{Token, require_token};
use crate::containerd::{ContainerInfo, WORKLOAD_LABEL};
use crate::http::{ApiError, parse_json};
use crate::protocol::TransferSummary;

fn identity(k: &KubeIdentity) -> Result<WorkloadIdentity, AgentError> {
    for (what, v) in [
        ("namespace", &k.namespace),
        ("workload", &k.workload),
        ("container name", &k.container),
    ] {
        safe(what, v)?;
    }
    Ok(k.identity()?)
}

impl NodeAgent {
    fn kube_mark_path(&self, key: &SafeName) -> PathBuf {
        self.config
            .state_dir
            .join("marks")
            .join(format!("{key}.json"))
    }

    /// Marks, unmarks, discards or reports Kubernetes workloads' containers.
    pub fn kube_workloads(
        &self,
        req: &WorkloadsRequest,
    ) -> Result<Vec<WorkloadStatus>, AgentError> {
        let migration = safe("migration id", &req.migration)?;
        let mut out = Vec::new();
        for k in &req.identities {
            let id = identity(k)?;
            let mark = self.kube_mark_path(&id.safe_key());
            match req.action {
                WorkloadAction::Mark => {
                    // A checkpoint left from an earlier attempt must not pass for this one.
                    self.store.remove(&id)?;
                    // Not durable: the checkpoint is streamed away at once (the shim's `Mark`).
                    write_json(
                        &mark,
                        &serde_json::json!({"migration": migration.as_str(), "durable": false}),
                    )?;
                    info!(workload = %k, migration = %migration, "marked for checkpoint on stop");
                }
                WorkloadAction::Unmark | WorkloadAction::Discard => {
                    let _ = fs::remove_file(&mark);
                    if req.action == WorkloadAction::Discard {
                        self.store.remove(&id)?;
                    }
                }
                WorkloadAction::Status => {}
            }
            let pending = self.store.pending(&id)?;
            out.push(WorkloadStatus {
                identity: k.clone(),
                marked: mark.exists(),
                pending: pending.is_some(),
                bytes: pending
                    .map(|c| c.files().iter().map(|f| f.size).sum())
                    .unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Streams each identity's pending checkpoint to the agent at `destination`.
    pub async fn kube_send(
        &self,
        http: &reqwest::Client,
        token: &Token,
        req: &KubeSendRequest,
    ) -> Result<TransferSummary, AgentError> {
        let migration = safe("migration id", &req.migration)?;
        let url = format!(
            "{}/agent/v1/kube/receive/{migration}",
            req.destination.trim_end_matches('/')
        );
        let mut total = TransferSummary::default();
        for k in &req.identities {
            let id = identity(k)?;
            let checkpoint = self.store.pending(&id)?.ok_or_else(|| {
                AgentError::NotFound(format!(
                    "no checkpoint of {k} on node {}; did its pod stop with the mark set?",
                    self.config.name
                ))
            })?;
            // The stream carries a container record; for a pod it only names the workload.
            let info = ContainerInfo {
                namespace: k.namespace.clone(),
                id: k.container.clone(),
                image: checkpoint.manifest().image.clone(),
                runtime: self.config.runtime.clone(),
                labels: BTreeMap::from([(WORKLOAD_LABEL.to_string(), k.workload.clone())]),
                spec: serde_json::Value::Null,
            };
            let source = crate::transfer::Source::Complete(self.store.path_for(&id));
            let hint = self.memory_hint(&source).await;
            let (stats, _) = self
                .stream_checkpoint(http, token, &url, source, info, hint, &format!("{k}"))
                .await?;
            info!(workload = %k, raw = stats.raw_bytes, wire = stats.wire_bytes, "checkpoint sent");
            total.raw_bytes += stats.raw_bytes;
            total.wire_bytes += stats.wire_bytes;
        }
        Ok(total)
    }

    /// Receives one Kubernetes workload's checkpoint into the store, where the shim finds it
    /// when the kubelet creates the workload's container. Refuses other identities.
    pub async fn kube_receive(
        &self,
        migration: &str,
        memory_hint: Option<u64>,
        body: Body,
    ) -> Result<TransferSummary, AgentError> {
        let migration = safe("migration id", migration)?;
        let received = self
            .receive_body(body, memory_hint, |info, manifest| {
                let workload = info.labels.get(WORKLOAD_LABEL).cloned().unwrap_or_default();
                let expected = KubeIdentity {
                    namespace: info.namespace.clone(),
                    workload,
                    container: info.id.clone(),
                };
                let expected = identity(&expected).map_err(|e| e.to_string())?;
                if manifest.identity != expected {
                    return Err(format!(
                        "checkpoint is for {}, but the record is for {expected}",
                        manifest.identity
                    ));
                }
                Ok(())
            })
            .await?;
        info!(workload = %received.checkpoint.manifest().identity, migration = %migration,
              raw = received.stats.raw_bytes, wire = received.stats.wire_bytes,
              "checkpoint received; waiting for the kubelet to create the container");
        Ok(TransferSummary {
            raw_bytes: received.stats.raw_bytes,
            wire_bytes: received.stats.wire_bytes,
            live_bytes: received.stats.live_bytes,
            in_memory: self.store.in_memory(received.checkpoint.dir()),
        })
    }
}

/// The `/agent/v1/kube` routes (bearer token required).
pub fn router(state: AgentState) -> Router {
    let token = state.token.clone();
    Router::new()
        .route("/agent/v1/kube/workloads", post(workloads))
        .route("/agent/v1/kube/send", post(send))
        .route("/agent/v1/kube/receive/{migration}", post(receive))
        .layer(middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

const WORKLOADS: &str = r#"{"migration":"<id>","action":"mark|unmark|discard|status","identities":[{"namespace":"<ns>","workload":"<name>","container":"<name>"}]}"#;

async fn workloads(
    State(s): State<AgentState>,
    body: Bytes,
) -> Result<Json<Vec<WorkloadStatus>>, ApiError> {
    let req: WorkloadsRequest = parse_json(&body, WORKLOADS)?;
    Ok(Json(s.agent.kube_workloads(&req)?))
}

async fn send(State(s): State<AgentState>, body: Bytes) -> Result<Json<TransferSummary>, ApiError> {
    let req: KubeSendRequest = parse_json(
        &body,
        r#"{"migration":"<id>","identities":[...],"destination":"http://host:port"}"#,
    )?;
    Ok(Json(s.agent.kube_send(&s.http, &s.token, &req).await?))
}

async fn receive(
    State(s): State<AgentState>,
    Path(migration): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Json<TransferSummary>, ApiError> {
    let hint = crate::agent_routes::memory_hint(&headers)?;
    Ok(Json(s.agent.kube_receive(&migration, hint, body).await?))
}
