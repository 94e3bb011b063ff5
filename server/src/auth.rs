//! The shared bearer token: what protects every mutating endpoint and all node-to-node traffic.
//!
//! One secret for the whole cluster keeps set-up to one file per node (a Kubernetes Secret
//! mounted into the DaemonSet and the controller). It is read from `--token-file` or
//! `MIG_TOKEN`, never from the repository or the command line (which `ps` shows).

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::protocol::ErrorBody;

/// The environment variable holding the token when no file is given.
pub const TOKEN_ENV: &str = "MIG_TOKEN";

/// A loaded token.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why no token could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither a file nor the environment variable gave one.
    #[error("no token: pass --token-file FILE or set {TOKEN_ENV}")]
    Missing,
    /// The token is empty or not a valid header value.
    #[error("token from {0} is empty or contains characters not allowed in an HTTP header")]
    Invalid(String),
}

impl Token {
    /// Wraps a token; it must be non-empty printable ASCII (it travels in a header).
    pub fn new(token: impl Into<String>, source: &str) -> Result<Self, TokenError> {
        let token = token.into().trim().to_string();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid(source.to_string()));
        }
        Ok(Self(token))
    }

    /// From `file` if given, else from `MIG_TOKEN`.
    pub fn load(file: Option<&Path>) -> Result<Self, TokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.display().to_string(),
                source,
            })?;
            return Self::new(text, &path.display().to_string());
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) => Self::new(v, TOKEN_ENV),
            Err(_) => Err(TokenError::Missing),
        }
    }

    /// The token, for an `Authorization: Bearer` header.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut diff = u8::from(a.len() != b.len());
        for (i, x) in a.iter().enumerate() {
            diff |= x ^ b.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

/// Middleware: refuses the request with 401 unless it carries `Authorization: Bearer <token>`.
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if token.matches(p.trim()) => next.run(request).await,
        other => {
            let error = if other.is_some() {
                "wrong bearer token"
            } else {
                "missing bearer token"
            };
            let mut response = (
                StatusCode::UNAUTHORIZED,
                axum::Json(ErrorBody {
                    error: error.into(),
                    expected: Some(
                        "header `Authorization: Bearer <token>` with the cluster's token (--token-file or MIG_TOKEN)"
                            .into(),
                    ),
                }),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_exact_token() {
        let t = Token::new("s3cret-token\n", "test").expect("token");
        assert!(t.matches("s3cret-token"));
        assert!(!t.matches("s3cret-toke"));
        assert!(!t.matches("s3cret-token2"));
        assert!(!t.matches(""));
    }

    #[test]
    fn refuses_empty_and_header_breaking_tokens() {
        assert!(Token::new("  ", "test").is_err());
        assert!(Token::new("a b", "test").is_err());
        assert!(format!("{:?}", Token::new("x", "t").expect("token")).contains("redacted"));
    }
}
