//! [`Store`]: the node's directory of checkpoints, one per workload.
//!
//! Layout under the root (e.g. `/var/lib/kubernetes-mig/checkpoints`, mode 0700):
//!
//! ```text
//! <key>/                       complete checkpoint of one workload (see the crate docs)
//! .tmp-<key>-<unique>/         checkpoint being written; renamed to <key> on commit
//! .old-<key>-<unique>/         previous checkpoint being deleted after a replacement
//! .removing-<key>-<unique>/    checkpoint being deleted (removed or consumed)
//! ```
//!
//! Hidden names cannot collide with a key because a [`SafeName`] never starts with `.`, and
//! a directory only ever appears under `<key>` by an atomic rename of a complete checkpoint,
//! so `<key>` is either absent or complete, even after a crash.
//!
//! A store may have a second root in memory (a tmpfs, [`Store::with_memory`]) with the same
//! layout, for checkpoints that only live to be moved to another node
//! ([`Store::begin_transient`]). A workload has one checkpoint in the store, in either root:
//! installing one removes the workload's checkpoint from the other root, and the lookups
//! ([`Store::pending`], [`Store::path_for`], [`Store::writing`], ...) see both.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result, io_err};
use crate::identity::WorkloadIdentity;
use crate::name::SafeName;
use crate::room::Room;
use crate::writer::CheckpointWriter;

const HIDDEN_PREFIXES: [&str; 3] = [".tmp-", ".old-", ".removing-"];

/// The directory of checkpoints on one node.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// The root in memory, if the node has one (see [`Store::with_memory`]).
    memory: Option<PathBuf>,
}

impl Store {
    /// The conventional root on a node.
    pub const DEFAULT_ROOT: &'static str = "/var/lib/kubernetes-mig/checkpoints";

