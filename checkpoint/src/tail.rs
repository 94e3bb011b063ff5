//! [`TailHasher`]: hashes an engine's memory images while the engine writes them.
//!
//! Hashing is the part of a commit that grows with the workload's memory (SHA-256 runs at
//! ~1.7 GB/s here; CRIU writes its page images about as fast). CRIU writes each
//! `pages-<n>.img` front to back and never returns to bytes it has written (DMTCP its
//! `ckpt_*.dmtcp`, under a temporary name it then renames), so a reader that follows the
//! file's end computes the file's digest alongside the dump, on another core, and the commit
//! only hashes what is left (the small images, the archives, which are hashed as they are
//! packed). Files are followed by inode, so a rename (DMTCP's, or the move into the
//! checkpoint) keeps what was hashed.
//!
//! Should an engine ever rewrite bytes already read, the digest is wrong but never hides a
//! corruption: every reader of the checkpoint compares the data with it (the receiving node
//! while streaming, [`crate::Checkpoint::verify`] after a reboot), and refuses the checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::manifest::hex;

/// A file's identity: device and inode.
pub(crate) type FileId = (u64, u64);

/// Digests of the files a [`TailHasher`] followed: file -> (size, sha256).
pub(crate) type Digests = BTreeMap<FileId, (u64, String)>;

/// Follows the files of one directory whose names `wanted` accepts, hashing what is appended
/// to them, until [`TailHasher::finish`].
#[derive(Debug)]
pub(crate) struct TailHasher {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Digests>>>,
}

struct Followed {
    file: File,
    hasher: Sha256,
    size: u64,
}

impl TailHasher {
    /// Starts following `dir` (which must exist).
    pub(crate) fn start(dir: PathBuf, wanted: fn(&str) -> bool) -> io::Result<Self> {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("mig-tail-hash".into())
            .spawn(move || follow(&dir, wanted, &flag))?;
        Ok(Self {
            done,
            thread: Some(thread),
        })
    }

    /// Call once the writer has closed every file: reads what is left and returns the
    /// digests. An error (a file vanished, a read failed) means the caller hashes the files
    /// itself.
    pub(crate) fn finish(mut self) -> io::Result<Digests> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<Digests> {
        self.done.store(true, Ordering::Release);
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the hashing thread panicked"))),
            None => Ok(Digests::new()),
        }
    }
}

