//! Post-copy (lazy) migration: the pipe between the destination shim, which faults memory
//! pages in while the workload already runs there, and the origin shim, which serves them from
//! the frozen processes.
//!
//! ```text
//! destination shim --unix--> destination agent --HTTP upgrade "mig-pages"--> origin agent
//!   (pages_socket in its incoming mark)   POST /agent/v1/pages            --unix--> origin shim
//!                                                                  (<state>/pages/<key>.sock)
//! ```
//!
//! The agents never look at the bytes: they pipe them both ways and pass on a half-close. The
//! shims' own protocol says when every page was served; a connection that ends before that
//! makes the origin shim abort and resume the workload where it was.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tracing::{info, warn};

use crate::auth::Token;
use crate::files::remove_if_exists;
use crate::protocol::{ErrorBody, PagesRequest};
use crate::transfer::error_chain;

/// The protocol named in the `Upgrade` header of `POST /agent/v1/pages`.
pub const UPGRADE_PROTOCOL: &str = "mig-pages";

/// Copies bytes both ways until both directions ended. When one side ends its writes, the
/// other side's write half is shut down (the half-close passes through) while the other
/// direction goes on; an error in either direction drops both.
pub async fn pipe<A, B>(mut a: A, mut b: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Pages come in answers of up to megabytes: copy them in large pieces (tokio's default
    // is 8 KiB per read and write).
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PIPE_BUFFER, PIPE_BUFFER).await
}

/// The buffer of each direction of [`pipe`].
const PIPE_BUFFER: usize = 256 << 10;

/// Where a destination agent fetches pages: the origin agent and how to reach it.
#[derive(Clone)]
pub struct PagesOrigin {
    /// The client for node-to-node calls (the agents' TLS settings).
    pub http: reqwest::Client,
    /// The cluster token.
    pub token: Token,
    /// The origin agent's base URL.
    pub url: String,
}

/// Destination side: opens the upgraded connection to the origin agent's page pipe for
/// `req` and pipes `shim` (the destination shim's accepted connection) through it. When the
/// origin cannot be reached or refuses, `shim` is closed: the shim then fails the start.
pub async fn pipe_to_origin(
    shim: UnixStream,
    origin: &PagesOrigin,
    req: &PagesRequest,
) -> Result<(u64, u64), String> {
    let url = format!("{}/agent/v1/pages", origin.url.trim_end_matches('/'));
    let response = origin
        .http
        .post(&url)
        .bearer_auth(origin.token.secret())
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, UPGRADE_PROTOCOL)
        .json(req)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
    let status = response.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        return Err(format!("{url} answered {status}: {message}"));
    }
    let upgraded = response
        .upgrade()
        .await
        .map_err(|e| format!("upgrading {url}: {}", error_chain(&e)))?;
    pipe(shim, upgraded)
        .await
        .map_err(|e| format!("piping pages from {url}: {e}"))
}

/// Destination side: the socket one container's shim fetches its pages through, for as long
/// as its restore runs. It accepts one connection and pipes it to the origin
/// ([`pipe_to_origin`]); dropping it stops accepting and removes the socket, while a pipe
/// already going on runs until the shims end it.
pub struct PagesListener {
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
}

impl PagesListener {
    /// Binds `path` (mode 0600; a stale socket there is removed first) and serves it.
    pub fn bind(path: PathBuf, origin: PagesOrigin, req: PagesRequest) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        remove_if_exists(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            remove_if_exists(&path);
            return Err(e);
        }
        let accept = tokio::spawn(async move {
            let shim = match listener.accept().await {
                Ok((shim, _)) => shim,
                Err(e) => {
                    warn!(container_id = %req.id, error = %e, "accepting the shim's page connection");
                    return;
                }
            };
            drop(listener);
            // Apart from the accept, which ends with the restore: the pipe ends with the shims.
            tokio::spawn(async move {
                match pipe_to_origin(shim, &origin, &req).await {
                    Ok((up, down)) => {
                        info!(container_id = %req.id, migration = %req.migration, requests = up, pages = down, "post-copy pages piped")
                    }
                    Err(e) => {
                        warn!(container_id = %req.id, migration = %req.migration, error = %e, "post-copy page pipe failed")
                    }
                }
            });
        });
        Ok(Self { path, accept })
    }

    /// The socket's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PagesListener {
    fn drop(&mut self) {
        self.accept.abort();
        remove_if_exists(&self.path);
    }
}
