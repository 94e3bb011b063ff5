//! [`Journal`]: the controller's durable record of migrations and node agents, so that a
//! controller that dies mid-migration finds, when it starts again, the migrations it left
//! with a stopped workload and resolves them ([`crate::recovery`]).
//!
//! ```text
//! <state-dir>/controller/           0700, root only
//!   lock                            flock(2)ed while a controller runs on this state dir
//!   nodes.json                      the registered node agents (GET /nodes)
//!   migrations/<id>.json            one migration record each, as GET /migrations/{id} shows it
//! ```
//!
//! Every file is written whole or not at all (temp file, fsync, rename, fsync of the
//! directory), mode 0600. A record that cannot be read back is skipped with a warning, never
//! a reason not to start. Terminal records are kept as history, the newest
//! [`KEEP_TERMINAL`] of them.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mig_checkpoint::SafeName;
use tracing::{info, warn};

use crate::files::{remove_if_exists, write_private};
use crate::migration::Migration;
use crate::registry::NodeInfo;

/// Terminal records kept on disk (and in memory); older ones are deleted.
pub const KEEP_TERMINAL: usize = 1000;

/// A journal operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file or directory could not be handled.
    #[error("migration journal: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Another controller holds the state dir.
    #[error(
        "migration journal: {} is locked by another controller; two controllers must not share a state dir",
        path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A migration id that must not become a file name.
    #[error("migration journal: invalid migration id {id:?}: {reason}")]
    InvalidId {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { what, path, source }
}

/// Checks that a migration id can name a file in the journal: a [`SafeName`] (no `/`, no
/// leading dot) without `..`. The controller makes its ids itself; this guards against a
/// record on disk, or a bug, naming a path outside the journal.
pub fn validate_id(id: &str) -> Result<(), JournalError> {
    let invalid = |reason: String| JournalError::InvalidId {
        id: id.to_string(),
        reason,
    };
    SafeName::new(id).map_err(|e| invalid(e.to_string()))?;
    if id.contains("..") {
        return Err(invalid("it contains \"..\"".into()));
    }
    Ok(())
}

/// What a journal held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every readable migration record, oldest first.
    pub migrations: Vec<Migration>,
    /// The node agents registered when the controller stopped.
    pub nodes: Vec<NodeInfo>,
}

/// The controller's journal under `<state-dir>/controller`.
#[derive(Debug)]
pub struct Journal {
    root: PathBuf,
    /// Serialises writes, so that two writes of one record land in the order they were made.
    writing: Mutex<()>,
    /// Held (flock) for the journal's lifetime.
    _lock: File,
}

