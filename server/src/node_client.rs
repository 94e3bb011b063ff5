//! How the controller reaches node agents: the [`NodeApi`] seam and its HTTP implementation.
//! Unit tests of the migration driver put a fake behind the trait.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::Token;
use crate::containerd::ContainerInfo;
use crate::kube::{KubeSendRequest, WorkloadStatus, WorkloadsRequest};
use crate::protocol::{
    ActionReport, CheckpointSummary, ContainerState, ContainersRequest, ErrorBody, PrepareRequest,
    ResolveRequest, SendRequest, TransferSummary,
};
use crate::registry::NodeInfo;
use crate::transfer::error_chain;

/// A call to a node agent that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("node {node}: {op} failed: {message}")]
pub struct NodeCallError {
    /// The node.
    pub node: String,
    /// The operation (`checkpoint`, `send`, ...).
    pub op: String,
    /// HTTP status of the agent's answer; `None` when it could not be reached.
    pub status: Option<u16>,
    /// The agent's message, or why it could not be reached.
    pub message: String,
}

/// The agent operations the controller drives.
#[async_trait]
pub trait NodeApi: Send + Sync {
    /// Containers of a target on `node`.
    async fn resolve(
        &self,
        node: &NodeInfo,
        req: &ResolveRequest,
    ) -> Result<Vec<String>, NodeCallError>;
    /// The containers' records (origin).
    async fn describe(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerInfo>, NodeCallError>;
    /// Create the containers ahead of their checkpoints (destination).
    async fn prepare(
        &self,
        node: &NodeInfo,
        req: &PrepareRequest,
    ) -> Result<ActionReport, NodeCallError>;
    /// Checkpoint (stops the containers).
    async fn checkpoint(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<CheckpointSummary>, NodeCallError>;
    /// Stream checkpoints from `node` to `req.destination`.
    async fn send(
        &self,
        node: &NodeInfo,
        req: &SendRequest,
    ) -> Result<TransferSummary, NodeCallError>;
    /// Restore what was received.
    async fn restore(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError>;
    /// Remove what was received or created.
    async fn abort(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError>;
    /// Run the containers again on the origin.
    async fn rollback(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError>;
    /// Remove the migrated containers from the origin.
    async fn finish(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError>;
    /// Whether the containers exist on `node` and what their tasks do.
    async fn status(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerState>, NodeCallError>;
    /// Kubernetes mode: mark, unmark, discard or report workloads' checkpoints.
    async fn kube_workloads(
        &self,
        node: &NodeInfo,
        req: &WorkloadsRequest,
    ) -> Result<Vec<WorkloadStatus>, NodeCallError> {
        let _ = req;
        Err(unsupported(node, "kube/workloads"))
    }
    /// Kubernetes mode: stream workloads' checkpoints from `node` to `req.destination`.
    async fn kube_send(
        &self,
        node: &NodeInfo,
        req: &KubeSendRequest,
    ) -> Result<TransferSummary, NodeCallError> {
        let _ = req;
        Err(unsupported(node, "kube/send"))
    }
}

fn unsupported(node: &NodeInfo, op: &str) -> NodeCallError {
    NodeCallError {
        node: node.name.clone(),
        op: op.to_string(),
        status: None,
        message: "not supported by this client".into(),
    }
}

/// [`NodeApi`] over HTTP with the cluster token.
#[derive(Clone)]
pub struct HttpNodes {
    http: reqwest::Client,
    token: Token,
    /// Limit for quick calls; send, checkpoint and restore get `long_timeout`.
    short_timeout: Duration,
    long_timeout: Duration,
}

impl HttpNodes {
    /// A client presenting `token`.
    pub fn new(http: reqwest::Client, token: Token, long_timeout: Duration) -> Self {
        Self {
            http,
            token,
            short_timeout: Duration::from_secs(60),
            long_timeout,
        }
    }

    async fn post<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        node: &NodeInfo,
        op: &str,
        body: &B,
        long: bool,
    ) -> Result<T, NodeCallError> {
        let err = |status: Option<u16>, message: String| NodeCallError {
            node: node.name.clone(),
            op: op.to_string(),
            status,
            message,
        };
        let url = format!("{}/agent/v1/{op}", node.address.trim_end_matches('/'));
        let timeout = if long {
            self.long_timeout
        } else {
            self.short_timeout
        };
        let send = || {
            self.http
                .post(&url)
                .bearer_auth(self.token.secret())
                .timeout(timeout)
                .json(body)
                .send()
        };
        let response = match send().await {
            // A kept-alive connection the peer closed just as it was reused ("connection
            // closed before message completed"): the request did not get through. Calls that
            // can be repeated are sent once more, on a new connection.
            Err(e) if IDEMPOTENT.contains(&op) && !e.is_timeout() && e.is_request() => {
                tracing::debug!(%url, error = %error_chain(&e), "retrying on a new connection");
                send().await
            }
            other => other,
        }
        .map_err(|e| err(None, format!("cannot reach {url}: {}", error_chain(&e))))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            err(
                Some(status.as_u16()),
                format!("reading the answer: {}", error_chain(&e)),
            )
        })?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(err(Some(status.as_u16()), message));
        }
        serde_json::from_str(&text).map_err(|e| {
            err(
                Some(status.as_u16()),
                format!("unexpected answer {text:?}: {e}"),
            )
        })
    }
}

/// Agent calls that do the same when repeated (describe reads; prepare skips what it created;
/// abort deletes what is left), so a retry after a connection failure cannot do anything twice.
const IDEMPOTENT: [&str; 5] = ["resolve", "describe", "prepare", "abort", "status"];

#[async_trait]
impl NodeApi for HttpNodes {
    async fn resolve(
        &self,
        node: &NodeInfo,
        req: &ResolveRequest,
    ) -> Result<Vec<String>, NodeCallError> {
        self.post(node, "resolve", req, false).await
    }
    async fn describe(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerInfo>, NodeCallError> {
        self.post(node, "describe", req, false).await
    }
    async fn prepare(
        &self,
        node: &NodeInfo,
        req: &PrepareRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.post(node, "prepare", req, false).await
    }
    async fn checkpoint(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<CheckpointSummary>, NodeCallError> {
        self.post(node, "checkpoint", req, true).await
    }
    async fn send(
        &self,
        node: &NodeInfo,
        req: &SendRequest,
    ) -> Result<TransferSummary, NodeCallError> {
        self.post(node, "send", req, true).await
    }
    async fn restore(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.post(node, "restore", req, true).await
    }
    async fn abort(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.post(node, "abort", req, false).await
    }
    async fn rollback(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.post(node, "rollback", req, true).await
    }
    async fn finish(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<ActionReport, NodeCallError> {
        self.post(node, "finish", req, false).await
    }
    async fn status(
        &self,
        node: &NodeInfo,
        req: &ContainersRequest,
    ) -> Result<Vec<ContainerState>, NodeCallError> {
        self.post(node, "status", req, false).await
    }
    async fn kube_workloads(
        &self,
        node: &NodeInfo,
        req: &WorkloadsRequest,
    ) -> Result<Vec<WorkloadStatus>, NodeCallError> {
        self.post(node, "kube/workloads", req, false).await
    }
    async fn kube_send(
        &self,
        node: &NodeInfo,
        req: &KubeSendRequest,
    ) -> Result<TransferSummary, NodeCallError> {
        self.post(node, "kube/send", req, true).await
    }
}