    /// Opens the store at `root`, creating it (and missing parents) with mode 0700.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("create checkpoint store", &root))?;
        Ok(Self { root, memory: None })
    }

    /// This store with a second root in memory at `dir`, for [`Store::begin_transient`],
    /// which creates it (mode 0700) when it first writes there. `dir` should be on a tmpfs
    /// of its own node, never shared with another store.
    pub fn with_memory(mut self, dir: impl Into<PathBuf>) -> Result<Self> {
        self.memory = Some(dir.into());
        Ok(self)
    }

    /// The entries of `root`; none when it does not exist (a memory root not used yet).
    fn entries(root: &Path, what: &'static str) -> Result<Vec<fs::DirEntry>> {
        match fs::read_dir(root) {
            Ok(entries) => entries.map(|e| e.map_err(io_err(what, root))).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(what, root)(e)),
        }
    }

    /// The store's root directory (on disk).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root in memory, if any.
    pub fn memory_root(&self) -> Option<&Path> {
        self.memory.as_deref()
    }

    /// The roots: on disk, then in memory if there is one.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.root.as_path()).chain(self.memory.as_deref())
    }

    /// Whether `path` lies in the memory root.
    pub fn in_memory(&self, path: &Path) -> bool {
        self.memory.as_deref().is_some_and(|m| path.starts_with(m))
    }

    /// One root as a store of its own.
    fn only(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            memory: None,
        }
    }

    /// Where the complete checkpoint of `identity` is: in memory if it is there, else on
    /// disk (whether or not it exists).
    pub fn path_for(&self, identity: &WorkloadIdentity) -> PathBuf {
        let key = identity.safe_key();
        self.memory
            .as_deref()
            .map(|m| m.join(&key))
            .filter(|p| p.symlink_metadata().is_ok())
            .unwrap_or_else(|| self.root.join(&key))
    }

    /// Starts writing a checkpoint of `identity` in a temporary directory of the store (on
    /// disk); it replaces the workload's current checkpoint on [`CheckpointWriter::commit`].
    pub fn begin(&self, identity: &WorkloadIdentity) -> Result<CheckpointWriter> {
        let memory = self.memory.as_deref().map(Store::only);
        CheckpointWriter::new(&Store::only(&self.root), identity.clone(), memory)
    }

    /// [`Store::begin`] for a checkpoint that only lives to be moved (a migration's, on
    /// either node): in memory when the store has a memory root with room for `size_hint`
    /// bytes (see [`crate::room`]), else on disk. [`CheckpointWriter::in_memory`] tells which.
    pub fn begin_transient(
        &self,
        identity: &WorkloadIdentity,
        size_hint: u64,
    ) -> Result<CheckpointWriter> {
        if let Some(memory) = self.memory.as_deref() {
            let room = DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(memory)
                .map_err(|e| e.to_string())
                .and_then(|()| private_memory_root(memory))
                .and_then(|()| Room::of(memory).map_err(|e| e.to_string()));
            match room.and_then(|r| r.fits(size_hint)) {
                Ok(()) => {
                    let disk = Some(Store::only(&self.root));
                    let mut writer =
                        CheckpointWriter::new(&Store::only(memory), identity.clone(), disk)?;
                    writer.set_size_hint(size_hint)?;
                    return Ok(writer);
                }
                Err(why) => tracing::info!(
                    workload = %identity,
                    reason = %why,
                    "checkpoint written to disk: no room in memory"
                ),
            }
        }
        self.begin(identity)
    }

    /// The size hint of a checkpoint (complete or being written) in `dir`, if it was written
    /// in memory with one (see [`Store::begin_transient`]).
    pub fn size_hint(dir: &Path) -> Option<u64> {
        fs::read_to_string(dir.join(crate::writer::SIZE_HINT_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The complete checkpoint waiting for `identity`, if any: the newer if both roots hold
    /// one (only after a crash between an install and the removal of the older one). Only the
    /// manifest is checked here; the restore verifies the files with
    /// [`Checkpoint::verify_for_restore`].
    pub fn pending(&self, identity: &WorkloadIdentity) -> Result<Option<Checkpoint>> {
        let mut found: Option<Checkpoint> = None;
        for root in self.roots() {
            let dir = root.join(identity.safe_key());
            match dir.symlink_metadata() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &dir)(e)),
            }
            let checkpoint = Checkpoint::open(&dir)?;
            if checkpoint.identity() != identity {
                return Err(Error::IdentityMismatch {
                    dir,
                    found: Box::new(checkpoint.identity().clone()),
                    expected: Box::new(identity.clone()),
                });
            }
            if found
                .as_ref()
                .is_none_or(|f| f.manifest().created_unix <= checkpoint.manifest().created_unix)
            {
                found = Some(checkpoint);
            }
        }
        Ok(found)
    }

    /// Deletes the checkpoint of `identity` (from both roots); returns whether there was one.
    pub fn remove(&self, identity: &WorkloadIdentity) -> Result<bool> {
        let mut removed = false;
        for root in self.roots() {
            let store = Store::only(root);
            let dir = store.root.join(identity.safe_key());
            let doomed = store.hidden_path(".removing-", &identity.safe_key());
            match fs::rename(&dir, &doomed) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("rename", &dir)(e)),
            }
            fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
            removed = true;
        }
        Ok(removed)
    }

    /// Marks `checkpoint` consumed after a successful restore, by deleting it.
    ///
    /// Deleting rather than keeping a `restored` copy is deliberate: a checkpoint holds the
    /// process's memory and can be gigabytes, and a kept copy could be restored twice. A
    /// restore that fails simply does not call this, which leaves the checkpoint in place for
    /// a retry. If a newer checkpoint replaced the directory since `checkpoint` was opened,
    /// nothing is deleted and [`Error::Replaced`] is returned.
    pub fn consume(&self, checkpoint: Checkpoint) -> Result<()> {
        let doomed = self.consume_detached(checkpoint)?;
        fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))
    }

    /// [`Store::consume`], except that the data is left for the caller to delete: the
    /// checkpoint is moved out of the workload's place (so nothing restores it again) to the
    /// hidden directory returned. Deleting a GiB of images takes a noticeable time that a
    /// restore need not wait for; a directory its caller fails to delete is removed by
    /// [`Store::remove_stale`].
    pub fn consume_detached(&self, checkpoint: Checkpoint) -> Result<PathBuf> {
        let dir = checkpoint.dir().to_path_buf();
        // In the root that holds it: a rename does not cross filesystems.
        let root = dir.parent().unwrap_or(&self.root);
        let doomed = Store::only(root).hidden_path(".removing-", &checkpoint.identity().safe_key());
        // Renaming first makes the check below race-free: once moved, the directory cannot be
        // replaced under us.
        fs::rename(&dir, &doomed).map_err(io_err("rename", &dir))?;
        if !checkpoint.is_still_at(&doomed)? {
            // Put the newer checkpoint back unless yet another one has appeared meanwhile.
            crate::sys::rename_noreplace(&doomed, &dir).map_err(io_err("rename back", &doomed))?;
            return Err(Error::Replaced { dir });
        }
        Ok(doomed)
    }

    /// Deletes leftovers of interrupted writes and deletions (hidden directories) last
    /// modified more than `older_than` ago; returns how many were deleted. A node agent calls
    /// this at start-up; the age threshold protects writes still in progress.
    pub fn remove_stale(&self, older_than: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        let entries = self
            .roots()
            .map(|root| Store::entries(root, "read directory"));
        for entry in entries.collect::<Result<Vec<_>>>()?.into_iter().flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !HIDDEN_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let path = entry.path();
            let meta = path.symlink_metadata().map_err(io_err("stat", &path))?;
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if meta.is_dir() && age > older_than {
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The temporary directory of a checkpoint of `identity` being written right now (by
    /// [`Store::begin`], in this or another process) that was begun at or after `since`, the
    /// newest if there are several; `None` when there is none. (Older ones are leftovers of a
    /// crashed writer.) Its files are the engine's as it writes them: for following them (a
    /// migration streams the images while they are written), never for restoring.
    pub fn writing(
        &self,
        identity: &WorkloadIdentity,
        since: SystemTime,
    ) -> Result<Option<PathBuf>> {
        let since = since
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let prefix = format!(".tmp-{}-", identity.safe_key());
        let mut newest: Option<(u128, PathBuf)> = None;
        let entries = self.roots().map(|root| Store::entries(root, "list"));
        for entry in entries.collect::<Result<Vec<_>>>()?.into_iter().flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            // `<pid>-<nanos>-<counter>`: anything else belongs to another key that starts
            // with this one (`a-1` and `a-1-2`).
            let parts: Vec<&str> = rest.split('-').collect();
            if parts.len() != 3 || !parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())) {
                continue;
            }
            let nanos: u128 = parts[1].parse().unwrap_or_default();
            if nanos >= since && newest.as_ref().is_none_or(|(n, _)| nanos >= *n) {
                newest = Some((nanos, entry.path()));
            }
        }
        Ok(newest.map(|(_, p)| p))
    }

    /// A fresh hidden path in the root: `<prefix><key>-<pid>-<nanos>-<counter>`.
    pub(crate) fn hidden_path(&self, prefix: &str, key: &SafeName) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(format!("{prefix}{key}-{}-{nanos}-{n}", std::process::id()))
    }
}

