//! One process of a container (its init or an exec) and the state machine it moves through.

use std::time::SystemTime;

use containerd_shim::{
    asynchronous::io::Stdio as Paths,
    protos::{protobuf::well_known_types::timestamp::Timestamp, types::task::Status as ApiStatus},
};
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    io::ProcessIo,
};

/// Where a process is in its life.
///
/// ```text
/// Created ──start──▶ Running ⇄ Paused
///    │                 │
/// CreatedFromCheckpoint┘──exit──▶ Stopped ──delete──▶ (gone)
/// ```
/// `CreatedFromCheckpoint` is a container created with a checkpoint to restore: runc has done
/// nothing yet; `start` runs `runc restore` instead of `runc start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created by runc, waiting for `start`.
    Created,
    /// Waiting for `start` to restore it from a checkpoint.
    CreatedFromCheckpoint,
    /// Running.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// Exited; its exit status is known.
    Stopped,
}

impl Status {
    /// The status as containerd's API names it.
    pub fn to_api(self) -> ApiStatus {
        match self {
            Status::Created | Status::CreatedFromCheckpoint => ApiStatus::CREATED,
            Status::Running => ApiStatus::RUNNING,
            Status::Paused => ApiStatus::PAUSED,
            Status::Stopped => ApiStatus::STOPPED,
        }
    }
}

/// How and when a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code; 128 + signal for a process killed by a signal.
    pub status: u32,
    /// When the shim saw it end.
    pub at: SystemTime,
}

impl Exit {
    /// Now, with `status`.
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }

    /// The exit time as a protobuf timestamp.
    pub fn timestamp(&self) -> Timestamp {
        timestamp(self.at)
    }
}

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A process of a container.
pub struct Process {
    /// Empty for the container's init.
    pub exec_id: String,
    /// containerd's stdio paths for it.
    pub paths: Paths,
    /// 0 until known.
    pub pid: i32,
    /// Where it is in its life.
    pub status: Status,
    /// For an exec that has not started: its OCI process spec as JSON.
    pub spec: Vec<u8>,
    /// The shim's side of its stdio, once started (or created).
    pub io: Option<ProcessIo>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    /// A process that has not run yet.
    pub fn new(exec_id: &str, paths: Paths, status: Status) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            paths,
            pid: 0,
            status,
            spec: Vec::new(),
            io: None,
            exit: watch::channel(None).0,
        }
    }

    /// How it ended, if it has.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Records its end and wakes every waiter.
    pub fn set_exited(&mut self, exit: Exit) {
        self.status = Status::Stopped;
        self.exit.send_replace(Some(exit));
    }

    /// A handle that resolves when the process has ended; usable without holding the
    /// container's lock.
    pub fn waiter(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.subscribe()
    }

    /// Refuses an operation that needs a live process.
    pub fn ensure_alive(&self, what: &str) -> Result<()> {
        match self.status {
            Status::Running | Status::Paused | Status::Created => Ok(()),
            Status::CreatedFromCheckpoint => Err(Error::FailedPrecondition(format!(
                "cannot {what} {}: it is waiting to be restored from a checkpoint; start it first",
                self.describe()
            ))),
            Status::Stopped => Err(Error::NotFound(format!(
                "cannot {what} {}: process already finished",
                self.describe()
            ))),
        }
    }

    fn describe(&self) -> String {
        if self.exec_id.is_empty() {
            "the container's init process".to_string()
        } else {
            format!("exec {}", self.exec_id)
        }
    }
}

/// Waits for the process behind `rx` to end.
pub async fn wait(mut rx: watch::Receiver<Option<Exit>>) -> Result<Exit> {
    let exit = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| Error::Other("the process was removed before it exited".into()))?;
    exit.ok_or_else(|| Error::Other("no exit recorded".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_on_exit_and_later_waiters_see_it_at_once() {
        let mut p = Process::new("", Paths::default(), Status::Running);
        let early = tokio::spawn(wait(p.waiter()));
        tokio::task::yield_now().await;
        p.set_exited(Exit::now(3));
        assert_eq!(early.await.unwrap().unwrap().status, 3);
        assert_eq!(wait(p.waiter()).await.unwrap().status, 3);
        assert_eq!(p.status, Status::Stopped);
    }

    #[test]
    fn a_finished_process_cannot_be_signalled() {
        let mut p = Process::new("e1", Paths::default(), Status::Running);
        assert!(p.ensure_alive("kill").is_ok());
        p.set_exited(Exit::now(0));
        let err = p.ensure_alive("kill").unwrap_err();
        assert!(matches!(err, Error::NotFound(_)));
        assert!(err.to_string().contains("exec e1"), "{err}");
    }
}
