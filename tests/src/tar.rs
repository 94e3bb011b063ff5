//! A minimal, deterministic ustar writer: enough for an image layer and an OCI layout archive.
//!
//! Every entry gets uid/gid 0 and mtime 0 so that the same inputs always give the same bytes,
//! and therefore the same digests (the image cache relies on it).

use anyhow::{Result, bail};

const BLOCK: usize = 512;

/// An in-memory tar archive under construction.
#[derive(Default)]
pub struct Tar {
    bytes: Vec<u8>,
}

impl Tar {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.header(
            &format!("{}/", path.trim_end_matches('/')),
            mode,
            0,
            b'5',
            "",
        )
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<()> {
        self.header(path, mode, contents.len() as u64, b'0', "")?;
        self.bytes.extend_from_slice(contents);
        self.pad();
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.header(path, 0o777, 0, b'2', target)
    }

    /// Ends the archive with the two zero blocks tar readers expect.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.resize(self.bytes.len() + 2 * BLOCK, 0);
        self.bytes
    }

    fn header(&mut self, path: &str, mode: u32, size: u64, kind: u8, link: &str) -> Result<()> {
        if path.len() > 100 || link.len() > 100 {
            bail!("tar: path too long for a plain ustar header: {path} -> {link}");
        }
        let mut h = [0u8; BLOCK];
        h[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0); // uid
        octal(&mut h[116..124], 0); // gid
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 0); // mtime
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field read as spaces.
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let sum = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(sum.as_bytes());
        self.bytes.extend_from_slice(&h);
        Ok(())
    }

    fn pad(&mut self) {
        let rem = self.bytes.len() % BLOCK;
        if rem != 0 {
            self.bytes.resize(self.bytes.len() + BLOCK - rem, 0);
        }
    }
}

/// Writes `value` as zero-padded octal followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_tar_lists_what_we_wrote() {
        let mut tar = Tar::new();
        tar.dir("bin", 0o755).unwrap();
        tar.file("bin/hello", 0o755, b"hi\n").unwrap();
        tar.symlink("bin/sh", "hello").unwrap();
        let bytes = tar.finish();
        assert_eq!(bytes.len() % BLOCK, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tar");
        std::fs::write(&path, &bytes).unwrap();
        let out = Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "tar -t: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("bin/hello"), "{listing}");
        assert!(listing.contains("bin/sh -> hello"), "{listing}");
    }

    #[test]
    fn same_input_same_bytes() {
        let build = || {
            let mut tar = Tar::new();
            tar.file("a", 0o644, b"x").unwrap();
            tar.finish()
        };
        assert_eq!(build(), build());
    }
}
