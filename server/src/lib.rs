//! kubernetes-mig migration server: moves running containers between nodes.
//!
//! One binary, two roles:
//! - the **node agent** ([`agent::NodeAgent`], routes in [`agent_routes`]) runs on every node.
//!   It asks our containerd shim for a checkpoint (a migration mark, then SIGTERM), streams the
//!   checkpoint to the destination's agent ([`transfer`], format in [`stream`]), and on the
//!   destination creates the container again so the shim restores it;
//! - the **controller** ([`controller::Controller`], REST API in [`api`]) accepts
//!   `POST /migrate`, drives the agents through [`node_client::NodeApi`] and keeps the
//!   [`migration::Migration`] records.
//!
//! Both run in one process by default (a single machine); the flow:
//!
//! ```text
//! client --POST /migrate--> controller
//!   controller --checkpoint--> origin agent --mark + SIGTERM--> containerd --> shim (CRIU dump)
//!   controller --send--> origin agent ==zstd stream, sha256 per file==> destination agent
//!   controller --restore--> destination agent --create + start--> containerd --> shim (restore)
//!   controller --finish--> origin agent (delete container and checkpoint)
//! on failure: abort on the destination, rollback on the origin (restart from its checkpoint)
//! ```
//!
//! A post-copy migration ([`pages`]) checkpoints all but the memory pages; the destination's
//! shim fetches them from the frozen origin through both agents while its start runs, and a
//! rollback resumes the frozen origin.
//!
//! With a state dir the controller journals every migration ([`journal`]); one it finds
//! unfinished when it starts is resolved ([`recovery`]): finished when the destination runs
//! the workload, else rolled back to the origin.

pub mod agent;
pub mod agent_routes;
pub mod api;
pub mod auth;
pub mod containerd;
pub mod controller;
mod files;
pub mod http;
pub mod journal;
pub mod kube;
pub mod metrics;
pub mod migration;
pub mod node_client;
pub mod openapi;
pub mod pages;
pub mod protocol;
pub mod recovery;
pub mod registry;
pub mod stream;
pub mod tls;
pub mod transfer;
pub mod zframes;

use std::sync::Arc;

use axum::Router;

/// The whole HTTP application for the roles this process plays.
pub fn app(
    controller: Option<Arc<controller::Controller>>,
    agent: Option<agent_routes::AgentState>,
    token: auth::Token,
) -> Router {
    let mut router = Router::new();
    if let Some(controller) = controller {
        router = router.merge(api::router(controller, token));
    } else {
        router = router.route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        );
    }
    if let Some(agent) = agent {
        router = router.merge(kube::agent::router(agent.clone()));
        router = router.merge(agent_routes::router(agent));
    }
    router
}
