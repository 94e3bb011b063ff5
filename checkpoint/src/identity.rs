//! Which workload a checkpoint belongs to, and the store key derived from it.
//!
//! A migrated container comes back as a *new* container (new id, usually a new pod name) on
//! another node, so a checkpoint cannot be found by container id. It is found by the identity
//! of the workload instead: the Kubernetes namespace, the owning workload and the container's
//! name in the pod spec, which the replacement container shares with the original.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manifest::hex;
use crate::name::SafeName;

/// Annotation keys read from the OCI runtime spec.
pub mod annotations {
    /// Set by containerd's CRI plugin: the pod's namespace.
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    /// Set by containerd's CRI plugin: the pod's name.
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    /// Set by containerd's CRI plugin: the container's name in the pod spec.
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    /// kubernetes-mig's own pod annotation naming the owning workload. containerd copies pod
    /// annotations into the container's spec only when the runtime handler lists them in
    /// `pod_annotations`, so the handler's configuration must include `mig.dev/*`.
    pub const WORKLOAD: &str = "mig.dev/workload";
}

/// The alphabet of Kubernetes' `rand.String` and `rand.SafeEncodeString`, used for both the
/// ReplicaSet's pod-template-hash and the pod name's random suffix. It has no vowels and no
/// `0`, `1`, `3`, which is what lets us tell those parts from ordinary name words.
const K8S_RAND_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The workload a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkloadIdentity {
    /// A container of a Kubernetes pod.
    Kubernetes {
        /// The pod's namespace.
        namespace: String,
        /// The owning workload's name (Deployment, StatefulSet member, ...), else the pod's.
        workload: String,
        /// The container's name in the pod spec.
        container: String,
    },
    /// A container started outside Kubernetes (e.g. with `ctr`).
    Container {
        /// The containerd namespace.
        namespace: String,
        /// The container id.
        id: String,
    },
}

impl WorkloadIdentity {
    /// A Kubernetes container's identity. Fields must be non-empty and free of NUL bytes.
    pub fn kubernetes(
        namespace: impl Into<String>,
        workload: impl Into<String>,
        container: impl Into<String>,
    ) -> Result<Self> {
        let id = Self::Kubernetes {
            namespace: namespace.into(),
            workload: workload.into(),
            container: container.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// A plain containerd container's identity. Fields must be non-empty and free of NUL bytes.
    pub fn container(namespace: impl Into<String>, id: impl Into<String>) -> Result<Self> {
        let id = Self::Container {
            namespace: namespace.into(),
            id: id.into(),
        };
        id.validate()?;
        Ok(id)
    }

    /// Builds the identity from a container's OCI spec annotations.
    ///
    /// With all three CRI annotations present the container is a Kubernetes container; its
    /// workload is the `mig.dev/workload` annotation when set, else derived from the pod name
    /// by [`workload_from_pod_name`]. Otherwise (a container run outside Kubernetes, or a
    /// pod's sandbox container, which has no container name) it is identified by
    /// `containerd_namespace` and `container_id`.
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
        containerd_namespace: &str,
        container_id: &str,
    ) -> Result<Self> {
        let get = |key: &str| {
            annotations
                .get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        match (
            get(annotations::SANDBOX_NAMESPACE),
            get(annotations::SANDBOX_NAME),
            get(annotations::CONTAINER_NAME),
        ) {
            (Some(namespace), Some(pod), Some(container)) => {
                let workload = get(annotations::WORKLOAD).unwrap_or(workload_from_pod_name(pod));
                Self::kubernetes(namespace, workload, container)
            }
            _ => Self::container(containerd_namespace, container_id),
        }
    }

    fn parts(&self) -> (&'static str, Vec<&str>) {
        match self {
            Self::Kubernetes {
                namespace,
                workload,
                container,
            } => ("k8s", vec![namespace, workload, container]),
            Self::Container { namespace, id } => ("ctr", vec![namespace, id]),
        }
    }

    fn validate(&self) -> Result<()> {
        let (kind, parts) = self.parts();
        for part in parts {
            if part.is_empty() || part.contains('\0') {
                return Err(Error::InvalidIdentity {
                    reason: format!("{kind} identity {self}: empty field or NUL byte"),
                });
            }
        }
        Ok(())
    }

    /// The directory name of this workload's checkpoint in a [`crate::Store`]; see
    /// [`WorkloadIdentity::safe_key`].
    pub fn key(&self) -> String {
        self.safe_key().into()
    }

    /// The key as a validated [`SafeName`].
    ///
    /// When every field is made only of `[A-Za-z0-9.-]` and starts with a letter or digit
    /// (always true for Kubernetes names, which are DNS labels or subdomains) the key is
    /// readable: `k8s_<namespace>_<workload>_<container>`
    /// or `ctr_<namespace>_<id>`; `_` cannot occur inside a field, so the key is unambiguous.
    /// Any other field, or a key that would exceed [`SafeName::MAX_LEN`], gives
    /// `hashed_<kind>.<sanitised, truncated fields>_<128-bit sha256 prefix of the exact fields>`,
    /// whose `hashed_` prefix no readable key has. Equal identities give equal keys on every node.
    pub fn safe_key(&self) -> SafeName {
        let (kind, parts) = self.parts();
        let plain = |p: &str| {
            p.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        };
        if parts.iter().all(|p| plain(p)) {
            let key = format!("{kind}_{}", parts.join("_"));
            if key.len() <= SafeName::MAX_LEN {
                return SafeName::from_trusted(key);
            }
        }
        // Length-prefixing each field keeps the hashed encoding unambiguous whatever the fields
        // contain.
        let mut hasher = Sha256::new();
        hasher.update(kind.as_bytes());
        for part in &parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hex(&hasher.finalize()[..16]);
        let readable: String = parts
            .join(".")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(120)
            .collect();
        SafeName::from_trusted(format!("hashed_{kind}.{readable}_{digest}"))
    }
}

impl fmt::Display for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kubernetes {
                namespace,
                workload,
                container,
            } => write!(
                f,
                "workload {namespace:?}/{workload:?} container {container:?}"
            ),
            Self::Container { namespace, id } => {
                write!(f, "containerd container {namespace:?}/{id:?}")
            }
        }
    }
}

/// The owning workload's name derived from a pod's name.
///
/// A Deployment's pods are named `<deployment>-<pod-template-hash>-<suffix>`: the hash is 6 to
/// 10 characters and the suffix exactly 5, both from Kubernetes' random alphabet
/// (`bcdfghjklmnpqrstvwxz2456789`). Such a name is stripped to `<deployment>`, so the
/// replacement pod (new hash suffix, maybe new ReplicaSet) finds the checkpoint. Every other
/// name is kept whole: a StatefulSet's `redis-0` is one member with its own state and must not
/// pick up `redis-1`'s checkpoint, and DaemonSet/Job pods (`<name>-<suffix>`) are per-node or
/// one-off. The pattern is a heuristic; set the `mig.dev/workload` annotation to be exact.
pub fn workload_from_pod_name(pod: &str) -> &str {
    let in_alphabet = |s: &str| s.bytes().all(|b| K8S_RAND_ALPHABET.contains(&b));
    let mut parts = pod.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(suffix), Some(hash), Some(base))
            if suffix.len() == 5
                && in_alphabet(suffix)
                && (6..=10).contains(&hash.len())
                && in_alphabet(hash)
                && !base.is_empty() =>
        {
            base
        }
        _ => pod,
    }
}
