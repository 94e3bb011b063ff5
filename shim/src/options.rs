//! Runtime options: what containerd's configuration says about how to run runc.
//!
//! containerd hands a shim whose `runtime_type` is not runc's its `runtimes.<handler>.options`
//! table as `runtimeoptions.v1.Options{type_url, config_path, config_body}`, `config_body` being
//! the table re-encoded as TOML. Clients that speak to the shim like to runc's
//! (`ctr run --runc-binary`, ...) send `containerd.runc.v1.Options` instead. Both are decoded into
//! one [`RuntimeOptions`]; anything else is refused rather than silently defaulted, because a
//! missed `SystemdCgroup = true` makes runc reject the kubelet's cgroup paths much later.

use containerd_shim::protos::{
    protobuf::{Message, well_known_types::any::Any},
    shim::oci::Options as RuncOptions,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
const RUNC_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

/// The options this shim understands, whichever way they arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeOptions {
    /// Let systemd manage the container's cgroups (`runc --systemd-cgroup`).
    #[serde(rename = "SystemdCgroup", default)]
    pub systemd_cgroup: bool,
    /// The runc binary to run; `runc` on PATH when empty.
    #[serde(rename = "BinaryName", default)]
    pub binary_name: String,
    /// runc's state root; a per-containerd, per-namespace default when empty.
    #[serde(rename = "Root", default)]
    pub root: String,
    /// Do not use pivot_root (ramdisk roots).
    #[serde(rename = "NoPivotRoot", default)]
    pub no_pivot_root: bool,
    /// Do not create a new session keyring.
    #[serde(rename = "NoNewKeyring", default)]
    pub no_new_keyring: bool,
    /// Checkpoint engine for containers of this runtime (`criu` or `dmtcp`); a pod annotation
    /// `mig.dev/engine` overrides it.
    #[serde(rename = "Engine", default)]
    pub engine: String,
    /// Where the node keeps checkpoints and per-container state.
    #[serde(rename = "StateDir", default)]
    pub state_dir: String,
    /// Where DMTCP is installed on the node (its `bin/` holds `dmtcp_launch`).
    #[serde(rename = "DmtcpDir", default)]
    pub dmtcp_dir: String,
    /// How CRIU locks a container's network while it dumps: `auto` (default: nftables where
    /// the node's CRIU supports it, else iptables), `nftables` or `iptables`.
    #[serde(rename = "CriuNetworkLock", default)]
    pub criu_network_lock: String,
    /// When a CRIU restore runs the program before all of its memory is back, a `criu
    /// lazy-pages` daemon filling it in from the node's copy of the checkpoint: `auto`
    /// (default: checkpoints of 64 MiB of pages or more, where the kernel has userfaultfd),
    /// `always` or `never`.
    #[serde(rename = "CriuLazyPages", default)]
    pub criu_lazy_pages: String,
    /// Where a migration's CRIU checkpoint is written when the node has the memory for it (a
    /// tmpfs; see `mig_checkpoint::room`): empty for the default (a directory per state root
    /// under /dev/shm/kubernetes-mig), `off` to always write to disk. The node agent must be
    /// given the same (`--memory-dir`).
    #[serde(rename = "MemoryDir", default)]
    pub memory_dir: String,
    /// containerd's runc options that this shim accepts but has no use for.
    #[serde(rename = "ShimCgroup", default)]
    pub shim_cgroup: String,
    /// See `ShimCgroup`.
    #[serde(rename = "IoUid", default)]
    pub io_uid: u32,
    /// See `ShimCgroup`.
    #[serde(rename = "IoGid", default)]
    pub io_gid: u32,
    /// Default CRIU image path for containerd's checkpoint calls (accepted, unused: containerd
    /// passes the path with each call).
    #[serde(rename = "CriuImagePath", default)]
    pub criu_image_path: String,
    /// See `CriuImagePath`.
    #[serde(rename = "CriuWorkPath", default)]
    pub criu_work_path: String,
}

impl RuntimeOptions {
    /// Decodes the `options` of a CreateTaskRequest. `None` means the defaults.
    pub fn from_any(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(Self::default());
        };
        let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
        match type_name {
            RUNTIME_OPTIONS_TYPE => {
                let fields = decode_runtimeoptions(&any.value)?;
                let body = if !fields.config_body.is_empty() {
                    fields.config_body
                } else if !fields.config_path.is_empty() {
                    std::fs::read_to_string(&fields.config_path).map_err(Error::io(format!(
                        "read runtime options file {}",
                        fields.config_path
                    )))?
                } else {
                    String::new()
                };
                Self::from_toml(&body)
            }
            RUNC_OPTIONS_TYPE => {
                let o = RuncOptions::parse_from_bytes(&any.value).map_err(|e| {
                    Error::InvalidArgument(format!("decode {RUNC_OPTIONS_TYPE}: {e}"))
                })?;
                Ok(Self {
                    systemd_cgroup: o.systemd_cgroup,
                    binary_name: o.binary_name,
                    root: o.root,
                    no_pivot_root: o.no_pivot_root,
                    no_new_keyring: o.no_new_keyring,
                    shim_cgroup: o.shim_cgroup,
                    io_uid: o.io_uid,
                    io_gid: o.io_gid,
                    criu_image_path: o.criu_image_path,
                    criu_work_path: o.criu_work_path,
                    ..Self::default()
                })
            }
            other => Err(Error::InvalidArgument(format!(
                "unsupported runtime options type {other:?}: expected {RUNTIME_OPTIONS_TYPE} \
                 (the runtime's options table in containerd's config) or {RUNC_OPTIONS_TYPE}"
            ))),
        }
    }

    /// Parses the TOML of a `runtimes.<handler>.options` table.
    pub fn from_toml(body: &str) -> Result<Self> {
        toml::from_str(body).map_err(|e| {
            Error::InvalidArgument(format!(
                "runtime options (containerd config `runtimes.<handler>.options`) are invalid: \
                 {}; known keys: SystemdCgroup, BinaryName, Root, NoPivotRoot, NoNewKeyring, \
                 Engine, StateDir, DmtcpDir, ShimCgroup, IoUid, IoGid, CriuImagePath, CriuWorkPath",
                e.message()
            ))
        })
    }
}

