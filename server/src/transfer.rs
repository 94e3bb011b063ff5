//! Moving checkpoint streams over HTTP: the origin agent's sender and the destination
//! agent's receiver. The format itself is in [`crate::stream`]; this module only bridges the
//! blocking encoder/decoder (file IO, zstd) to the async HTTP bodies, one blocking thread per
//! stream, with a small bounded channel so a slow peer slows the reader instead of filling
//! memory.

use std::io;

use bytes::Bytes;
use futures_util::StreamExt;
use std::path::Path;
use std::time::Duration;

use mig_checkpoint::{Store, WorkloadIdentity};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agent::{AgentError, CheckpointProgress, NodeAgent, safe};
use crate::auth::Token;
use crate::containerd::ContainerInfo;
use crate::protocol::{ErrorBody, TransferSummary};
use crate::stream::{
    Follow, LiveOutcome, Received, StreamError, StreamStats, receive_checkpoint_chunks,
    send_checkpoint, send_checkpoint_live,
};
use crate::zframes::{ChunkSource, Sink};

/// Chunks handed to the HTTP body; big enough to keep syscalls few.
const CHUNK: usize = 1024 * 1024;
/// Pieces smaller than this are gathered into a chunk rather than sent on their own (frame
/// and block headers; the bytes of stored frames come in pieces of 128 KiB).
const SMALL_PIECE: usize = 16 << 10;
/// Sent with a checkpoint stream the origin wrote in memory: its size hint in bytes (see
/// [`NodeAgent::memory_hint`]).
pub const MEMORY_HINT_HEADER: &str = "x-mig-memory-hint";
/// Pieces in flight between the encoder thread and the HTTP client: 128 KiB each for stored
/// frames, so ~8 MiB.
const SEND_DEPTH: usize = 64;
/// Body chunks (as hyper reads them, tens of KiB) the receiver buffers between the connection
/// and its decoding thread: the connection is read ahead while the thread decodes, instead of
/// only when the thread asks for more.
const RECEIVE_DEPTH: usize = 256;

/// A [`Sink`] feeding the request body through a channel: large pieces go as they are (hyper
/// writes them to the socket with `writev`, without copying them), small ones are gathered
/// into chunks first.
///
/// The request can fail while the body stream is still held by the HTTP client (a dead peer),
/// so nothing would drain the channel; `cancel` unblocks the writer then.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
    cancel: CancellationToken,
    runtime: tokio::runtime::Handle,
}

impl ChannelWriter {
    /// Sends the gathered small pieces.
    fn push(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = if self.buf.len() < SMALL_PIECE {
            let chunk = Bytes::copy_from_slice(&self.buf);
            self.buf.clear();
            chunk
        } else {
            Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)))
        };
        self.send(chunk)
    }

    fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        let closed = || {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection to the destination closed while sending",
            )
        };
        let (tx, cancel) = (&self.tx, &self.cancel);
        self.runtime.block_on(async {
            tokio::select! {
                sent = tx.send(Ok(chunk)) => sent.map_err(|_| closed()),
                () = cancel.cancelled() => Err(closed()),
            }
        })
    }
}

impl Sink for ChannelWriter {
    fn put(&mut self, piece: Bytes) -> io::Result<()> {
        if piece.len() < SMALL_PIECE {
            return self.put_slice(&piece);
        }
        self.push()?;
        self.send(piece)
    }
    fn put_slice(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.push()?;
        }
        Ok(())
    }
    fn flush_sink(&mut self) -> io::Result<()> {
        self.push()
    }
}

/// What a stream sends: a complete checkpoint, or one that is being written.
pub(crate) enum Source {
    /// The committed checkpoint in this directory.
    Complete(std::path::PathBuf),
    /// The checkpoint of this identity, followed in the store while the shim writes it.
    Live {
        store: mig_checkpoint::Store,
        identity: WorkloadIdentity,
        since: std::time::SystemTime,
        progress: watch::Receiver<CheckpointProgress>,
        deadline: std::time::Instant,
    },
}

