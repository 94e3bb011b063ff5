//! zstd output written as one frame per chunk of input, where a chunk that would not compress
//! is stored as it is instead of being run through the compressor; and the reader of such
//! output, which hands stored bytes on without copying them.
//!
//! Process memory often does not compress (random keys, encrypted sessions, media, caches of
//! already compressed data), and zstd spends about as long on such bytes as on any others
//! before it stores them in raw blocks anyway: ~1.1 s of one core per GiB at level 1 on the
//! machines here, on the origin, while the engine dumps and the destination receives. So each
//! chunk ([`CHUNK`] bytes) is probed first: a sample of it (slices spread over the chunk) is
//! compressed, and only when the sample shrinks enough is the whole chunk compressed. A chunk
//! stored goes out as a zstd frame of raw blocks (RFC 8878, 3.1.1).
//!
//! The output is a plain concatenation of zstd frames: any zstd decoder (`zstd -d`,
//! [`zstd::Decoder`]) reads it back as the input bytes. Every frame states its content size
//! and is a single segment, so a decoder's window is at most one chunk.
//!
//! Neither end copies stored bytes in user space. A gigabyte of page images is otherwise
//! copied four or five times between the file and the socket on each side (into the framer's
//! chunk, into the frame, into the channel's buffer; out of the channel's chunk, through
//! zstd's window, into the writer's buffer): ~0.3 s of CPU per GiB on each node, on the two
//! cores the engine's dump and the transfer share. So the input is taken as [`Bytes`]
//! ([`FrameWriter::write_bytes`]) and a stored frame goes out as its small headers and slices
//! of that input ([`Sink::put`]); [`FrameReader`] decodes a frame of raw blocks by slicing
//! the received chunks, and runs zstd only for frames that hold compressed blocks.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};

/// Input bytes per frame.
pub const CHUNK: usize = 1 << 20;
/// Chunks smaller than this are compressed without probing: the probe would be most of them.
const PROBE_MIN: usize = 64 << 10;
/// The sample: this many slices of [`SLICE`] bytes each, evenly spread over the chunk.
const SLICES: usize = 8;
const SLICE: usize = 4 << 10;
/// A chunk is compressed when its sample compresses to at most this share (in tenths): less
/// gain than that does not pay for the compressor's time on a link of 1 Gbit/s and up.
const WORTH_TENTHS: usize = 9;
/// zstd's frame magic number, that of its skippable frames (low 4 bits free), and its
/// largest block.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const MAX_BLOCK: usize = 128 << 10;
/// The largest frame a [`FrameReader`] takes, on the wire and decoded: mig-server's frames
/// hold one [`CHUNK`]; the bound keeps a hostile stream from making it buffer without end.
const MAX_FRAME: usize = 16 << 20;
/// Bytes a [`ReadChunks`] asks its reader for at once.
const READ_CHUNK: usize = 256 << 10;