impl Journal {
    /// Opens (creating) the journal of the controller whose state dir is `state_dir`, and
    /// locks it against a second controller.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let root = state_dir.join("controller");
        private_dir(&root)?;
        private_dir(&root.join("migrations"))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        // SAFETY: flock(2) on a descriptor `lock` owns; released when it is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                JournalError::Locked { path: lock_path }
            } else {
                io_err("lock", &lock_path)(e)
            });
        }
        Ok(Self {
            root,
            writing: Mutex::new(()),
            _lock: lock,
        })
    }

    /// The journal's directory, `<state-dir>/controller`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn migrations_dir(&self) -> PathBuf {
        self.root.join("migrations")
    }

    fn record_path(&self, id: &str) -> Result<PathBuf, JournalError> {
        validate_id(id)?;
        Ok(self.migrations_dir().join(format!("{id}.json")))
    }

    /// Writes `migration`'s record, replacing the previous one atomically.
    pub fn save(&self, migration: &Migration) -> Result<(), JournalError> {
        let path = self.record_path(&migration.id)?;
        let _writing = crate::controller::lock(&self.writing);
        write_atomically(&path, migration)
    }

    /// Writes the record `current` returns, taken under the write lock: of two writes of one
    /// record made at the same time, the later state lands last.
    pub fn save_latest(
        &self,
        current: impl FnOnce() -> Option<Migration>,
    ) -> Result<(), JournalError> {
        let _writing = crate::controller::lock(&self.writing);
        let Some(migration) = current() else {
            return Ok(());
        };
        write_atomically(&self.record_path(&migration.id)?, &migration)
    }

    /// Writes the node registry `current` returns, taken under the write lock (as
    /// [`Journal::save_latest`]).
    pub fn save_nodes(&self, current: impl FnOnce() -> Vec<NodeInfo>) -> Result<(), JournalError> {
        let _writing = crate::controller::lock(&self.writing);
        write_atomically(&self.root.join("nodes.json"), &current())
    }

    /// Reads everything back. Unreadable records are skipped with a warning; so are leftover
    /// temp files of a write interrupted by a crash, which are removed.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded::default();
        let nodes_path = self.root.join("nodes.json");
        match fs::read(&nodes_path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<NodeInfo>>(&bytes) {
                Ok(nodes) => loaded.nodes = nodes,
                Err(e) => {
                    warn!(path = %nodes_path.display(), error = %e, "skipping an unreadable node registry; agents register again")
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %nodes_path.display(), error = %e, "cannot read the node registry")
            }
        }
        let dir = self.migrations_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the migration journal");
                return loaded;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                remove_if_exists(&path);
                continue;
            }
            match read_record(&path, &name) {
                Ok(m) => loaded.migrations.push(m),
                Err(reason) => {
                    warn!(path = %path.display(), %reason, "skipping an unreadable migration record")
                }
            }
        }
        loaded.migrations.sort_by(|a, b| {
            (a.created_unix_ms, a.id.as_str()).cmp(&(b.created_unix_ms, b.id.as_str()))
        });
        info!(
            migrations = loaded.migrations.len(),
            nodes = loaded.nodes.len(),
            dir = %self.root.display(),
            "migration journal loaded"
        );
        loaded
    }

    /// Deletes the records of `ids` (terminal ones past the history cap).
    pub fn remove(&self, ids: &[String]) {
        let _writing = crate::controller::lock(&self.writing);
        for id in ids {
            if let Ok(path) = self.record_path(id) {
                remove_if_exists(&path);
            }
        }
    }
}

/// The ids of terminal records beyond the newest `keep`, among `migrations`.
pub fn past_history_cap(migrations: &[&Migration], keep: usize) -> Vec<String> {
    let mut terminal: Vec<&&Migration> = migrations
        .iter()
        .filter(|m| m.phase.is_terminal())
        .collect();
    if terminal.len() <= keep {
        return Vec::new();
    }
    terminal.sort_by(|a, b| {
        (b.created_unix_ms, b.id.as_str()).cmp(&(a.created_unix_ms, a.id.as_str()))
    });
    terminal[keep..].iter().map(|m| m.id.clone()).collect()
}

fn read_record(path: &Path, name: &str) -> Result<Migration, String> {
    let id = name
        .strip_suffix(".json")
        .ok_or("not a .json record")?
        .to_string();
    validate_id(&id).map_err(|e| e.to_string())?;
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let migration: Migration = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if migration.id != id {
        return Err(format!(
            "the record inside is of migration {:?}, not {id:?}",
            migration.id
        ));
    }
    Ok(migration)
}

fn private_dir(dir: &Path) -> Result<(), JournalError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))?;
    // An existing directory keeps its mode through create(): the records show what the
    // workloads are and where they run, so they are root's alone.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", dir))
}

