//! Discovery without Kubernetes: the `--endpoints` flag and the `--endpoints-file` YAML.
//!
//! * `--endpoints 10.0.0.1:8000,[fd00::1]:8000` — IPv4 or bracketed IPv6 socket addresses,
//!   each endpoint named `ip:port`. Host names are refused (nothing is resolved).
//! * `--endpoints-file FILE`:
//!
//!   ```yaml
//!   endpoints:
//!   - name: vllm-0            # optional; defaults to address:port
//!     address: 10.0.0.1       # an IP address
//!     port: 8000              # 1-65535; optional with --endpoint-target-ports
//!     labels:                 # optional
//!       llm-d.ai/role: decode
//!       llm-d.ai/engine-type: vllm
//!   ```
//!
//!   Unknown keys are errors naming the key, the entry and the line; so are a non-IP
//!   address, a port outside 1-65535, and duplicate names or `ip:port` pairs. An empty file is
//!   an error too (an editor truncating the file must not empty the pool); write
//!   `endpoints: []` to mean "no endpoints".
//!
//! `--endpoint-target-ports` follows the reference's per-pod expansion (one endpoint per pod
//! per target port): an address given **without** a port (`10.0.0.1` on the flag, an entry
//! without `port` in the file) becomes one endpoint per target port, named `ip:port` — or
//! `<name>-rank-<i>` for a named file entry, like the reference's `<pod>-rank-<i>`. An
//! explicit port is used as is.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::path::Path;

use llmsched_core::endpoint::EndpointMeta;
use serde::Deserialize;

/// Endpoints that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// A bad `--endpoints` entry.
    #[error("--endpoints: '{entry}': {reason}")]
    Flag {
        /// The entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A bad endpoints file.
    #[error("{source_name}: {detail}")]
    File {
        /// The file.
        source_name: String,
        /// What is wrong, with the entry, key and line where known.
        detail: String,
    },
}

/// Parses the `--endpoints` flag (see the module documentation).
pub fn parse_endpoints_flag(
    value: &str,
    target_ports: &[u16],
) -> Result<Vec<EndpointMeta>, DiscoveryError> {
    let mut out: Vec<EndpointMeta> = Vec::new();
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for raw in value.split(',') {
        let entry = raw.trim();
        if entry.is_empty() {
            continue;
        }
        let fail = |reason: String| DiscoveryError::Flag {
            entry: entry.to_string(),
            reason,
        };
        let addrs: Vec<SocketAddr> = if let Ok(sa) = entry.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(fail("port must be between 1 and 65535".into()));
            }
            vec![sa]
        } else if let Some(ip) = parse_bare_ip(entry) {
            if target_ports.is_empty() {
                return Err(fail(
                    "missing port (write ip:port with IPv6 in brackets, [ip]:port, \
                     or set --endpoint-target-ports)"
                        .into(),
                ));
            }
            target_ports
                .iter()
                .map(|&p| SocketAddr::new(ip, p))
                .collect()
        } else {
            return Err(fail(
                "expected ip:port with an IPv4 address or a bracketed IPv6 address \
                 (e.g. 10.0.0.1:8000, [fd00::1]:8000); host names are not resolved"
                    .into(),
            ));
        };
        for sa in addrs {
            if sa.port() == 0 {
                return Err(fail("target port 0 is not a valid port".into()));
            }
            if let Some(prev) = seen.insert(sa, entry.to_string()) {
                return Err(fail(format!("duplicate address {sa} (also from '{prev}')")));
            }
            out.push(EndpointMeta::from_addr(sa));
        }
    }
    Ok(out)
}

