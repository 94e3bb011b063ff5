//! containerd-shim-mig-v2.
