//! The wire format of a checkpoint moving between two node agents, and its two ends.
//!
//! One container's checkpoint travels as one zstd-compressed stream:
//!
//! ```text
//! "MIGSTRM2"                       magic and format version
//! u32 BE length + JSON             the container's record (ContainerInfo): what the
//!                                  destination needs to create it again; kept out of the
//!                                  checkpoint directory, whose content the manifest fixes
//! u32 BE length + JSON             the workload identity: the store key the files go to
//! live records, any number:        bytes of a CRIU page image sent while CRIU writes it:
//!   'D' u16 BE length + path       its path in the checkpoint (images/pages-N.img)
//!       u64 BE offset              how much of it was sent before (records are in order)
//!       u32 BE length + bytes
//! 'M' u32 BE length + manifest     the checkpoint's manifest, byte for byte, once committed
//! 32 bytes                         sha256 of the record, identity and manifest: the record is
//!                                  not covered by the manifest, and a damaged record would
//!                                  create a different container
//! file bytes                       every file listed in the manifest, in manifest order, each
//!                                  from where its live records left off (all of it for most)
//!                                  to the size the manifest says
//! "END1"                           trailer: a stream cut short never looks complete
//! ```
//!
//! Live records let the transfer overlap the engine's dump: the origin follows the page images
//! in the store's temporary directory as CRIU appends to them ([`send_checkpoint_live`]) and
//! sends the rest once the checkpoint is committed. Nothing is trusted for it: the receiver
//! hashes every byte of every file, live or not, and compares the result with the manifest,
//! which comes last; a page image that changed after part of it was sent fails that check.
//!
//! Paths never travel on their own: live paths are checked like manifest paths (and must be
//! page images), the others come from the manifest, which [`Manifest::parse`] has already
//! checked to stay inside the checkpoint directory. The sender reads straight from the
//! checkpoint directory (no second copy on the origin); it hashes what it sends only when the
//! checkpoint's `verified.json` stamp (written by the shim's commit after hashing) does not
//! vouch for the files, since the receiver checks every byte anyway. Neither end copies file
//! bytes in user space (see [`crate::zframes`]): the sender frames the buffers it read into,
//! the receiver hashes and writes slices of the chunks the network brought. The receiver
//! hashes what it writes (as it decodes; a second thread writes) and compares each file with
//! its manifest entry as soon as the file is complete, so a corrupted stream is refused at the
//! first bad file and the store's temporary directory is dropped with the writer. The files
//! are then installed without hashing them again
//! ([`mig_checkpoint::CheckpointWriter::commit_received_hashed`]) and with a stamp, so the
//! restore does not hash them either.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use mig_checkpoint::{
    Checkpoint, FileEntry, IMAGES_DIR, MANIFEST_FILE, Manifest, Store, WorkloadIdentity,
};
use sha2::{Digest, Sha256};

use crate::containerd::ContainerInfo;
use crate::zframes::{ChunkSource, FrameReader, FrameWriter, ReadChunks, Sink};

const MAGIC: &[u8; 8] = b"MIGSTRM2";
const TRAILER: &[u8; 4] = b"END1";
const TAG_LIVE: u8 = b'D';
const TAG_MANIFEST: u8 = b'M';
/// A container record larger than this is not a container record.
const MAX_INFO_LEN: u32 = 4 << 20;
/// Identities are a few names.
const MAX_IDENTITY_LEN: u32 = 64 << 10;
/// Manifests list a few files each; this bound only stops a hostile length from allocating.
const MAX_MANIFEST_LEN: u32 = 64 << 20;
/// Read size for file data: few syscalls, and big blocks for zstd. Also the largest live
/// record.
const COPY_BUF: usize = 1 << 20;
/// Pieces of files in flight between the receiver's decoding and writing threads (at most
/// one frame's worth each: 128 KiB when stored, 1 MiB when compressed).
const PIPELINE_DEPTH: usize = 32;
/// Read buffers the sender keeps for reuse once what it sent from them is gone.
const POOL_KEEP: usize = 64;
/// How often the live sender looks for new data when there was none.
const LIVE_POLL: Duration = Duration::from_millis(2);

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
    /// The checkpoint a live send followed failed or did not complete.
    #[error("no checkpoint to send: {0}")]
    SourceFailed(String),
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
    /// Of `raw_bytes`, those sent while the checkpoint was being written (live records).
    pub live_bytes: u64,
    /// Stream bytes the sender stored rather than compressed, as they did not compress
    /// ([`crate::zframes`]); 0 on the receiving end.
    pub stored_bytes: u64,
}

/// Streams the complete checkpoint in `dir` with the container record `info` into `out`,
/// compressed at zstd `level`. Fails if a file no longer matches its manifest entry.
pub fn send_checkpoint<S: Sink>(
    dir: &Path,
    info: &ContainerInfo,
    out: S,
    level: i32,
) -> Result<StreamStats, StreamError> {
    let checkpoint = Checkpoint::open(dir)?;
    let s = Sender::start(info, &checkpoint.identity().clone(), out, level)?;
    s.finish(dir, &checkpoint, BTreeMap::new())
}

