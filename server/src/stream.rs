//! The wire format of a checkpoint moving between two node agents, and its two ends.
//!
//! One container's checkpoint travels as one zstd-compressed stream:
//!
//! ```text
//! "MIGSTRM1"                       magic and format version
//! u32 BE length + JSON             the container's record (ContainerInfo): what the
//!                                  destination needs to create it again; kept out of the
//!                                  checkpoint directory, whose content the manifest fixes
//! u32 BE length + manifest.json    the checkpoint's manifest, byte for byte
//! 32 bytes                         sha256 of the two blocks above: the container record is
//!                                  not covered by the manifest, and a damaged record would
//!                                  create a different container
//! file bytes                       every file listed in the manifest, in manifest order, each
//!                                  exactly as long as the manifest says
//! "END1"                           trailer: a stream cut short never looks complete
//! ```
//!
//! Paths never travel on their own: the receiver takes them from the manifest, which
//! [`Manifest::parse`] has already checked to stay inside the checkpoint directory. The sender
//! reads straight from the checkpoint directory (no second copy on the origin); it hashes what
//! it sends only when the checkpoint's `verified.json` stamp (written by the shim's commit after
//! hashing) does not vouch for the files, since the receiver checks every byte anyway. The
//! receiver hashes what it writes (as it decompresses; a second thread writes) and compares each file with its manifest entry as soon as the file is
//! complete, so a corrupted stream is refused at the first bad file and the store's temporary
//! directory is dropped with the writer. The files are then installed without hashing them
//! again ([`mig_checkpoint::CheckpointWriter::commit_received_hashed`]) and with a stamp, so
//! the restore does not hash them either.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mig_checkpoint::{Checkpoint, FileEntry, MANIFEST_FILE, Manifest, Store};
use sha2::{Digest, Sha256};

use crate::containerd::ContainerInfo;

const MAGIC: &[u8; 8] = b"MIGSTRM1";
const TRAILER: &[u8; 4] = b"END1";
/// A container record larger than this is not a container record.
const MAX_INFO_LEN: u32 = 4 << 20;
/// Manifests list a few files each; this bound only stops a hostile length from allocating.
const MAX_MANIFEST_LEN: u32 = 64 << 20;
/// Read and write size for file data: few syscalls, and big blocks for zstd.
const COPY_BUF: usize = 1 << 20;
/// Buffers in flight between the receiver's decompressing and writing threads.
const PIPELINE_DEPTH: usize = 4;