fn parse_bare_ip(s: &str) -> Option<IpAddr> {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    inner.parse().ok()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    endpoints: Vec<FileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    #[serde(default)]
    name: Option<String>,
    address: IpAddr,
    #[serde(default)]
    port: Option<NonZeroU16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Parses the text of an endpoints file; `source_name` (the path) prefixes errors.
pub fn parse_endpoints_file(
    text: &str,
    source_name: &str,
    target_ports: &[u16],
) -> Result<Vec<EndpointMeta>, DiscoveryError> {
    let fail = |detail: String| DiscoveryError::File {
        source_name: source_name.to_string(),
        detail,
    };
    if text.trim().is_empty() {
        return Err(fail(
            "file is empty (write `endpoints: []` for no endpoints)".into(),
        ));
    }
    // serde_norway's messages already carry the path and the line/column.
    let doc: FileDoc = serde_norway::from_str(text).map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut addrs: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, e) in doc.endpoints.into_iter().enumerate() {
        if e.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(fail(format!("endpoints[{i}].name: must not be empty")));
        }
        for k in e.labels.keys() {
            if k.is_empty() {
                return Err(fail(format!("endpoints[{i}].labels: empty label key")));
            }
        }
        let expanded: Vec<(String, SocketAddr)> = match e.port {
            Some(p) => {
                let sa = SocketAddr::new(e.address, p.get());
                vec![(e.name.clone().unwrap_or_else(|| sa.to_string()), sa)]
            }
            None if target_ports.is_empty() => {
                return Err(fail(format!(
                    "endpoints[{i}]: missing field `port` (or set --endpoint-target-ports)"
                )));
            }
            None => target_ports
                .iter()
                .enumerate()
                .map(|(rank, &p)| {
                    let sa = SocketAddr::new(e.address, p);
                    let name = match &e.name {
                        Some(n) => format!("{n}-rank-{rank}"),
                        None => sa.to_string(),
                    };
                    (name, sa)
                })
                .collect(),
        };
        for (name, sa) in expanded {
            if sa.port() == 0 {
                return Err(fail(format!("endpoints[{i}]: target port 0 is not valid")));
            }
            if let Some(first) = names.insert(name.clone(), i) {
                return Err(fail(format!(
                    "endpoints[{i}]: duplicate name '{name}' (also endpoints[{first}])"
                )));
            }
            if let Some(first) = addrs.insert(sa, i) {
                return Err(fail(format!(
                    "endpoints[{i}]: duplicate address {sa} (also endpoints[{first}])"
                )));
            }
            out.push(EndpointMeta {
                name,
                address: sa.ip(),
                port: sa.port(),
                labels: e.labels.clone(),
            });
        }
    }
    Ok(out)
}

