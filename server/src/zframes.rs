//! zstd output written as one frame per chunk of input, where a chunk that would not compress
//! is stored as it is instead of being run through the compressor.
//!
//! Process memory often does not compress (random keys, encrypted sessions, media, caches of
//! already compressed data), and zstd spends about as long on such bytes as on any others
//! before it stores them in raw blocks anyway: ~1.1 s of one core per GiB at level 1 on the
//! machines here, on the origin, while the engine dumps and the destination receives. So each
//! chunk ([`CHUNK`] bytes) is probed first: a sample of it (slices spread over the chunk) is
//! compressed, and only when the sample shrinks enough is the whole chunk compressed. A chunk
//! stored goes out as a zstd frame of raw blocks (RFC 8878, 3.1.1), which costs one copy.
//!
//! The output is a plain concatenation of zstd frames: any zstd decoder (`zstd -d`,
//! [`zstd::Decoder`]) reads it back as the input bytes, so receivers need nothing of this.
//! Every frame states its content size and is a single segment, so a decoder's window is at
//! most one chunk.

use std::io::{self, Write};

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
/// zstd's frame magic number and largest block.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const MAX_BLOCK: usize = 128 << 10;

/// Input bytes that went out compressed and stored, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Bytes of input compressed by zstd.
    pub compressed: u64,
    /// Bytes of input stored as they are (their sample did not compress).
    pub stored: u64,
}

/// A writer that compresses what is written to it into `inner` as described above.
/// [`FrameWriter::finish`] (or `flush`) writes out the last, partial chunk.
pub struct FrameWriter<W: Write> {
    inner: W,
    compressor: zstd::bulk::Compressor<'static>,
    /// Input not yet framed (less than one chunk).
    pending: Vec<u8>,
    /// The frame being written out.
    frame: Vec<u8>,
    sample: Vec<u8>,
    stats: FrameStats,
}

impl<W: Write> FrameWriter<W> {
    /// A writer compressing at zstd `level` (as `zstd -<level>`; 0 is zstd's default).
    pub fn new(inner: W, level: i32) -> io::Result<Self> {
        Ok(Self {
            inner,
            compressor: zstd::bulk::Compressor::new(level)?,
            pending: Vec::with_capacity(CHUNK),
            frame: Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK) + 64),
            sample: Vec::with_capacity(SLICES * SLICE),
            stats: FrameStats::default(),
        })
    }

    /// How much of the input was compressed and how much stored, so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// Writes out the pending input and returns the inner writer (not flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.emit_pending()?;
        Ok(self.inner)
    }

    fn emit_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.pending);
        let result = self.emit(&chunk);
        self.pending = chunk;
        self.pending.clear();
        result
    }

    /// Writes `chunk` (not empty, at most [`CHUNK`] bytes) as one frame.
    fn emit(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.frame.clear();
        if self.worth_compressing(chunk)? {
            self.compressor.compress_to_buffer(chunk, &mut self.frame)?;
        }
        // Not probed as worth it, or it did not shrink after all: stored.
        if self.frame.is_empty() || self.frame.len() >= chunk.len() {
            self.frame.clear();
            raw_frame(chunk, &mut self.frame);
            self.stats.stored += chunk.len() as u64;
        } else {
            self.stats.compressed += chunk.len() as u64;
        }
        self.inner.write_all(&self.frame)
    }

    fn worth_compressing(&mut self, chunk: &[u8]) -> io::Result<bool> {
        if chunk.len() < PROBE_MIN {
            return Ok(true);
        }
        self.sample.clear();
        let step = chunk.len() / SLICES;
        for i in 0..SLICES {
            let at = i * step;
            self.sample
                .extend_from_slice(&chunk[at..at + SLICE.min(step)]);
        }
        // The frame buffer is free until the chunk itself is compressed.
        let n = self
            .compressor
            .compress_to_buffer(&self.sample[..], &mut self.frame)?;
        self.frame.clear();
        Ok(n * 10 <= self.sample.len() * WORTH_TENTHS)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pending.is_empty() && buf.len() >= CHUNK {
            // A whole chunk at once: framed from the caller's buffer, not copied first.
            self.emit(&buf[..CHUNK])?;
            return Ok(CHUNK);
        }
        let n = buf.len().min(CHUNK - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == CHUNK {
            self.emit_pending()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit_pending()?;
        self.inner.flush()
    }
}

/// Appends to `out` a zstd frame holding `data` (not empty) in raw blocks: a single-segment
/// frame header with a 4-byte content size and no checksum, then blocks of at most 128 KiB,
/// each with its 3-byte header (last-block bit, type 0 = raw, size).
fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!data.is_empty() && data.len() <= u32::MAX as usize);
    out.extend_from_slice(&ZSTD_MAGIC.to_le_bytes());
    // Frame header descriptor: content size field of 4 bytes (flag 2, bits 7-6), single
    // segment (bit 5); no checksum, no dictionary.
    out.push(0b1010_0000);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        let header = (block.len() as u32) << 3 | last;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
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

    #[test]
    fn a_cut_stored_frame_is_an_error() {
        let (wire, stats) = frame_all(&noise(CHUNK, 5), usize::MAX);
        assert_eq!(stats.stored, CHUNK as u64);
        assert!(zstd::decode_all(&wire[..wire.len() - 1]).is_err());
    }
}
