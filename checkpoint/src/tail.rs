//! [`TailHasher`]: hashes an engine's memory images while the engine writes them.
//!
//! Hashing is the part of a commit that grows with the workload's memory (SHA-256 runs at
//! ~1.7 GB/s here; CRIU writes its page images about as fast). CRIU writes each
//! `pages-<n>.img` front to back and never returns to bytes it has written, so a reader that
//! follows the file's end computes the file's digest alongside the dump, on another core, and
//! the commit only hashes what is left (the small images, the archives, which are hashed as
//! they are packed).
//!
//! Should an engine ever rewrite bytes already read, the digest is wrong but never hides a
//! corruption: every reader of the checkpoint compares the data with it (the receiving node
//! while streaming, [`crate::Checkpoint::verify`] after a reboot), and refuses the checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::manifest::hex;

/// Digests of the files a [`TailHasher`] followed: name in the directory -> (size, sha256).
pub(crate) type Digests = BTreeMap<String, (u64, String)>;

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
    let mut files: BTreeMap<String, Followed> = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // Read the flag before looking: whatever was written before it was set is then read
        // in this last round.
        let last = done.load(Ordering::Acquire);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if wanted(&name) && !files.contains_key(&name) && entry.file_type()?.is_file() {
                let file = File::open(entry.path())?;
                files.insert(
                    name,
                    Followed {
                        file,
                        hasher: Sha256::new(),
                        size: 0,
                    },
                );
            }
        }
        let mut progressed = false;
        for f in files.values_mut() {
            loop {
                let n = match f.file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                f.hasher.update(&buf[..n]);
                f.size += n as u64;
                progressed = true;
            }
        }
        if last {
            return Ok(files
                .into_iter()
                .map(|(name, f)| (name, (f.size, hex(&f.hasher.finalize()))))
                .collect());
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// CRIU's memory page images, the only large files of a dump.
pub(crate) fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
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
        let digests = hasher.finish().unwrap();
        assert_eq!(
            digests.keys().collect::<Vec<_>>(),
            vec!["pages-1.img", "pages-2.img"]
        );
        assert_eq!(digests["pages-1.img"], (all.len() as u64, sha(&all)));
        assert_eq!(digests["pages-2.img"], (4, sha(b"late")));
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