/// Reads and parses an endpoints file.
pub fn load_endpoints_file(
    path: &Path,
    target_ports: &[u16],
) -> Result<Vec<EndpointMeta>, DiscoveryError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| DiscoveryError::File {
        source_name: name.clone(),
        detail: format!("cannot read: {e}"),
    })?;
    parse_endpoints_file(&text, &name, target_ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_accepts_ipv4_and_bracketed_ipv6() {
        let v = parse_endpoints_flag(" 10.0.0.1:8000, [fd00::1]:9000,", &[]).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name, "10.0.0.1:8000");
        assert_eq!(v[1].name, "[fd00::1]:9000");
        assert_eq!(v[1].port, 9000);
        assert!(v[1].labels.is_empty());
    }

    #[test]
    fn flag_expands_bare_addresses_over_target_ports() {
        let v = parse_endpoints_flag("10.0.0.1,[::1],10.0.0.2:7000", &[8000, 8001]).unwrap();
        let names: Vec<_> = v.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "10.0.0.1:8000",
                "10.0.0.1:8001",
                "[::1]:8000",
                "[::1]:8001",
                "10.0.0.2:7000"
            ]
        );
    }

    #[test]
    fn flag_errors_name_the_entry() {
        for (input, needle) in [
            ("localhost:8000", "host names"),
            ("10.0.0.1", "missing port"),
            ("10.0.0.1:0", "1 and 65535"),
            ("10.0.0.1:70000", "expected ip:port"),
            ("::1:8000", "IPv6 in brackets"),
            ("10.0.0.1:1,10.0.0.1:1", "duplicate address"),
        ] {
            let e = parse_endpoints_flag(input, &[]).unwrap_err().to_string();
            assert!(e.contains(needle), "{input}: {e}");
            assert!(e.starts_with("--endpoints: '"), "{e}");
        }
    }

    #[test]
    fn file_parses_names_labels_and_defaults() {
        let text = "endpoints:\n\
                    - name: vllm-0\n  address: 10.0.0.1\n  port: 8000\n  labels: {llm-d.ai/role: decode}\n\
                    - address: fd00::2\n  port: 8001\n";
        let v = parse_endpoints_file(text, "eps.yaml", &[]).unwrap();
        assert_eq!(v[0].name, "vllm-0");
        assert_eq!(v[0].labels.get("llm-d.ai/role").unwrap(), "decode");
        assert_eq!(v[1].name, "[fd00::2]:8001");
        assert_eq!(
            parse_endpoints_file("endpoints: []\n", "f", &[]).unwrap(),
            vec![]
        );
    }

    #[test]
    fn file_expands_target_ports_with_rank_names() {
        let text = "endpoints:\n- {name: pod-a, address: 10.0.0.1}\n- {address: 10.0.0.2}\n\
                    - {address: 10.0.0.3, port: 9000}\n";
        let v = parse_endpoints_file(text, "f", &[8000, 8001]).unwrap();
        let names: Vec<_> = v.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pod-a-rank-0",
                "pod-a-rank-1",
                "10.0.0.2:8000",
                "10.0.0.2:8001",
                "10.0.0.3:9000"
            ]
        );
        assert_eq!(v[1].port, 8001);
    }

    #[test]
    fn file_errors_name_file_entry_key_and_line() {
        let cases = [
            (
                "endpoints:\n- address: 10.0.0.1\n  port: 8000\n  adress: x\n",
                &[
                    "eps.yaml: ",
                    "endpoints[0]",
                    "unknown field `adress`",
                    "line 4",
                ][..],
            ),
            (
                "endpoints:\n- address: vllm.local\n  port: 8000\n",
                &["endpoints[0].address", "line 2"],
            ),
            (
                "endpoints:\n- address: 10.0.0.1\n  port: 70000\n",
                &["endpoints[0].port", "70000", "line 3"],
            ),
            (
                "endpoints:\n- address: 10.0.0.1\n  port: 0\n",
                &["endpoints[0].port", "nonzero", "line 3"],
            ),
            (
                "endpoints:\n- address: 10.0.0.1\n",
                &["endpoints[0]: missing field `port`"],
            ),
            (
                "endpoints:\n- {name: a, address: 10.0.0.1, port: 1}\n- {name: a, address: 10.0.0.2, port: 1}\n",
                &["endpoints[1]: duplicate name 'a' (also endpoints[0])"],
            ),
            (
                "endpoints:\n- {address: 10.0.0.1, port: 1}\n- {name: b, address: 10.0.0.1, port: 1}\n",
                &["endpoints[1]: duplicate address 10.0.0.1:1"],
            ),
            ("pods: []\n", &["unknown field `pods`"]),
            ("  \n", &["file is empty"]),
            ("endpoints:\n- address: 10.0.0.1\n  port: [1\n", &["line"]),
            (
                "endpoints:\n- {address: 10.0.0.1, port: 1, labels: {a: [x]}}\n",
                &["endpoints[0].labels.a"],
            ),
            (
                "endpoints:\n- {name: '', address: 10.0.0.1, port: 1}\n",
                &["endpoints[0].name: must not be empty"],
            ),
        ];
        for (text, needles) in cases {
            let e = parse_endpoints_file(text, "eps.yaml", &[])
                .unwrap_err()
                .to_string();
            for n in needles {
                assert!(e.contains(n), "{text:?}\n  expected '{n}' in: {e}");
            }
            assert!(e.starts_with("eps.yaml: "), "{e}");
        }
    }
}