/// What went wrong while sending or receiving a checkpoint stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading, writing or (de)compressing failed; the peer may have gone away.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The stream does not follow the format above.
    #[error("malformed checkpoint stream: {0}")]
    Malformed(String),
    /// A file arrived (or was read on the origin) with other content than the manifest lists.
    #[error(
        "checksum mismatch for {path}: manifest says sha256 {expected} ({expected_size} bytes), got {found} ({found_size} bytes)"
    )]
    ChecksumMismatch {
        /// The file's path inside the checkpoint.
        path: String,
        /// The manifest's sha256.
        expected: String,
        /// The sha256 of the bytes seen.
        found: String,
        /// The manifest's size.
        expected_size: u64,
        /// The number of bytes seen.
        found_size: u64,
    },
    /// The checkpoint store refused the checkpoint (opening, verifying, installing it).
    #[error("checkpoint store: {0}")]
    Store(#[from] mig_checkpoint::Error),
    /// The stream is for another workload than the receiver accepts.
    #[error("refused checkpoint: {0}")]
    Refused(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StreamError {
    let what = what.into();
    move |source| StreamError::Io { what, source }
}

/// Byte counts of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes of checkpoint files (manifest included).
    pub raw_bytes: u64,
    /// Bytes on the wire, after compression.
    pub wire_bytes: u64,
}

/// Counts bytes going through a reader or writer.
struct Counting<T> {
    inner: T,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Streams the checkpoint in `dir` with the container record `info` into `out`, compressed at
/// zstd `level`. Fails if a file no longer matches its manifest entry.
pub fn send_checkpoint<W: Write>(
    dir: &Path,
    info: &ContainerInfo,
    out: W,
    level: i32,
) -> Result<StreamStats, StreamError> {
    let checkpoint = Checkpoint::open(dir)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_bytes = std::fs::read(&manifest_path)
        .map_err(io_err(format!("read {}", manifest_path.display())))?;
    let info_bytes = serde_json::to_vec(info)
        .map_err(|e| StreamError::Malformed(format!("cannot encode container record: {e}")))?;

    let counting = Counting {
        inner: out,
        count: 0,
    };
    let mut z = zstd::Encoder::new(counting, level).map_err(io_err("start zstd encoder"))?;
    let send = |z: &mut dyn Write, bytes: &[u8]| z.write_all(bytes).map_err(io_err("send"));
    send(&mut z, MAGIC)?;
    send(&mut z, &len_prefix(info_bytes.len())?)?;
    send(&mut z, &info_bytes)?;
    send(&mut z, &len_prefix(manifest_bytes.len())?)?;
    send(&mut z, &manifest_bytes)?;
    send(&mut z, &header_digest(&info_bytes, &manifest_bytes))?;
    // The receiver hashes every byte against the manifest, so hashing here again only moves
    // the error for a file changed since the checkpoint to the origin. The writer's stamp
    // says (from metadata alone) that the files are still what it hashed; without a valid
    // one the sender hashes what it reads, as before.
    let trusted = match checkpoint.stamp_status() {
        Ok(()) => true,
        Err(reason) => {
            tracing::info!(dir = %dir.display(), %reason, "hashing the checkpoint while sending");
            false
        }
    };
    let mut buf = vec![0u8; COPY_BUF];
    let mut raw = manifest_bytes.len() as u64;
    for entry in checkpoint.files() {
        let path = dir.join(&entry.path);
        let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
        let mut hasher = (!trusted).then(Sha256::new);
        let n = copy_hashing(
            &mut file.take(entry.size.saturating_add(1)),
            &mut z,
            hasher.as_mut(),
            &mut buf,
        )
        .map_err(io_err(format!("send {}", path.display())))?;
        let found = hasher.map(|h| hex(&h.finalize()));
        if n != entry.size || found.as_ref().is_some_and(|f| f != &entry.sha256) {
            return Err(StreamError::ChecksumMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                found: found.unwrap_or_else(|| "(not hashed: size differs)".into()),
                expected_size: entry.size,
                found_size: n,
            });
        }
        raw += n;
    }
    send(&mut z, TRAILER)?;
    let mut counting = z.finish().map_err(io_err("finish zstd stream"))?;
    counting.flush().map_err(io_err("flush"))?;
    Ok(StreamStats {
        raw_bytes: raw,
        wire_bytes: counting.count,
    })
}

fn header_digest(info: &[u8], manifest: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((info.len() as u64).to_be_bytes());
    h.update(info);
    h.update(manifest);
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn len_prefix(len: usize) -> Result<[u8; 4], StreamError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| StreamError::Malformed(format!("header of {len} bytes is too long")))
}

/// A received and installed checkpoint.
#[derive(Debug)]
pub struct Received {
    /// The container record sent with it.
    pub info: ContainerInfo,
    /// The checkpoint, now the pending one of its workload in the store.
    pub checkpoint: Checkpoint,
    /// Byte counts.
    pub stats: StreamStats,
}

