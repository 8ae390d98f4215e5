//! Property tests of endpoint discovery input (`--endpoints` and `--endpoints-file`, written
//! by users and tools): arbitrary text never panics; generated valid lists and files parse
//! to exactly the endpoints written (names, addresses, ports, labels, target-port
//! expansion); a file with one fault fails with an error naming the entry and the field.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use llmsched_datalayer::{parse_endpoints_file, parse_endpoints_flag};
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    ]
}

#[derive(Debug, Clone)]
struct Entry {
    name: Option<String>,
    ip: IpAddr,
    port: Option<u16>,
    labels: BTreeMap<String, String>,
}

fn entries() -> impl Strategy<Value = (Vec<Entry>, Vec<u16>)> {
    (
        proptest::collection::vec(
            (
                proptest::option::of("[a-z][a-z0-9.-]{0,12}"),
                ip(),
                proptest::option::of(1u16..),
                proptest::collection::btree_map(
                    "[a-zA-Z][a-zA-Z0-9./_-]{0,15}",
                    "\\PC{0,10}",
                    0..3,
                ),
            ),
            0..8,
        ),
        proptest::collection::btree_set(1u16.., 0..4),
    )
        .prop_map(|(raw, ports)| {
            let ports: Vec<u16> = ports.into_iter().collect();
            // Unique names and addresses (duplicates are errors, tested separately); without
            // target ports every entry needs its own port.
            let mut names = BTreeSet::new();
            let mut addrs = BTreeSet::new();
            let mut out = Vec::new();
            for (name, ip, port, labels) in raw {
                let port = if ports.is_empty() {
                    Some(port.unwrap_or(8000))
                } else {
                    port
                };
                let expanded: Vec<(String, SocketAddr)> = match port {
                    Some(p) => {
                        let sa = SocketAddr::new(ip, p);
                        vec![(name.clone().unwrap_or_else(|| sa.to_string()), sa)]
                    }
                    None => ports
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| {
                            let sa = SocketAddr::new(ip, p);
                            (
                                name.as_ref()
                                    .map_or_else(|| sa.to_string(), |n| format!("{n}-rank-{i}")),
                                sa,
                            )
                        })
                        .collect(),
                };
                if expanded
                    .iter()
                    .any(|(n, a)| names.contains(n) || addrs.contains(a))
                {
                    continue;
                }
                for (n, a) in expanded {
                    names.insert(n);
                    addrs.insert(a);
                }
                out.push(Entry {
                    name,
                    ip,
                    port,
                    labels,
                });
            }
            (out, ports)
        })
}

fn file_json(entries: &[Entry]) -> Value {
    json!({
        "endpoints": entries.iter().map(|e| {
            let mut v = json!({"address": e.ip.to_string()});
            if let Some(n) = &e.name { v["name"] = json!(n); }
            if let Some(p) = e.port { v["port"] = json!(p); }
            if !e.labels.is_empty() { v["labels"] = json!(e.labels); }
            v
        }).collect::<Vec<_>>()
    })
}

/// What the parser must produce: (name, ip, port, labels) in order.
fn expected(
    entries: &[Entry],
    ports: &[u16],
) -> Vec<(String, IpAddr, u16, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for e in entries {
        match e.port {
            Some(p) => out.push((
                e.name
                    .clone()
                    .unwrap_or_else(|| SocketAddr::new(e.ip, p).to_string()),
                e.ip,
                p,
                e.labels.clone(),
            )),
            None => {
                for (i, &p) in ports.iter().enumerate() {
                    let name = e.name.as_ref().map_or_else(
                        || SocketAddr::new(e.ip, p).to_string(),
                        |n| format!("{n}-rank-{i}"),
                    );
                    out.push((name, e.ip, p, e.labels.clone()));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s)\\PC{0,300}", ports in proptest::collection::vec(any::<u16>(), 0..3)) {
        let _ = parse_endpoints_file(&text, "f.yaml", &ports);
        let _ = parse_endpoints_flag(&text, &ports);
    }

    #[test]
    fn valid_files_parse_to_what_was_written((entries, ports) in entries()) {
        let text = serde_norway::to_string(&file_json(&entries)).unwrap();
        let got = parse_endpoints_file(&text, "f.yaml", &ports).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let got: Vec<_> = got.into_iter().map(|m| (m.name, m.address, m.port, m.labels)).collect();
        prop_assert_eq!(got, expected(&entries, &ports));
    }

    #[test]
    fn valid_flags_parse_to_what_was_written(
        addrs in proptest::collection::btree_set((ip(), 1u16..), 0..8),
        blanks in proptest::collection::vec("[ ]{0,2}", 16),
    ) {
        let addrs: Vec<SocketAddr> = addrs.into_iter().map(|(i, p)| SocketAddr::new(i, p)).collect();
        let text: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}{a}{}", blanks[(2 * i) % 16], blanks[(2 * i + 1) % 16]))
            .collect();
        let got = parse_endpoints_flag(&text.join(","), &[]).unwrap();
        let got: Vec<SocketAddr> = got.iter().map(|m| SocketAddr::new(m.address, m.port)).collect();
        prop_assert_eq!(got, addrs);
    }

    #[test]
    fn a_fault_names_the_entry_and_the_field(
        (entries, _) in entries().prop_filter("some entries", |(e, _)| !e.is_empty()),
        which in any::<prop::sample::Index>(),
        kind in 0u8..4,
        key in "[a-z]{3,10}".prop_filter("not a real key", |k| !["name", "address", "port", "labels"].contains(&k.as_str())),
    ) {
        let mut doc = file_json(&entries);
        let i = which.index(entries.len());
        let (field, value) = match kind {
            0 => (key.clone(), json!("x")),
            1 => ("address".to_string(), json!("not-an-ip")),
            2 => ("port".to_string(), json!(70000)),
            _ => ("port".to_string(), json!(0)),
        };
        doc["endpoints"][i][field.as_str()] = value;
        let text = serde_norway::to_string(&doc).unwrap();
        let e = parse_endpoints_file(&text, "f.yaml", &[]).unwrap_err().to_string();
        prop_assert!(e.starts_with("f.yaml: "), "{e}");
        prop_assert!(e.contains(&format!("endpoints[{i}]")), "{e}");
        if kind == 0 {
            prop_assert!(e.contains(&key), "{e}");
        }
    }
}

#[test]
fn duplicates_are_refused() {
    let text = "endpoints:\n- {name: a, address: 10.0.0.1, port: 80}\n- {name: a, address: 10.0.0.2, port: 80}\n";
    let e = parse_endpoints_file(text, "f", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("endpoints[1]: duplicate name 'a'"), "{e}");
    let text =
        "endpoints:\n- {address: 10.0.0.1, port: 80}\n- {name: b, address: 10.0.0.1, port: 80}\n";
    let e = parse_endpoints_file(text, "f", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate address 10.0.0.1:80"), "{e}");
}
