//! The node agent's HTTP API, `/agent/v1/...`. Only the controller and other agents call it;
//! every route requires the bearer token, reads included, since they reveal node state.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::Response;
use axum::routing::post;
use axum::{Json, response::IntoResponse};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

use crate::agent::NodeAgent;
use crate::auth::{Token, require_token};
use crate::http::{ApiError, parse_json};
use crate::pages::{PagesOrigin, UPGRADE_PROTOCOL, pipe};
use crate::protocol::{
    ContainersRequest, PagesRequest, PrepareRequest, ResolveRequest, SendRequest,
};

/// What the agent routes share.
#[derive(Clone)]
pub struct AgentState {
    /// The agent.
    pub agent: Arc<NodeAgent>,
    /// Client for streaming to other agents.
    pub http: reqwest::Client,
    /// The cluster token, presented to other agents.
    pub token: Token,
}

const CONTAINERS: &str =
    r#"{"migration":"<id>","namespace":"<containerd namespace>","containers":["<id>",...]}"#;

/// The `/agent/v1` routes.
pub fn router(state: AgentState) -> Router {
    let token = state.token.clone();
    Router::new()
        .route("/agent/v1/resolve", post(resolve))
        .route("/agent/v1/describe", post(describe))
        .route("/agent/v1/prepare", post(prepare))
        .route("/agent/v1/checkpoint", post(checkpoint))
        .route("/agent/v1/send", post(send))
        .route("/agent/v1/receive/{migration}", post(receive))
        .route("/agent/v1/restore", post(restore))
        .route("/agent/v1/abort", post(abort))
        .route("/agent/v1/rollback", post(rollback))
        .route("/agent/v1/finish", post(finish))
        .route("/agent/v1/status", post(status))
        .route("/agent/v1/pages", post(pages))
        .layer(middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

async fn resolve(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ResolveRequest = parse_json(
        &body,
        r#"{"namespace":"<ns>","target":{"kind":"deployment|pod|container","name":"<name>"}}"#,
    )?;
    Ok(Json(s.agent.resolve(&req.namespace, &req.target).await?))
}

async fn describe(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(
        s.agent.describe(&req.namespace, &req.containers).await?,
    ))
}

async fn prepare(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: PrepareRequest = parse_json(
        &body,
        r#"{"migration":"<id>","containers":[<container record from /agent/v1/describe>,...]}"#,
    )?;
    Ok(Json(
        s.agent.prepare(&req.migration, &req.containers).await?,
    ))
}

async fn checkpoint(
    State(s): State<AgentState>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(
        s.agent
            .checkpoint(
                &req.migration,
                &req.namespace,
                &req.containers,
                req.post_copy,
            )
            .await?,
    ))
}

async fn send(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: SendRequest = parse_json(
        &body,
        r#"{"migration":"<id>","namespace":"<ns>","containers":["<id>"],"destination":"http://host:port","live":false}"#,
    )?;
    Ok(Json(
        s.agent
            .send(
                &s.http,
                &s.token,
                &req.migration,
                &req.namespace,
                &req.containers,
                &req.destination,
                req.live,
            )
            .await?,
    ))
}

async fn receive(
    State(s): State<AgentState>,
    Path(migration): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let hint = memory_hint(&headers)?;
    Ok(Json(s.agent.receive(&migration, hint, body).await?))
}

/// The origin's [`crate::transfer::MEMORY_HINT_HEADER`], if it sent one: a byte count.
pub(crate) fn memory_hint(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(crate::transfer::MEMORY_HINT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "header {} is {value:?}: expected a byte count",
                    crate::transfer::MEMORY_HINT_HEADER
                ),
            )
        })
}

async fn restore(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    let pages = req.pages_from.map(|url| PagesOrigin {
        http: s.http.clone(),
        token: s.token.clone(),
        url,
    });
    Ok(Json(s.agent.restore(&req.migration, pages.as_ref()).await?))
}

async fn abort(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(s.agent.abort(&req.migration).await?))
}

async fn rollback(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(
        s.agent
            .rollback(&req.migration, &req.namespace, &req.containers)
            .await?,
    ))
}

async fn finish(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(
        s.agent
            .finish(&req.migration, &req.namespace, &req.containers)
            .await?,
    ))
}

async fn status(State(s): State<AgentState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let req: ContainersRequest = parse_json(&body, CONTAINERS)?;
    Ok(Json(s.agent.status(&req.namespace, &req.containers).await?))
}

const PAGES: &str = r#"{"migration":"<id>","namespace":"<ns>","id":"<container id>"} with headers `Connection: upgrade` and `Upgrade: mig-pages`"#;

/// Post-copy, origin side: the destination agent's connection, upgraded, becomes a byte pipe
/// to the page server of the shim of one container (see [`crate::pages`]).
async fn pages(State(s): State<AgentState>, mut request: Request) -> Result<Response, ApiError> {
    let asks_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !asks_upgrade {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("POST /agent/v1/pages needs the header `Upgrade: {UPGRADE_PROTOCOL}`"),
        )
        .expected(PAGES));
    }
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    // Checked before the shim is connected to: a connection to it that closes makes it abort.
    if !connection_upgrade || request.version() != axum::http::Version::HTTP_11 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "POST /agent/v1/pages is an HTTP/1.1 upgrade: it needs `Connection: upgrade`",
        )
        .expected(PAGES));
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024)
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")).expected(PAGES)
        })?;
    let req: PagesRequest = parse_json(&body, PAGES)?;
    let shim = s
        .agent
        .open_pages(&req.migration, &req.namespace, &req.id)
        .await?;
    tokio::spawn(async move {
        // Should the upgrade fail, `shim` is dropped, closed at once: the shim aborts and
        // resumes the workload here.
        match on_upgrade.await {
            Ok(upgraded) => match pipe(TokioIo::new(upgraded), shim).await {
                Ok((down, up)) => {
                    info!(container_id = %req.id, migration = %req.migration, requests = down, pages = up, "post-copy pages served")
                }
                Err(e) => {
                    warn!(container_id = %req.id, migration = %req.migration, error = %e, "post-copy page pipe failed")
                }
            },
            Err(e) => {
                warn!(container_id = %req.id, migration = %req.migration, error = %e, "the page connection was not upgraded")
            }
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, UPGRADE_PROTOCOL),
            (header::CONNECTION, "upgrade"),
        ],
    )
        .into_response())
}
