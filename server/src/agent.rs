//! [`NodeAgent`]: the per-node half of a migration. It checkpoints containers through our shim,
//! streams checkpoints to another agent, receives them, restores, rolls back and cleans up.
//!
//! Node state lives under the state dir (`MIG_STATE_DIR`, shared with the shim):
//!
//! ```text
//! checkpoints/                 the mig_checkpoint::Store the shim writes and restores from
//! marks/<key>.json             {"migration": id, "durable": false}: tells the shim to checkpoint
//!                              on the next kill (data not fsynced: it is streamed at once)
//! migrations/<id>/<key>.json   the container record of each container of migration <id>
//!                              (origin: taken before the checkpoint; destination: received)
//! migrations/<id>/<key>.created  destination only: we created this container, abort deletes it
//! migrations/<id>/<key>.post-copy  origin only: a post-copy checkpoint of it was committed,
//!                              so its processes are frozen (or were, until the shim aborted)
//! incoming/<key>.json          destination only: {"migration": id}: the container and its
//!                              task were created ahead of the checkpoint; the shim's create
//!                              leaves what needs the checkpoint to the task's start. A
//!                              post-copy restore adds "pages_socket": the socket the shim
//!                              fetches its pages through (see crate::pages)
//! pages/<key>.sock             post-copy: origin: the shim serves the frozen processes'
//!                              pages there; destination: the agent's pipe to the origin
//! ```
//!
//! A post-copy checkpoint (mark with "post_copy": true) has no memory pages: the processes
//! stay frozen on the origin until the destination has fetched them all, and a rollback
//! resumes them there (closing the page socket), never restores from that checkpoint.
//!
//! The per-migration records are what make abort and rollback possible after the agent
//! restarts: they say which containers and checkpoints belong to the migration.

use std::collections::HashMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mig_checkpoint::{SafeName, Store, WorkloadIdentity};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::containerd::{
    ContainerInfo, Containerd, ContainerdError, POD_LABEL, TaskStatus, WORKLOAD_LABEL,
};
use crate::files::{remove_if_exists, write_private};
use crate::migration::{Target, millis};
use crate::pages::{PagesListener, PagesOrigin};
use crate::protocol::{ActionReport, CheckpointSummary, ContainerState, PagesRequest};

/// What a node agent operation failed on; the HTTP layer maps it to a status code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request names something invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The request names something that does not exist here.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (container not running, already exists).
    #[error("{0}")]
    Conflict(String),
    /// containerd refused or failed.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// Checkpointing a container failed; it keeps running.
    #[error("checkpoint of container {container} failed: {reason}")]
    Checkpoint {
        /// The container.
        container: String,
        /// Why.
        reason: String,
    },
    /// The checkpoint store failed.
    #[error("checkpoint store: {0}")]
    Store(#[from] mig_checkpoint::Error),
    /// The checkpoint stream failed.
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    /// The other agent failed or could not be reached.
    #[error("{0}")]
    Peer(String),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// Local file handling failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// How long a rollback waits for a post-copy checkpoint's shim to resume the frozen workload.
const POST_COPY_RESUME_WAIT: Duration = Duration::from_secs(10);

/// How often a restore looks whether the task it starts already runs (see
/// [`NodeAgent::start_watching`]).
const RUNNING_POLL: Duration = Duration::from_millis(10);

/// Validates a name from a request before it goes near a path or a command line.
pub fn safe(what: &str, name: &str) -> Result<SafeName, AgentError> {
    SafeName::new(name).map_err(|e| {
        AgentError::BadRequest(format!(
            "invalid {what} {name:?}: {e}; expected 1-200 characters of [A-Za-z0-9._-] starting with a letter or digit"
        ))
    })
}

/// How a node agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name.
    pub name: String,
    /// The state dir shared with the shim.
    pub state_dir: PathBuf,
    /// The runtime type containers are created with on restore, and must have to be migrated.
    pub runtime: String,
    /// zstd level for outgoing streams; 1 keeps up with a 10 Gbit/s link on one core.
    pub zstd_level: i32,
    /// How long to wait for a task to stop (checkpoint) or run (restore).
    pub wait_timeout: Duration,
    /// The checkpoint store's root in memory, the shim's too (see
    /// [`mig_checkpoint::room::memory_dir`]): a checkpoint received for a migration is
    /// written there when the origin wrote it in memory and this node has the room.
    pub memory_dir: Option<PathBuf>,
}

/// One node's agent.
pub struct NodeAgent {
    pub(crate) config: AgentConfig,
    pub(crate) store: Store,
    pub(crate) containerd: Arc<dyn Containerd>,
    /// Checkpoints of this node's migrations, by migration and container, as a live send
    /// ([`NodeAgent::send`] with `live`) follows them while they are written.
    live: std::sync::Mutex<HashMap<(String, String), watch::Sender<CheckpointProgress>>>,
}