/// How the checkpoint a live send follows is doing, as the caller knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveOutcome {
    /// Not committed yet: the engine may still be writing.
    Pending,
    /// Committed to the store.
    Committed,
    /// It failed: no checkpoint will come.
    Failed(String),
}

/// Which checkpoint a live send follows, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Follow<'a> {
    /// The store the checkpoint is written into.
    pub store: &'a Store,
    /// Its workload.
    pub identity: &'a WorkloadIdentity,
    /// When its checkpoint was asked for: temporary directories begun before are leftovers.
    pub since: std::time::SystemTime,
    /// When to give up waiting for it.
    pub deadline: Instant,
}

/// Streams the checkpoint `follow` names while it is being written: the CRIU page images are
/// sent as they grow in the store's temporary directory, the rest once `outcome` says the
/// checkpoint is committed. Gives up with the reason `outcome` gives for a failure, or at the
/// deadline.
pub fn send_checkpoint_live<S: Sink>(
    follow: Follow<'_>,
    info: &ContainerInfo,
    out: S,
    level: i32,
    outcome: &mut dyn FnMut() -> LiveOutcome,
) -> Result<StreamStats, StreamError> {
    let Follow {
        store,
        identity,
        since,
        deadline,
    } = follow;
    let mut s = Sender::start(info, identity, out, level)?;
    let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
    let mut writing: Option<PathBuf> = None;
    loop {
        // Sampled before reading: once committed, what is read next is everything.
        let state = outcome();
        if writing.is_none() {
            writing = store.writing(identity, since)?;
        }
        if let Some(tmp) = &writing {
            follow_new_page_images(&tmp.join(IMAGES_DIR), &mut followed);
        }
        let mut progressed = false;
        for (path, f) in &mut followed {
            progressed |= s.send_live(path, f)?;
        }
        match state {
            LiveOutcome::Committed => break,
            LiveOutcome::Failed(reason) => return Err(StreamError::SourceFailed(reason)),
            LiveOutcome::Pending => {}
        }
        if !progressed {
            if Instant::now() >= deadline {
                return Err(StreamError::SourceFailed(format!(
                    "the checkpoint of {identity} was not complete in time"
                )));
            }
            std::thread::sleep(LIVE_POLL);
        }
    }
    let dir = store.path_for(identity);
    let checkpoint = Checkpoint::open(&dir)?;
    s.finish(&dir, &checkpoint, followed)
}

/// A page image followed while it is written: the open file (it stays valid when the
/// directory is renamed into place) and how much of it was sent.
struct Followed {
    file: File,
    sent: u64,
}

/// Opens the page images in `images` not followed yet. Missing directories (not created yet,
/// or renamed away) are not an error: the files already open are still read.
fn follow_new_page_images(images: &Path, followed: &mut BTreeMap<String, Followed>) {
    let Ok(entries) = std::fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("pages-") && name.ends_with(".img")) {
            continue;
        }
        let path = format!("{IMAGES_DIR}/{name}");
        if followed.contains_key(&path) {
            continue;
        }
        if let Ok(file) = File::open(entry.path()) {
            followed.insert(path, Followed { file, sent: 0 });
        }
    }
}

/// Read buffers, each back in the pool once the last piece sent from it is dropped (written
/// to the socket): the sender hands what it reads on without copying it, and reuses memory
/// the kernel has already given it rather than asking for new pages for every read.
#[derive(Clone, Default)]
struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// A buffer of a [`BufPool`] with `len` bytes read into it.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: BufPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = self.pool.0.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_KEEP {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

impl BufPool {
    /// Reads into a buffer of the pool with `read` (given `COPY_BUF` bytes to fill); the bytes
    /// read, or `None` when there were none.
    fn read(&self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<Option<Bytes>> {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; COPY_BUF]);
        let len = read(&mut buf)?;
        if len == 0 {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
            return Ok(None);
        }
        Ok(Some(Bytes::from_owner(Pooled {
            buf,
            len,
            pool: self.clone(),
        })))
    }
}

/// The sending end: the compressed output and its counters.
struct Sender<S: Sink> {
    z: FrameWriter<S>,
    info_bytes: Vec<u8>,
    identity_bytes: Vec<u8>,
    raw: u64,
    live: u64,
    pool: BufPool,
}

impl<S: Sink> Sender<S> {
    fn start(
        info: &ContainerInfo,
        identity: &WorkloadIdentity,
        out: S,
        level: i32,
    ) -> Result<Self, StreamError> {
        let info_bytes = serde_json::to_vec(info)
            .map_err(|e| StreamError::Malformed(format!("cannot encode container record: {e}")))?;
        let identity_bytes = serde_json::to_vec(identity)
            .map_err(|e| StreamError::Malformed(format!("cannot encode identity: {e}")))?;
        let z = FrameWriter::new(out, level).map_err(io_err("start zstd encoder"))?;
        let mut s = Self {
            z,
            info_bytes,
            identity_bytes,
            raw: 0,
            live: 0,
            pool: BufPool::default(),
        };
        s.send(MAGIC)?;
        let (info, identity) = (s.info_bytes.clone(), s.identity_bytes.clone());
        s.send(&len_prefix(info.len())?)?;
        s.send(&info)?;
        s.send(&len_prefix(identity.len())?)?;
        s.send(&identity)?;
        Ok(s)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.z.write_all(bytes).map_err(io_err("send"))
    }