/// Reads one checkpoint stream from `input` into `store`.
///
/// `accept` sees the container record and manifest before anything is written and may refuse
/// the stream (wrong workload, namespace not served here). On any error the partly written
/// checkpoint is removed (the store writer is dropped) and the previous checkpoint of the
/// workload, if any, stays as it was.
pub fn receive_checkpoint<R: Read>(
    input: R,
    store: &Store,
    accept: impl FnOnce(&ContainerInfo, &Manifest) -> Result<(), String>,
) -> Result<Received, StreamError> {
    let mut counting = Counting {
        inner: input,
        count: 0,
    };
    let mut z = zstd::Decoder::new(&mut counting).map_err(io_err("start zstd decoder"))?;
    let mut magic = [0u8; 8];
    read_exact(&mut z, &mut magic, "stream header")?;
    if &magic != MAGIC {
        return Err(StreamError::Malformed(format!(
            "stream starts with {magic:?}, expected {MAGIC:?}"
        )));
    }
    let info_bytes = read_block(&mut z, MAX_INFO_LEN, "container record")?;
    let manifest_bytes = read_block(&mut z, MAX_MANIFEST_LEN, "manifest")?;
    let mut digest = [0u8; 32];
    read_exact(&mut z, &mut digest, "header digest")?;
    if digest != header_digest(&info_bytes, &manifest_bytes) {
        return Err(StreamError::ChecksumMismatch {
            path: "<container record and manifest>".into(),
            expected: hex(&digest),
            found: hex(&header_digest(&info_bytes, &manifest_bytes)),
            expected_size: (info_bytes.len() + manifest_bytes.len()) as u64,
            found_size: (info_bytes.len() + manifest_bytes.len()) as u64,
        });
    }
    let info: ContainerInfo = serde_json::from_slice(&info_bytes)
        .map_err(|e| StreamError::Malformed(format!("container record: {e}")))?;
    let manifest = Manifest::parse(&manifest_bytes, Path::new("<stream>"))?;
    accept(&info, &manifest).map_err(StreamError::Refused)?;

    let writer = store.begin(&manifest.identity)?;
    let dir = writer.dir().to_path_buf();
    write_new(&dir.join(MANIFEST_FILE), &manifest_bytes)?;
    let hashed = receive_files(&mut z, &dir, &manifest.files)?;
    let raw = manifest_bytes.len() as u64 + hashed.iter().map(|f| f.size).sum::<u64>();
    let mut trailer = [0u8; 4];
    read_exact(&mut z, &mut trailer, "stream trailer")?;
    if &trailer != TRAILER {
        return Err(StreamError::Malformed(format!(
            "expected trailer {TRAILER:?} after the last file, found {trailer:?}"
        )));
    }
    let mut rest = [0u8; 1];
    if z.read(&mut rest).map_err(io_err("read after trailer"))? != 0 {
        return Err(StreamError::Malformed("data after the trailer".to_string()));
    }
    drop(z);
    // Every file was hashed above as it was written and matched its manifest entry.
    let checkpoint = writer.commit_received_hashed(&hashed)?;
    Ok(Received {
        info,
        checkpoint,
        stats: StreamStats {
            raw_bytes: raw,
            wire_bytes: counting.count,
        },
    })
}

/// What the receiving thread hands the thread that writes files.
enum Job {
    /// The next file to fill.
    File(File),
    /// The next `.1` bytes of the current file, in the buffer `.0`.
    Data(Vec<u8>, usize),
    /// The current file is complete: reply whether it was written.
    End,
}

/// Receives the files listed in `entries` from `z` into `dir`, each compared with its
/// manifest entry as soon as it is complete; returns what was written, as entries.
///
/// Two threads: this one reads the network, decompresses and hashes, a second one writes, with
/// a few 1 MiB buffers going round between them. (Hashing here rather than with the writes
/// balances the two: decompressing is the cheapest step, and writing into the page cache, new
/// memory for the kernel, is not cheap on a VM.)
fn receive_files(
    z: &mut impl Read,
    dir: &Path,
    entries: &[FileEntry],
) -> Result<Vec<FileEntry>, StreamError> {
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(PIPELINE_DEPTH);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    for _ in 0..=PIPELINE_DEPTH {
        let _ = free_tx.send(vec![0u8; COPY_BUF]);
    }
    std::thread::scope(|scope| {
        scope.spawn(move || write_files(job_rx, free_tx, done_tx));
        let result = decompress_files(z, dir, entries, &job_tx, &free_rx, &done_rx);
        drop(job_tx);
        result
    })
}

fn decompress_files(
    z: &mut impl Read,
    dir: &Path,
    entries: &[FileEntry],
    jobs: &std::sync::mpsc::SyncSender<Job>,
    free: &std::sync::mpsc::Receiver<Vec<u8>>,
    done: &std::sync::mpsc::Receiver<io::Result<()>>,
) -> Result<Vec<FileEntry>, StreamError> {
    let gone = |()| StreamError::Io {
        what: "write received files".into(),
        source: io::Error::other("the writing thread ended early"),
    };
    let mut hashed = Vec::with_capacity(entries.len());
    for entry in entries {
        let path = dir.join(&entry.path);
        if let Some(parent) = path.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err(format!("create {}", parent.display())))?;
        }
        jobs.send(Job::File(new_file(&path)?))
            .map_err(|_| gone(()))?;
        let mut hasher = Sha256::new();
        let mut left = entry.size;
        while left > 0 {
            let mut buf = free.recv().map_err(|_| gone(()))?;
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let n = read_full(z, &mut buf[..want])
                .map_err(io_err(format!("receive {}", entry.path)))?;
            left -= n as u64;
            if n < want {
                return Err(StreamError::Malformed(format!(
                    "stream ended inside {} after {} of {} bytes",
                    entry.path,
                    entry.size - left,
                    entry.size
                )));
            }
            hasher.update(&buf[..n]);
            jobs.send(Job::Data(buf, n)).map_err(|_| gone(()))?;
        }
        jobs.send(Job::End).map_err(|_| gone(()))?;
        let found = hex(&hasher.finalize());
        done.recv()
            .map_err(|_| gone(()))?
            .map_err(io_err(format!("write {}", path.display())))?;
        if found != entry.sha256 {
            return Err(StreamError::ChecksumMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                found,
                expected_size: entry.size,
                found_size: entry.size,
            });
        }
        hashed.push(FileEntry {
            path: entry.path.clone(),
            size: entry.size,
            sha256: found,
        });
    }
    Ok(hashed)
}

