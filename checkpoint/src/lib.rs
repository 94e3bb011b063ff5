//! The kubernetes-mig checkpoint: on-disk layout, manifest, verification and workload identity.
//!
//! The shim writes a checkpoint when a container is stopped for migration; the restoring side
//! (the shim on another node, after the migration server has streamed the directory there)
//! verifies it and restores from it. A checkpoint is a directory:
//!
//! ```text
//! <store root>/<key>/            mode 0700, root-owned
//!   verified.json                optional: the writer's stamp that the content was hashed at
//!                                install (boot id, manifest digest, each file's inode, size,
//!                                mtime, ctime), so a restore in the same boot skips hashing
//!   manifest.json                format version, engine + version, workload identity,
//!                                image, creation time (unix seconds), and every file below
//!                                with size and sha256
//!   images/                      written by the engine: CRIU *.img or DMTCP ckpt_*.dmtcp
//!   rootfs/upper.tar             the container's overlay upper layer (see [`archive`])
//!   volumes/<name>.tar           the content of each of the pod's local volumes
//! ```
//!
//! Every file is mode 0600. Nothing else may be in the directory: [`Checkpoint::verify`]
//! rejects unlisted files, symlinks and devices as firmly as missing or altered ones.
//!
//! The flow:
//!
//! ```no_run
//! # fn main() -> mig_checkpoint::Result<()> {
//! use mig_checkpoint::{EngineInfo, SafeName, Store, WorkloadIdentity};
//! use std::path::Path;
//!
//! let store = Store::open(Store::DEFAULT_ROOT)?;
//! let identity = WorkloadIdentity::kubernetes("default", "redis", "redis")?;
//! let engine = EngineInfo::new("criu", "4.2.1");
//!
//! // Source node.
//! let mut writer = store.begin(&identity)?;
//! let images = writer.images_dir()?; // hand to `runc checkpoint --image-path`
//! writer.add_upper_layer(Path::new("/run/.../rootfs-upper"))?;
//! writer.add_volume(&SafeName::new("data")?, Path::new("/var/lib/kubelet/.../data"))?;
//! let checkpoint = writer.commit(engine.clone(), "docker.io/library/redis:7")?;
//!
//! // Destination node, once the directory has arrived.
//! if let Some(checkpoint) = store.pending(&identity)? {
//!     checkpoint.verify_for_restore(&engine)?;
//!     // ... unpack_upper(), restore from checkpoint.images_dir() ...
//!     store.consume(checkpoint)?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod archive;
mod checkpoint;
mod error;
mod identity;
mod manifest;
mod name;
pub mod room;
mod stamp;
mod store;
mod sys;
mod tail;
mod writer;

pub use archive::{pack_tree, pack_tree_hashed, unpack_tree, unpack_tree as unpack_upper};
pub use checkpoint::{Checkpoint, Verified};
pub use error::{Corruption, Error, Result};
pub use identity::{WorkloadIdentity, annotations, workload_from_pod_name};
pub use manifest::{
    EngineInfo, FORMAT_VERSION, FileEntry, IMAGES_DIR, MANIFEST_FILE, Manifest, ROOTFS_DIR,
    UPPER_LAYER_FILE, VOLUMES_DIR, sha256_file, validate_relative_path,
};
pub use name::SafeName;
pub use stamp::{boot_id, mtime_ns};
pub use store::Store;
pub use writer::CheckpointWriter;