/// Where a [`FrameWriter`]'s output goes: pieces of it handed over whole, and small ones
/// (frame and block headers, compressed frames) as slices to copy.
pub trait Sink {
    /// Takes a piece of output, without copying it where it can.
    fn put(&mut self, piece: Bytes) -> io::Result<()>;
    /// Takes a small piece of output (it is copied).
    fn put_slice(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Passes on what it holds.
    fn flush_sink(&mut self) -> io::Result<()>;
}

/// Any writer is a sink: pieces are written to it, which copies them.
impl<W: Write> Sink for W {
    fn put(&mut self, piece: Bytes) -> io::Result<()> {
        self.write_all(&piece)
    }
    fn put_slice(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }
    fn flush_sink(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// Input bytes that went out compressed and stored, and the bytes written out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Bytes of input compressed by zstd.
    pub compressed: u64,
    /// Bytes of input stored as they are (their sample did not compress).
    pub stored: u64,
    /// Bytes of output: the stream on the wire.
    pub wire: u64,
}

/// A writer that compresses what is written to it into `inner` as described above.
/// [`FrameWriter::finish`] (or `flush`) writes out the last, partial chunk.
pub struct FrameWriter<S: Sink> {
    inner: S,
    compressor: zstd::bulk::Compressor<'static>,
    /// Input not yet framed (less than one chunk), in order: taken pieces, then `small`.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// Input written as slices, copied here until the next piece or frame.
    small: Vec<u8>,
    /// A chunk made contiguous for the compressor, and its output.
    whole: Vec<u8>,
    frame: Vec<u8>,
    sample: Vec<u8>,
    stats: FrameStats,
}

impl<S: Sink> FrameWriter<S> {
    /// A writer compressing at zstd `level` (as `zstd -<level>`; 0 is zstd's default).
    pub fn new(inner: S, level: i32) -> io::Result<Self> {
        Ok(Self {
            inner,
            compressor: zstd::bulk::Compressor::new(level)?,
            pending: VecDeque::new(),
            pending_len: 0,
            small: Vec::new(),
            whole: Vec::with_capacity(CHUNK),
            frame: Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK) + 64),
            sample: Vec::with_capacity(SLICES * SLICE),
            stats: FrameStats::default(),
        })
    }

    /// How much of the input was compressed and how much stored, and the output, so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// Takes `data` as input without copying it: a stored frame sends slices of it.
    pub fn write_bytes(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.take_small();
        self.pending_len += data.len();
        self.pending.push_back(data);
        while self.pending_len >= CHUNK {
            self.emit(CHUNK)?;
        }
        Ok(())
    }

    /// Writes out the pending input and returns the inner sink (not flushed).
    pub fn finish(mut self) -> io::Result<S> {
        self.emit_pending()?;
        Ok(self.inner)
    }

    /// Moves the small writes into `pending`, as one piece.
    fn take_small(&mut self) {
        if !self.small.is_empty() {
            let small = Bytes::copy_from_slice(&self.small);
            self.small.clear();
            self.pending_len += small.len();
            self.pending.push_back(small);
        }
    }

    fn emit_pending(&mut self) -> io::Result<()> {
        self.take_small();
        while self.pending_len > 0 {
            self.emit(self.pending_len.min(CHUNK))?;
        }
        Ok(())
    }

    /// Writes the first `len` (not 0, at most [`CHUNK`]) pending bytes as one frame.
    fn emit(&mut self, len: usize) -> io::Result<()> {
        let mut chunk = Vec::new();
        let mut left = len;
        while left > 0 {
            let front = self.pending.front_mut().expect("pending holds len bytes");
            let piece = if front.len() <= left {
                self.pending.pop_front().expect("front")
            } else {
                front.split_to(left)
            };
            left -= piece.len();
            chunk.push(piece);
        }
        self.pending_len -= len;
        if self.worth_compressing(&chunk, len)? {
            self.whole.clear();
            for piece in &chunk {
                self.whole.extend_from_slice(piece);
            }
            self.frame.clear();
            self.compressor
                .compress_to_buffer(&self.whole[..], &mut self.frame)?;
            if self.frame.len() < len {
                self.stats.compressed += len as u64;
                self.stats.wire += self.frame.len() as u64;
                return self.inner.put_slice(&self.frame);
            }
        }
        // Not probed as worth it, or it did not shrink after all: stored.
        self.stats.stored += len as u64;
        self.raw_frame(chunk, len)
    }