/// The writing thread of [`receive_files`]: writes what it is handed, returns the buffers,
/// and answers each [`Job::End`] with the first write error, if any.
fn write_files(
    jobs: std::sync::mpsc::Receiver<Job>,
    free: std::sync::mpsc::Sender<Vec<u8>>,
    done: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let mut current: Option<File> = None;
    let mut failed: Option<io::Error> = None;
    for job in jobs {
        match job {
            Job::File(file) => {
                current = Some(file);
                failed = None;
            }
            Job::Data(buf, n) => {
                if let (None, Some(file)) = (&failed, current.as_mut())
                    && let Err(e) = file.write_all(&buf[..n])
                {
                    failed = Some(e);
                }
                let _ = free.send(buf);
            }
            Job::End => {
                let result = match (failed.take(), current.take()) {
                    (Some(e), _) => Err(e),
                    (None, Some(_)) => Ok(()),
                    (None, None) => Err(io::Error::other("no file was started")),
                };
                if done.send(result).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Malformed(format!("stream ended inside the {what}"))
        } else {
            StreamError::Io {
                what: format!("read {what}"),
                source: e,
            }
        }
    })
}

fn read_block(r: &mut impl Read, max: u32, what: &str) -> Result<Vec<u8>, StreamError> {
    let mut len = [0u8; 4];
    read_exact(r, &mut len, what)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(StreamError::Malformed(format!(
            "{what} of {len} bytes, expected at most {max}"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact(r, &mut buf, what)?;
    Ok(buf)
}

fn new_file(path: &PathBuf) -> Result<File, StreamError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("create {}", path.display())))
}

fn write_new(path: &PathBuf, bytes: &[u8]) -> Result<(), StreamError> {
    new_file(path)?
        .write_all(bytes)
        .map_err(io_err(format!("write {}", path.display())))
}