    /// Sends what was appended to `f` since the last call; whether there was anything.
    fn send_live(&mut self, path: &str, f: &mut Followed) -> Result<bool, StreamError> {
        let mut any = false;
        loop {
            let Some(data) = self
                .pool
                .read(|buf| f.file.read_at(buf, f.sent))
                .map_err(io_err(format!("read {path}")))?
            else {
                return Ok(any);
            };
            let n = data.len();
            let path_len = u16::try_from(path.len())
                .map_err(|_| StreamError::Malformed(format!("path {path} is too long")))?;
            let mut head = Vec::with_capacity(1 + 2 + path.len() + 8 + 4);
            head.push(TAG_LIVE);
            head.extend_from_slice(&path_len.to_be_bytes());
            head.extend_from_slice(path.as_bytes());
            head.extend_from_slice(&f.sent.to_be_bytes());
            head.extend_from_slice(&(n as u32).to_be_bytes());
            self.z.write_all(&head).map_err(io_err("send"))?;
            self.z.write_bytes(data).map_err(io_err("send"))?;
            f.sent += n as u64;
            self.live += n as u64;
            any = true;
            if n < COPY_BUF {
                return Ok(any);
            }
        }
    }

    /// Sends what `from` reads, feeding `hasher` with every byte, so each file is read exactly
    /// once and not copied; returns the number of bytes sent.
    fn send_file(
        &mut self,
        from: &mut impl Read,
        mut hasher: Option<&mut Sha256>,
    ) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            let data = self.pool.read(|buf| {
                loop {
                    match from.read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        read => return read,
                    }
                }
            })?;
            let Some(data) = data else {
                return Ok(total);
            };
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&data);
            }
            total += data.len() as u64;
            self.z.write_bytes(data)?;
        }
    }

    /// The manifest, then every file from where its live records left off, then the trailer.
    fn finish(
        mut self,
        dir: &Path,
        checkpoint: &Checkpoint,
        mut followed: BTreeMap<String, Followed>,
    ) -> Result<StreamStats, StreamError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = std::fs::read(&manifest_path)
            .map_err(io_err(format!("read {}", manifest_path.display())))?;
        self.send(&[TAG_MANIFEST])?;
        self.send(&len_prefix(manifest_bytes.len())?)?;
        self.send(&manifest_bytes)?;
        let digest = header_digest(&self.info_bytes, &self.identity_bytes, &manifest_bytes);
        self.send(&digest)?;
        self.raw += manifest_bytes.len() as u64;
        // The receiver hashes every byte against the manifest, so hashing here again only
        // moves the error for a file changed since the checkpoint to the origin. The writer's
        // stamp says (from metadata alone) that the files are still what it hashed; without a
        // valid one the sender hashes what it reads, as before (live files excepted: part of
        // them is gone already, the receiver decides).
        let trusted = match checkpoint.stamp_status() {
            Ok(()) => true,
            Err(reason) => {
                tracing::info!(dir = %dir.display(), %reason, "hashing the checkpoint while sending");
                false
            }
        };
        for entry in checkpoint.files() {
            let (n, found) = match followed.remove(&entry.path) {
                Some(f) => {
                    let Some(rest) = entry.size.checked_sub(f.sent) else {
                        return Err(size_mismatch(entry, f.sent));
                    };
                    // `read_at` from where the live records stopped, through a positioned
                    // reader: the file may have been read to its end already.
                    let mut reader = PositionedReader {
                        file: &f.file,
                        at: f.sent,
                    };
                    let n = self
                        .send_file(&mut (&mut reader).take(rest.saturating_add(1)), None)
                        .map_err(io_err(format!("send {}", entry.path)))?;
                    (f.sent + n, None)
                }
                None => {
                    let path = dir.join(&entry.path);
                    let file =
                        File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
                    let mut hasher = (!trusted).then(Sha256::new);
                    let n = self
                        .send_file(
                            &mut file.take(entry.size.saturating_add(1)),
                            hasher.as_mut(),
                        )
                        .map_err(io_err(format!("send {}", path.display())))?;
                    (n, hasher.map(|h| hex(&h.finalize())))
                }
            };
            if n != entry.size || found.as_ref().is_some_and(|f| f != &entry.sha256) {
                return Err(StreamError::ChecksumMismatch {
                    path: entry.path.clone(),
                    expected: entry.sha256.clone(),
                    found: found.unwrap_or_else(|| "(not hashed: size differs)".into()),
                    expected_size: entry.size,
                    found_size: n,
                });
            }
            self.raw += entry.size;
        }
        if let Some(path) = followed.keys().next() {
            return Err(StreamError::Malformed(format!(
                "{path} was sent while the checkpoint was written, but the checkpoint does not \
                 list it"
            )));
        }
        self.send(TRAILER)?;
        self.z.flush().map_err(io_err("finish the stream"))?;
        let framed = self.z.stats();
        Ok(StreamStats {
            raw_bytes: self.raw,
            wire_bytes: framed.wire,
            live_bytes: self.live,
            stored_bytes: framed.stored,
        })
    }
}