    /// Writes `chunk` (`len` bytes, not 0) as a zstd frame of raw blocks: a single-segment
    /// frame header with a 4-byte content size and no checksum, then blocks of at most 128
    /// KiB, each with its 3-byte header (last-block bit, type 0 = raw, size) and then its
    /// bytes, as slices of the chunk.
    fn raw_frame(&mut self, chunk: Vec<Bytes>, len: usize) -> io::Result<()> {
        let mut head = [0u8; 9];
        head[..4].copy_from_slice(&ZSTD_MAGIC.to_le_bytes());
        // Frame header descriptor: content size field of 4 bytes (flag 2, bits 7-6), single
        // segment (bit 5); no checksum, no dictionary.
        head[4] = 0b1010_0000;
        head[5..].copy_from_slice(&(len as u32).to_le_bytes());
        self.inner.put_slice(&head)?;
        let mut pieces = chunk.into_iter();
        let mut piece = Bytes::new();
        let mut left = len;
        while left > 0 {
            let block = left.min(MAX_BLOCK);
            left -= block;
            let header = (block as u32) << 3 | u32::from(left == 0);
            self.inner.put_slice(&header.to_le_bytes()[..3])?;
            let mut need = block;
            while need > 0 {
                if piece.is_empty() {
                    piece = pieces.next().expect("the chunk holds len bytes");
                }
                let part = if piece.len() <= need {
                    std::mem::take(&mut piece)
                } else {
                    piece.split_to(need)
                };
                need -= part.len();
                self.inner.put(part)?;
            }
        }
        self.stats.wire += (9 + 3 * len.div_ceil(MAX_BLOCK) + len) as u64;
        Ok(())
    }

    fn worth_compressing(&mut self, chunk: &[Bytes], len: usize) -> io::Result<bool> {
        if len < PROBE_MIN {
            return Ok(true);
        }
        self.sample.clear();
        let step = len / SLICES;
        for i in 0..SLICES {
            copy_range(chunk, i * step, SLICE.min(step), &mut self.sample);
        }
        // The frame buffer is free until the chunk itself is compressed.
        self.frame.clear();
        let n = self
            .compressor
            .compress_to_buffer(&self.sample[..], &mut self.frame)?;
        self.frame.clear();
        Ok(n * 10 <= self.sample.len() * WORTH_TENTHS)
    }
}

/// Appends bytes `at..at + len` of the concatenation of `pieces` to `out`.
fn copy_range(pieces: &[Bytes], mut at: usize, mut len: usize, out: &mut Vec<u8>) {
    for piece in pieces {
        if len == 0 {
            return;
        }
        if at >= piece.len() {
            at -= piece.len();
            continue;
        }
        let n = len.min(piece.len() - at);
        out.extend_from_slice(&piece[at..at + n]);
        at = 0;
        len -= n;
    }
}

impl<S: Sink> Write for FrameWriter<S> {
    /// Copies `buf` (the stream's headers, small records): pieces are taken with
    /// [`FrameWriter::write_bytes`].
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.pending_len - self.small.len());
        self.small.extend_from_slice(&buf[..n]);
        if self.pending_len + self.small.len() == CHUNK {
            self.take_small();
            self.emit(CHUNK)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit_pending()?;
        self.inner.flush_sink()
    }
}

/// Where a [`FrameReader`] gets the stream: chunks of it as they arrive, cut anywhere.
pub trait ChunkSource {
    /// The next chunk; `None` at the end of the stream.
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>>;
}

