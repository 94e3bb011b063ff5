//! JSON bodies exchanged between the controller and the node agents (`/agent/v1/...`).

use serde::{Deserialize, Serialize};

use crate::migration::Target;

/// `POST /agent/v1/resolve`: which containers make up a target on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveRequest {
    /// containerd namespace.
    pub namespace: String,
    /// What to look for.
    pub target: Target,
}

/// `POST /agent/v1/{describe,checkpoint,restore,rollback,finish,abort,status}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainersRequest {
    /// The migration this belongs to.
    pub migration: String,
    /// containerd namespace.
    pub namespace: String,
    /// Container ids (unused by restore and abort, which act on what was received).
    pub containers: Vec<String>,
    /// Post-copy (lazy) migration, for the checkpoint: the shim commits a checkpoint without
    /// memory pages, keeps the processes frozen and serves their pages on `pages/<key>.sock`.
    /// (A rollback finds what such a checkpoint left and resumes the frozen processes, never
    /// restores from that checkpoint.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub post_copy: bool,
    /// Restore of a post-copy migration: the origin agent's base URL, whose
    /// `POST /agent/v1/pages` the destination pipes each shim's page requests to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_from: Option<String>,
}

/// `POST /agent/v1/pages` (origin): upgrade the connection to a byte pipe to the shim's page
/// server of one container of a post-copy migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PagesRequest {
    /// The migration.
    pub migration: String,
    /// containerd namespace.
    pub namespace: String,
    /// Container id.
    pub id: String,
}

/// `POST /agent/v1/prepare`: create, on the destination, the containers of a migration ahead
/// of their checkpoints (their records as the origin's `POST /agent/v1/describe` gave them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// The migration.
    pub migration: String,
    /// The containers to create.
    pub containers: Vec<crate::containerd::ContainerInfo>,
}

/// `POST /agent/v1/send`: stream the migration's checkpoints to another agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// The migration.
    pub migration: String,
    /// containerd namespace.
    pub namespace: String,
    /// Container ids, each already checkpointed.
    pub containers: Vec<String>,
    /// The destination agent's base URL.
    pub destination: String,
    /// Start with the checkpoint instead of after it: stream each container's page images
    /// while they are written (the controller asks for the checkpoint at the same time).
    #[serde(default)]
    pub live: bool,
}

/// `POST /agent/v1/status`: one container of the request on the node asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container id.
    pub container: String,
    /// Whether the container exists on the node.
    pub exists: bool,
    /// Its task's status; `None` when it has no task.
    pub task: Option<crate::containerd::TaskStatus>,
}

/// One container's checkpoint on the origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointSummary {
    /// Container id.
    pub container: String,
    /// Sum of the checkpoint's file sizes.
    pub bytes: u64,
    /// Number of files.
    pub files: usize,
    /// Whether it was written in the node's checkpoint store in memory (see
    /// `mig_checkpoint::Store::begin_transient`).
    #[serde(default)]
    pub in_memory: bool,
}

/// Byte counts of a transfer.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TransferSummary {
    /// Uncompressed checkpoint bytes.
    pub raw_bytes: u64,
    /// Compressed bytes on the wire.
    pub wire_bytes: u64,
    /// Of `raw_bytes`, those sent while the checkpoint was being written.
    #[serde(default)]
    pub live_bytes: u64,
    /// Whether the destination wrote every checkpoint in its store in memory.
    #[serde(default)]
    pub in_memory: bool,
}

/// What an agent did, for the migration record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActionReport {
    /// One line per step.
    pub done: Vec<String>,
    /// Containers that had stopped and run again (rollback only).
    #[serde(default)]
    pub restored: Vec<String>,
    /// Restore only: how long before this answer the last container was seen running. The
    /// answer waits for a lazy restore to have all of its memory in place (the shim's start
    /// returns then), while the workload already runs; the downtime ends at the earlier time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_ms_before: Option<u64>,
}

/// Every error response: what was wrong and what was expected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What was wrong.
    pub error: String,
    /// What would have been accepted, when that helps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_requests_of_earlier_versions_still_parse_and_are_written_as_before() {
        let old = r#"{"migration":"m","namespace":"default","containers":["c"]}"#;
        let req: ContainersRequest = serde_json::from_str(old).expect("parse");
        assert!(!req.post_copy);
        assert_eq!(req.pages_from, None);
        assert_eq!(serde_json::to_string(&req).expect("json"), old);
        let req = ContainersRequest {
            post_copy: true,
            pages_from: Some("https://node01:7070".into()),
            ..req
        };
        let json = serde_json::to_value(&req).expect("json");
        assert_eq!(json["post_copy"], true);
        assert_eq!(json["pages_from"], "https://node01:7070");
    }
}
