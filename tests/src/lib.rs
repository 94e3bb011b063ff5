//! Harness for the end-to-end tests: private containerd instances, test images, ctr.