fn size_mismatch(entry: &FileEntry, found: u64) -> StreamError {
    StreamError::ChecksumMismatch {
        path: entry.path.clone(),
        expected: entry.sha256.clone(),
        found: "(not hashed: size differs)".into(),
        expected_size: entry.size,
        found_size: found,
    }
}

/// Reads a file from a position with `read_at`, leaving the file's own offset alone.
struct PositionedReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn header_digest(info: &[u8], identity: &[u8], manifest: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((info.len() as u64).to_be_bytes());
    h.update(info);
    h.update((identity.len() as u64).to_be_bytes());
    h.update(identity);
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
/// `accept` sees the container record and manifest before the checkpoint is installed and
/// may refuse the stream (wrong workload, namespace not served here); live records that came
/// before the manifest are written into the store's temporary directory only. On any error
/// the partly written checkpoint is removed (the store writer is dropped) and the previous
/// checkpoint of the workload, if any, stays as it was.
pub fn receive_checkpoint<R: Read>(
    input: R,
    store: &Store,
    memory_hint: Option<u64>,
    accept: impl FnOnce(&ContainerInfo, &Manifest) -> Result<(), String>,
) -> Result<Received, StreamError> {
    receive_checkpoint_chunks(ReadChunks::new(input), store, memory_hint, accept)
}

/// [`receive_checkpoint`] from chunks as they arrive (an HTTP body's): the bytes of stored
/// frames are hashed and written from the chunks themselves, not copied.
pub fn receive_checkpoint_chunks(
    input: impl ChunkSource,
    store: &Store,
    memory_hint: Option<u64>,
    accept: impl FnOnce(&ContainerInfo, &Manifest) -> Result<(), String>,
) -> Result<Received, StreamError> {
    let mut z = FrameReader::new(input);
    let mut magic = [0u8; 8];
    read_exact(&mut z, &mut magic, "stream header")?;
    if &magic != MAGIC {
        return Err(StreamError::Malformed(format!(
            "stream starts with {magic:?}, expected {MAGIC:?}"
        )));
    }
    let info_bytes = read_block(&mut z, MAX_INFO_LEN, "container record")?;
    let identity_bytes = read_block(&mut z, MAX_IDENTITY_LEN, "workload identity")?;
    let identity: WorkloadIdentity = serde_json::from_slice(&identity_bytes)
        .map_err(|e| StreamError::Malformed(format!("workload identity: {e}")))?;
    // The origin wrote it in memory: so does this node if it has the room (see
    // `Store::begin_transient`).
    let writer = match memory_hint {
        Some(hint) => store.begin_transient(&identity, hint)?,
        None => store.begin(&identity)?,
    };
    let dir = writer.dir().to_path_buf();
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(PIPELINE_DEPTH);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let (info, hashed, live) = std::thread::scope(|scope| {
        scope.spawn(move || write_files(job_rx, done_tx));
        let mut files = Files {
            dir: &dir,
            jobs: job_tx,
            done: done_rx,
            open: BTreeMap::new(),
            next: 0,
            live: 0,
        };
        receive_body(
            &mut z,
            &mut files,
            &info_bytes,
            &identity,
            &identity_bytes,
            accept,
        )
    })?;
    let raw = hashed.iter().map(|f| f.size).sum::<u64>();
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
    let wire_bytes = z.wire_bytes();
    drop(z);
    let manifest_len = std::fs::metadata(dir.join(MANIFEST_FILE))
        .map(|m| m.len())
        .unwrap_or_default();
    // Every file was hashed above as it was written and matched its manifest entry.
    let checkpoint = writer.commit_received_hashed(&hashed)?;
    Ok(Received {
        info,
        checkpoint,
        stats: StreamStats {
            raw_bytes: raw + manifest_len,
            wire_bytes,
            live_bytes: live,
            stored_bytes: 0,
        },
    })
}

/// Live records, then the manifest and the rest of every file; returns the container record,
/// what was written, as entries, and how many bytes came in live records.
fn receive_body(
    z: &mut FrameReader<impl ChunkSource>,
    files: &mut Files<'_>,
    info_bytes: &[u8],
    identity: &WorkloadIdentity,
    identity_bytes: &[u8],
    accept: impl FnOnce(&ContainerInfo, &Manifest) -> Result<(), String>,
) -> Result<(ContainerInfo, Vec<FileEntry>, u64), StreamError> {
    loop {
        let mut tag = [0u8; 1];
        read_exact(z, &mut tag, "record tag")?;
        match tag[0] {
            TAG_LIVE => files.receive_live(z)?,
            TAG_MANIFEST => break,
            other => {
                return Err(StreamError::Malformed(format!(
                    "unknown record tag {other:#04x}, expected 'D' (live data) or 'M' (manifest)"
                )));
            }
        }
    }
    let manifest_bytes = read_block(z, MAX_MANIFEST_LEN, "manifest")?;
    let mut digest = [0u8; 32];
    read_exact(z, &mut digest, "header digest")?;
    let computed = header_digest(info_bytes, identity_bytes, &manifest_bytes);
    if digest != computed {
        let len = (info_bytes.len() + identity_bytes.len() + manifest_bytes.len()) as u64;
        return Err(StreamError::ChecksumMismatch {
            path: "<container record, identity and manifest>".into(),
            expected: hex(&digest),
            found: hex(&computed),
            expected_size: len,
            found_size: len,
        });
    }
    let info: ContainerInfo = serde_json::from_slice(info_bytes)
        .map_err(|e| StreamError::Malformed(format!("container record: {e}")))?;
    let manifest = Manifest::parse(&manifest_bytes, Path::new("<stream>"))?;
    accept(&info, &manifest).map_err(StreamError::Refused)?;
    if &manifest.identity != identity {
        return Err(StreamError::Refused(format!(
            "the stream announced a checkpoint of {identity}, its manifest is for {}",
            manifest.identity
        )));
    }
    write_new(&files.dir.join(MANIFEST_FILE), &manifest_bytes)?;
    let mut hashed = Vec::with_capacity(manifest.files.len());
    for entry in &manifest.files {
        hashed.push(files.receive_rest(z, entry)?);
    }
    if let Some(path) = files.open.keys().next() {
        return Err(StreamError::Malformed(format!(
            "{path} was sent while the checkpoint was written, but its manifest does not list it"
        )));
    }
    Ok((info, hashed, files.live))
}

/// What the receiving thread hands the thread that writes files.
enum Job {
    /// A new file, by number.
    Open(usize, File),
    /// The next bytes of file `.0`.
    Data(usize, Bytes),
    /// File `.0` is complete: reply whether it was written.
    Close(usize),
}

/// A file being received: its number for the writing thread, its hash so far, its size so far.
struct Open {
    id: usize,
    hasher: Sha256,
    written: u64,
}

/// The receiving thread's side of the files: what is open, and the writing thread's channels.
///
/// Two threads: this one decodes what the network brought and hashes it, a second one writes
/// the same pieces (slices of the received chunks for stored frames: nothing is copied in
/// between). Hashing here rather than with the writes balances the two: decoding is the
/// cheapest step, and writing into the page cache, new memory for the kernel, is not cheap on
/// a VM.
struct Files<'a> {
    dir: &'a Path,
    jobs: std::sync::mpsc::SyncSender<Job>,
    done: std::sync::mpsc::Receiver<io::Result<()>>,
    open: BTreeMap<String, Open>,
    next: usize,
    /// Bytes received in live records.
    live: u64,
}

