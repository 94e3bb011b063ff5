//! Test images built locally from Debian's busybox-static: no registry is reachable here.
//!
//! The image is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/*`) packed in a
//! tar archive that `ctr images import` accepts. It is built deterministically and cached under
//! `target/mig-e2e/images/`, keyed by the busybox binary and the image's name and command.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::tar::Tar;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The image most tests use.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/mig-busybox:test";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// Bump when the layout of the built image changes, to invalidate cached archives.
const FORMAT: &str = "mig-e2e image v1";

/// An OCI image archive on disk, ready for `ctr images import`.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// Full reference, e.g. `docker.io/library/mig-busybox:test`.
    pub name: String,
    /// The OCI layout tar archive.
    pub archive: PathBuf,
}

impl TestImage {
    /// The busybox image ([`BUSYBOX_IMAGE`]) whose default command is `sh`.
    pub fn busybox() -> Result<Self> {
        Self::busybox_with(BUSYBOX_IMAGE, &["/bin/sh"])
    }

    /// A busybox image named `name` whose default command is `cmd`.
    pub fn busybox_with(name: &str, cmd: &[&str]) -> Result<Self> {
        Self::busybox_with_files(name, cmd, &[])
    }

    /// A busybox image named `name` whose default command is `cmd`, with `files` added (their
    /// parent directories are created as needed): a program and the libraries it links, say.
    pub fn busybox_with_files(name: &str, cmd: &[&str], files: &[ImageFile]) -> Result<Self> {
        // Tests of one binary build the same image concurrently: build it once.
        static BUILDING: Mutex<()> = Mutex::new(());
        let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());

        let busybox = fs::read(BUSYBOX).with_context(|| {
            format!("reading {BUSYBOX} (install Debian's busybox-static: scripts/setup.sh)")
        })?;
        let mut key = Sha256::new();
        key.update(FORMAT);
        key.update(name);
        key.update(serde_json::to_vec(cmd)?);
        key.update(&busybox);
        for f in files {
            key.update(f.path.as_bytes());
            key.update(f.mode.to_le_bytes());
            key.update((f.contents.len() as u64).to_le_bytes());
            key.update(&f.contents);
        }
        let key = hex(&key.finalize());
        let file_name = format!("{}-{}.tar", sanitize(name), &key[..16]);
        let archive = image_cache_dir().join(file_name);
        if !archive.exists() {
            let bytes = build_layout(name, cmd, &busybox, files)?;
            fs::create_dir_all(image_cache_dir())?;
            // Written aside and renamed so that another test process never reads half a file.
            let partial = archive.with_extension(format!("partial.{}", std::process::id()));
            fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
            fs::rename(&partial, &archive)?;
        }
        Ok(Self {
            name: name.to_string(),
            archive,
        })
    }
}

/// The program `bin` as the image file `path_in_image` (mode 0755), followed by every shared
/// library `ldd` lists for it (the dynamic loader included), at their host paths: what an image
/// needs to run a dynamically linked program of this machine.
pub fn program_with_libraries(bin: &Path, path_in_image: &str) -> Result<Vec<ImageFile>> {
    let mut files = vec![ImageFile {
        path: path_in_image.trim_start_matches('/').to_string(),
        mode: 0o755,
        contents: fs::read(bin).with_context(|| format!("reading {}", bin.display()))?,
    }];
    let ldd = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        files.push(ImageFile {
            path: path.trim_start_matches('/').to_string(),
            mode: 0o755,
            contents: fs::read(path).with_context(|| format!("reading {path}"))?,
        });
    }
    if files.len() < 3 {
        anyhow::bail!(
            "ldd found no libraries for {}: {}",
            bin.display(),
            String::from_utf8_lossy(&ldd.stdout)
        );
    }
    Ok(files)
}

/// A regular file of a test image.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Path in the image, relative (`lib/x86_64-linux-gnu/libc.so.6`) or absolute.
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