impl Drop for TailHasher {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn follow(dir: &Path, wanted: fn(&str) -> bool, done: &AtomicBool) -> io::Result<Digests> {
    use std::os::unix::fs::MetadataExt;
    let mut files: BTreeMap<FileId, Followed> = BTreeMap::new();
    loop {
        // Read the flag before looking: whatever was written before it was set is then read
        // in this last round.
        let last = done.load(Ordering::Acquire);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !wanted(&name) || !entry.file_type()?.is_file() {
                continue;
            }
            // Renamed away meanwhile (DMTCP's temporary name): found again under the new one.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(slot) =
                files.entry((meta.dev(), meta.ino()))
            {
                let Ok(file) = File::open(entry.path()) else {
                    continue;
                };
                slot.insert(Followed {
                    file,
                    hasher: Sha256::new(),
                    size: 0,
                });
            }
        }
        let mut progressed = false;
        for f in files.values_mut() {
            let len = f.file.metadata()?.len();
            if len > f.size {
                hash_range(f, len)?;
                progressed = true;
            }
        }
        if last {
            return Ok(files
                .into_iter()
                .map(|(id, f)| (id, (f.size, hex(&f.hasher.finalize()))))
                .collect());
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Hashes `f` from where it stopped to `len`, straight from the page cache: the bytes are
/// mapped, not copied (a copy of every image byte would compete with the engine writing them
/// for this machine's memory bandwidth). The engine only appends, so the range stays valid
/// while mapped; pages are mapped a window at a time.
fn hash_range(f: &mut Followed, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const WINDOW: u64 = 64 << 20;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    while f.size < len {
        let base = f.size / page * page;
        let end = len.min(base + WINDOW);
        let map_len = (end - base) as usize;
        // SAFETY: a read-only private mapping of a range of the file that exists (below `len`,
        // its size a moment ago; the writer only appends). It is unmapped before returning.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                f.file.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ptr` maps `map_len` readable bytes until the munmap below.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, map_len) };
        f.hasher.update(&bytes[(f.size - base) as usize..]);
        // SAFETY: unmapping exactly what was mapped above; `bytes` is not used after.
        unsafe { libc::munmap(ptr, map_len) };
        f.size = end;
    }
    Ok(())
}

/// CRIU's memory page images, the only large files of its dump.
pub(crate) fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// DMTCP's checkpoint images, also while being written (`ckpt_*.dmtcp.temp`).
pub(crate) fn is_dmtcp_image(name: &str) -> bool {
    name.starts_with("ckpt_") && name.contains(".dmtcp")
}

/// The digests of the files now in `dir` (by name) that `digests` holds (by identity).
pub(crate) fn by_name(
    dir: &Path,
    digests: &Digests,
) -> io::Result<BTreeMap<String, (u64, String)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if let (Some(d), Ok(name)) = (
            digests.get(&(meta.dev(), meta.ino())),
            entry.file_name().into_string(),
        ) {
            out.insert(name, d.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[test]
    fn follows_files_while_they_grow() {
        let dir = tempfile::tempdir().unwrap();
        let hasher = TailHasher::start(dir.path().to_path_buf(), is_page_image).unwrap();
        let mut a = File::create(dir.path().join("pages-1.img")).unwrap();
        let mut all = Vec::new();
        for i in 0..50u8 {
            let chunk = vec![i; 70_000];
            a.write_all(&chunk).unwrap();
            all.extend_from_slice(&chunk);
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        // A file that appears late, and one that is not a page image.
        fs::write(dir.path().join("pages-2.img"), b"late").unwrap();
        fs::write(dir.path().join("core-1.img"), b"core").unwrap();
        drop(a);
        let digests = by_name(dir.path(), &hasher.finish().unwrap()).unwrap();
        assert_eq!(
            digests.keys().collect::<Vec<_>>(),
            vec!["pages-1.img", "pages-2.img"]
        );
        assert_eq!(digests["pages-1.img"], (all.len() as u64, sha(&all)));
        assert_eq!(digests["pages-2.img"], (4, sha(b"late")));
    }

    #[test]
    fn a_renamed_file_keeps_its_digest_and_is_found_by_its_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let moved = tempfile::tempdir().unwrap();
        let hasher = TailHasher::start(dir.path().to_path_buf(), is_dmtcp_image).unwrap();
        let temp = dir.path().join("ckpt_app_1.dmtcp.temp");
        let mut f = File::create(&temp).unwrap();
        f.write_all(&[1u8; 300_000]).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        f.write_all(&[2u8; 5]).unwrap();
        drop(f);
        let done = dir.path().join("ckpt_app_1.dmtcp");
        fs::rename(&temp, &done).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let digests = hasher.finish().unwrap();
        assert_eq!(digests.len(), 1, "hashed once, under either name");
        // Moved on into the checkpoint (as the shim does), still found.
        fs::rename(&done, moved.path().join("ckpt_app_1.dmtcp")).unwrap();
        let mut data = vec![1u8; 300_000];
        data.extend_from_slice(&[2u8; 5]);
        assert_eq!(
            by_name(moved.path(), &digests).unwrap()["ckpt_app_1.dmtcp"],
            (data.len() as u64, sha(&data))
        );
    }

    #[test]
    fn an_empty_directory_gives_no_digests() {
        let dir = tempfile::tempdir().unwrap();
        let hasher = TailHasher::start(dir.path().to_path_buf(), is_page_image).unwrap();
        assert!(hasher.finish().unwrap().is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let hasher = TailHasher::start(dir.path().join("gone"), is_page_image).unwrap();
        assert!(hasher.finish().is_err());
    }
}
