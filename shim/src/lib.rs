//! `containerd-shim-mig-v2`: a containerd runtime v2 shim (task API v3) that runs containers
//! through runc, and checkpoints and restores them so that they can move between nodes.
//!
//! Layout: [`shim`] is the binary's protocol with containerd (start/delete/serve), [`task`] the
//! thin ttrpc layer, [`service`] the operations, [`container`] and [`process`] the state,
//! [`runc`] the seam to runc, [`io`] stdio plumbing, [`options`] the runtime configuration.

pub mod container;
pub mod criu;
pub mod dmtcp;
pub mod error;
pub mod events;
pub mod io;
pub mod lazy;
pub mod loopback;
pub mod node;
pub mod node_cache;
pub mod options;
pub mod overlay;
pub mod postcopy;
pub mod process;
pub mod runc;
pub mod service;
pub mod shim;
pub mod stats;
pub mod task;
pub mod tmpfs;
pub mod workload;
pub mod writeback;

/// This build's version and git revision.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("MIG_GIT_REVISION"));

/// The runtime name containerd knows this shim by (`runtime_type`).
pub const RUNTIME_ID: &str = "io.containerd.mig.v2";
