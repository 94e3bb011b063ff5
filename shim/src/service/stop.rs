//! Kill (with a checkpoint first when the workload is marked for migration), containerd's own
//! checkpoint, and delete.

use super::*;

impl Service {
    /// `Kill`: signals the init (or all the container's processes), or an exec.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let c = self.container(id)?;
        let c = c.lock().await;
        let p = c.process(exec_id)?;
        p.ensure_alive("signal")?;
        if exec_id.is_empty() {
            let how = match &c.workload {
                Some(w) if c.init.status == Status::Running => w.stop_needs_checkpoint(signal)?,
                _ => None,
            };
            if let (Some(how), Some(w)) = (how, &c.workload) {
                return self.checkpoint_then_stop(&c, w, signal, all, how).await;
            }
            return c.runtime.kill(id, signal, all).await;
        }
        if p.status == Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "cannot signal exec {exec_id} of container {id}: it has not started"
            )));
        }
        let sig = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("{signal} is not a signal number")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig).map_err(|e| {
            Error::Other(format!(
                "signal exec {exec_id} (pid {}) of container {id}: {e}",
                p.pid
            ))
        })
    }

    /// A stop for migration: checkpoint into the node's store, which stops the container's
    /// processes (CRIU's dump kills them; DMTCP ends them right after their images, and the
    /// restore-hook exits). A checkpoint that fails before the processes were stopped leaves
    /// the container running and is reported, unless the mark forces the stop; one that fails
    /// after (DMTCP midway, or archiving) leaves it stopped without a checkpoint.
    async fn checkpoint_then_stop(
        &self,
        c: &Container,
        w: &Workload,
        signal: u32,
        all: bool,
        how: StopCheckpoint,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let force = how.force;
        let transient = (!how.durable).then_some(c.init.pid as u32);
        match w
            .checkpoint(&c.id, c.runtime.as_ref(), how.post_copy, transient)
            .await
        {
            Ok(ckpt) => {
                tracing::info!(container_id = %c.id, checkpoint = %ckpt.dir().display(), engine = %ckpt.engine(), elapsed_ms = started.elapsed().as_millis() as u64, "checkpointed before stop");
                if how.durable {
                    crate::writeback::sync_later(ckpt);
                }
                w.node.clear_mark(&w.identity);
                if w.engine.kind() == EngineKind::Criu {
                    // CRIU has already stopped the container's processes (post-copy: frozen,
                    // they end once the destination has every page, or resume).
                    return Ok(());
                }
                // DMTCP ended the application; its init, the hook, exits after replying.
                self.await_init_exit(c).await
            }
            Err(f) if f.stopped => {
                tracing::error!(container_id = %c.id, error = %f.error, "checkpoint before stop failed after the container's processes were stopped");
                if force {
                    w.node.clear_mark(&w.identity);
                }
                self.await_init_exit(c).await?;
                if force {
                    return Ok(());
                }
                Err(Error::FailedPrecondition(format!(
                    "container {} is stopped without a checkpoint: its checkpoint before stop \
                     failed after its processes had been stopped: {}",
                    c.id, f.error
                )))
            }
            Err(f) if force => {
                tracing::error!(container_id = %c.id, error = %f.error, "checkpoint before stop failed; stopping anyway (forced)");
                w.node.clear_mark(&w.identity);
                c.runtime.kill(&c.id, signal, all).await
            }
            Err(f) => Err(Error::FailedPrecondition(format!(
                "container {} was not stopped: its checkpoint before stop failed, and it keeps \
                 running: {}",
                c.id, f.error
            ))),
        }
    }

    /// Waits for the container's init to be gone after the engine ended it (DMTCP's hook exits
    /// right after answering); SIGKILLs what is left if it lingers.
    async fn await_init_exit(&self, c: &Container) -> Result<()> {
        const LINGER: Duration = Duration::from_secs(10);
        let pid = nix::unistd::Pid::from_raw(c.init.pid);
        let started = std::time::Instant::now();
        // Gone once the shim's reaper has reaped it (a zombie still answers signal 0).
        while c.init.pid > 0 && nix::sys::signal::kill(pid, None).is_ok() {
            if started.elapsed() >= LINGER {
                tracing::warn!(container_id = %c.id, pid = c.init.pid, "the init did not exit after its checkpoint; killing the container");
                return c.runtime.kill(&c.id, libc::SIGKILL as u32, true).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::debug!(container_id = %c.id, waited_ms = started.elapsed().as_millis() as u64, "the init exited after its checkpoint");
        Ok(())
    }

    /// `Delete`: removes an exited exec, or the container once its init is not running.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<DeleteResponse> {
        let c = self.container(id)?;
        let mut c = c.lock().await;
        if !exec_id.is_empty() {
            let p = c.process(exec_id)?;
            if matches!(p.status, Status::Running | Status::Paused) {
                return Err(Error::FailedPrecondition(format!(
                    "cannot delete exec {exec_id} of container {id}: it is still running"
                )));
            }
            let p = c.execs.remove(exec_id).expect("checked above");
            if let Some(io) = &p.io {
                io.abort().await;
            }
            return Ok(delete_response(&p));
        }
        if matches!(c.init.status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete container {id}: it is still running; kill it first"
            )));
        }
        if c.init.status != Status::CreatedFromCheckpoint {
            c.runtime.delete(id, true).await?;
        }
        if c.init.exit().is_none() {
            // Never started: runc delete killed its init before it ran.
            c.init.set_exited(Exit::now(137));
        }
        for p in std::iter::once(&c.init).chain(c.execs.values()) {
            if let Some(io) = &p.io {
                io.abort().await;
            }
        }
        if let Some(root) = c.rootfs.take() {
            unmount_rootfs(&root);
        }
        if let Some(w) = &c.workload {
            // A container still waiting for its checkpoint never mounted its root.
            if let (Some(r), None) = (&w.rootfs, &c.deferred) {
                r.unmount();
            }
            w.remove_scratch();
        }
        self.containers
            .lock()
            .expect("container map poisoned")
            .remove(id);
        self.pids
            .lock()
            .expect("pid index poisoned")
            .forget_container(id);
        let resp = delete_response(&c.init);
        tracing::info!(container_id = %id, "container deleted");
        self.events.send(
            TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: id.to_string(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                id: id.to_string(),
                ..Default::default()
            },
        );
        Ok(resp)
    }

    /// `Checkpoint` through runc and CRIU, with containerd's checkpoint options.
    pub async fn checkpoint(&self, req: &CheckpointTaskRequest) -> Result<()> {
        let c = self.container(&req.id)?;
        let c = c.lock().await;
        if !matches!(c.init.status, Status::Running | Status::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot checkpoint container {}: it is {:?}, not running",
                req.id, c.init.status
            )));
        }
        let o = match req.options.as_ref().filter(|a| !a.value.is_empty()) {
            Some(any) => CheckpointOptions::parse_from_bytes(&any.value).map_err(|e| {
                Error::InvalidArgument(format!(
                    "checkpoint options of {} are not containerd.runc.v1.CheckpointOptions: {e}",
                    req.id
                ))
            })?,
            None => CheckpointOptions::default(),
        };
        let image_path = if o.image_path.is_empty() {
            &req.path
        } else {
            &o.image_path
        };
        if image_path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "checkpoint of {}: no image path given (request path or options.image_path)",
                req.id
            )));
        }
        let opts = CheckpointOpts {
            image_path: image_path.into(),
            work_path: if o.work_path.is_empty() {
                c.bundle.join("criu-work")
            } else {
                o.work_path.clone().into()
            },
            leave_running: !o.exit,
            tcp_established: o.open_tcp,
            external_unix_sockets: o.external_unix_sockets,
            shell_job: o.terminal,
            file_locks: o.file_locks,
            empty_namespaces: o.empty_namespaces.clone(),
            cgroups_mode: o.cgroups_mode.clone(),
            lazy_pages: false,
        };
        tracing::info!(container_id = %req.id, image_path = %opts.image_path.display(), exit = o.exit, "checkpoint");
        match &c.workload {
            Some(w) if w.engine.kind() == EngineKind::Dmtcp => {
                // With exit, DMTCP ends the application with its images and the hook exits.
                w.checkpoint_native(&opts.image_path, o.exit).await?;
                if o.exit {
                    self.await_init_exit(&c).await?;
                }
                Ok(())
            }
            Some(w) => {
                c.runtime.checkpoint(&req.id, &opts).await?;
                w.mark_native_checkpoint(&opts.image_path)
            }
            None => c.runtime.checkpoint(&req.id, &opts).await,
        }
    }
}