/// Where the checkpoint of one container of a migration is, for a live send that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointProgress {
    /// Not begun: the container record is not saved yet.
    NotStarted,
    /// The container record is saved and the shim asked to checkpoint, at this time (the
    /// shim begins writing after it).
    Started(std::time::SystemTime),
    /// The checkpoint is committed to the store.
    Committed,
    /// It failed (or was never attempted: an earlier container of the migration failed).
    Failed(String),
}

impl NodeAgent {
    /// Opens the state dir (creating `checkpoints/`, `marks/`, `incoming/`, `migrations/`).
    pub fn new(config: AgentConfig, containerd: Arc<dyn Containerd>) -> Result<Self, AgentError> {
        let mut store = Store::open(config.state_dir.join("checkpoints"))?;
        if let Some(dir) = &config.memory_dir {
            store = store.with_memory(dir)?;
        }
        for dir in ["marks", "incoming", "migrations"] {
            private_dir(&config.state_dir.join(dir))?;
        }
        remove_orphaned_receives(&store);
        // Leftovers of transfers interrupted by a crash; an hour protects live ones.
        match store.remove_stale(Duration::from_secs(3600)) {
            Ok(n) if n > 0 => info!(removed = n, "removed stale checkpoint leftovers"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot clean stale checkpoint leftovers"),
        }
        Ok(Self {
            live: std::sync::Mutex::new(HashMap::new()),
            config,
            store,
            containerd,
        })
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The node's checkpoint store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn migration_dir(&self, migration: &SafeName) -> PathBuf {
        self.config.state_dir.join("migrations").join(migration)
    }

    fn identity(namespace: &SafeName, id: &SafeName) -> Result<WorkloadIdentity, AgentError> {
        Ok(WorkloadIdentity::container(
            namespace.as_str(),
            id.as_str(),
        )?)
    }

    /// The containers of `target` in `namespace`.
    pub async fn resolve(
        &self,
        namespace: &str,
        target: &Target,
    ) -> Result<Vec<String>, AgentError> {
        let ns = safe("namespace", namespace)?;
        let (ids, what) = match target {
            Target::Deployment(name) | Target::Pod(name) => {
                let name = safe("workload name", name)?;
                let label = if matches!(target, Target::Deployment(_)) {
                    WORKLOAD_LABEL
                } else {
                    POD_LABEL
                };
                let ids = self
                    .containerd
                    .list_by_label(ns.as_str(), label, name.as_str())
                    .await?;
                (ids, format!("containers labelled {label}={name}"))
            }
            Target::Container(id) => {
                let id = safe("container id", id)?;
                match self.containerd.info(ns.as_str(), id.as_str()).await {
                    Ok(_) => (vec![id.to_string()], String::new()),
                    Err(ContainerdError::NotFound { .. }) => (vec![], format!("container {id}")),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if ids.is_empty() {
            return Err(AgentError::NotFound(format!(
                "no {what} in namespace {ns} on node {}",
                self.config.name
            )));
        }
        Ok(ids)
    }

    /// Checkpoints each container through the shim: mark, SIGTERM, wait until stopped, check
    /// the store. Stops at the first failure; the containers not yet killed keep running.
    pub async fn checkpoint(
        &self,
        migration: &str,
        namespace: &str,
        containers: &[String],
        post_copy: bool,
    ) -> Result<Vec<CheckpointSummary>, AgentError> {
        let migration = safe("migration id", migration)?;
        let ns = safe("namespace", namespace)?;
        let dir = self.migration_dir(&migration);
        private_dir(&dir)?;
        let mut summaries = Vec::new();
        for (i, id) in containers.iter().enumerate() {
            let id = safe("container id", id)?;
            match self
                .checkpoint_one(&migration, &ns, &id, &dir, post_copy)
                .await
            {
                Ok(summary) => {
                    self.set_progress(&migration, &id, CheckpointProgress::Committed);
                    summaries.push(summary);
                }
                Err(e) => {
                    for rest in &containers[i..] {
                        let failed = CheckpointProgress::Failed(format!(
                            "the checkpoint of {rest} failed or was not attempted: {e}"
                        ));
                        self.set_progress_named(migration.as_str(), rest, failed);
                    }
                    return Err(e);
                }
            }
        }
        Ok(summaries)
    }

    /// What a live send of `id` for `migration` waits on (created if the checkpoint has not
    /// said anything yet: the send may come first).
    pub(crate) fn progress(
        &self,
        migration: &str,
        id: &str,
    ) -> watch::Receiver<CheckpointProgress> {
        let mut live = self.live.lock().expect("live map poisoned");
        live.entry((migration.to_string(), id.to_string()))
            .or_insert_with(|| watch::channel(CheckpointProgress::NotStarted).0)
            .subscribe()
    }

    fn set_progress(&self, migration: &SafeName, id: &SafeName, to: CheckpointProgress) {
        self.set_progress_named(migration.as_str(), id.as_str(), to);
    }

    fn set_progress_named(&self, migration: &str, id: &str, to: CheckpointProgress) {
        let mut live = self.live.lock().expect("live map poisoned");
        live.entry((migration.to_string(), id.to_string()))
            .or_insert_with(|| watch::channel(CheckpointProgress::NotStarted).0)
            .send_replace(to);
    }

    /// Forgets the progress of `migration`'s checkpoints (its sends are over).
    pub(crate) fn forget_progress(&self, migration: &str) {
        self.live
            .lock()
            .expect("live map poisoned")
            .retain(|(m, _), _| m != migration);
    }

    /// Whether each container exists here and what its task is doing: how a controller that
    /// restarted mid-migration learns whether the destination already runs the workload.
    pub async fn status(
        &self,
        namespace: &str,
        containers: &[String],
    ) -> Result<Vec<ContainerState>, AgentError> {
        let ns = safe("namespace", namespace)?;
        let mut states = Vec::new();
        for id in containers {
            let id = safe("container id", id)?;
            let exists = match self.containerd.info(ns.as_str(), id.as_str()).await {
                Ok(_) => true,
                Err(ContainerdError::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            let task = if exists {
                self.containerd
                    .task_status(ns.as_str(), id.as_str())
                    .await?
            } else {
                None
            };
            states.push(ContainerState {
                container: id.to_string(),
                exists,
                task,
            });
        }
        Ok(states)
    }

    /// The records of containers to migrate (origin side), which the destination creates its
    /// containers from ahead of their checkpoints ([`NodeAgent::prepare`]).
    pub async fn describe(
        &self,
        namespace: &str,
        containers: &[String],
    ) -> Result<Vec<ContainerInfo>, AgentError> {
        let ns = safe("namespace", namespace)?;
        let mut infos = Vec::new();
        for id in containers {
            let id = safe("container id", id)?;
            infos.push(self.checkpointable(&ns, &id).await?);
        }
        Ok(infos)
    }

    /// The record of a container that our shim runs, so can checkpoint.
    async fn checkpointable(
        &self,
        ns: &SafeName,
        id: &SafeName,
    ) -> Result<ContainerInfo, AgentError> {
        let info = self.containerd.info(ns.as_str(), id.as_str()).await?;
        // Killing a container of another runtime would lose its state: only our shim turns the
        // kill into a checkpoint.
        if info.runtime != self.config.runtime {
            return Err(AgentError::Conflict(format!(
                "container {id} runs with runtime {:?}; only containers of runtime {} can be checkpointed",
                info.runtime, self.config.runtime
            )));
        }
        Ok(info)
    }

    async fn checkpoint_one(
        &self,
        migration: &SafeName,
        ns: &SafeName,
        id: &SafeName,
        dir: &Path,
        post_copy: bool,
    ) -> Result<CheckpointSummary, AgentError> {
        let info = self.checkpointable(ns, id).await?;
        let status = self
            .containerd
            .task_status(ns.as_str(), id.as_str())
            .await?;
        if status != Some(TaskStatus::Running) {
            return Err(AgentError::Conflict(format!(
                "container {id} is {status:?}, expected a running task to checkpoint"
            )));
        }
        let identity = Self::identity(ns, id)?;
        let key = identity.safe_key();
        // A checkpoint left from an earlier attempt must not pass for this one.
        self.store.remove(&identity)?;
        write_json(&dir.join(format!("{key}.json")), &info)?;
        let mark = self.mark_path(&key);
        // Not durable: the checkpoint is streamed away at once (see the shim's `Mark`).
        write_json(&mark, &checkpoint_mark(migration, post_copy))?;
        info!(container_id = %id, migration = %migration, "checkpointing through the shim");
        self.set_progress(
            migration,
            id,
            CheckpointProgress::Started(std::time::SystemTime::now()),
        );
        if let Err(e) = self
            .containerd
            .kill(ns.as_str(), id.as_str(), "SIGTERM")
            .await
        {
            remove_if_exists(&mark);
            return Err(AgentError::Checkpoint {
                container: id.to_string(),
                reason: format!("{e} (the container keeps running)"),
            });
        }
        // The shim's kill returns once the checkpoint is committed, its processes ended (CRIU's
        // dump kills them; DMTCP's hook has exited): the checkpoint is what the downtime waits
        // for, not containerd noting the exit a moment later (a rollback waits for that). In
        // post-copy the processes stay, frozen, until their pages are fetched.
        let mut pending = self.store.pending(&identity)?;
        if pending.is_none() {
            self.wait_stopped(ns, id).await?;
            pending = self.store.pending(&identity)?;
        }
        let checkpoint = pending.ok_or_else(|| AgentError::Checkpoint {
            container: id.to_string(),
            reason: format!(
                "the task stopped but no checkpoint appeared in {}; did the shim see the mark?",
                self.store.path_for(&identity).display()
            ),
        })?;
        if post_copy {
            // What tells a rollback that the processes were frozen, should the shim have
            // resumed them already (and removed its socket).
            let frozen = dir.join(format!("{key}.post-copy"));
            fs::write(&frozen, b"").map_err(io_err(format!("write {}", frozen.display())))?;
        }
        Ok(CheckpointSummary {
            container: id.to_string(),
            bytes: checkpoint.files().iter().map(|f| f.size).sum(),
            files: checkpoint.files().len(),
            in_memory: self.store.in_memory(checkpoint.dir()),
        })
    }

    fn incoming_path(&self, key: &SafeName) -> PathBuf {
        self.config
            .state_dir
            .join("incoming")
            .join(format!("{key}.json"))
    }

    /// `pages/<key>.sock`: the socket of a post-copy migration's pages (origin: the shim's;
    /// destination: the agent's, see [`crate::pages`]).
    pub(crate) fn pages_socket(&self, key: &SafeName) -> PathBuf {
        self.config
            .state_dir
            .join("pages")
            .join(format!("{key}.sock"))
    }

    /// Origin side of `POST /agent/v1/pages`: connects to the page server of container `id`'s
    /// shim, which a post-copy checkpoint of `migration` left. Only the shim's one client
    /// connects: the destination agent, for the destination shim.
    pub async fn open_pages(
        &self,
        migration: &str,
        namespace: &str,
        id: &str,
    ) -> Result<tokio::net::UnixStream, AgentError> {
        let migration = safe("migration id", migration)?;
        let ns = safe("namespace", namespace)?;
        let id = safe("container id", id)?;
        let identity = Self::identity(&ns, &id)?;
        // Only what a checkpoint of this migration on this node left.
        self.saved_info(&migration, &identity)?;
        let path = self.pages_socket(&identity.safe_key());
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => AgentError::NotFound(format!(
                    "no page server for {identity} on node {} ({} is absent): was it \
                     checkpointed for post-copy, and are its pages not served already?",
                    self.config.name,
                    path.display()
                )),
                io::ErrorKind::ConnectionRefused => AgentError::Conflict(format!(
                    "the page server of {identity} on node {} does not accept connections \
                     ({}): its pages were fetched already, or it aborted",
                    self.config.name,
                    path.display()
                )),
                _ => io_err(format!("connect to {}", path.display()))(e),
            })
    }

    fn mark_path(&self, key: &SafeName) -> PathBuf {
        self.config
            .state_dir
            .join("marks")
            .join(format!("{key}.json"))
    }

    /// The container record saved for `id` by [`NodeAgent::checkpoint`].
    pub(crate) fn saved_info(
        &self,
        migration: &SafeName,
        identity: &WorkloadIdentity,
    ) -> Result<ContainerInfo, AgentError> {
        let path = self
            .migration_dir(migration)
            .join(format!("{}.json", identity.safe_key()));
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                AgentError::NotFound(format!(
                    "{identity} has no record for migration {migration} on node {}; checkpoint it first",
                    self.config.name
                ))
            } else {
                AgentError::Io {
                    what: format!("read {}", path.display()),
                    source: e,
                }
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::BadRequest(format!("corrupt record {}: {e}", path.display())))
    }

    /// Destination side, when a checkpoint arrives: a container created ahead for it
    /// ([`NodeAgent::prepare`]) must have been created from the same record as the one the
    /// stream carries, which the stream's checksum protects (the prepare request has only
    /// TCP's). A damaged record would otherwise have created a different container.
    pub(crate) fn check_prepared(
        &self,
        migration: &SafeName,
        info: &ContainerInfo,
    ) -> Result<(), AgentError> {
        let identity = WorkloadIdentity::container(info.namespace.as_str(), info.id.as_str())?;
        let path = self
            .migration_dir(migration)
            .join(format!("{}.json", identity.safe_key()));
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
        };
        let prepared: ContainerInfo = serde_json::from_slice(&bytes).map_err(|e| {
            AgentError::BadRequest(format!("corrupt record {}: {e}", path.display()))
        })?;
        if &prepared != info {
            return Err(AgentError::Conflict(format!(
                "container {}/{} was created ahead from a record that differs from the one its \
                 checkpoint carries (damaged in transit?); expected the same record",
                info.namespace, info.id
            )));
        }
        Ok(())
    }

    /// Records a received container (destination side).
    pub(crate) fn record_received(
        &self,
        migration: &SafeName,
        info: &ContainerInfo,
    ) -> Result<(), AgentError> {
        let identity = WorkloadIdentity::container(info.namespace.as_str(), info.id.as_str())?;
        let dir = self.migration_dir(migration);
        private_dir(&dir)?;
        write_json(&dir.join(format!("{}.json", identity.safe_key())), info)
    }

    /// The containers received for `migration`, in a stable order.
    fn received(&self, migration: &SafeName) -> Result<Vec<(ContainerInfo, PathBuf)>, AgentError> {
        let dir = self.migration_dir(migration);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err(format!("read {}", dir.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(io_err(format!("read {}", dir.display())))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err(format!("read {}", path.display())))?;
            let info: ContainerInfo = serde_json::from_slice(&bytes).map_err(|e| {
                AgentError::BadRequest(format!("corrupt record {}: {e}", path.display()))
            })?;
            out.push((info, path.with_extension("created")));
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    }

    /// Destination side, before the origin checkpoints: creates the migration's containers and
    /// their tasks with our runtime, so that neither (nor starting the shim) is part of the
    /// downtime. The incoming mark tells the shim that the checkpoint comes later: its create
    /// does only what does not need the checkpoint, and the task's start restores from it. The
    /// restore starts the tasks once the checkpoints are here; an abort deletes them.
    pub async fn prepare(
        &self,
        migration: &str,
        containers: &[ContainerInfo],
    ) -> Result<ActionReport, AgentError> {
        let migration = safe("migration id", migration)?;
        let mut report = ActionReport::default();
        for info in containers {
            let ns = safe("namespace", &info.namespace)?;
            let id = safe("container id", &info.id)?;
            self.record_received(&migration, info)?;
            let identity = Self::identity(&ns, &id)?;
            let created_marker = self
                .migration_dir(&migration)
                .join(format!("{}.created", identity.safe_key()));
            self.ensure_created(info, &created_marker).await?;
            write_json(
                &self.incoming_path(&identity.safe_key()),
                &serde_json::json!({ "migration": migration.as_str() }),
            )?;
            if self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?
                .is_none()
            {
                self.containerd
                    .create_task(ns.as_str(), id.as_str())
                    .await?;
            }
            report
                .done
                .push(format!("{id} and its task created on {}", self.config.name));
        }
        Ok(report)
    }

    /// At startup: aborts the migrations this node was the destination of whose containers,
    /// created ahead ([`NodeAgent::prepare`]), never started: an agent that restarts
    /// mid-migration was most likely killed during it, and no controller will abort them for
    /// it (nor would a stale received checkpoint be left to restore a later container of the
    /// workload). Should the migration go on, its restore finds nothing and it rolls back on
    /// the origin. A migration with a restored container, and the origin's records (no
    /// container created there), are left alone.
    pub async fn remove_unstarted_prepared(&self) {
        let root = self.config.state_dir.join("migrations");
        let Ok(entries) = fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(migration) = safe("migration id", &entry.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(received) = self.received(&migration) else {
                continue;
            };
            let mut destination = false;
            let mut started = false;
            for (info, created_marker) in &received {
                if created_marker.exists() {
                    destination = true;
                    if !matches!(
                        self.containerd.task_status(&info.namespace, &info.id).await,
                        Ok(None | Some(TaskStatus::Created))
                    ) {
                        started = true;
                    }
                }
            }
            if !destination || started {
                continue;
            }
            match self.abort(migration.as_str()).await {
                Ok(report) => {
                    info!(migration = %migration, done = ?report.done, "aborted a migration interrupted by a restart")
                }
                Err(e) => {
                    warn!(migration = %migration, error = %e, "cannot abort a migration interrupted by a restart")
                }
            }
        }
    }

    /// Creates the container of `info` unless this migration already did (`created_marker`);
    /// one of that id that this migration did not create is a conflict.
    async fn ensure_created(
        &self,
        info: &ContainerInfo,
        created_marker: &Path,
    ) -> Result<(), AgentError> {
        if created_marker.exists() {
            return Ok(());
        }
        match self.containerd.info(&info.namespace, &info.id).await {
            Ok(_) => Err(AgentError::Conflict(format!(
                "container {}/{} already exists on node {}; expected no container of that id",
                info.namespace, info.id, self.config.name
            ))),
            Err(ContainerdError::NotFound { .. }) => {
                fs::write(created_marker, b"")
                    .map_err(io_err(format!("write {}", created_marker.display())))?;
                self.containerd.create(info, &self.config.runtime).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates (unless [`NodeAgent::prepare`] did) and starts every container received for
    /// `migration` with our runtime (the shim restores each from its pending checkpoint) and
    /// waits until all run. A task already running is left as it is: a controller that
    /// restarted asks again to complete a restore that its predecessor began.
    ///
    /// With `pages` (post-copy), each shim fetches its memory pages from the origin while
    /// its start runs, through a socket of this agent named in its incoming mark (see
    /// [`crate::pages`]); the socket is removed when the restore ends.
    pub async fn restore(
        &self,
        migration: &str,
        pages: Option<&PagesOrigin>,
    ) -> Result<ActionReport, AgentError> {
        let migration = safe("migration id", migration)?;
        let received = self.received(&migration)?;
        if received.is_empty() {
            return Err(AgentError::NotFound(format!(
                "nothing was received for migration {migration} on node {}",
                self.config.name
            )));
        }
        let mut report = ActionReport::default();
        let mut all_running: Option<Instant> = None;
        for (info, created_marker) in received {
            let ns = safe("namespace", &info.namespace)?;
            let id = safe("container id", &info.id)?;
            self.ensure_created(&info, &created_marker).await?;
            let status = self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?;
            let running = if status != Some(TaskStatus::Running) {
                // Kept until the restore of this container ends (dropping it closes it).
                let _pages = match pages {
                    Some(origin) => Some(self.listen_pages(&migration, &ns, &id, origin)?),
                    None => None,
                };
                info!(container_id = %id, migration = %migration, post_copy = pages.is_some(), "starting restored container");
                self.start_watching(&ns, &id).await?
            } else {
                None
            };
            self.wait_for(&ns, &id, "run after restore", |s| {
                s == Some(TaskStatus::Running)
            })
            .await?;
            let running = running.unwrap_or_else(Instant::now);
            all_running = Some(all_running.map_or(running, |a| a.max(running)));
            remove_if_exists(&self.incoming_path(&Self::identity(&ns, &id)?.safe_key()));
            report
                .done
                .push(format!("{id} restored and running on {}", self.config.name));
        }
        remove_dir_if_exists(&self.migration_dir(&migration));
        report.running_ms_before = all_running.map(|t| millis(t.elapsed()));
        Ok(report)
    }

    /// Post-copy, destination side: listens on `pages/<key>.sock` for the shim of `id` and
    /// names it in the container's incoming mark.
    fn listen_pages(
        &self,
        migration: &SafeName,
        ns: &SafeName,
        id: &SafeName,
        origin: &PagesOrigin,
    ) -> Result<PagesListener, AgentError> {
        let key = Self::identity(ns, id)?.safe_key();
        let dir = self.config.state_dir.join("pages");
        private_dir(&dir)?;
        let path = std::path::absolute(self.pages_socket(&key))
            .map_err(io_err("resolve the page socket's path"))?;
        let req = PagesRequest {
            migration: migration.to_string(),
            namespace: ns.to_string(),
            id: id.to_string(),
        };
        let listener = PagesListener::bind(path.clone(), origin.clone(), req)
            .map_err(io_err(format!("listen on {}", path.display())))?;
        write_json(
            &self.incoming_path(&key),
            &serde_json::json!({
                "migration": migration.as_str(),
                "pages_socket": listener.path(),
            }),
        )?;
        Ok(listener)
    }

    /// Starts a restored task; returns when the shim's start returned, and when the task was
    /// first seen running before that. A lazy restore (shim/src/lazy.rs) runs the workload
    /// while its memory fills in, and the start returns only when every page is in place.
    async fn start_watching(
        &self,
        ns: &SafeName,
        id: &SafeName,
    ) -> Result<Option<Instant>, AgentError> {
        let start = self.containerd.start_task(ns.as_str(), id.as_str());
        tokio::pin!(start);
        let mut running = None;
        let mut poll = tokio::time::interval(RUNNING_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                started = &mut start => {
                    started?;
                    return Ok(running);
                }
                _ = poll.tick(), if running.is_none() => {
                    if let Ok(Some(TaskStatus::Running)) =
                        self.containerd.task_status(ns.as_str(), id.as_str()).await
                    {
                        running = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Destination side of a failed migration: deletes the containers this agent created for
    /// it and every checkpoint received for it.
    pub async fn abort(&self, migration: &str) -> Result<ActionReport, AgentError> {
        let migration = safe("migration id", migration)?;
        let mut report = ActionReport::default();
        for (info, created_marker) in self.received(&migration)? {
            let (ns, id) = (info.namespace.as_str(), info.id.as_str());
            if created_marker.exists() {
                if let Err(e) = self.containerd.delete_task(ns, id, true).await {
                    warn!(container_id = %id, error = %e, "deleting task on abort");
                }
                match self.containerd.delete_container(ns, id).await {
                    // create itself failed: there was nothing to delete.
                    Err(ContainerdError::NotFound { .. }) => {}
                    Ok(()) => report
                        .done
                        .push(format!("deleted container {id} on {}", self.config.name)),
                    Err(e) => report
                        .done
                        .push(format!("could not delete container {id}: {e}")),
                }
            }
            let identity = WorkloadIdentity::container(ns, id)?;
            remove_if_exists(&self.incoming_path(&identity.safe_key()));
            remove_if_exists(&self.pages_socket(&identity.safe_key()));
            if self.store.remove(&identity)? {
                report.done.push(format!(
                    "removed received checkpoint of {id} on {}",
                    self.config.name
                ));
            }
        }
        remove_dir_if_exists(&self.migration_dir(&migration));
        Ok(report)
    }

    /// Origin side of a failed migration: every listed container runs again. A stopped one
    /// gets a new task, which our shim restores from the checkpoint still pending here.
    ///
    /// After a post-copy checkpoint (its `.post-copy` record, or a page socket the shim left)
    /// the processes never stopped, they are frozen: closing the page socket makes the shim
    /// resume them and drop its checkpoint, which has no pages and is never restored from.
    pub async fn rollback(
        &self,
        migration: &str,
        namespace: &str,
        containers: &[String],
    ) -> Result<ActionReport, AgentError> {
        let migration = safe("migration id", migration)?;
        let ns = safe("namespace", namespace)?;
        let mut report = ActionReport::default();
        for id in containers {
            let id = safe("container id", id)?;
            let identity = Self::identity(&ns, &id)?;
            remove_if_exists(&self.mark_path(&identity.safe_key()));
            self.wait_checkpoint_written(&identity, &id).await?;
            let key = identity.safe_key();
            let frozen = self
                .migration_dir(&migration)
                .join(format!("{key}.post-copy"));
            if frozen.exists() || self.pages_socket(&key).exists() {
                let done = self.resume_post_copy(&ns, &id, &identity).await?;
                // Frozen, then running again: the downtime ends here as for a restored one.
                report.done.push(done);
                report.restored.push(id.to_string());
                continue;
            }
            if self.store.pending(&identity)?.is_some() {
                // Checkpointed, so its processes are gone: wait until containerd has noted
                // the exit, lest a task still shown running be taken for one never stopped.
                self.wait_stopped(&ns, &id).await?;
            }
            match self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?
            {
                Some(TaskStatus::Running) => {
                    report
                        .done
                        .push(format!("{id} was still running on {}", self.config.name));
                    continue;
                }
                Some(_) => {
                    self.containerd
                        .delete_task(ns.as_str(), id.as_str(), false)
                        .await?
                }
                None => {}
            }
            self.containerd.start_task(ns.as_str(), id.as_str()).await?;
            self.wait_for(&ns, &id, "run again after rollback", |s| {
                s == Some(TaskStatus::Running)
            })
            .await?;
            report.done.push(format!(
                "{id} restored on {} from its own checkpoint",
                self.config.name
            ));
            report.restored.push(id.to_string());
        }
        remove_dir_if_exists(&self.migration_dir(&migration));
        self.forget_progress(migration.as_str());
        Ok(report)
    }

    /// Rollback of a post-copy checkpoint: asks the shim to abort (a connection to its page
    /// socket closed at once) and waits, up to [`POST_COPY_RESUME_WAIT`], until the socket is
    /// gone. A task that runs then was resumed: what it says. One that stopped served its pages
    /// (the destination had them all), and its checkpoint, without pages, cannot bring it back
    /// here: an error.
    async fn resume_post_copy(
        &self,
        ns: &SafeName,
        id: &SafeName,
        identity: &WorkloadIdentity,
    ) -> Result<String, AgentError> {
        let socket = self.pages_socket(&identity.safe_key());
        if socket.exists() {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(conn) => drop(conn),
                // Refused: the shim is gone or already serves (the destination's pipe, which
                // the destination's abort closes).
                Err(e) => {
                    warn!(container_id = %id, error = %e, "cannot connect to the page socket to abort the post-copy")
                }
            }
        }
        let deadline = Instant::now() + POST_COPY_RESUME_WAIT;
        loop {
            let status = self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?;
            let socket_gone = !socket.exists();
            let pending = self.store.pending(identity)?.is_some();
            let resumed = status == Some(TaskStatus::Running) && !pending;
            if socket_gone && (resumed || status != Some(TaskStatus::Running)) {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = self
            .containerd
            .task_status(ns.as_str(), id.as_str())
            .await?;
        if status == Some(TaskStatus::Running) {
            if socket.exists() {
                return Err(AgentError::Timeout(format!(
                    "container {id} on node {} is still frozen {:?} after its post-copy page \
                     server was told to abort ({} is still there); expected the shim to resume it",
                    self.config.name,
                    POST_COPY_RESUME_WAIT,
                    socket.display()
                )));
            }
            // Never to be restored from: it has no pages.
            let dropped = self.store.remove(identity)?;
            return Ok(format!(
                "{id} resumed on {} (post-copy: its processes had only been frozen){}",
                self.config.name,
                if dropped {
                    "; its pageless checkpoint was removed"
                } else {
                    ""
                }
            ));
        }
        // Its processes exited: every page went to the destination. The checkpoint here (if
        // any is left) has no pages: starting a task would restore from it, or start afresh.
        Err(AgentError::Conflict(format!(
            "container {id} stopped on node {} (task {status:?}) after a post-copy checkpoint: \
             its memory was served to the destination, and its checkpoint here has no pages, so \
             it is not restarted here; check the destination node",
            self.config.name
        )))
    }

    /// Origin side of a successful migration: deletes the stopped containers and their
    /// checkpoints, so nothing restores them here again.
    pub async fn finish(
        &self,
        migration: &str,
        namespace: &str,
        containers: &[String],
    ) -> Result<ActionReport, AgentError> {
        let migration = safe("migration id", migration)?;
        let ns = safe("namespace", namespace)?;
        let mut report = ActionReport::default();
        for id in containers {
            let id = safe("container id", id)?;
            let identity = Self::identity(&ns, &id)?;
            if self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?
                .is_some()
            {
                self.containerd
                    .delete_task(ns.as_str(), id.as_str(), true)
                    .await?;
            }
            let removed = match self
                .containerd
                .delete_container(ns.as_str(), id.as_str())
                .await
            {
                Ok(()) => "removed from",
                // A finish asked again (the controller restarted while finishing): the first
                // one deleted the container; what it may have left is removed below.
                Err(ContainerdError::NotFound { .. }) => "already gone from",
                Err(e) => return Err(e.into()),
            };
            self.store.remove(&identity)?;
            remove_if_exists(&self.mark_path(&identity.safe_key()));
            remove_if_exists(&self.pages_socket(&identity.safe_key()));
            report
                .done
                .push(format!("{id} {removed} {}", self.config.name));
        }
        remove_dir_if_exists(&self.migration_dir(&migration));
        self.forget_progress(migration.as_str());
        Ok(report)
    }

    /// Waits while the shim still writes a checkpoint of `identity`: the kill of a checkpoint
    /// goes on when its caller gave up (the controller timed out, or restarted, and with it
    /// this agent). A rollback that looked before it ends would find the task running, leave
    /// it, and then see the checkpoint stop it. A writer is live while its temp directory
    /// exists and its process does; after the wait timeout the rollback goes on regardless.
    async fn wait_checkpoint_written(
        &self,
        identity: &WorkloadIdentity,
        id: &SafeName,
    ) -> Result<(), AgentError> {
        let start = Instant::now();
        while let Some(dir) = self.live_checkpoint_writer(identity) {
            if start.elapsed() > self.config.wait_timeout {
                warn!(container_id = %id, dir = %dir.display(), "a checkpoint is still being written; rolling back regardless");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The temp directory of a checkpoint of `identity` that another live process (the shim)
    /// is writing, if any. The store names them `.tmp-<key>-<pid>-<nanos>-<n>`; a dead
    /// writer's is a leftover, and this process writes only what it receives.
    fn live_checkpoint_writer(&self, identity: &WorkloadIdentity) -> Option<PathBuf> {
        let prefix = format!(".tmp-{}-", identity.safe_key());
        let entries = self
            .store
            .roots()
            .filter_map(|root| fs::read_dir(root).ok())
            .flat_map(|entries| entries.flatten());
        entries.map(|e| e.path()).find(|dir| {
            let Some(rest) = dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&prefix))
            else {
                return false;
            };
            // Exactly `<pid>-<nanos>-<n>`: not a key that merely starts with this one.
            let parts: Vec<&str> = rest.split('-').collect();
            parts.len() == 3
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && writer_pid(dir).is_some_and(|pid| {
                    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
                })
        })
    }

    /// Waits until containerd has noted that a checkpointed container's task stopped.
    async fn wait_stopped(&self, ns: &SafeName, id: &SafeName) -> Result<(), AgentError> {
        self.wait_for(ns, id, "stop after its checkpoint", |s| {
            matches!(s, None | Some(TaskStatus::Stopped))
        })
        .await
    }

    async fn wait_for(
        &self,
        ns: &SafeName,
        id: &SafeName,
        what: &str,
        done: impl Fn(Option<TaskStatus>) -> bool,
    ) -> Result<(), AgentError> {
        let start = Instant::now();
        loop {
            let status = self
                .containerd
                .task_status(ns.as_str(), id.as_str())
                .await?;
            if done(status) {
                return Ok(());
            }
            if start.elapsed() > self.config.wait_timeout {
                return Err(AgentError::Timeout(format!(
                    "container {id} did not {what} within {:?} on node {} (task is {status:?})",
                    self.config.wait_timeout, self.config.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The mark that asks the shim for a checkpoint on the next kill; `post_copy`: one without
/// memory pages, the processes frozen and their pages served on `pages/<key>.sock`.
pub fn checkpoint_mark(migration: &SafeName, post_copy: bool) -> serde_json::Value {
    let mut mark = serde_json::json!({ "migration": migration.as_str(), "durable": false });
    if post_copy {
        mark["post_copy"] = serde_json::Value::Bool(true);
    }
    mark
}

/// Removes temporary checkpoint directories whose writer process is gone (an agent killed
/// mid-receive), so partial data does not wait an hour for [`Store::remove_stale`]. The store
/// names them `.tmp-<key>-<pid>-<nanos>-<n>`; a live pid (the shim writing a checkpoint right
/// now) keeps its directory.
fn remove_orphaned_receives(store: &Store) {
    let entries = store
        .roots()
        .filter_map(|root| fs::read_dir(root).ok())
        .flat_map(|entries| entries.flatten());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with(".tmp-")) else {
            continue;
        };
        let Some(pid) = writer_pid(&entry.path()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            info!(dir = %name, pid, "removing partial checkpoint of a dead writer");
            remove_dir_if_exists(&entry.path());
        }
    }
}

/// The pid in a store temp directory's name, `.tmp-<key>-<pid>-<nanos>-<n>`.
fn writer_pid(dir: &Path) -> Option<u32> {
    dir.file_name()?.to_str()?.rsplit('-').nth(2)?.parse().ok()
}

fn private_dir(dir: &Path) -> Result<(), AgentError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("create {}", dir.display())))
}

/// Writes JSON atomically (temp file, fsync, rename) with mode 0600: the shim must never read
/// a half-written mark.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::Io {
        what: format!("encode {}", path.display()),
        source: io::Error::other(e),
    })?;
    write_private(path, &bytes, false).map_err(|source| AgentError::Io {
        what: format!("write {}", path.display()),
        source,
    })
}

fn remove_dir_if_exists(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_asks_for_post_copy_only_when_told() {
        let migration = SafeName::new("m-1").expect("name");
        assert_eq!(
            checkpoint_mark(&migration, false),
            serde_json::json!({"migration": "m-1", "durable": false})
        );
        assert_eq!(
            checkpoint_mark(&migration, true),
            serde_json::json!({"migration": "m-1", "durable": false, "post_copy": true})
        );
    }
}