impl NodeAgent {
    /// Streams the checkpoint of each container to the agent at `destination`, one request
    /// per container, straight from the checkpoint directory. With `live`, the send starts
    /// with the checkpoint (the controller asks for both at once): each container's page
    /// images are streamed while the shim's engine writes them, the rest once committed.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        http: &reqwest::Client,
        token: &Token,
        migration: &str,
        namespace: &str,
        containers: &[String],
        destination: &str,
        live: bool,
    ) -> Result<TransferSummary, AgentError> {
        let migration = safe("migration id", migration)?;
        let ns = safe("namespace", namespace)?;
        let url = format!(
            "{}/agent/v1/receive/{migration}",
            destination.trim_end_matches('/')
        );
        let mut total = TransferSummary {
            in_memory: !containers.is_empty(),
            ..TransferSummary::default()
        };
        let started = std::time::Instant::now();
        for id in containers {
            let id = safe("container id", id)?;
            let identity = WorkloadIdentity::container(ns.as_str(), id.as_str())?;
            let source = if live {
                let mut progress = self.progress(migration.as_str(), id.as_str());
                let begun = tokio::time::timeout(self.config.wait_timeout, async {
                    progress
                        .wait_for(|p| *p != CheckpointProgress::NotStarted)
                        .await
                        .map(|p| (*p).clone())
                })
                .await;
                let since = match begun {
                    Err(_) | Ok(Err(_)) => {
                        return Err(AgentError::Timeout(format!(
                            "the checkpoint of {id} did not begin within {:?}",
                            self.config.wait_timeout
                        )));
                    }
                    Ok(Ok(CheckpointProgress::Failed(reason))) => {
                        return Err(AgentError::Stream(StreamError::SourceFailed(reason)));
                    }
                    Ok(Ok(CheckpointProgress::Started(at))) => at,
                    // Committed already: whatever it wrote is found complete.
                    Ok(Ok(_)) => std::time::SystemTime::now(),
                };
                Source::Live {
                    store: self.store.clone(),
                    identity: identity.clone(),
                    since,
                    progress,
                    deadline: std::time::Instant::now() + self.config.wait_timeout,
                }
            } else {
                Source::Complete(self.store.path_for(&identity))
            };
            let hint = self.memory_hint(&source).await;
            let info = self.saved_info(&migration, &identity)?;
            let (stats, received) = self
                .stream_checkpoint(http, token, &url, source, info, hint, &format!("{id}"))
                .await?;
            total.in_memory &= received.in_memory;
            info!(container_id = %id, raw = stats.raw_bytes, wire = stats.wire_bytes,
                  live = stats.live_bytes, stored = stats.stored_bytes, elapsed_ms = started.elapsed().as_millis() as u64,
                  "checkpoint sent");
            total.raw_bytes += stats.raw_bytes;
            total.wire_bytes += stats.wire_bytes;
            total.live_bytes += stats.live_bytes;
        }
        Ok(total)
    }

    /// The size hint of `source` when the shim wrote it in memory (see
    /// [`mig_checkpoint::Store::begin_transient`]), for the receiver to write it in memory too
    /// if it has the room. A live checkpoint's directory is looked for as the live sender
    /// does, for as long as the shim may take to begin it.
    pub(crate) async fn memory_hint(&self, source: &Source) -> Option<u64> {
        let in_memory = |dir: &Path| {
            self.store
                .in_memory(dir)
                .then(|| Store::size_hint(dir))
                .map(|hint| hint.ok_or(()))
        };
        match source {
            Source::Complete(dir) => in_memory(dir).and_then(Result::ok),
            Source::Live {
                store,
                identity,
                since,
                progress,
                deadline,
            } => loop {
                let found = match store.writing(identity, *since) {
                    Ok(Some(dir)) => Some(dir),
                    _ if *progress.borrow() == CheckpointProgress::Committed => {
                        Some(store.path_for(identity))
                    }
                    _ => None,
                };
                match found.as_deref().map(in_memory) {
                    // On disk.
                    Some(None) => return None,
                    Some(Some(Ok(hint))) => return Some(hint),
                    // In memory, its hint not written yet; or not begun yet.
                    Some(Some(Err(()))) | None => {}
                }
                if matches!(*progress.borrow(), CheckpointProgress::Failed(_))
                    || std::time::Instant::now() > *deadline
                {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            },
        }
    }

    /// POSTs the checkpoint of `source` (with its container record) to `url` as one
    /// compressed stream, read straight from the store on a blocking thread, asking the
    /// receiver to write it in memory for `memory_hint` bytes if it can (header
    /// [`MEMORY_HINT_HEADER`]). `what` names the workload in errors.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn stream_checkpoint(
        &self,
        http: &reqwest::Client,
        token: &Token,
        url: &str,
        source: Source,
        info: ContainerInfo,
        memory_hint: Option<u64>,
        what: &str,
    ) -> Result<(StreamStats, TransferSummary), AgentError> {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(SEND_DEPTH);
        let level = self.config.zstd_level;
        let cancel = CancellationToken::new();
        let out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            cancel: cancel.clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let encoder = tokio::task::spawn_blocking(move || {
            let stats = match source {
                Source::Complete(dir) => send_checkpoint(&dir, &info, out, level)?,
                Source::Live {
                    store,
                    identity,
                    since,
                    progress,
                    deadline,
                } => {
                    let mut outcome = || match &*progress.borrow() {
                        CheckpointProgress::Committed => LiveOutcome::Committed,
                        CheckpointProgress::Failed(reason) => LiveOutcome::Failed(reason.clone()),
                        _ => LiveOutcome::Pending,
                    };
                    let follow = Follow {
                        store: &store,
                        identity: &identity,
                        since,
                        deadline,
                    };
                    send_checkpoint_live(follow, &info, out, level, &mut outcome)?
                }
            };
            Ok::<_, StreamError>(stats)
        });
        let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        }));
        let mut request = http.post(url).bearer_auth(token.secret());
        if let Some(hint) = memory_hint {
            request = request.header(MEMORY_HINT_HEADER, hint.to_string());
        }
        let response = request.body(body).send().await;
        if !matches!(&response, Ok(r) if r.status().is_success()) {
            cancel.cancel();
        }
        let encoded = encoder
            .await
            .map_err(|e| AgentError::Peer(format!("sender thread failed: {e}")))?;
        let response = response.map_err(|e| {
            AgentError::Peer(format!(
                "sending the checkpoint of {what} to {url} failed: {}",
                error_chain(&e)
            ))
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(AgentError::Peer(format!(
                "destination refused the checkpoint of {what} ({status}): {message}"
            )));
        }
        let stats = encoded?;
        // What the destination says it did; an older one may not say (all defaults).
        let received = response.json::<TransferSummary>().await.unwrap_or_default();
        Ok((stats, received))
    }

    /// Receives one checkpoint stream for `migration` into the store and records the
    /// container for the restore. Refuses streams for other workloads than the container
    /// record names.
    pub async fn receive(
        &self,
        migration: &str,
        memory_hint: Option<u64>,
        body: axum::body::Body,
    ) -> Result<TransferSummary, AgentError> {
        let migration = safe("migration id", migration)?;
        let started = std::time::Instant::now();
        let received = self
            .receive_body(body, memory_hint, |info, manifest| {
                let ns = SafeNameCheck::check("namespace", &info.namespace)?;
                let id = SafeNameCheck::check("container id", &info.id)?;
                let expected = WorkloadIdentity::container(ns, id).map_err(|e| e.to_string())?;
                if manifest.identity != expected {
                    return Err(format!(
                        "checkpoint is for {}, but the container record is for {expected}",
                        manifest.identity
                    ));
                }
                Ok(())
            })
            .await?;
        self.check_prepared(&migration, &received.info)?;
        self.record_received(&migration, &received.info)?;
        info!(container_id = %received.info.id, migration = %migration,
              in_memory = self.store.in_memory(received.checkpoint.dir()),
              raw = received.stats.raw_bytes, wire = received.stats.wire_bytes,
              live = received.stats.live_bytes, elapsed_ms = started.elapsed().as_millis() as u64, "checkpoint received");
        Ok(TransferSummary {
            raw_bytes: received.stats.raw_bytes,
            wire_bytes: received.stats.wire_bytes,
            live_bytes: received.stats.live_bytes,
            in_memory: self.store.in_memory(received.checkpoint.dir()),
        })
    }

    /// Reads one checkpoint stream from an HTTP body into the store, on a blocking thread;
    /// `accept` decides from its container record and manifest whether it is for this node
    /// (see [`receive_checkpoint`]).
    pub(crate) async fn receive_body(
        &self,
        body: axum::body::Body,
        memory_hint: Option<u64>,
        accept: impl FnOnce(&ContainerInfo, &mig_checkpoint::Manifest) -> Result<(), String>
        + Send
        + 'static,
    ) -> Result<Received, AgentError> {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(RECEIVE_DEPTH);
        let pump = tokio::spawn(async move {
            let mut frames = body.into_data_stream();
            while let Some(frame) = frames.next().await {
                if tx.send(frame.map_err(io::Error::other)).await.is_err() {
                    break;
                }
            }
        });
        let input = ChannelReader { rx };
        let store = self.store.clone();
        let received = tokio::task::spawn_blocking(move || {
            receive_checkpoint_chunks(input, &store, memory_hint, accept)
        })
        .await;
        // Done or failed: what is left of the body is not read.
        pump.abort();
        received
            .map_err(|e| AgentError::Peer(format!("receiver thread failed: {e}")))?
            .map_err(AgentError::from)
    }
}

/// The receiving end of [`NodeAgent::receive_body`]'s pump, read on a blocking thread.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl ChunkSource for ChannelReader {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.rx.blocking_recv().transpose()
    }
}

struct SafeNameCheck;

impl SafeNameCheck {
    fn check<'a>(what: &str, name: &'a str) -> Result<&'a str, String> {
        mig_checkpoint::SafeName::new(name)
            .map(|_| name)
            .map_err(|e| format!("invalid {what} {name:?} in container record: {e}"))
    }
}

/// An error with its causes, which is where reqwest keeps "connection refused".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
