//! The migration record and its state machine.
//!
//! ```text
//! pending -> checkpointing -> transferring -> restoring -> finishing -> done
//!    \            \                \              \
//!     +------------+----------------+--------------+--> failed       (origin untouched, or
//!                                                                    rollback itself failed)
//!                                                  +--> rolled_back  (origin stopped, then
//!                                                                    restored from its own
//!                                                                    checkpoint)
//! ```
//!
//! Only [`Migration::advance`] and [`Migration::fail`] change the phase, so the record can never
//! go back to a running phase or leave a terminal one. `finishing` has no way out but `done`:
//! the workload runs on the destination by then, and nothing may roll it back to the origin.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, not started.
    Pending,
    /// The origin is checkpointing (the workload is stopping).
    Checkpointing,
    /// The checkpoint is streaming to the destination.
    Transferring,
    /// The destination is restoring.
    Restoring,
    /// The workload runs on the destination; the origin's stopped copy and its checkpoint are
    /// being removed.
    Finishing,
    /// Running on the destination and gone from the origin.
    Done,
    /// Failed; the workload was never stopped, or could not be restored anywhere (see reason).
    Failed,
    /// Failed after the workload stopped on the origin; it was restored there.
    RolledBack,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::Restoring,
        Phase::Finishing,
        Phase::Done,
        Phase::Failed,
        Phase::RolledBack,
    ];

    /// Whether the migration is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::RolledBack)
    }

    /// The snake_case name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Checkpointing => "checkpointing",
            Phase::Transferring => "transferring",
            Phase::Restoring => "restoring",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled_back",
        }
    }

    fn next(self) -> Option<Phase> {
        match self {
            Phase::Pending => Some(Phase::Checkpointing),
            Phase::Checkpointing => Some(Phase::Transferring),
            Phase::Transferring => Some(Phase::Restoring),
            Phase::Restoring => Some(Phase::Finishing),
            Phase::Finishing => Some(Phase::Done),
            _ => None,
        }
    }
}

/// What a migration moves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum Target {
    /// Containers labelled `mig.dev/workload=<name>` (a Deployment in Kubernetes).
    Deployment(String),
    /// Containers labelled `mig.dev/pod=<name>`.
    Pod(String),
    /// One container by id.
    Container(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Deployment(n) => write!(f, "deployment {n}"),
            Target::Pod(n) => write!(f, "pod {n}"),
            Target::Container(n) => write!(f, "container {n}"),
        }
    }
}

/// How long a phase took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// The phase.
    pub phase: Phase,
    /// Milliseconds from the migration's creation to the phase's start.
    pub started_ms: u64,
    /// Duration, once the phase is over.
    pub duration_ms: Option<u64>,
}

/// Why a migration failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The phase that failed.
    pub phase: Phase,
    /// What went wrong, as the failing component said it.
    pub reason: String,
    /// What was done about it (rollback, cleanup), and whether that worked.
    pub recovery: Vec<String>,
}

/// A transition the state machine does not allow.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("migration {id} cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    id: String,
    from: Phase,
    to: Phase,
}

/// One migration, as `GET /migrations/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// Its id.
    pub id: String,
    /// What moves.
    pub target: Target,
    /// containerd namespace of the containers.
    pub namespace: String,
    /// Node it leaves.
    pub origin_node: String,
    /// Node it goes to.
    pub dest_node: String,
    /// Current phase.
    pub phase: Phase,
    /// The containers moved.
    pub containers: Vec<String>,
    /// Creation time, unix milliseconds.
    pub created_unix_ms: u64,
    /// Checkpoint bytes (uncompressed).
    pub checkpoint_bytes: u64,
    /// Bytes on the wire (compressed).
    pub bytes_transferred: u64,
    /// Checkpoint bytes (uncompressed) sent while the origin was still checkpointing: the
    /// part of the transfer that overlapped the dump.
    #[serde(default)]
    pub bytes_sent_while_checkpointing: u64,
    /// Phases entered so far, with their timings.
    pub timings: Vec<PhaseTiming>,
    /// From the moment the origin started stopping to the workload running again (on the
    /// destination, or on the origin after a rollback).
    pub downtime_ms: Option<u64>,
    /// Total duration once terminal.
    pub duration_ms: Option<u64>,
    /// Why it failed.
    pub failure: Option<Failure>,
    /// Problems that did not fail the migration (e.g. origin cleanup after success).
    pub warnings: Vec<String>,
    /// The destination reported the workload running: set on entering `finishing`, which is
    /// journaled before the origin is cleaned up, so a controller that restarts then only
    /// finishes the migration. (Records of earlier versions set it while `restoring`.)
    #[serde(default)]
    pub destination_running: bool,
    /// Post-copy: the workload ran on the destination while its memory pages were fetched from
    /// the frozen origin (see [`crate::pages`]).
    #[serde(default)]
    pub post_copy: bool,
    /// Whether the checkpoint was written in memory rather than on disk, on each node (every
    /// container's; see the README, "Checkpoints in memory").
    #[serde(default)]
    pub checkpoint_in_memory: InMemory,
    /// Kubernetes mode: the Deployment, its old and new pods, the steps taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kube::KubeReport>,
    #[serde(skip)]
    clock: Clock,
}

