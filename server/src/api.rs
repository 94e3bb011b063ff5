//! The controller's REST API (documented in [`crate::openapi`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use serde_json::json;

use crate::auth::{Token, require_token};
use crate::controller::{Controller, ControllerError, MigrateRequest};
use crate::http::{ApiError, parse_json};
use crate::registry::PodInfo;

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        match e {
            ControllerError::BadRequest { message, expected } => {
                ApiError::new(StatusCode::BAD_REQUEST, message).expected(expected)
            }
            ControllerError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            ControllerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            ControllerError::Node(e) => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
            ControllerError::Kube(e) => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
            e @ ControllerError::Journal(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// The controller routes; `token` guards the mutating ones.
pub fn router(controller: Arc<Controller>, token: Token) -> Router {
    let mutating = Router::new()
        .route("/register", post(register))
        .route("/migrate", post(migrate))
        .layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/nodes", get(nodes))
        .route("/pods", get(pods))
        .route("/migrations", get(migrations))
        .route("/migrations/{id}", get(migration))
        .merge(mutating)
        .with_state(controller)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}

async fn metrics(State(c): State<Arc<Controller>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&c.migrations(), c.nodes().len()),
    )
        .into_response()
}

async fn nodes(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.nodes())
}

async fn pods(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.pods())
}

async fn migrations(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.migrations())
}

async fn migration(
    State(c): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    c.migration(&id).map(Json).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("no migration {id:?}"))
            .expected("an id returned by POST /migrate (see GET /migrations)")
    })
}

const REGISTER_EXPECTED: &str = r#"{"name":"<node>","address":"http://host:port"} for a node agent, or {"id":"<pod>","env":{"K":"V"}} for a pod"#;

async fn register(
    State(c): State<Arc<Controller>>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let value: serde_json::Value = parse_json(&body, REGISTER_EXPECTED)?;
    if value.get("name").is_some() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NodeRegistration {
            name: String,
            address: String,
        }
        let node: NodeRegistration =
            serde_json::from_value(value).map_err(|e| invalid(e, REGISTER_EXPECTED))?;
        let new = c.register_node(&node.name, &node.address)?;
        Ok(Json(
            json!({"registered": "node", "name": node.name, "new": new}),
        ))
    } else if value.get("id").is_some() {
        let pod: PodInfo =
            serde_json::from_value(value).map_err(|e| invalid(e, REGISTER_EXPECTED))?;
        let id = pod.id.clone();
        let new = c.register_pod(pod)?;
        Ok(Json(json!({"registered": "pod", "id": id, "new": new})))
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body has neither \"name\" (node) nor \"id\" (pod)",
        )
        .expected(REGISTER_EXPECTED))
    }
}

fn invalid(e: serde_json::Error, expected: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")).expected(expected)
}

async fn migrate(
    State(c): State<Arc<Controller>>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: MigrateRequest = parse_json(
        &body,
        r#"{"deployment":"<name>","originNode":"<node>","destNode":"<node>"} (or "pod"/"container"; optional "namespace")"#,
    )?;
    let record = c.start(req).await?;
    let location = format!("/migrations/{}", record.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(record),
    ))
}