/// Checks that nobody but this user can swap `memory` or its parent for something else: both
/// must be real directories (not symlinks) owned by this user and writable by no one else.
/// The default memory root lies in /dev/shm, which every local user may write to: one who
/// created `/dev/shm/kubernetes-mig` first could otherwise replace the store with a link to a
/// directory of theirs and receive the processes' memory.
fn private_memory_root(memory: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::geteuid() };
    for dir in [Some(memory), memory.parent()].into_iter().flatten() {
        let meta = dir
            .symlink_metadata()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is not a directory of uid {uid} that only it can write (uid {}, mode {:o}): \
                 another user could replace the checkpoint store",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_root_others_can_write_to_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        let store = Store::open(dir.path().join("disk"))
            .and_then(|s| s.with_memory(shared.join("store")))
            .expect("store");
        let id = WorkloadIdentity::container("default", "a").expect("id");
        assert!(store.begin_transient(&id, 4096).expect("begin").in_memory());
        // The parent becomes writable by others (as /dev/shm itself is): disk.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
        let writer = store.begin_transient(&id, 4096).expect("begin");
        assert!(!writer.in_memory());
        drop(writer);
        // A symlink in place of the memory root: disk.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::remove_dir(shared.join("store")).expect("rmdir");
        std::os::unix::fs::symlink(dir.path(), shared.join("store")).expect("symlink");
        assert!(private_memory_root(&shared.join("store")).is_err());
        assert!(!store.begin_transient(&id, 4096).expect("begin").in_memory());
    }

    #[test]
    fn writing_finds_this_workloads_new_temp_dir_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path().join("s")).expect("store");
        let a = WorkloadIdentity::container("default", "a-1").expect("id");
        let longer = WorkloadIdentity::container("default", "a-1-2").expect("id");
        let before = SystemTime::now();
        assert_eq!(store.writing(&a, before).expect("list"), None);
        // Another workload whose key starts with this one's.
        let other = store.begin(&longer).expect("begin");
        assert_eq!(store.writing(&a, before).expect("list"), None);
        let mine = store.begin(&a).expect("begin");
        assert_eq!(
            store.writing(&a, before).expect("list").as_deref(),
            Some(mine.dir())
        );
        // Begun before `since`: a leftover, not the checkpoint being written now.
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(store.writing(&a, later).expect("list"), None);
        drop((other, mine));
    }
}