fn writer_gone() -> StreamError {
    StreamError::Io {
        what: "write received files".into(),
        source: io::Error::other("the writing thread ended early"),
    }
}

impl Files<'_> {
    /// Creates `path` (a checked relative path) and hands it to the writing thread.
    fn create(&mut self, path: &str) -> Result<Open, StreamError> {
        let full = self.dir.join(path);
        if let Some(parent) = full.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err(format!("create {}", parent.display())))?;
        }
        let id = self.next;
        self.next += 1;
        self.jobs
            .send(Job::Open(id, new_file(&full)?))
            .map_err(|_| writer_gone())?;
        Ok(Open {
            id,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Reads `len` bytes of file `f` from `z`, hashes and writes them.
    fn receive_data(
        &mut self,
        z: &mut FrameReader<impl ChunkSource>,
        f: &mut Open,
        path: &str,
        mut len: u64,
        expected_total: u64,
    ) -> Result<(), StreamError> {
        while len > 0 {
            let want = usize::try_from(len).unwrap_or(usize::MAX);
            let piece = match z.next_piece(want) {
                Ok(Some(piece)) => piece,
                Ok(None) => return Err(ended_inside(path, f.written, expected_total)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(ended_inside(path, f.written, expected_total));
                }
                Err(e) => return Err(io_err(format!("receive {path}"))(e)),
            };
            f.hasher.update(&piece);
            f.written += piece.len() as u64;
            len -= piece.len() as u64;
            self.jobs
                .send(Job::Data(f.id, piece))
                .map_err(|_| writer_gone())?;
        }
        Ok(())
    }

    /// One live record: bytes of a page image while the origin's engine writes it.
    fn receive_live(&mut self, z: &mut FrameReader<impl ChunkSource>) -> Result<(), StreamError> {
        let mut len = [0u8; 2];
        read_exact(z, &mut len, "live record")?;
        let mut path = vec![0u8; u16::from_be_bytes(len) as usize];
        read_exact(z, &mut path, "live record path")?;
        let path = String::from_utf8(path)
            .map_err(|_| StreamError::Malformed("live record path is not UTF-8".into()))?;
        let name = path.strip_prefix(&format!("{IMAGES_DIR}/")).unwrap_or("");
        if let Err(why) = mig_checkpoint::validate_relative_path(&path).and_then(|()| {
            (name.starts_with("pages-") && name.ends_with(".img") && !name.contains('/'))
                .then_some(())
                .ok_or("not a page image (images/pages-N.img)")
        }) {
            return Err(StreamError::Malformed(format!(
                "live record for {path:?}: {why}"
            )));
        }
        let mut head = [0u8; 12];
        read_exact(z, &mut head, "live record")?;
        let offset = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(head[8..].try_into().expect("4 bytes"));
        if len as usize > COPY_BUF {
            return Err(StreamError::Malformed(format!(
                "live record of {len} bytes for {path}, expected at most {COPY_BUF}"
            )));
        }
        let mut f = match self.open.remove(&path) {
            Some(f) => f,
            None => self.create(&path)?,
        };
        if offset != f.written {
            return Err(StreamError::Malformed(format!(
                "live record for {path} at offset {offset}, expected {}",
                f.written
            )));
        }
        let total = f.written + u64::from(len);
        self.receive_data(z, &mut f, &path, u64::from(len), total)?;
        self.live += u64::from(len);
        self.open.insert(path, f);
        Ok(())
    }

    /// The rest of manifest entry `entry` (all of it unless live records began it), checked
    /// against the entry once complete.
    fn receive_rest(
        &mut self,
        z: &mut FrameReader<impl ChunkSource>,
        entry: &FileEntry,
    ) -> Result<FileEntry, StreamError> {
        let mut f = match self.open.remove(&entry.path) {
            Some(f) => f,
            None => self.create(&entry.path)?,
        };
        let Some(rest) = entry.size.checked_sub(f.written) else {
            return Err(StreamError::ChecksumMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                found: "(not hashed: more bytes were sent than the manifest lists)".into(),
                expected_size: entry.size,
                found_size: f.written,
            });
        };
        self.receive_data(z, &mut f, &entry.path, rest, entry.size)?;
        self.jobs
            .send(Job::Close(f.id))
            .map_err(|_| writer_gone())?;
        let found = hex(&f.hasher.finalize());
        self.done
            .recv()
            .map_err(|_| writer_gone())?
            .map_err(io_err(format!(
                "write {}",
                self.dir.join(&entry.path).display()
            )))?;
        if found != entry.sha256 {
            return Err(StreamError::ChecksumMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                found,
                expected_size: entry.size,
                found_size: entry.size,
            });
        }
        Ok(FileEntry {
            path: entry.path.clone(),
            size: entry.size,
            sha256: found,
        })
    }
}

