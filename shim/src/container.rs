//! A container the shim serves: its bundle, its root filesystem, its init and its execs.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use containerd_shim::protos::types::mount::Mount;

use crate::{
    error::{Error, Result},
    process::Process,
    runc::Runtime,
    workload::Workload,
};

/// A container and its processes. Guarded by its own lock in the service so that slow runc
/// calls on one container never hold up another.
pub struct Container {
    /// containerd's id for it.
    pub id: String,
    /// Its OCI bundle.
    pub bundle: PathBuf,
    /// The root filesystem the shim mounted (unmounted at delete), if any.
    pub rootfs: Option<PathBuf>,
    /// The runc that runs it (options are per container).
    pub runtime: Arc<dyn Runtime>,
    /// Its init process.
    pub init: Process,
    /// Its exec processes, by exec id.
    pub execs: HashMap<String, Process>,
    /// For a container created from a checkpoint: the CRIU images to restore at start.
    pub restore_from: Option<PathBuf>,
    /// What makes it migratable; `None` for the pod's pause container.
    pub workload: Option<Workload>,
    /// For a container created ahead of its checkpoint (a migration's destination): its root
    /// mounts, mounted at start once the checkpoint is here.
    pub deferred: Option<Vec<Mount>>,
}

impl Container {
    /// The init (empty `exec_id`) or the named exec.
    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| self.no_exec(exec_id))
    }

    /// Mutable [`Container::process`].
    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let err = self.no_exec(exec_id);
        self.execs.get_mut(exec_id).ok_or(err)
    }

    fn no_exec(&self, exec_id: &str) -> Error {
        Error::NotFound(format!(
            "exec {exec_id} does not exist in container {}",
            self.id
        ))
    }
}
