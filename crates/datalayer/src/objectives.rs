//! [`ObjectivesStore`]: the `InferenceObjective` / `InferenceModelRewrite` manifests in
//! effect, from `--objectives-file` (a multi-document YAML of the manifests users apply to a
//! cluster; see `llmsched_core::objectives::parse_manifests`). Readers get a lock-free
//! snapshot; a reload swaps it atomically, and a bad file keeps the last good one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use llmsched_core::objectives::{Objectives, parse_manifests};

/// Objectives and model rewrites in effect.
#[derive(Debug, Default)]
pub struct ObjectivesStore {
    current: Arc<ArcSwap<Objectives>>,
    version: AtomicU64,
}

/// An objectives file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ObjectivesFileError(pub String);

impl ObjectivesStore {
    /// A store holding `objectives`.
    pub fn new(objectives: Objectives) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(objectives)),
            version: AtomicU64::new(0),
        }
    }

    /// The objectives in effect (a cheap, lock-free load).
    pub fn load(&self) -> Arc<Objectives> {
        self.current.load_full()
    }

    /// The swappable snapshot itself, for readers that hold it directly (the director).
    pub fn shared(&self) -> Arc<ArcSwap<Objectives>> {
        self.current.clone()
    }

    /// Replaces the objectives.
    pub fn replace(&self, objectives: Objectives) {
        self.current.store(Arc::new(objectives));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// How many times the objectives were replaced.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reads and parses an objectives file (errors name the file and document).
    pub fn read_file(path: &Path) -> Result<Objectives, ObjectivesFileError> {
        let name = path.display().to_string();
        let (text, _) = crate::watch::read_text(path)
            .map_err(|e| ObjectivesFileError(format!("{name}: {e}")))?;
        parse_manifests(&text, &name).map_err(|e| ObjectivesFileError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_file_reports_path_and_document() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("obj.yaml");
        std::fs::write(
            &p,
            "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {priority: 2}\n---\n\
             apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: b}\nspec: {priority: x}\n",
        )
        .unwrap();
        let e = ObjectivesStore::read_file(&p).unwrap_err().to_string();
        assert!(e.contains("obj.yaml: document 2"), "{e}");
        assert!(e.contains("priority"), "{e}");
        let missing = ObjectivesStore::read_file(&dir.path().join("nope.yaml"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.yaml: cannot read"), "{missing}");
    }

    #[test]
    fn replace_swaps_the_snapshot() {
        let s = ObjectivesStore::default();
        let before = s.load();
        let mut o = Objectives::default();
        o.insert_objective("x", 5);
        s.replace(o);
        assert_eq!(before.priority("x"), None);
        assert_eq!(s.load().priority("x"), Some(5));
        assert_eq!(s.version(), 1);
    }
}
