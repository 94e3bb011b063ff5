//! [`HttpKube`]: the [`KubeApi`] over plain HTTP+JSON (reqwest, rustls), with credentials from
//! the pod's service account (in cluster) or a minimal kubeconfig.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use super::{Deployment, KubeApi, KubeError, Pod};
use crate::transfer::error_chain;

/// Where the service account's credentials are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn err(status: Option<u16>, message: impl Into<String>) -> KubeError {
    KubeError {
        status,
        message: message.into(),
    }
}

/// How to reach and authenticate to the API server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KubeConfig {
    /// `https://host:port` (or `http://` for a test server).
    pub server: String,
    /// Bearer token.
    pub token: Option<String>,
    /// PEM of the CA that signed the API server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of a client certificate followed by its key.
    pub client_pem: Option<Vec<u8>>,
    /// Skip verification of the server's certificate (kubeconfig `insecure-skip-tls-verify`).
    pub insecure: bool,
}

impl KubeConfig {
    /// In-cluster: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's token and CA.
    pub fn in_cluster() -> Result<Self, KubeError> {
        Self::in_cluster_from(
            std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            std::env::var("KUBERNETES_SERVICE_PORT").ok(),
            Path::new(SERVICE_ACCOUNT_DIR),
        )
    }

    /// [`KubeConfig::in_cluster`] with the environment and directory given.
    pub fn in_cluster_from(
        host: Option<String>,
        port: Option<String>,
        dir: &Path,
    ) -> Result<Self, KubeError> {
        let host = host.ok_or_else(|| {
            err(
                None,
                "KUBERNETES_SERVICE_HOST is not set: not running in a pod; pass --kubeconfig",
            )
        })?;
        let port = port.unwrap_or_else(|| "443".into());
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| err(None, format!("read {}: {e}", path.display())))
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_string();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self {
            server: format!("https://{host}:{port}"),
            token: Some(token),
            ca_pem: Some(read("ca.crt")?),
            client_pem: None,
            insecure: false,
        })
    }

    /// A kubeconfig, minimally: the first cluster's `server`, `certificate-authority(-data)`,
    /// `insecure-skip-tls-verify` and the first user's `token`, `client-certificate(-data)`,
    /// `client-key(-data)`. Contexts are ignored, so give it a single-context file, e.g.
    /// `kubectl config view --minify --flatten --raw > mig.kubeconfig`. Exec and auth-provider
    /// plugins are not supported.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(None, format!("read kubeconfig {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_kubeconfig(&text, base)
    }

    /// Parses kubeconfig text (YAML as kubectl writes it, or JSON); relative file paths are
    /// resolved against `base`.
    pub fn parse_kubeconfig(text: &str, base: &Path) -> Result<Self, KubeError> {
        let fields = scan_kubeconfig(text);
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let server = get("server").ok_or_else(|| err(None, "kubeconfig has no cluster server"))?;
        let file = |v: String| {
            let p = PathBuf::from(&v);
            let p = if p.is_absolute() { p } else { base.join(p) };
            std::fs::read(&p).map_err(|e| err(None, format!("read {}: {e}", p.display())))
        };
        let data_or_file = |data: &str, file_key: &str| -> Result<Option<Vec<u8>>, KubeError> {
            if let Some(d) = get(data) {
                return base64_decode(&d)
                    .map(Some)
                    .ok_or_else(|| err(None, format!("kubeconfig {data} is not valid base64")));
            }
            get(file_key).map(file).transpose()
        };
        let ca_pem = data_or_file("certificate-authority-data", "certificate-authority")?;
        let cert = data_or_file("client-certificate-data", "client-certificate")?;
        let key = data_or_file("client-key-data", "client-key")?;
        let client_pem = match (cert, key) {
            (Some(mut c), Some(k)) => {
                c.push(b'\n');
                c.extend(k);
                Some(c)
            }
            (None, None) => None,
            _ => {
                return Err(err(
                    None,
                    "kubeconfig has a client certificate or key without the other",
                ));
            }
        };
        Ok(Self {
            server,
            token: get("token"),
            ca_pem,
            client_pem,
            insecure: get("insecure-skip-tls-verify").as_deref() == Some("true"),
        })
    }
}