/// The stream ended inside the file at `path`.
fn ended_inside(path: &str, written: u64, total: u64) -> StreamError {
    StreamError::Malformed(format!(
        "stream ended inside {path} after {written} of {total} bytes"
    ))
}

/// The writing thread of [`receive_checkpoint`]: writes what it is handed and answers each
/// [`Job::Close`] with the file's first write error, if any.
fn write_files(
    jobs: std::sync::mpsc::Receiver<Job>,
    done: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let mut files: BTreeMap<usize, (File, Option<io::Error>)> = BTreeMap::new();
    for job in jobs {
        match job {
            Job::Open(id, file) => {
                files.insert(id, (file, None));
            }
            Job::Data(id, piece) => {
                if let Some((file, failed @ None)) = files.get_mut(&id)
                    && let Err(e) = file.write_all(&piece)
                {
                    *failed = Some(e);
                }
            }
            Job::Close(id) => {
                let result = match files.remove(&id) {
                    Some((_, Some(e))) => Err(e),
                    Some((_, None)) => Ok(()),
                    None => Err(io::Error::other("no such file was started")),
                };
                if done.send(result).is_err() {
                    return;
                }
            }
        }
    }
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
        let (_dirs, origin_store, dest_store) = two_stores();
        let payload = vec![7u8; 300_000];
        let cp = sample_checkpoint(&origin_store, "counter", &payload);
        let wire = encode(cp.dir(), "counter");
        assert!(wire.len() < payload.len() / 10, "zstd should shrink zeros");
        let got = receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).expect("receive");
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

    #[test]
    fn a_memory_hint_lands_the_checkpoint_in_memory_where_it_fits() {
        let (dirs, origin_store, dest_store) = two_stores();
        let dest_store = dest_store
            .with_memory(dirs.1.path().join("shm"))
            .expect("memory root");
        let cp = sample_checkpoint(&origin_store, "counter", &[3u8; 5000]);
        let wire = encode(cp.dir(), "counter");
        let got = receive_checkpoint(&wire[..], &dest_store, Some(1 << 20), |_, _| Ok(()))
            .expect("receive");
        assert!(dest_store.in_memory(got.checkpoint.dir()));
        got.checkpoint.verify().expect("verify");
        // No hint, or more than this node has: on disk, replacing the one in memory.
        let got = receive_checkpoint(&wire[..], &dest_store, Some(u64::MAX / 4), |_, _| Ok(()))
            .expect("receive");
        assert!(!dest_store.in_memory(got.checkpoint.dir()));
        let identity = WorkloadIdentity::container("default", "counter").expect("id");
        assert_eq!(
            dest_store
                .pending(&identity)
                .expect("pending")
                .expect("one")
                .dir(),
            got.checkpoint.dir()
        );
        assert!(!dirs.1.path().join("shm").join(identity.safe_key()).exists());
    }

    /// Re-encodes `wire` with one byte of the decompressed payload flipped at `offset` from
    /// the end, so the damage passes zstd and must be caught by the per-file sha256.
    fn flip_payload_byte(wire: &[u8], from_end: usize) -> Vec<u8> {
        let mut plain = zstd::decode_all(wire).expect("decode");
        let at = plain.len() - from_end;
        plain[at] ^= 0x5a;
        zstd::encode_all(&plain[..], 1).expect("encode")
    }

    /// An origin's and a destination's store, in temp dirs that live as long as the guard.
    fn two_stores() -> ((tempfile::TempDir, tempfile::TempDir), Store, Store) {
        let origin = tempfile::tempdir().expect("tmp");
        let dest = tempfile::tempdir().expect("tmp");
        let origin_store = Store::open(origin.path().join("s")).expect("store");
        let dest_store = Store::open(dest.path().join("s")).expect("store");
        ((origin, dest), origin_store, dest_store)
    }

    fn store_is_empty(store: &Store) -> bool {
        std::fs::read_dir(store.root())
            .expect("read")
            .next()
            .is_none()
    }

    #[test]
    fn corrupted_byte_is_refused_and_temp_removed() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let cp = sample_checkpoint(&origin_store, "counter", &[1u8; 4096]);
        // Inside the last file, just before the 4-byte trailer.
        let wire = flip_payload_byte(&encode(cp.dir(), "counter"), 10);
        let err =
            receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).expect_err("refused");
        assert!(
            matches!(err, StreamError::ChecksumMismatch { .. }),
            "unexpected error {err}"
        );
        assert!(store_is_empty(&dest_store), "temp dir left behind");
    }

    #[test]
    fn corrupted_container_record_is_refused() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let cp = sample_checkpoint(&origin_store, "counter", b"x");
        let mut plain = zstd::decode_all(&encode(cp.dir(), "counter")[..]).expect("decode");
        let at = plain
            .windows(7)
            .position(|w| w == b"busybox")
            .expect("image in record");
        plain[at] = b'B';
        let wire = zstd::encode_all(&plain[..], 1).expect("encode");
        let err =
            receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("container record"), "{err}");
        assert!(store_is_empty(&dest_store));
    }

    #[test]
    fn corrupted_compressed_byte_is_refused() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let cp = sample_checkpoint(&origin_store, "counter", &payload);
        let mut wire = encode(cp.dir(), "counter");
        let mid = wire.len() / 2;
        wire[mid] ^= 0xff;
        assert!(receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).is_err());
        assert!(store_is_empty(&dest_store), "temp dir left behind");
    }

    #[test]
    fn truncated_stream_is_refused() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let cp = sample_checkpoint(&origin_store, "counter", &[3u8; 50_000]);
        let plain = zstd::decode_all(&encode(cp.dir(), "counter")[..]).expect("decode");
        let cut = zstd::encode_all(&plain[..plain.len() - 100], 1).expect("encode");
        let err =
            receive_checkpoint(&cut[..], &dest_store, None, |_, _| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("ended"), "{err}");
        assert!(store_is_empty(&dest_store));
    }

    #[test]
    fn refusal_by_receiver_writes_nothing() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let cp = sample_checkpoint(&origin_store, "counter", b"x");
        let wire = encode(cp.dir(), "counter");
        let err = receive_checkpoint(&wire[..], &dest_store, None, |_, _| Err("not here".into()))
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

    /// Writes a checkpoint of `id` into `store` the way the shim does, the page image in
    /// `chunks` with pauses, then `after_pages` (e.g. a change), then commits; flags `done`.
    fn write_slowly(
        store: &Store,
        id: &str,
        chunks: &[Vec<u8>],
        after_pages: impl FnOnce(&Path),
        done: &std::sync::atomic::AtomicBool,
    ) {
        let identity = WorkloadIdentity::container("default", id).expect("identity");
        let writer = store.begin(&identity).expect("begin");
        let images = writer.images_dir().expect("images");
        let mut pages = File::create(images.join("pages-1.img")).expect("create");
        for chunk in chunks {
            pages.write_all(chunk).expect("write");
            std::thread::sleep(Duration::from_millis(30));
        }
        after_pages(&images.join("pages-1.img"));
        std::fs::write(images.join("core.img"), b"core").expect("write");
        writer
            .commit(
                EngineInfo::new("criu", "4.2.1"),
                "docker.io/library/busybox:latest",
            )
            .expect("commit");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn send_live_while(
        store: &Store,
        id: &str,
        chunks: &[Vec<u8>],
        after_pages: impl FnOnce(&Path) + Send,
    ) -> Result<(Vec<u8>, StreamStats), StreamError> {
        let done = std::sync::atomic::AtomicBool::new(false);
        let identity = WorkloadIdentity::container("default", id).expect("identity");
        let since = std::time::SystemTime::now();
        std::thread::scope(|scope| {
            scope.spawn(|| write_slowly(store, id, chunks, after_pages, &done));
            let mut wire = Vec::new();
            let mut outcome = || {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    LiveOutcome::Committed
                } else {
                    LiveOutcome::Pending
                }
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            let follow = Follow {
                store,
                identity: &identity,
                since,
                deadline,
            };
            let stats = send_checkpoint_live(follow, &info(id), &mut wire, 1, &mut outcome)?;
            Ok((wire, stats))
        })
    }

    fn chunks(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect())
            .collect()
    }

    #[test]
    fn live_send_streams_page_images_while_they_are_written() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let parts = chunks(4, 200_000);
        let (wire, stats) =
            send_live_while(&origin_store, "counter", &parts, |_| {}).expect("send");
        assert!(
            stats.live_bytes > 0,
            "nothing was sent while the page image was written: {stats:?}"
        );
        let got = receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).expect("receive");
        got.checkpoint.verify().expect("verify");
        assert_eq!(got.checkpoint.stamp_status(), Ok(()));
        let pages = std::fs::read(got.checkpoint.images_dir().join("pages-1.img")).expect("read");
        assert_eq!(pages, parts.concat());
        assert_eq!(stats.raw_bytes, got.stats.raw_bytes);
        assert_eq!(stats.live_bytes, got.stats.live_bytes);
    }

    #[test]
    fn live_page_image_changed_after_it_was_sent_is_refused() {
        let (_dirs, origin_store, dest_store) = two_stores();
        let (wire, stats) = send_live_while(&origin_store, "counter", &chunks(2, 100_000), |p| {
            // Long after the sender saw the first bytes (it looks every few ms).
            std::thread::sleep(Duration::from_millis(100));
            let f = OpenOptions::new().write(true).open(p).expect("open");
            f.write_all_at(b"X", 0).expect("rewrite");
        })
        .expect("send");
        assert!(stats.live_bytes > 0, "{stats:?}");
        let err =
            receive_checkpoint(&wire[..], &dest_store, None, |_, _| Ok(())).expect_err("refused");
        assert!(
            matches!(&err, StreamError::ChecksumMismatch { path, .. } if path == "images/pages-1.img"),
            "{err}"
        );
        assert!(store_is_empty(&dest_store), "temp dir left behind");
    }

    #[test]
    fn failed_checkpoint_ends_a_live_send() {
        let origin = tempfile::tempdir().expect("tmp");
        let store = Store::open(origin.path().join("s")).expect("store");
        let identity = WorkloadIdentity::container("default", "counter").expect("identity");
        let mut outcome = || LiveOutcome::Failed("CRIU said no".into());
        let deadline = Instant::now() + Duration::from_secs(5);
        let follow = Follow {
            store: &store,
            identity: &identity,
            since: std::time::SystemTime::now(),
            deadline,
        };
        let err = send_checkpoint_live(follow, &info("counter"), io::sink(), 1, &mut outcome)
            .expect_err("no checkpoint");
        assert!(err.to_string().contains("CRIU said no"), "{err}");
    }

    /// A stream whose first record is a live record for `path`.
    fn with_live_record(path: &str) -> Vec<u8> {
        let identity = WorkloadIdentity::container("default", "counter").expect("identity");
        let info = serde_json::to_vec(&info("counter")).expect("json");
        let identity = serde_json::to_vec(&identity).expect("json");
        let mut plain = MAGIC.to_vec();
        plain.extend_from_slice(&(info.len() as u32).to_be_bytes());
        plain.extend_from_slice(&info);
        plain.extend_from_slice(&(identity.len() as u32).to_be_bytes());
        plain.extend_from_slice(&identity);
        plain.push(TAG_LIVE);
        plain.extend_from_slice(&(path.len() as u16).to_be_bytes());
        plain.extend_from_slice(path.as_bytes());
        plain.extend_from_slice(&0u64.to_be_bytes());
        plain.extend_from_slice(&4u32.to_be_bytes());
        plain.extend_from_slice(b"evil");
        zstd::encode_all(&plain[..], 1).expect("encode")
    }

    #[test]
    fn live_records_only_write_page_images_inside_the_checkpoint() {
        let dest = tempfile::tempdir().expect("tmp");
        let store = Store::open(dest.path().join("s")).expect("store");
        for (path, why) in [
            ("images/../../../etc/evil", "'..'"),
            ("/etc/evil", "absolute"),
            ("rootfs/upper.tar", "not a page image"),
            ("images/core.img", "not a page image"),
        ] {
            let err = receive_checkpoint(&with_live_record(path)[..], &store, None, |_, _| Ok(()))
                .expect_err("refused");
            assert!(
                matches!(err, StreamError::Malformed(_)) && err.to_string().contains(why),
                "{path}: {err}"
            );
            assert!(store_is_empty(&store), "{path}: temp dir left behind");
        }
        assert!(!dest.path().join("etc").exists());
    }
}
