//! The container's root filesystem, assembled by the shim as an overlay whose upper layer (the
//! container's own file changes) is known, so a checkpoint can carry it to another node.
//!
//! containerd's overlayfs snapshotter hands a writable container one `overlay` mount with
//! `lowerdir=` (the image layers), `upperdir=` and `workdir=`: the shim mounts exactly that and
//! records the upper dir, so containerd's own `--rw` checkpoint still sees the same changes. Any
//! other mount (a bind of a native snapshot, say) becomes the single lower layer of an overlay
//! whose upper dir the shim keeps under the node's state root.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a container's root is and where its changes go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// The mounted root (`<bundle>/rootfs`).
    pub target: PathBuf,
    /// The upper layer: the container's changes to its root.
    pub upper: PathBuf,
    /// The overlay's work dir.
    pub work: PathBuf,
    /// The lower layers, topmost first.
    pub lower: Vec<PathBuf>,
    /// Where containerd's non-overlay mounts were mounted to serve as the lower layer.
    pub lower_mount: Option<PathBuf>,
}

/// The file in the bundle recording [`Rootfs`].
pub const RECORD: &str = "mig-rootfs.json";

/// An overlay layout parsed from containerd's mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The lower dirs, topmost first.
    pub lower: Vec<PathBuf>,
    /// The upper dir.
    pub upper: PathBuf,
    /// The work dir.
    pub work: PathBuf,
    /// Overlay options other than the three dirs (`index=off`, `userxattr`, ...).
    pub options: Vec<String>,
}

/// Parses containerd's mounts: `Some` when they are one writable overlay.
pub fn parse(mounts: &[Mount]) -> Option<Layout> {
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let (mut lower, mut upper, mut work, mut options) = (Vec::new(), None, None, Vec::new());
    for o in &m.options {
        if let Some(v) = o.strip_prefix("lowerdir=") {
            lower = v.split(':').map(PathBuf::from).collect();
        } else if let Some(v) = o.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(v));
        } else if let Some(v) = o.strip_prefix("workdir=") {
            work = Some(PathBuf::from(v));
        } else {
            options.push(o.clone());
        }
    }
    Some(Layout {
        lower,
        upper: upper?,
        work: work?,
        options,
    })
}

/// The overlay mount data for `layout`.
fn mount_data(layout: &Layout) -> String {
    let lower = layout
        .lower
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let mut data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        layout.upper.display(),
        layout.work.display()
    );
    for o in &layout.options {
        data.push(',');
        data.push_str(o);
    }
    data
}

/// Plans the container's root: containerd's overlay as is, or containerd's mounts as the lower
/// layer of an overlay with `scratch/upper` and `scratch/work`.
pub fn plan(mounts: &[Mount], bundle: &Path, scratch: &Path) -> Rootfs {
    let target = bundle.join("rootfs");
    match parse(mounts) {
        Some(l) => Rootfs {
            target,
            upper: l.upper,
            work: l.work,
            lower: l.lower,
            lower_mount: None,
        },
        None => {
            let lower = bundle.join("mig-lower");
            Rootfs {
                target,
                upper: scratch.join("upper"),
                work: scratch.join("work"),
                lower: vec![lower.clone()],
                lower_mount: Some(lower),
            }
        }
    }
}

impl Rootfs {
    /// Mounts the root as planned and records it in the bundle. On failure nothing stays
    /// mounted.
    pub async fn mount(&self, mounts: &[Mount], bundle: &Path) -> Result<()> {
        let options = parse(mounts).map(|l| l.options).unwrap_or_default();
        if let Some(lower) = &self.lower_mount {
            mkdir(lower)?;
            for m in mounts {
                if let Err(e) = containerd_shim::util::mount_rootfs(m, lower).await {
                    unmount(lower);
                    return Err(Error::Other(format!(
                        "mount {} ({}) at {}: {e}",
                        m.source,
                        m.type_,
                        lower.display()
                    )));
                }
            }
        }
        for d in [&self.target, &self.upper, &self.work] {
            mkdir(d)?;
        }
        let layout = Layout {
            lower: self.lower.clone(),
            upper: self.upper.clone(),
            work: self.work.clone(),
            options,
        };
        let data = mount_data(&layout);
        if let Err(e) = nix::mount::mount(
            Some("overlay"),
            &self.target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        ) {
            self.unmount();
            return Err(Error::Other(format!(
                "mount the container's overlay root at {} (upper {}): {e}",
                self.target.display(),
                self.upper.display()
            )));
        }
        let record = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(bundle.join(RECORD), record).map_err(Error::io(format!(
            "record the rootfs in {}",
            bundle.display()
        )))
    }

    /// Unmounts the root (and the lower mount), leaving the layers themselves alone.
    pub fn unmount(&self) {
        unmount(&self.target);
        if let Some(lower) = &self.lower_mount {
            unmount(lower);
        }
    }

    /// Reads the record a create left in `bundle`, for `delete` after a crashed shim.
    pub fn recorded(bundle: &Path) -> Option<Self> {
        let text = std::fs::read(bundle.join(RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(Error::io(format!("create {}", p.display())))
}

/// Unmounts everything at and under `root`; a failure is logged, never fatal (delete must
/// proceed so containerd can clean up).
pub fn unmount(root: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(root.to_str(), libc::MNT_DETACH) {
        tracing::warn!(path = %root.display(), error = %e, "unmount");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn containerds_overlay_is_used_as_is() {
        let m = overlay(&[
            "index=off",
            "workdir=/s/12/work",
            "upperdir=/s/12/fs",
            "lowerdir=/s/3/fs:/s/2/fs",
        ]);
        let l = parse(std::slice::from_ref(&m)).unwrap();
        assert_eq!(l.upper, PathBuf::from("/s/12/fs"));
        assert_eq!(
            l.lower,
            [PathBuf::from("/s/3/fs"), PathBuf::from("/s/2/fs")]
        );
        assert_eq!(
            mount_data(&l),
            "lowerdir=/s/3/fs:/s/2/fs,upperdir=/s/12/fs,workdir=/s/12/work,index=off"
        );
        let r = plan(&[m], Path::new("/b"), Path::new("/state/c"));
        assert_eq!(r.upper, PathBuf::from("/s/12/fs"));
        assert_eq!(r.lower_mount, None);
        assert_eq!(r.target, PathBuf::from("/b/rootfs"));
    }

    #[test]
    fn other_mounts_become_the_lower_layer_with_an_upper_of_our_own() {
        let bind = Mount {
            type_: "bind".into(),
            source: "/snap/1/fs".into(),
            options: vec!["rbind".into(), "rw".into()],
            ..Default::default()
        };
        let r = plan(&[bind], Path::new("/b"), Path::new("/state/c"));
        assert_eq!(r.upper, PathBuf::from("/state/c/upper"));
        assert_eq!(r.lower, [PathBuf::from("/b/mig-lower")]);
        // A read-only overlay (no upperdir) is treated the same way.
        let ro = overlay(&["lowerdir=/a:/b"]);
        assert!(parse(&[ro]).is_none());
    }
}