/// Copies `from` to `to` through `buf`, feeding `hasher` with every byte, so each file is
/// read (or written) exactly once; returns the number of bytes copied.
fn copy_hashing(
    from: &mut impl Read,
    to: &mut impl Write,
    mut hasher: Option<&mut Sha256>,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mig_checkpoint::{EngineInfo, WorkloadIdentity};

    pub(crate) fn sample_checkpoint(store: &Store, id: &str, payload: &[u8]) -> Checkpoint {
        let identity = WorkloadIdentity::container("default", id).expect("identity");
        let writer = store.begin(&identity).expect("begin");
        let images = writer.images_dir().expect("images");
        std::fs::write(images.join("pages-1.img"), payload).expect("write");
        std::fs::write(images.join("core.img"), b"core").expect("write");
        writer
            .commit(
                EngineInfo::new("criu", "4.2.1"),
                "docker.io/library/busybox:latest",
            )
            .expect("commit")
    }

    fn info(id: &str) -> ContainerInfo {
        ContainerInfo {
            namespace: "default".into(),
            id: id.into(),
            image: "docker.io/library/busybox:latest".into(),
            runtime: "io.containerd.mig.v2".into(),
            labels: Default::default(),
            spec: serde_json::json!({}),
        }
    }

    fn encode(dir: &Path, id: &str) -> Vec<u8> {
        let mut wire = Vec::new();
        send_checkpoint(dir, &info(id), &mut wire, 1).expect("send");
        wire
    }

    #[test]
    fn round_trip_installs_identical_checkpoint() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let payload = vec![7u8; 300_000];
        let cp = sample_checkpoint(&origin_store, "counter", &payload);
        let wire = encode(cp.dir(), "counter");
        assert!(wire.len() < payload.len() / 10, "zstd should shrink zeros");
        let got = receive_checkpoint(&wire[..], &dest_store, |_, _| Ok(())).expect("receive");
        assert_eq!(got.info.id, "counter");
        assert_eq!(got.stats.wire_bytes, wire.len() as u64);
        got.checkpoint.verify().expect("verify");
        // Hashed while streaming, so installed with a valid stamp: the restore will not hash.
        assert_eq!(got.checkpoint.stamp_status(), Ok(()));
        let received =
            std::fs::read(got.checkpoint.images_dir().join("pages-1.img")).expect("read");
        assert_eq!(received, payload);
        let identity = WorkloadIdentity::container("default", "counter").expect("id");
        assert!(dest_store.pending(&identity).expect("pending").is_some());
    }

    /// Re-encodes `wire` with one byte of the decompressed payload flipped at `offset` from
    /// the end, so the damage passes zstd and must be caught by the per-file sha256.
    fn flip_payload_byte(wire: &[u8], from_end: usize) -> Vec<u8> {
        let mut plain = zstd::decode_all(wire).expect("decode");
        let at = plain.len() - from_end;
        plain[at] ^= 0x5a;
        zstd::encode_all(&plain[..], 1).expect("encode")
    }

    fn store_is_empty(store: &Store) -> bool {
        std::fs::read_dir(store.root())
            .expect("read")
            .next()
            .is_none()
    }

    #[test]
    fn corrupted_byte_is_refused_and_temp_removed() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let cp = sample_checkpoint(&origin_store, "counter", &[1u8; 4096]);
        // Inside the last file, just before the 4-byte trailer.
        let wire = flip_payload_byte(&encode(cp.dir(), "counter"), 10);
        let err = receive_checkpoint(&wire[..], &dest_store, |_, _| Ok(())).expect_err("refused");
        assert!(
            matches!(err, StreamError::ChecksumMismatch { .. }),
            "unexpected error {err}"
        );
        assert!(store_is_empty(&dest_store), "temp dir left behind");
    }

    #[test]
    fn corrupted_container_record_is_refused() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let cp = sample_checkpoint(&origin_store, "counter", b"x");
        let mut plain = zstd::decode_all(&encode(cp.dir(), "counter")[..]).expect("decode");
        let at = plain
            .windows(7)
            .position(|w| w == b"busybox")
            .expect("image in record");
        plain[at] = b'B';
        let wire = zstd::encode_all(&plain[..], 1).expect("encode");
        let err = receive_checkpoint(&wire[..], &dest_store, |_, _| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("container record"), "{err}");
        assert!(store_is_empty(&dest_store));
    }

    #[test]
    fn corrupted_compressed_byte_is_refused() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let cp = sample_checkpoint(&origin_store, "counter", &payload);
        let mut wire = encode(cp.dir(), "counter");
        let mid = wire.len() / 2;
        wire[mid] ^= 0xff;
        assert!(receive_checkpoint(&wire[..], &dest_store, |_, _| Ok(())).is_err());
        assert!(store_is_empty(&dest_store), "temp dir left behind");
    }

    #[test]
    fn truncated_stream_is_refused() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let cp = sample_checkpoint(&origin_store, "counter", &[3u8; 50_000]);
        let plain = zstd::decode_all(&encode(cp.dir(), "counter")[..]).expect("decode");
        let cut = zstd::encode_all(&plain[..plain.len() - 100], 1).expect("encode");
        let err = receive_checkpoint(&cut[..], &dest_store, |_, _| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("ended"), "{err}");
        assert!(store_is_empty(&dest_store));
    }

    #[test]
    fn refusal_by_receiver_writes_nothing() {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        let cp = sample_checkpoint(&origin_store, "counter", b"x");
        let wire = encode(cp.dir(), "counter");
        let err = receive_checkpoint(&wire[..], &dest_store, |_, _| Err("not here".into()))
            .expect_err("refused");
        assert!(matches!(err, StreamError::Refused(_)));
        assert!(store_is_empty(&dest_store));
    }

    #[test]
    fn origin_file_changed_since_checkpoint_is_not_sent() {
        let origin = tempfile::tempdir().expect("tmp");
        let store = Store::open(origin.path().join("s")).expect("store");
        let cp = sample_checkpoint(&store, "counter", b"abc");
        std::fs::write(cp.images_dir().join("core.img"), b"CORE").expect("write");
        let err = send_checkpoint(cp.dir(), &info("counter"), io::sink(), 1).expect_err("refused");
        assert!(matches!(err, StreamError::ChecksumMismatch { .. }), "{err}");
    }
}
