//! The HTTP error type shared by the controller API and the agent API, and JSON body parsing
//! that says what was wrong and what was expected (axum's own rejection is plain text).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::agent::AgentError;
use crate::containerd::ContainerdError;
use crate::protocol::ErrorBody;
use crate::stream::StreamError;

/// An error response: status plus `{"error": ..., "expected": ...}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                expected: None,
            },
        }
    }

    /// Adds what would have been accepted.
    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.body.expected = Some(expected.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match &e {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) | AgentError::Containerd(ContainerdError::NotFound { .. }) => {
                StatusCode::NOT_FOUND
            }
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Stream(
                StreamError::ChecksumMismatch { .. }
                | StreamError::Malformed(_)
                | StreamError::Refused(_)
                | StreamError::Store(mig_checkpoint::Error::Corrupt { .. }),
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Stream(StreamError::SourceFailed(_)) => StatusCode::CONFLICT,
            AgentError::Peer(_) => StatusCode::BAD_GATEWAY,
            AgentError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Parses a JSON body into `T`; on failure a 400 that quotes serde's complaint and `expected`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")).expected(expected)
    })
}
