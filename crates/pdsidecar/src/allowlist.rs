//! SSRF protection: which prefill targets the sidecar may call.
//!
//! The reference (`--enable-ssrf-protection`) allows the pod IPs of its InferencePool, watched
//! through the Kubernetes API, and compares hosts only (ports are ignored). This sidecar takes
//! the list directly (`--ssrf-allowlist`, `--ssrf-allowlist-file`): IP addresses, CIDR ranges
//! and DNS names (matched exactly, case-insensitively, never resolved), ports ignored likewise.

use std::collections::HashSet;
use std::net::IpAddr;

/// Allowed prefill hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    ips: HashSet<IpAddr>,
    names: HashSet<String>,
    nets: Vec<(IpAddr, u8)>,
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Allowlist {
    /// Parses entries (blank entries and `#` comments skipped).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut list = Self::default();
        for raw in entries {
            let e = raw.split('#').next().unwrap_or("").trim();
            if e.is_empty() {
                continue;
            }
            if let Some((net, bits)) = e.split_once('/') {
                let net: IpAddr = net
                    .parse()
                    .map_err(|_| format!("allowlist entry {e:?}: not an IP network"))?;
                let max = if net.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| {
                    format!("allowlist entry {e:?}: prefix length must be 0-{max}")
                })?;
                list.nets.push((net, bits));
            } else if let Ok(ip) = e
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                list.ips.insert(ip);
            } else if e
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                list.names.insert(e.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "allowlist entry {e:?}: expected an IP address, a CIDR range or a DNS name"
                ));
            }
        }
        Ok(list)
    }

    /// Whether `host` (an IP address or DNS name, without port) may be called.
    pub fn allows(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip) || self.nets.iter().any(|(n, b)| in_net(ip, *n, *b)),
            Err(_) => self.names.contains(&host.to_ascii_lowercase()),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ips.len() + self.names.len() + self.nets.len()
    }

    /// Whether the list allows nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_networks_and_names() {
        let a = Allowlist::parse([
            "10.0.0.7",
            "192.168.0.0/16 # pods",
            "",
            "Prefill-0.NS.svc",
            "fd00::/8",
            "[::1]",
        ])
        .unwrap();
        assert_eq!(a.len(), 5);
        assert!(a.allows("10.0.0.7"));
        assert!(!a.allows("10.0.0.8"));
        assert!(a.allows("192.168.3.4"));
        assert!(!a.allows("192.169.0.1"));
        assert!(a.allows("prefill-0.ns.svc"));
        assert!(!a.allows("prefill-1.ns.svc"));
        assert!(a.allows("fd12::1"));
        assert!(a.allows("::1"));
        assert!(!a.allows("fe80::1"));
        let all = Allowlist::parse(["0.0.0.0/0"]).unwrap();
        assert!(all.allows("8.8.8.8"));
        assert!(!all.allows("::1"));
        assert!(Allowlist::parse(Vec::<&str>::new()).unwrap().is_empty());
    }

    #[test]
    fn bad_entries_say_why() {
        assert!(
            Allowlist::parse(["10.0.0.0/33"])
                .unwrap_err()
                .contains("0-32")
        );
        assert!(
            Allowlist::parse(["x/8"])
                .unwrap_err()
                .contains("IP network")
        );
        assert!(Allowlist::parse(["a b"]).unwrap_err().contains("DNS name"));
    }
}