/// Where a migration's checkpoint was written, node by node: in memory (true) or on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InMemory {
    /// On the origin.
    pub origin: bool,
    /// On the destination.
    pub destination: bool,
}

#[derive(Debug, Clone)]
struct Clock {
    created: Instant,
    phase_started: Instant,
    downtime_started: Option<Instant>,
}

impl Default for Clock {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            created: now,
            phase_started: now,
            downtime_started: None,
        }
    }
}

/// `d` in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Migration {
    /// A new pending migration.
    pub fn new(
        id: String,
        target: Target,
        namespace: String,
        origin_node: String,
        dest_node: String,
    ) -> Self {
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(millis)
            .unwrap_or_default();
        Self {
            id,
            target,
            namespace,
            origin_node,
            dest_node,
            phase: Phase::Pending,
            containers: Vec::new(),
            created_unix_ms,
            checkpoint_bytes: 0,
            post_copy: false,
            checkpoint_in_memory: InMemory::default(),
            bytes_transferred: 0,
            bytes_sent_while_checkpointing: 0,
            timings: vec![PhaseTiming {
                phase: Phase::Pending,
                started_ms: 0,
                duration_ms: None,
            }],
            downtime_ms: None,
            duration_ms: None,
            failure: None,
            warnings: Vec::new(),
            destination_running: false,
            kubernetes: None,
            clock: Clock::default(),
        }
    }

    fn close_phase(&mut self, now: Instant) {
        if let Some(last) = self.timings.last_mut() {
            last.duration_ms
                .get_or_insert(millis(now - self.clock.phase_started));
        }
    }

    fn enter(&mut self, to: Phase, now: Instant) {
        self.close_phase(now);
        self.phase = to;
        self.clock.phase_started = now;
        if to.is_terminal() {
            self.duration_ms = Some(millis(now - self.clock.created));
        } else {
            self.timings.push(PhaseTiming {
                phase: to,
                started_ms: millis(now - self.clock.created),
                duration_ms: None,
            });
        }
    }

    /// Moves to the next phase; `to` must be it. Entering `finishing` records that the
    /// workload runs on the destination: the downtime ends and `destination_running` is set.
    pub fn advance(&mut self, to: Phase) -> Result<(), TransitionError> {
        if self.phase.next() != Some(to) {
            return Err(TransitionError {
                id: self.id.clone(),
                from: self.phase,
                to,
            });
        }
        let now = Instant::now();
        match to {
            Phase::Checkpointing => self.clock.downtime_started = Some(now),
            Phase::Finishing => {
                self.workload_running_again(now);
                self.destination_running = true;
            }
            _ => {}
        }
        self.enter(to, now);
        Ok(())
    }

    fn workload_running_again(&mut self, now: Instant) {
        if let Some(start) = self.clock.downtime_started.take() {
            self.downtime_ms = Some(millis(now.max(start) - start));
        }
    }

    /// The destination saw the workload running `before` ago, ahead of the answer that ends
    /// the restore (a lazy restore answers once all memory is in place): the downtime ends
    /// there, not when `finishing` is entered.
    pub fn running_before(&mut self, before: Duration) {
        let now = Instant::now();
        self.workload_running_again(now.checked_sub(before).unwrap_or(now));
    }

    /// Ends the migration as `Failed` or `RolledBack` with the reason and what was done.
    /// `restored_on_origin` says the workload was stopped and runs on the origin again.
    /// Refused once terminal, and in `finishing`: the workload runs on the destination.
    pub fn fail(
        &mut self,
        reason: String,
        recovery: Vec<String>,
        restored_on_origin: bool,
    ) -> Result<(), TransitionError> {
        let to = if restored_on_origin {
            Phase::RolledBack
        } else {
            Phase::Failed
        };
        if self.phase.is_terminal() || self.phase == Phase::Finishing {
            return Err(TransitionError {
                id: self.id.clone(),
                from: self.phase,
                to,
            });
        }
        let now = Instant::now();
        if restored_on_origin {
            self.workload_running_again(now);
        }
        self.failure = Some(Failure {
            phase: self.phase,
            reason,
            recovery,
        });
        self.enter(to, now);
        Ok(())
    }

    /// Rebuilds the record's clock after it was read back from the journal (the clock is not
    /// stored: it is monotonic time of the process that made it), from the wall-clock times
    /// the record holds, so durations and downtime still count from the migration's start.
    pub fn resume_clock(&mut self) {
        let now_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(millis)
            .unwrap_or_default();
        let age = Duration::from_millis(now_unix_ms.saturating_sub(self.created_unix_ms));
        let now = Instant::now();
        let created = now.checked_sub(age).unwrap_or(now);
        let at = |ms: u64| {
            created
                .checked_add(Duration::from_millis(ms))
                .unwrap_or(now)
                .min(now)
        };
        let phase_started = self.timings.last().map_or(created, |t| at(t.started_ms));
        let downtime_started = (self.downtime_ms.is_none() && !self.phase.is_terminal())
            .then(|| {
                self.timings
                    .iter()
                    .find(|t| t.phase == Phase::Checkpointing)
                    .map(|t| at(t.started_ms))
            })
            .flatten();
        self.clock = Clock {
            created,
            phase_started,
            downtime_started,
        };
    }

    /// Duration of `phase`, if it has ended.
    pub fn phase_duration(&self, phase: Phase) -> Option<u64> {
        self.timings
            .iter()
            .find(|t| t.phase == phase)
            .and_then(|t| t.duration_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration() -> Migration {
        Migration::new(
            "m1".into(),
            Target::Deployment("counter".into()),
            "default".into(),
            "node01".into(),
            "node02".into(),
        )
    }

    #[test]
    fn happy_path_records_every_phase_and_downtime() {
        let mut m = migration();
        for p in [
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Restoring,
            Phase::Finishing,
            Phase::Done,
        ] {
            m.advance(p).expect("advance");
        }
        assert_eq!(m.phase, Phase::Done);
        assert_eq!(m.timings.len(), 5);
        assert!(m.timings.iter().all(|t| t.duration_ms.is_some()));
        assert!(m.downtime_ms.is_some());
        assert!(m.duration_ms.is_some());
    }

    #[test]
    fn phases_cannot_be_skipped_or_repeated() {
        let mut m = migration();
        assert!(m.advance(Phase::Transferring).is_err());
        m.advance(Phase::Checkpointing).expect("advance");
        assert!(m.advance(Phase::Checkpointing).is_err());
        assert!(m.advance(Phase::Pending).is_err());
    }

    #[test]
    fn failure_is_terminal_and_keeps_the_failed_phase() {
        let mut m = migration();
        m.advance(Phase::Checkpointing).expect("advance");
        m.advance(Phase::Transferring).expect("advance");
        m.fail("destination gone".into(), vec!["rolled back".into()], true)
            .expect("fail");
        assert_eq!(m.phase, Phase::RolledBack);
        let failure = m.failure.as_ref().expect("failure");
        assert_eq!(failure.phase, Phase::Transferring);
        assert!(m.downtime_ms.is_some());
        assert!(m.advance(Phase::Restoring).is_err());
        assert!(m.fail("again".into(), vec![], false).is_err());
    }

    #[test]
    fn a_record_read_back_keeps_counting_from_its_start() {
        let mut m = migration();
        m.advance(Phase::Checkpointing).expect("advance");
        m.created_unix_ms -= 5_000;
        let mut back: Migration =
            serde_json::from_value(serde_json::to_value(&m).expect("json")).expect("read back");
        back.resume_clock();
        back.fail("the controller restarted".into(), vec![], true)
            .expect("fail");
        assert!(back.duration_ms.expect("duration") >= 5_000, "{back:?}");
        assert!(back.downtime_ms.expect("downtime") >= 5_000, "{back:?}");
        assert!(back.timings[1].duration_ms.expect("checkpointing") >= 5_000);
    }

    #[test]
    fn finishing_ends_the_downtime_and_can_only_end_done() {
        let mut m = migration();
        for p in [Phase::Checkpointing, Phase::Transferring, Phase::Restoring] {
            m.advance(p).expect("advance");
        }
        assert_eq!((m.downtime_ms, m.destination_running), (None, false));
        m.advance(Phase::Finishing).expect("advance");
        assert!(m.downtime_ms.is_some(), "{m:?}");
        assert!(m.destination_running);
        assert!(!Phase::Finishing.is_terminal());
        let restoring = &m.timings[3];
        assert_eq!(restoring.phase, Phase::Restoring);
        assert!(
            restoring.duration_ms.is_some(),
            "closed on finishing: {m:?}"
        );
        // The workload runs on the destination: nothing may fail it or roll it back.
        assert!(m.fail("late".into(), vec![], true).is_err());
        assert!(m.fail("late".into(), vec![], false).is_err());
        assert_eq!((m.phase, m.failure.as_ref()), (Phase::Finishing, None));
        let downtime = m.downtime_ms;
        m.advance(Phase::Done).expect("advance");
        assert_eq!(m.downtime_ms, downtime, "the cleanup is no downtime");
        assert!(m.phase_duration(Phase::Finishing).is_some());
    }

    #[test]
    fn every_phase_has_its_json_name_and_the_running_ones_their_order() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str());
            let back: Phase = serde_json::from_value(p.as_str().into()).expect("parse");
            assert_eq!(back, p);
        }
        let mut order = vec![Phase::Pending];
        while let Some(next) = order.last().and_then(|p| p.next()) {
            order.push(next);
        }
        assert_eq!(order, Phase::ALL[..6]);
    }

    #[test]
    fn a_record_journaled_by_the_previous_version_while_restoring_finishes() {
        // Written before `finishing` existed: the destination ran, still `restoring`.
        let old = r#"{"id":"mig-1-0","target":{"kind":"deployment","name":"counter"},
            "namespace":"default","originNode":"node01","destNode":"node02","phase":"restoring",
            "containers":["counter"],"createdUnixMs":1700000000000,"checkpointBytes":10,
            "bytesTransferred":5,"timings":[
              {"phase":"pending","started_ms":0,"duration_ms":3},
              {"phase":"checkpointing","started_ms":3,"duration_ms":100},
              {"phase":"transferring","started_ms":103,"duration_ms":50},
              {"phase":"restoring","started_ms":153,"duration_ms":null}],
            "downtimeMs":300,"durationMs":null,"failure":null,"warnings":[],
            "destinationRunning":true}"#;
        let mut m: Migration = serde_json::from_str(old).expect("old record");
        m.resume_clock();
        assert_eq!(m.phase, Phase::Restoring);
        m.advance(Phase::Finishing).expect("advance");
        m.advance(Phase::Done).expect("advance");
        assert_eq!(m.downtime_ms, Some(300), "journaled downtime kept");
        let phases: Vec<&str> = m.timings.iter().map(|t| t.phase.as_str()).collect();
        assert_eq!(
            phases,
            [
                "pending",
                "checkpointing",
                "transferring",
                "restoring",
                "finishing"
            ]
        );
    }

    #[test]
    fn the_downtime_ends_when_the_destination_saw_the_workload_running() {
        let mut m = migration();
        for p in [Phase::Checkpointing, Phase::Transferring, Phase::Restoring] {
            m.advance(p).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        // Seen running 250 ms before the restore's answer (a lazy restore filling memory).
        m.running_before(Duration::from_millis(250));
        m.advance(Phase::Finishing).unwrap();
        let downtime = m.downtime_ms.expect("downtime");
        assert!((50..250).contains(&downtime), "{downtime} ms");
        assert!(
            m.phase_duration(Phase::Restoring).unwrap() >= 300,
            "the restore phase still lasts until the answer: {m:?}"
        );
    }

    #[test]
    fn failure_before_stopping_has_no_downtime() {
        let mut m = migration();
        m.fail("unknown workload".into(), vec![], false)
            .expect("fail");
        assert_eq!(m.phase, Phase::Failed);
        assert_eq!(m.downtime_ms, None);
    }
}