/// Any reader as a [`ChunkSource`].
pub struct ReadChunks<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: Read> ReadChunks<R> {
    /// Reads `inner` a chunk at a time.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl<R: Read> ChunkSource for ReadChunks<R> {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            // Reuses the buffer once the chunks cut from it are gone.
            self.buf.clear();
            self.buf.resize(READ_CHUNK, 0);
            match self.inner.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.buf.truncate(n);
                    return Ok(Some(self.buf.split().freeze()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Decodes a stream of zstd frames read from a [`ChunkSource`] (what a [`FrameWriter`]
/// writes, or any frames of at most [`MAX_FRAME`] bytes each way).
///
/// A frame of raw and RLE blocks without a checksum, which is what a stored chunk is, is
/// decoded as slices of the received chunks ([`FrameReader::next_piece`]): its bytes are not
/// copied. A frame with compressed blocks is decompressed whole by zstd. Decoded bytes are
/// given out only once their frame is complete and checked (its blocks add up to its content
/// size; zstd checks the rest), so a damaged frame never yields any of its bytes.
pub struct FrameReader<S> {
    source: S,
    /// Received bytes not decoded yet.
    input: Bytes,
    /// Decoded bytes not read yet.
    out: VecDeque<Bytes>,
    /// Stream bytes decoded so far.
    wire: u64,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn frame_too_big() -> io::Error {
    invalid(format!("zstd frame of more than {MAX_FRAME} bytes"))
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the stream ends inside a zstd frame",
    )
}

impl<S: ChunkSource> FrameReader<S> {
    /// Decodes what `source` gives.
    pub fn new(source: S) -> Self {
        Self {
            source,
            input: Bytes::new(),
            out: VecDeque::new(),
            wire: 0,
            decompressor: None,
        }
    }

    /// Stream bytes taken from the source and decoded so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire
    }

    /// The next at most `max` (not 0) decoded bytes, as they arrived where the frame stored
    /// them (not copied); `None` at the end of the stream, which came between two frames.
    pub fn next_piece(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        while self.out.is_empty() {
            if !self.decode_frame()? {
                return Ok(None);
            }
        }
        let front = self.out.front_mut().expect("not empty");
        Ok(Some(if front.len() <= max {
            self.out.pop_front().expect("not empty")
        } else {
            front.split_to(max)
        }))
    }

    /// Makes `input` non-empty; false at the end of the stream.
    fn fill(&mut self) -> io::Result<bool> {
        while self.input.is_empty() {
            match self.source.next_chunk()? {
                Some(chunk) => self.input = chunk,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The next `n` stream bytes, as pieces appended to `into`.
    fn take(&mut self, mut n: usize, into: &mut Vec<Bytes>) -> io::Result<()> {
        while n > 0 {
            if !self.fill()? {
                return Err(cut_short());
            }
            let piece = self.input.split_to(n.min(self.input.len()));
            n -= piece.len();
            self.wire += piece.len() as u64;
            into.push(piece);
        }
        Ok(())
    }

    /// The next `N` stream bytes, copied (headers), also appended to `frame` as pieces.
    fn take_array<const N: usize>(&mut self, frame: &mut Vec<Bytes>) -> io::Result<[u8; N]> {
        let at = frame.len();
        self.take(N, frame)?;
        let mut out = [0u8; N];
        copy_into(&frame[at..], &mut out);
        Ok(out)
    }

    /// Decodes the next frame into `out` (a skippable frame adds nothing); false when the
    /// stream ended before it.
    fn decode_frame(&mut self) -> io::Result<bool> {
        if !self.fill()? {
            return Ok(false);
        }
        // Every stream byte of the frame, in case zstd has to decode it.
        let mut frame: Vec<Bytes> = Vec::new();
        let magic = u32::from_le_bytes(self.take_array(&mut frame)?);
        if magic & 0xFFFF_FFF0 == SKIPPABLE_MAGIC {
            let len = u32::from_le_bytes(self.take_array(&mut frame)?) as usize;
            // Taken a block at a time, so a hostile length holds no more than that.
            let (mut left, mut skipped) = (len, Vec::new());
            while left > 0 {
                let n = left.min(MAX_BLOCK);
                self.take(n, &mut skipped)?;
                skipped.clear();
                left -= n;
            }
            return Ok(true);
        }
        if magic != ZSTD_MAGIC {
            return Err(invalid(format!(
                "not a zstd frame: magic number {magic:#010x}, expected {ZSTD_MAGIC:#010x}"
            )));
        }
        let [descriptor] = self.take_array(&mut frame)?;
        let single_segment = descriptor & 0x20 != 0;
        let checksum = descriptor & 0x04 != 0;
        let dictionary = descriptor & 0x03;
        if descriptor & 0x08 != 0 {
            return Err(invalid(
                "zstd frame header with its reserved bit set".into(),
            ));
        }
        if !single_segment {
            self.take_array::<1>(&mut frame)?; // window descriptor
        }
        let skip = [0usize, 1, 2, 4][dictionary as usize];
        self.take(skip, &mut frame)?;
        let size_len = match descriptor >> 6 {
            0 => usize::from(single_segment),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let content_size = if size_len == 0 {
            None
        } else {
            let at = frame.len();
            self.take(size_len, &mut frame)?;
            let mut le = [0u8; 8];
            copy_into(&frame[at..], &mut le);
            let n = u64::from_le_bytes(le);
            Some(if size_len == 2 { n + 256 } else { n })
        };
        if content_size.is_some_and(|n| n > MAX_FRAME as u64) {
            return Err(invalid(format!(
                "zstd frame of {} bytes, expected at most {MAX_FRAME}",
                content_size.unwrap_or_default()
            )));
        }
        // The blocks: raw and RLE ones are their bytes already.
        let mut decoded: Vec<Bytes> = Vec::new();
        let mut decoded_len = 0usize;
        let mut frame_len = 0usize;
        let mut compressed = checksum || dictionary != 0;
        loop {
            let [a, b, c] = self.take_array(&mut frame)?;
            let header = u32::from_le_bytes([a, b, c, 0]);
            let size = (header >> 3) as usize;
            if size > MAX_BLOCK {
                return Err(invalid(format!(
                    "zstd block of {size} bytes, expected at most {MAX_BLOCK}"
                )));
            }
            match (header >> 1) & 3 {
                0 => {
                    let at = frame.len();
                    self.take(size, &mut frame)?;
                    decoded.extend(frame[at..].iter().cloned());
                    decoded_len += size;
                }
                1 => {
                    let [byte] = self.take_array(&mut frame)?;
                    decoded.push(Bytes::from(vec![byte; size]));
                    decoded_len += size;
                }
                2 => {
                    self.take(size, &mut frame)?;
                    compressed = true;
                }
                _ => return Err(invalid("zstd block of the reserved type 3".into())),
            }
            frame_len += 3 + size;
            if frame_len > MAX_FRAME || decoded_len > MAX_FRAME {
                return Err(frame_too_big());
            }
            if header & 1 != 0 {
                break;
            }
        }
        if checksum {
            self.take(4, &mut frame)?;
        }
        if !compressed {
            if let Some(n) = content_size
                && n != decoded_len as u64
            {
                return Err(invalid(format!(
                    "zstd frame says it holds {n} bytes, its blocks hold {decoded_len}"
                )));
            }
            self.out
                .extend(decoded.into_iter().filter(|b| !b.is_empty()));
            return Ok(true);
        }
        let whole = frame.concat();
        let data = match content_size {
            Some(n) => {
                let d = match &mut self.decompressor {
                    Some(d) => d,
                    None => self.decompressor.insert(zstd::bulk::Decompressor::new()?),
                };
                let data = d.decompress(&whole, n as usize)?;
                if data.len() as u64 != n {
                    return Err(invalid(format!(
                        "zstd frame says it holds {n} bytes, it decodes to {}",
                        data.len()
                    )));
                }
                data
            }
            None => {
                let mut data = Vec::new();
                zstd::stream::read::Decoder::with_buffer(&whole[..])?
                    .single_frame()
                    .take(MAX_FRAME as u64 + 1)
                    .read_to_end(&mut data)?;
                if data.len() > MAX_FRAME {
                    return Err(frame_too_big());
                }
                data
            }
        };
        if !data.is_empty() {
            self.out.push_back(Bytes::from(data));
        }
        Ok(true)
    }
}

/// Copies the concatenation of `pieces` (at most `out.len()` bytes) to the start of `out`.
fn copy_into(pieces: &[Bytes], out: &mut [u8]) {
    let mut filled = 0;
    for piece in pieces {
        out[filled..filled + piece.len()].copy_from_slice(piece);
        filled += piece.len();
    }
}

impl<S: ChunkSource> Read for FrameReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        Ok(match self.next_piece(buf.len())? {
            Some(piece) => {
                buf[..piece.len()].copy_from_slice(&piece);
                piece.len()
            }
            None => 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that do not compress (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn text(len: usize) -> Vec<u8> {
        b"the counter ticks; "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn frame_all(input: &[u8], writes: usize) -> (Vec<u8>, FrameStats) {
        let mut w = FrameWriter::new(Vec::new(), 1).expect("writer");
        for part in input.chunks(writes.max(1)) {
            w.write_all(part).expect("write");
        }
        w.flush().expect("flush");
        let stats = w.stats();
        let out = w.finish().expect("finish");
        (out, stats)
    }

    #[test]
    fn any_zstd_decoder_reads_the_input_back() {
        let mut input = noise(3 * CHUNK + 12345, 7);
        input.extend(text(2 * CHUNK + 77));
        input.extend(noise(MAX_BLOCK * 3, 9)); // ends on a block boundary
        input.extend(text(10));
        // Written whole, in odd pieces, and byte by byte through a small tail.
        for writes in [usize::MAX, 300_000, 4096] {
            let (wire, _) = frame_all(&input, writes);
            assert_eq!(
                zstd::decode_all(&wire[..]).expect("decode"),
                input,
                "{writes}"
            );
        }
        let mut w = FrameWriter::new(Vec::new(), 1).expect("writer");
        for b in text(1000) {
            w.write_all(&[b]).expect("write");
        }
        let wire = w.finish().expect("finish");
        assert_eq!(zstd::decode_all(&wire[..]).expect("decode"), text(1000));
    }

    #[test]
    fn noise_is_stored_and_text_compressed() {
        let mut w = FrameWriter::new(Vec::new(), 1).expect("writer");
        w.write_all(&noise(4 * CHUNK, 3)).expect("write");
        w.write_all(&text(4 * CHUNK)).expect("write");
        let stats = w.stats();
        let wire = w.finish().expect("finish");
        assert_eq!(stats.stored, 4 * CHUNK as u64);
        assert_eq!(stats.compressed, 4 * CHUNK as u64);
        // Stored: 9 bytes of frame header per chunk and 3 per 128 KiB block.
        let stored_overhead = 4 * (9 + 3 * (CHUNK / MAX_BLOCK));
        assert!(
            wire.len() < 4 * CHUNK + stored_overhead + CHUNK / 100,
            "{} bytes on the wire",
            wire.len()
        );
    }

    #[test]
    fn flush_frames_what_was_written_so_far() {
        let mut w = FrameWriter::new(Vec::new(), 1).expect("writer");
        w.write_all(b"MIGSTRM2").expect("write");
        w.flush().expect("flush");
        w.write_all(b"END1").expect("write");
        let wire = w.finish().expect("finish");
        assert_eq!(
            zstd::decode_all(&wire[..]).expect("decode"),
            b"MIGSTRM2END1"
        );
        // Two frames, each decodable on its own: the first was complete at the flush.
        let first = zstd::zstd_safe::find_frame_compressed_size(&wire).expect("frame");
        assert_eq!(
            zstd::decode_all(&wire[..first]).expect("decode"),
            b"MIGSTRM2"
        );
    }

    /// A source giving `wire` in chunks of `size` bytes (slices of it, not copies).
    struct Chunks {
        wire: Bytes,
        size: usize,
    }

    impl ChunkSource for Chunks {
        fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
            if self.wire.is_empty() {
                return Ok(None);
            }
            let n = self.size.min(self.wire.len());
            Ok(Some(self.wire.split_to(n)))
        }
    }

    fn read_all(wire: &[u8], size: usize) -> io::Result<Vec<u8>> {
        let mut r = FrameReader::new(Chunks {
            wire: Bytes::copy_from_slice(wire),
            size,
        });
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        assert_eq!(r.wire_bytes(), wire.len() as u64);
        Ok(out)
    }

    #[test]
    fn the_reader_reads_what_the_writer_wrote_however_it_arrives() {
        let mut input = noise(2 * CHUNK + 12345, 7);
        input.extend(text(CHUNK + 77));
        input.extend(noise(MAX_BLOCK * 3, 9));
        let (wire, stats) = frame_all(&input, 300_000);
        assert!(stats.stored > 0 && stats.compressed > 0, "{stats:?}");
        assert_eq!(stats.wire, wire.len() as u64);
        for size in [1, 2, 3, 4096, 100_000, MAX_BLOCK + 1, usize::MAX] {
            assert_eq!(
                read_all(&wire, size).expect("read"),
                input,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn pieces_of_a_stored_frame_are_slices_of_what_arrived() {
        let input = noise(CHUNK, 11);
        let mut w = FrameWriter::new(Vec::new(), 1).expect("writer");
        w.write_bytes(Bytes::from(input.clone())).expect("write");
        let wire = Bytes::from(w.finish().expect("finish"));
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        let mut r = FrameReader::new(Chunks {
            wire: wire.clone(),
            size: usize::MAX,
        });
        let mut out = Vec::new();
        while let Some(piece) = r.next_piece(usize::MAX).expect("piece") {
            assert!(range.contains(&(piece.as_ptr() as usize)), "a copy");
            assert!(piece.len() <= MAX_BLOCK);
            out.extend_from_slice(&piece);
        }
        assert_eq!(out, input);
    }

    #[test]
    fn the_reader_takes_frames_of_other_zstd_writers() {
        let input = text(300_000);
        // No content size, one frame, compressed; then one with a checksum.
        let mut wire = zstd::encode_all(&input[..], 3).expect("encode");
        let mut e = zstd::Encoder::new(Vec::new(), 1).expect("encoder");
        e.include_checksum(true).expect("checksum");
        e.write_all(&input).expect("write");
        wire.extend(e.finish().expect("finish"));
        let mut both = input.clone();
        both.extend(&input);
        assert_eq!(read_all(&wire, 1000).expect("read"), both);
    }

    #[test]
    fn the_reader_refuses_cut_and_damaged_frames() {
        let (wire, _) = frame_all(&noise(CHUNK + 10, 5), usize::MAX);
        // Cut inside a frame: an error, and none of that frame's bytes.
        let err = read_all(&wire[..wire.len() - 1], 4096).expect_err("cut");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // Cut between frames: the frames before it.
        let first = zstd::zstd_safe::find_frame_compressed_size(&wire).expect("frame");
        assert_eq!(
            read_all(&wire[..first], 4096).expect("read"),
            noise(CHUNK + 10, 5)[..CHUNK]
        );
        // A stored frame whose content size does not match its blocks.
        let mut bad = wire.clone();
        bad[5] ^= 1;
        let err = read_all(&bad, 4096).expect_err("damaged");
        assert!(err.to_string().contains("holds"), "{err}");
        // Not zstd at all.
        let err = read_all(b"MIGSTRM2 plain", 4096).expect_err("not zstd");
        assert!(err.to_string().contains("not a zstd frame"), "{err}");
        // A hostile content size.
        let mut huge = wire[..first].to_vec();
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_all(&huge, 4096).expect_err("huge");
        assert!(err.to_string().contains("expected at most"), "{err}");
    }

    #[test]
    fn a_cut_stored_frame_is_an_error() {
        let (wire, stats) = frame_all(&noise(CHUNK, 5), usize::MAX);
        assert_eq!(stats.stored, CHUNK as u64);
        assert!(zstd::decode_all(&wire[..wire.len() - 1]).is_err());
    }
}
