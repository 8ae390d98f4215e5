//! Shared by the deployment tests: the repository's paths and the external tools, always the
//! real ones (helm, kubernetes-validate, hadolint, Envoy).
//!
//! A tool comes from its `LLMSCHED_*` variable (set by `scripts/test.sh` from
//! `scripts/install-tools.sh --env`); when the variable is unset the test installs it with
//! `scripts/install-tools.sh <tool>` into `.tools/`, as a developer's first `cargo test`
//! would. A variable naming a missing file, or a failed install, fails the test: a missing
//! tool never turns into a silently skipped check.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test support

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The tools the deployment tests run: `scripts/install-tools.sh` name and environment
/// variable.
#[derive(Debug, Clone, Copy)]
pub enum Tool {
    Helm,
    KubernetesValidate,
    ValidatePython,
    Hadolint,
    Envoy,
}

impl Tool {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Tool::Helm => ("helm", "LLMSCHED_HELM_BIN"),
            Tool::KubernetesValidate => ("kubernetes-validate", "LLMSCHED_KUBERNETES_VALIDATE"),
            Tool::ValidatePython => ("validate-python", "LLMSCHED_VALIDATE_PYTHON"),
            Tool::Hadolint => ("hadolint", "LLMSCHED_HADOLINT_BIN"),
            Tool::Envoy => ("envoy", "LLMSCHED_ENVOY_BIN"),
        }
    }
}

static INSTALL: Mutex<()> = Mutex::new(());

/// The tool's path: from its variable, else installed by `scripts/install-tools.sh`.
pub fn tool(t: Tool) -> PathBuf {
    let (name, var) = t.names();
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "${var} is {} but that is not a file: run scripts/install-tools.sh --env (scripts/test.sh does)",
            p.display()
        );
        return p;
    }
    // One install at a time: within this process (the mutex) and across test binaries
    // (the lock file, the same one crates/gateway's find_envoy takes).
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo_root();
    let tools = std::env::var_os("LLMSCHED_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools"));
    std::fs::create_dir_all(&tools).unwrap();
    let lock = File::create(tools.join(".install.lock")).unwrap();
    lock.lock().unwrap();
    let out = Command::new("bash")
        .arg(root.join("scripts/install-tools.sh"))
        .arg(name)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/install-tools.sh");
    drop(lock);
    assert!(
        out.status.success(),
        "${var} is not set and `scripts/install-tools.sh {name}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let p = PathBuf::from(path);
    assert!(
        p.is_file(),
        "scripts/install-tools.sh {name} printed {}, which is not a file",
        p.display()
    );
    p
}

/// Runs a command to completion, stdin closed.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout and stderr, for assertion messages.
pub fn both(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