/// `key: value` pairs of a kubeconfig in document order, from YAML lines (`- key: v` and
/// `key: v`, quotes removed) or from JSON (`"key": "v"`).
fn scan_kubeconfig(text: &str) -> Vec<(String, String)> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let mut out = Vec::new();
        fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match v {
                            serde_json::Value::String(s) => out.push((k.clone(), s.clone())),
                            serde_json::Value::Bool(b) => out.push((k.clone(), b.to_string())),
                            other => walk(other, out),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(&v, &mut out);
        return out;
    }
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start().trim_start_matches("- ").trim();
            let (k, v) = line.split_once(':')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            (!v.is_empty() && !k.contains(' ')).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for b in s.bytes().filter(|b| !b.is_ascii_whitespace()) {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// [`KubeApi`] over HTTP.
#[derive(Clone)]
pub struct HttpKube {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl HttpKube {
    /// A client for `config`.
    pub fn new(config: &KubeConfig) -> Result<Self, KubeError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(ca) = &config.ca_pem {
            let cert = reqwest::Certificate::from_pem(ca)
                .map_err(|e| err(None, format!("invalid CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some(pem) = &config.client_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| err(None, format!("invalid client certificate or key: {e}")))?;
            builder = builder.identity(id);
        }
        if config.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(|e| {
            err(
                None,
                format!("building the HTTP client: {}", error_chain(&e)),
            )
        })?;
        Ok(Self {
            http,
            server: config.server.trim_end_matches('/').to_string(),
            token: config.token.clone(),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T, KubeError> {
        let request = match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let response = request
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| err(None, format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| {
            err(
                Some(status.as_u16()),
                format!("{what}: {}", error_chain(&e)),
            )
        })?;
        if !status.is_success() {
            // A `Status` object: its message says what was wrong.
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or(text);
            return Err(err(
                Some(status.as_u16()),
                format!("{what}: {status}: {message}"),
            ));
        }
        serde_json::from_str(&text).map_err(|e| {
            err(
                Some(status.as_u16()),
                format!("{what}: unexpected answer: {e}"),
            )
        })
    }
}

#[derive(serde::Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

#[async_trait]
impl KubeApi for HttpKube {
    async fn get_deployment(&self, namespace: &str, name: &str) -> Result<Deployment, KubeError> {
        let url = format!(
            "{}/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
            self.server
        );
        self.call(
            self.http.get(url),
            &format!("get deployment {namespace}/{name}"),
        )
        .await
    }

    async fn list_pods(
        &self,
        namespace: &str,
        label_selector: &str,
        node: Option<&str>,
    ) -> Result<Vec<Pod>, KubeError> {
        let url = format!("{}/api/v1/namespaces/{namespace}/pods", self.server);
        let mut query = vec![("labelSelector", label_selector.to_string())];
        if let Some(node) = node {
            query.push(("fieldSelector", format!("spec.nodeName={node}")));
        }
        let list: PodList = self
            .call(
                self.http.get(url).query(&query),
                &format!("list pods {namespace} {label_selector}"),
            )
            .await?;
        Ok(list.items)
    }

    async fn patch_deployment(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Deployment, KubeError> {
        let url = format!(
            "{}/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
            self.server
        );
        let request = self
            .http
            .patch(url)
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string());
        self.call(request, &format!("patch deployment {namespace}/{name}"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn kubeconfig_yaml_minimal() {
        let text = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: aGVsbG8=\n    server: https://10.0.0.1:6443\n  name: k\ncontexts:\n- context:\n    cluster: k\n    user: admin\n  name: k\ncurrent-context: k\nkind: Config\nusers:\n- name: admin\n  user:\n    token: \"abc.def\"\n";
        let c = KubeConfig::parse_kubeconfig(text, Path::new("/")).unwrap();
        assert_eq!(c.server, "https://10.0.0.1:6443");
        assert_eq!(c.token.as_deref(), Some("abc.def"));
        assert_eq!(c.ca_pem.as_deref(), Some(&b"hello"[..]));
        assert!(c.client_pem.is_none());
        assert!(!c.insecure);
    }

    #[test]
    fn kubeconfig_json_and_in_cluster() {
        let text = r#"{"clusters":[{"cluster":{"server":"https://h:6443","insecure-skip-tls-verify":true}}],"users":[{"user":{"token":"t"}}]}"#;
        let c = KubeConfig::parse_kubeconfig(text, Path::new("/")).unwrap();
        assert_eq!((c.server.as_str(), c.insecure), ("https://h:6443", true));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "sa-token\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "PEM").unwrap();
        let c =
            KubeConfig::in_cluster_from(Some("10.96.0.1".into()), Some("443".into()), dir.path())
                .unwrap();
        assert_eq!(c.server, "https://10.96.0.1:443");
        assert_eq!(c.token.as_deref(), Some("sa-token"));
        assert!(KubeConfig::in_cluster_from(None, None, dir.path()).is_err());
    }
}