/// The three fields of `runtimeoptions.v1.Options`, which the protos crate does not define.
#[derive(Debug, Default, PartialEq, Eq)]
struct RuntimeOptionsFields {
    type_url: String,
    config_path: String,
    config_body: String,
}

/// Decodes `runtimeoptions.v1.Options` by hand: three length-delimited string fields.
fn decode_runtimeoptions(mut buf: &[u8]) -> Result<RuntimeOptionsFields> {
    let bad = |what: &str| Error::InvalidArgument(format!("decode {RUNTIME_OPTIONS_TYPE}: {what}"));
    let mut out = RuntimeOptionsFields::default();
    while !buf.is_empty() {
        let (key, rest) = read_varint(buf).ok_or_else(|| bad("truncated field key"))?;
        buf = rest;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            2 => {
                let (len, rest) = read_varint(buf).ok_or_else(|| bad("truncated length"))?;
                let len = usize::try_from(len).map_err(|_| bad("length overflow"))?;
                if rest.len() < len {
                    return Err(bad("field longer than message"));
                }
                let (value, rest) = rest.split_at(len);
                buf = rest;
                let value = String::from_utf8(value.to_vec()).map_err(|_| bad("not UTF-8"))?;
                match field {
                    1 => out.type_url = value,
                    2 => out.config_path = value,
                    3 => out.config_body = value,
                    _ => {}
                }
            }
            0 => buf = read_varint(buf).ok_or_else(|| bad("truncated varint"))?.1,
            1 => buf = buf.get(8..).ok_or_else(|| bad("truncated fixed64"))?,
            5 => buf = buf.get(4..).ok_or_else(|| bad("truncated fixed32"))?,
            w => return Err(bad(&format!("unsupported wire type {w}"))),
        }
    }
    Ok(out)
}

fn read_varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &buf[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, s) in fields {
            out.push((n << 3) | 2);
            let mut len = s.len();
            loop {
                let b = (len & 0x7f) as u8;
                len >>= 7;
                if len == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_config_body_from_containerd_config() {
        let body = "SystemdCgroup = true\nEngine = \"criu\"\n";
        let a = any(
            "runtimeoptions.v1.Options",
            encode(&[(1, "io.containerd.mig.v1.Options"), (3, body)]),
        );
        let o = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert!(o.systemd_cgroup);
        assert_eq!(o.engine, "criu");
    }

    #[test]
    fn long_bodies_use_multi_byte_lengths() {
        let body = format!("BinaryName = \"{}\"", "r".repeat(300));
        let a = any("runtimeoptions.v1.Options", encode(&[(3, &body)]));
        assert_eq!(
            RuntimeOptions::from_any(Some(&a))
                .unwrap()
                .binary_name
                .len(),
            300
        );
    }

    #[test]
    fn unknown_keys_are_an_error_that_names_them() {
        let a = any(
            "runtimeoptions.v1.Options",
            encode(&[(3, "SystemCgroup = true")]),
        );
        let err = RuntimeOptions::from_any(Some(&a)).unwrap_err().to_string();
        assert!(err.contains("SystemCgroup"), "{err}");
        assert!(err.contains("known keys"), "{err}");
    }

    #[test]
    fn unknown_option_types_are_refused() {
        let a = any("types.example/some.Other", vec![]);
        let err = RuntimeOptions::from_any(Some(&a)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(err.to_string().contains("some.Other"));
    }

    #[test]
    fn runc_options_are_accepted() {
        let o = RuncOptions {
            systemd_cgroup: true,
            binary_name: "/usr/sbin/runc".into(),
            ..Default::default()
        };
        let a = any(
            "containerd.runc.v1.Options",
            o.write_to_bytes().expect("encode"),
        );
        let got = RuntimeOptions::from_any(Some(&a)).unwrap();
        assert!(got.systemd_cgroup);
        assert_eq!(got.binary_name, "/usr/sbin/runc");
    }

    #[test]
    fn absent_options_are_the_defaults() {
        assert_eq!(
            RuntimeOptions::from_any(None).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn truncated_messages_are_errors() {
        let mut bytes = encode(&[(3, "SystemdCgroup = true")]);
        bytes.truncate(5);
        let a = any("runtimeoptions.v1.Options", bytes);
        assert!(RuntimeOptions::from_any(Some(&a)).is_err());
    }
}
