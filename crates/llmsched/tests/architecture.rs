//! ARCHITECTURE.md's crate table says which llmsched crates each crate depends on at run
//! time; this test holds it to the manifests (`cargo metadata`), so the documented graph
//! cannot drift: a new crate without a row, a row without a crate, or an edge added or
//! dropped in a `Cargo.toml` fails here with the difference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `crate -> runtime llmsched dependencies` (optional ones left out) from `cargo metadata`.
fn manifests() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let short = |n: &str| n.strip_prefix("llmsched-").unwrap_or(n).to_string();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["name"].as_str().unwrap().starts_with("llmsched")
                        && d["kind"].is_null()
                        && !d["optional"].as_bool().unwrap_or(false)
                })
                .map(|d| short(d["name"].as_str().unwrap()))
                .collect();
            (short(p["name"].as_str().unwrap()), deps)
        })
        .collect()
}

/// The same map from ARCHITECTURE.md's table (`| \`crate\` | role | a, b (note) |`).
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repo_root().join("ARCHITECTURE.md")).unwrap();
    let mut in_table = false;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("| crate | role | depends on (runtime) |") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("| ---") {
            continue;
        }
        if !line.starts_with("| `") {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let name = cells[0].trim().trim_matches('`').to_string();
        let deps = cells.last().unwrap().trim();
        // A parenthesis is a note (feature-gated edges), not a dependency.
        let deps = deps.split('(').next().unwrap();
        let set = deps
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && *d != "—")
            .map(str::to_string)
            .collect();
        out.insert(name, set);
    }
    out
}

#[test]
fn the_documented_crate_graph_is_the_manifests_graph() {
    let real = manifests();
    let doc = documented();
    assert_eq!(
        real.keys().collect::<Vec<_>>(),
        doc.keys().collect::<Vec<_>>(),
        "crates in the workspace vs rows in ARCHITECTURE.md's table"
    );
    let mut wrong = Vec::new();
    for (name, deps) in &real {
        if doc[name] != *deps {
            wrong.push(format!(
                "{name}: Cargo.toml says {deps:?}, ARCHITECTURE.md says {:?}",
                doc[name]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
