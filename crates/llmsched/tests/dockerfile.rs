//! The `Dockerfile`. No Docker daemon runs here, so the image cannot be built in tests;
//! instead the real `hadolint` lints it, and its facts are checked against the workspace:
//! the builder runs exactly `cargo build --release --locked -p llmsched` (the binary the
//! README's release build produces) with a toolchain at least the workspace's
//! `rust-version`, nothing the build reads is left out of the context by `.dockerignore`,
//! and the image runs `llmsched epp` as user 65532 (so GIE's inferencepool chart, which sets
//! only `args`, starts the EPP).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Tool, both, repo_root, run, tool};

/// One instruction: keyword and its text (continuation lines joined).
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(cont) = trimmed.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (kw, rest) = current.split_once(' ').unwrap_or((current.as_str(), ""));
        out.push((kw.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// `ARG NAME=default` values.
fn arg_default(ins: &[(String, String)], name: &str) -> Option<String> {
    ins.iter().find_map(|(k, v)| {
        (k == "ARG")
            .then(|| v.strip_prefix(&format!("{name}=")))
            .flatten()
            .map(str::to_string)
    })
}

fn version(v: &str) -> (u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap_or(0))
}

#[test]
fn dockerfile_builds_the_release_binary_into_a_non_root_epp_image() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let ins = instructions(&text);

    let stages: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage: {stages:?}");
    assert!(
        stages[0].starts_with("docker.io/library/rust:${RUST_VERSION}-")
            && stages[0].ends_with(" AS builder"),
        "{}",
        stages[0]
    );
    assert!(
        stages[1].starts_with("gcr.io/distroless/"),
        "the runtime is distroless: {}",
        stages[1]
    );

    // The builder's toolchain is at least the workspace's rust-version.
    let rust = arg_default(&ins, "RUST_VERSION").expect("ARG RUST_VERSION=...");
    let cargo_toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let msrv = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        version(&rust) >= version(msrv),
        "RUST_VERSION {rust} < rust-version {msrv}"
    );

    // Exactly the release build of the llmsched package, with the committed lock file.
    assert_eq!(
        arg_default(&ins, "CARGO_PROFILE").as_deref(),
        Some("release")
    );
    let build = ins
        .iter()
        .find(|(k, v)| k == "RUN" && v.contains("cargo build"))
        .map(|(_, v)| v)
        .expect("a RUN cargo build");
    for needle in [
        "cargo build --profile \"${CARGO_PROFILE}\" --locked -p llmsched",
        "target/${CARGO_PROFILE}/llmsched",
    ] {
        assert!(build.contains(needle), "{needle:?} not in {build}");
    }
    assert!(!build.contains("--features") && !build.contains("--no-default-features"));

    // The runtime stage: the binary at /llmsched, user 65532, entrypoint `llmsched epp`.
    let runtime_at = ins.iter().rposition(|(k, _)| k == "FROM").unwrap();
    let runtime = &ins[runtime_at..];
    assert!(
        runtime
            .iter()
            .any(|(k, v)| k == "COPY" && v == "--from=builder /out/llmsched /llmsched"),
        "{runtime:?}"
    );
    let user = runtime.iter().rev().find(|(k, _)| k == "USER").unwrap();
    assert_eq!(user.1, "65532:65532");
    let entry = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .unwrap();
    let entry: Vec<String> = serde_json::from_str(&entry.1).expect("exec-form ENTRYPOINT");
    assert_eq!(entry, ["/llmsched", "epp"]);
    assert!(
        !runtime.iter().any(|(k, _)| k == "CMD"),
        "no CMD: the chart's args are the arguments"
    );
}

/// `.dockerignore` patterns (only the plain folder/file names this repository uses).
fn ignored(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn is_ignored(patterns: &[String], rel: &Path) -> bool {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    patterns.iter().any(|p| {
        if let Some(prefix) = p.strip_suffix('*') {
            first.starts_with(prefix)
        } else {
            first == *p
        }
    })
}

#[test]
fn dockerignore_keeps_everything_the_build_reads() {
    let root = repo_root();
    let patterns = ignored(&root);
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "crates",
        "config",
        "rustfmt.toml",
    ] {
        assert!(
            !is_ignored(&patterns, Path::new(needed)),
            "{needed} is ignored"
        );
    }
    for big in [".git", "target", ".tools"] {
        assert!(
            is_ignored(&patterns, Path::new(big)),
            "{big} is sent to the daemon"
        );
    }
    // Files compiled into the binary from outside the crates (include_str!/include_bytes!).
    let mut stack: Vec<PathBuf> = vec![root.join("crates")];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name != "target" && name != "tests" && name != "benches" {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let src = std::fs::read_to_string(&p).unwrap();
            for macro_ in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in src.match_indices(macro_) {
                    let rest = &src[at + macro_.len()..];
                    let rel = &rest[..rest.find('"').unwrap()];
                    let target = p.parent().unwrap().join(rel);
                    let Ok(target) = target.canonicalize() else {
                        continue; // generated into OUT_DIR, or a doc example
                    };
                    let rel = target.strip_prefix(&root).unwrap();
                    assert!(
                        !is_ignored(&patterns, rel),
                        "{} includes {}, which .dockerignore leaves out",
                        p.display(),
                        rel.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 0, "no include_str! found: the scan is broken");
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let hadolint = tool(Tool::Hadolint);
    let root = repo_root();
    let out = run(Command::new(&hadolint)
        .arg("--no-color")
        .arg(root.join("Dockerfile")));
    assert!(out.status.success(), "hadolint: {}", both(&out));

    // The linter is live: a Dockerfile with known problems fails.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian:latest\nRUN cd /tmp && apt-get install curl\nCMD run\n",
    )
    .unwrap();
    let out = run(Command::new(&hadolint).arg("--no-color").arg(&bad));
    assert!(
        !out.status.success(),
        "hadolint accepted a bad Dockerfile: {}",
        both(&out)
    );
    let text = both(&out);
    assert!(text.contains("DL3007") || text.contains("DL3003"), "{text}");
}