/// `<workspace>/target/mig-e2e/images`, or under `CARGO_TARGET_DIR` when set.
pub fn image_cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_dir().join("target"));
    target.join("mig-e2e").join("images")
}

fn build_layout(name: &str, cmd: &[&str], busybox: &[u8], files: &[ImageFile]) -> Result<Vec<u8>> {
    layout(name, cmd, &rootfs_layer(busybox, files)?)
}

/// An OCI image layout tar of one image named `name`, with one uncompressed `layer` (a tar) and
/// default command `cmd`.
pub(crate) fn layout(name: &str, cmd: &[&str], layer: &[u8]) -> Result<Vec<u8>> {
    let layer_digest = sha256(layer);
    let config = serde_json::to_vec(&json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": MEDIA_LAYER,
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": { "architecture": oci_arch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let mut tar = Tar::new();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    tar.file("index.json", 0o644, &index)?;
    tar.dir("blobs", 0o755)?;
    tar.dir("blobs/sha256", 0o755)?;
    for (digest, blob) in [
        (layer_digest, layer),
        (config_digest, &config[..]),
        (manifest_digest, &manifest[..]),
    ] {
        tar.file(&format!("blobs/sha256/{digest}"), 0o644, blob)?;
    }
    Ok(tar.finish())
}

/// The root filesystem: busybox, a symlink per applet it was built with, the few files and
/// directories a shell expects, and `files`.
fn rootfs_layer(busybox: &[u8], files: &[ImageFile]) -> Result<Vec<u8>> {
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    let mut applets: Vec<String> = String::from_utf8(list.stdout)?
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();

    let mut tar = Tar::new();
    let mut dirs: Vec<String> = Vec::new();
    for dir in ["bin", "dev", "etc", "proc", "root", "run", "sys", "var"] {
        tar.dir(dir, 0o755)?;
        dirs.push(dir.to_string());
    }
    tar.dir("tmp", 0o1777)?;
    dirs.push("tmp".to_string());
    tar.file("bin/busybox", 0o755, busybox)?;
    for applet in &applets {
        tar.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    tar.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    tar.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    tar.file("etc/hostname", 0o644, b"mig\n")?;
    for f in files {
        let path = f.path.trim_start_matches('/');
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                tar.dir(&parent, 0o755)?;
                dirs.push(parent.clone());
            }
        }
        tar.file(path, f.mode, &f.contents)?;
    }
    Ok(tar.finish())
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// True when `path` is an image archive this module would accept (used by tests of the module).
pub fn is_oci_archive(path: &Path) -> bool {
    Command::new("tar")
        .arg("-tf")
        .arg(path)
        .output()
        .map(|o| {
            let names = String::from_utf8_lossy(&o.stdout);
            o.status.success()
                && names.lines().any(|l| l == "index.json")
                && names.lines().any(|l| l == "oci-layout")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_image_is_an_oci_layout_and_cached() {
        if !Path::new(BUSYBOX).exists() {
            crate::note_skip(
                "busybox_image_is_an_oci_layout_and_cached",
                &format!("{BUSYBOX} is missing"),
            );
            return;
        }
        let a = TestImage::busybox().unwrap();
        assert!(is_oci_archive(&a.archive), "{}", a.archive.display());
        let mtime = fs::metadata(&a.archive).unwrap().modified().unwrap();
        let b = TestImage::busybox().unwrap();
        assert_eq!(a.archive, b.archive);
        assert_eq!(
            mtime,
            fs::metadata(&b.archive).unwrap().modified().unwrap(),
            "rebuilt a cached image"
        );
    }

    #[test]
    fn layer_is_deterministic() {
        let fake = b"not really busybox";
        if !Path::new(BUSYBOX).exists() {
            crate::note_skip("layer_is_deterministic", &format!("{BUSYBOX} is missing"));
            return;
        }
        assert_eq!(
            build_layout("x:y", &["sh"], fake, &[]).unwrap(),
            build_layout("x:y", &["sh"], fake, &[]).unwrap()
        );
    }
}
