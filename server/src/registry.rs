//! What the controller knows: registered node agents and registered pods (the original design's
//! `/register/:id+env`, kept for compatibility; migration does not need it).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use mig_checkpoint::SafeName;
use serde::{Deserialize, Serialize};

/// A registered node agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name (`node01`).
    pub name: String,
    /// Base URL of its agent (`http://10.231.0.1:7070`).
    pub address: String,
    /// When it last registered, unix seconds.
    #[serde(default)]
    pub registered_unix: u64,
}

/// A registered pod or container with its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// Its id.
    pub id: String,
    /// Its environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Why an address was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid node address {address:?}: {reason}")]
pub struct AddressError {
    address: String,
    reason: String,
}

/// Normalises a node address to a base URL: `host:port` gets `default_scheme`; only http and
/// https, no credentials, path, query or fragment (the agent's routes are appended to it).
pub fn normalise_address(address: &str, default_scheme: &str) -> Result<String, AddressError> {
    let fail = |reason: &str| AddressError {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else {
        format!("{default_scheme}://{address}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| fail(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(fail("scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail("credentials do not belong in the address"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(fail("expected scheme://host:port with no path"));
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// Nodes and pods.
#[derive(Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<String, NodeInfo>,
    pods: BTreeMap<String, PodInfo>,
}

impl Registry {
    /// Registers (or re-registers) a node; returns whether it is new. The name must be a
    /// [`SafeName`]: it appears in records, metrics labels and logs.
    pub fn register_node(&mut self, name: &SafeName, address: String) -> bool {
        let registered_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        self.nodes
            .insert(
                name.to_string(),
                NodeInfo {
                    name: name.to_string(),
                    address,
                    registered_unix,
                },
            )
            .is_none()
    }

    /// Puts back a node read from the controller's journal, as it was registered.
    pub fn restore_node(&mut self, node: NodeInfo) {
        self.nodes.insert(node.name.clone(), node);
    }

    /// Registers a pod; returns whether it is new.
    pub fn register_pod(&mut self, pod: PodInfo) -> bool {
        self.pods.insert(pod.id.clone(), pod).is_none()
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// All nodes, by name.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.values().cloned().collect()
    }

    /// All pods, by id.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.pods.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised_or_refused() {
        assert_eq!(
            normalise_address("10.231.0.1:7070", "http").as_deref(),
            Ok("http://10.231.0.1:7070")
        );
        assert_eq!(
            normalise_address("https://n1:7070/", "http").as_deref(),
            Ok("https://n1:7070")
        );
        for bad in [
            "ftp://x:1",
            "http://u:p@x:1",
            "http://x:1/path",
            "",
            "http://",
        ] {
            assert!(normalise_address(bad, "http").is_err(), "{bad} accepted");
        }
    }
}
