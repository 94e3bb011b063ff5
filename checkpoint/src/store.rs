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
use crate::writer::CheckpointWriter;

const HIDDEN_PREFIXES: [&str; 3] = [".tmp-", ".old-", ".removing-"];

/// The directory of checkpoints on one node.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
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
        Ok(Self { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the complete checkpoint of `identity` lives (whether or not it exists).
    pub fn path_for(&self, identity: &WorkloadIdentity) -> PathBuf {
        self.root.join(identity.safe_key())
    }

    /// Starts writing a checkpoint of `identity` in a temporary directory of the store; it
    /// replaces the workload's current checkpoint on [`CheckpointWriter::commit`].
    pub fn begin(&self, identity: &WorkloadIdentity) -> Result<CheckpointWriter> {
        CheckpointWriter::new(self, identity.clone())
    }

    /// The complete checkpoint waiting for `identity`, if any. Only the manifest is checked
    /// here; the restore verifies the files with [`Checkpoint::verify_for_restore`].
    pub fn pending(&self, identity: &WorkloadIdentity) -> Result<Option<Checkpoint>> {
        let dir = self.path_for(identity);
        match dir.symlink_metadata() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
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
        Ok(Some(checkpoint))
    }

    /// Deletes the checkpoint of `identity`; returns whether there was one.
    pub fn remove(&self, identity: &WorkloadIdentity) -> Result<bool> {
        let dir = self.path_for(identity);
        let doomed = self.hidden_path(".removing-", &identity.safe_key());
        match fs::rename(&dir, &doomed) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("rename", &dir)(e)),
        }
        fs::remove_dir_all(&doomed).map_err(io_err("remove", &doomed))?;
        Ok(true)
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
        let doomed = self.hidden_path(".removing-", &checkpoint.identity().safe_key());
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
        for entry in fs::read_dir(&self.root).map_err(io_err("read directory", &self.root))? {
            let entry = entry.map_err(io_err("read directory", &self.root))?;
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
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
