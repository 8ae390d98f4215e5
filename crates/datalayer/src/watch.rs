//! Reloading a file when it changes, by polling (portable, no inotify limits, and it follows
//! Kubernetes ConfigMap volumes, which swap a symlink rather than write the file).
//!
//! Every `interval` the file is read and hashed (xxh3); the files involved are a few KiB, so
//! reading is cheaper and more reliable than trusting mtime granularity. A new content is
//! applied only once it has been seen **twice in a row**, so a file caught half-written by a
//! non-atomic editor save is not applied. A content that fails to apply is logged once (with
//! the parser's file/line message) and the last good state stays in effect; the same bad
//! content is not retried until the file changes again. A missing or unreadable file is
//! logged once per distinct error and also keeps the last good state.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::metrics::{DataLayerMetrics, ReloadLabels};

/// Largest file the watcher reads.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Hash of a file content, as the watcher computes it.
pub(crate) fn content_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Reads a file as UTF-8, refusing files above [`MAX_FILE_BYTES`].
pub(crate) fn read_text(path: &std::path::Path) -> Result<(String, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, more than the {MAX_FILE_BYTES} allowed",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let hash = content_hash(&bytes);
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok((text, hash))
}

/// Watches `path`; `apply` gets each new content and returns a message on failure.
pub(crate) struct FileWatcher<F> {
    pub path: PathBuf,
    pub interval: Duration,
    /// Hash of the content already in effect (from the initial load).
    pub applied: Option<u64>,
    pub apply: F,
    pub metrics: DataLayerMetrics,
}

impl<F> FileWatcher<F>
where
    F: FnMut(&str) -> Result<(), String> + Send + 'static,
{
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let file = self.path.display().to_string();
        let mut pending: Option<u64> = None;
        let mut last_read_error: Option<String> = None;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let path = self.path.clone();
            let read = tokio::task::spawn_blocking(move || read_text(&path)).await;
            let (text, hash) = match read {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    if last_read_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(file = %file, error = %e, "watched file unusable; keeping the last good content");
                        last_read_error = Some(e);
                    }
                    pending = None;
                    continue;
                }
                Err(e) => {
                    tracing::error!(file = %file, error = %e, "file read task failed");
                    continue;
                }
            };
            if last_read_error.take().is_some() {
                tracing::info!(file = %file, "watched file readable again");
            }
            if self.applied == Some(hash) {
                pending = None;
                continue;
            }
            if pending != Some(hash) {
                // Seen once: wait for the next poll to confirm the write has finished.
                pending = Some(hash);
                continue;
            }
            pending = None;
            self.applied = Some(hash);
            let outcome = match (self.apply)(&text) {
                Ok(()) => {
                    tracing::info!(file = %file, "reloaded");
                    "applied"
                }
                Err(e) => {
                    tracing::error!(file = %file, error = %e, "invalid file; keeping the last good content");
                    "rejected"
                }
            };
            self.metrics
                .file_reloads
                .get_or_create(&ReloadLabels {
                    file: file.clone(),
                    outcome: outcome.to_string(),
                })
                .inc();
        }
    }
}
