//! The `x-prefiller-host-port` header the EPP's `prefill-header-handler` /
//! `disagg-headers-handler` sets: where to prefill this request.
//!
//! As the reference sidecar reads it: all values of the header, a single value split on commas,
//! blanks trimmed; the first candidate is used (a random one with
//! `--enable-prefiller-sampling`); an `http://` prefix is tolerated. An absent header, or one
//! with only blank entries, means "no disaggregation". Unlike the reference, a candidate that
//! is not `host:port` is refused with a 400 instead of failing later as a bad gateway.

use std::net::{IpAddr, Ipv6Addr};

use http::HeaderMap;

/// The header's name.
pub const PREFILLER_HOST_PORT: &str = "x-prefiller-host-port";

/// A parsed prefill target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host: an IP address or a DNS name (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Target {
    /// `host:port` for a URI authority (IPv6 bracketed).
    pub fn authority(&self) -> String {
        if self.host.parse::<Ipv6Addr>().is_ok() {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.authority())
    }
}

/// The header's candidates, in order: every value, a single value split on commas, trimmed,
/// blanks dropped. `Err` when a value is not visible ASCII.
pub fn candidates(headers: &HeaderMap) -> Result<Vec<String>, String> {
    let values: Vec<&str> = headers
        .get_all(PREFILLER_HOST_PORT)
        .iter()
        .map(|v| {
            v.to_str()
                .map_err(|_| format!("{PREFILLER_HOST_PORT} is not valid ASCII"))
        })
        .collect::<Result<_, _>>()?;
    let split: Vec<&str> = if values.len() == 1 {
        values[0].split(',').collect()
    } else {
        values
    };
    Ok(split
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

fn valid_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Parses one candidate: `ipv4:port`, `[ipv6]:port` or `dns-name:port` (an `http://` prefix
/// is tolerated, as by the reference).
pub fn parse_target(raw: &str) -> Result<Target, String> {
    let bad = |why: &str| {
        Err(format!(
            "invalid {PREFILLER_HOST_PORT} value {raw:?}: {why} (expected host:port)"
        ))
    };
    let s = raw.strip_prefix("http://").unwrap_or(raw);
    if s.contains('/') || s.contains('@') || s.contains('?') || s.contains('#') {
        return bad("not a host:port");
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return bad("an IPv6 address must be [addr]:port");
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return bad("not an IPv6 address");
        }
        (h, p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return bad("missing port");
        };
        if h.contains(':') {
            return bad("an IPv6 address must be in brackets");
        }
        if h.parse::<IpAddr>().is_err() && !valid_dns_name(h) {
            return bad("not an IP address or DNS name");
        }
        (h, p)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return bad("the port must be 1-65535"),
    };
    Ok(Target {
        host: host.to_ascii_lowercase(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn candidates_follow_the_reference_splitting() {
        let mut h = HeaderMap::new();
        assert!(candidates(&h).unwrap().is_empty());
        h.insert(
            PREFILLER_HOST_PORT,
            HeaderValue::from_static(" 10.0.0.1:8000 , 10.0.0.2:8000,"),
        );
        assert_eq!(candidates(&h).unwrap(), ["10.0.0.1:8000", "10.0.0.2:8000"]);
        h.append(PREFILLER_HOST_PORT, HeaderValue::from_static("10.0.0.3:1"));
        // Several values: each is one candidate (no comma splitting), as the reference.
        assert_eq!(
            candidates(&h).unwrap(),
            ["10.0.0.1:8000 , 10.0.0.2:8000,", "10.0.0.3:1"]
        );
        let mut blank = HeaderMap::new();
        blank.insert(PREFILLER_HOST_PORT, HeaderValue::from_static(" , "));
        assert!(candidates(&blank).unwrap().is_empty());
        let mut bin = HeaderMap::new();
        bin.insert(
            PREFILLER_HOST_PORT,
            HeaderValue::from_bytes(b"\xff:1").unwrap(),
        );
        assert!(candidates(&bin).unwrap_err().contains("ASCII"));
    }

    #[test]
    fn targets_parse_and_print() {
        let t = parse_target("10.0.0.1:8000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.1", 8000));
        assert_eq!(
            parse_target("http://Pod-1.ns.svc:8000")
                .unwrap()
                .authority(),
            "pod-1.ns.svc:8000"
        );
        let v6 = parse_target("[fd00::1]:8200").unwrap();
        assert_eq!(v6.host, "fd00::1");
        assert_eq!(v6.authority(), "[fd00::1]:8200");
        assert_eq!(v6.to_string(), "[fd00::1]:8200");
    }

    #[test]
    fn bad_targets_say_why() {
        for (raw, why) in [
            ("10.0.0.1", "missing port"),
            ("10.0.0.1:0", "1-65535"),
            ("10.0.0.1:99999", "1-65535"),
            ("10.0.0.1:http", "1-65535"),
            ("fd00::1:8000", "brackets"),
            ("[zz]:1", "IPv6"),
            ("[fd00::1]8000", "[addr]:port"),
            ("bad host:1", "DNS name"),
            ("-x:1", "DNS name"),
            ("a..b:1", "DNS name"),
            ("10.0.0.1:80/v1", "not a host:port"),
            ("user@10.0.0.1:80", "not a host:port"),
            ("https://10.0.0.1:80", "not a host:port"),
        ] {
            let e = parse_target(raw).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
            assert!(e.contains(PREFILLER_HOST_PORT), "{e}");
        }
    }
}
