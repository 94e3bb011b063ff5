//! Disk work kept out of stops and starts. Write-behind of checkpoint data: a checkpoint for a
//! stop is installed without waiting for its data to reach the disk (seconds for a GiB here,
//! all of it added to the stop), and made durable right after on a thread of its own. And
//! delete-behind of a consumed checkpoint: deleting a GiB of images takes ~0.2 s here, which
//! a restore need not wait for. The shim does not exit before both are done.
//!
//! Until then a crash can lose the checkpoint, never corrupt a restore: its stamp belongs to
//! the boot that wrote it, so after a reboot every file is hashed before a restore, and a file
//! whose data was lost is refused.

use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;

use mig_checkpoint::Checkpoint;

static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Makes `checkpoint`'s data durable in the background.
pub fn sync_later(checkpoint: Checkpoint) {
    spawn("mig-writeback", move || {
        let started = std::time::Instant::now();
        match checkpoint.sync_data() {
            Ok(()) => {
                tracing::info!(checkpoint = %checkpoint.dir().display(), elapsed_ms = started.elapsed().as_millis() as u64, "checkpoint data durable")
            }
            // A restore on this node may have consumed it meanwhile.
            Err(e) => {
                tracing::warn!(checkpoint = %checkpoint.dir().display(), error = %e, "could not make checkpoint data durable")
            }
        }
    });
}

/// Deletes `dir` (a consumed checkpoint, already out of the workload's place) in the
/// background.
pub fn remove_later(dir: PathBuf) {
    spawn("mig-remove", move || {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a consumed checkpoint; the store's stale cleanup will");
        }
    });
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) {
    match std::thread::Builder::new().name(name.into()).spawn(work) {
        Ok(handle) => PENDING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle),
        Err(e) => tracing::warn!(error = %e, "cannot start a background thread; {name} skipped"),
    }
}

/// Waits until everything handed to [`sync_later`] and [`remove_later`] is done.
pub fn wait_all() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    for handle in pending {
        let _ = handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_all_waits_for_removals() {
        wait_all();
        let dir = tempfile::tempdir().unwrap();
        let doomed = dir.path().join(".removing-x");
        std::fs::create_dir_all(doomed.join("images")).unwrap();
        std::fs::write(doomed.join("images/pages-1.img"), vec![7u8; 1 << 20]).unwrap();
        remove_later(doomed.clone());
        wait_all();
        assert!(!doomed.exists());
    }
}