/// Temp file in the same directory, fsync, rename over `path`, fsync of the directory: after
/// a crash `path` holds the old record or the new one, never a part.
fn write_atomically(path: &Path, value: &impl serde::Serialize) -> Result<(), JournalError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| io_err("encode", path)(io::Error::other(e)))?;
    write_private(path, &bytes, true).map_err(io_err("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{Phase, Target};
    use std::os::unix::fs::MetadataExt;

    fn record(id: &str, created: u64) -> Migration {
        let mut m = Migration::new(
            id.into(),
            Target::Deployment("counter".into()),
            "default".into(),
            "node01".into(),
            "node02".into(),
        );
        m.created_unix_ms = created;
        m.containers = vec!["counter".into()];
        m
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").mode() & 0o777
    }

    #[test]
    fn a_record_is_written_privately_and_reads_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let journal = Journal::open(dir.path()).expect("open");
        let mut m = record("mig-1-0", 1);
        m.advance(Phase::Checkpointing).expect("advance");
        journal.save(&m).expect("save");
        let path = dir.path().join("controller/migrations/mig-1-0.json");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("controller")), 0o700);
        assert_eq!(mode(&dir.path().join("controller/migrations")), 0o700);
        // Written whole: no temp file is left beside it.
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("mig-1-0.json")]);
        // A second write replaces the first.
        m.advance(Phase::Transferring).expect("advance");
        journal.save(&m).expect("save");
        let nodes = vec![NodeInfo {
            name: "node01".into(),
            address: "http://10.0.0.1:7070".into(),
            registered_unix: 7,
        }];
        journal.save_nodes(|| nodes.clone()).expect("nodes");
        assert_eq!(mode(&dir.path().join("controller/nodes.json")), 0o600);
        drop(journal);
        let loaded = Journal::open(dir.path()).expect("reopen").load();
        assert_eq!(loaded.nodes, nodes);
        assert_eq!(loaded.migrations.len(), 1);
        let back = &loaded.migrations[0];
        assert_eq!(back.phase, Phase::Transferring);
        assert_eq!(back.containers, vec!["counter".to_string()]);
        assert_eq!(back.timings.len(), 3);
    }

    #[test]
    fn an_existing_directory_is_made_private() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("controller");
        fs::create_dir_all(root.join("migrations")).expect("mkdir");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod");
        let _journal = Journal::open(dir.path()).expect("open");
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn corrupt_and_misnamed_records_are_skipped_and_temp_files_removed() {
        let dir = tempfile::tempdir().expect("tmp");
        let journal = Journal::open(dir.path()).expect("open");
        journal.save(&record("mig-1-0", 1)).expect("save");
        let migrations = dir.path().join("controller/migrations");
        fs::write(
            migrations.join("mig-2-0.json"),
            b"{\"id\": \"mig-2-0\", trunc",
        )
        .expect("write");
        // A record under another record's name.
        let other = serde_json::to_vec(&record("mig-3-0", 3)).expect("json");
        fs::write(migrations.join("mig-4-0.json"), other).expect("write");
        fs::write(migrations.join("..json"), b"{}").expect("write");
        fs::write(migrations.join("notes.txt"), b"x").expect("write");
        fs::write(migrations.join(".tmp-mig-5-0.json-77"), b"{").expect("write");
        fs::write(dir.path().join("controller/nodes.json"), b"[{").expect("write");
        let loaded = journal.load();
        let ids: Vec<_> = loaded.migrations.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["mig-1-0"]);
        assert!(loaded.nodes.is_empty());
        assert!(!migrations.join(".tmp-mig-5-0.json-77").exists());
        // Left for a human to look at.
        assert!(migrations.join("mig-2-0.json").exists());
    }

    #[test]
    fn ids_that_could_leave_the_journal_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a..b", "..", "x\0y"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        validate_id("mig-1764600000000-0").expect("a controller's id");
        let dir = tempfile::tempdir().expect("tmp");
        let journal = Journal::open(dir.path()).expect("open");
        let err = journal.save(&record("../escape", 1)).expect_err("saved");
        assert!(matches!(err, JournalError::InvalidId { .. }), "{err}");
        assert!(!dir.path().join("controller/escape.json").exists());
    }

    #[test]
    fn history_keeps_the_newest_terminal_records_and_every_running_one() {
        let mut all = Vec::new();
        for i in 0..6u64 {
            let mut m = record(&format!("mig-{i}-0"), i);
            if i != 1 {
                m.fail("x".into(), vec![], false).expect("fail");
            }
            all.push(m);
        }
        let refs: Vec<&Migration> = all.iter().collect();
        let mut gone = past_history_cap(&refs, 3);
        gone.sort();
        // 5, 4, 3 are the newest terminal ones; 1 still runs.
        assert_eq!(gone, ["mig-0-0", "mig-2-0"]);
        assert!(past_history_cap(&refs, 5).is_empty());
        let dir = tempfile::tempdir().expect("tmp");
        let journal = Journal::open(dir.path()).expect("open");
        for m in &all {
            journal.save(m).expect("save");
        }
        journal.remove(&gone);
        let left: Vec<_> = journal
            .load()
            .migrations
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(left, ["mig-1-0", "mig-3-0", "mig-4-0", "mig-5-0"]);
    }

    #[test]
    fn a_second_controller_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = Journal::open(dir.path()).expect("open");
        let err = Journal::open(dir.path()).expect_err("second");
        assert!(matches!(err, JournalError::Locked { .. }), "{err}");
        drop(first);
        Journal::open(dir.path()).expect("free again");
    }
}
