//! `--config-file` reload: when the file changes (polled every `--config-reload-interval`,
//! which also follows a Kubernetes ConfigMap volume's symlink swap) or on SIGHUP.
//!
//! One task owns the reload, so reloads never overlap:
//!
//! 1. the file is read and hashed; a polled change is applied once the same content has been
//!    read twice in a row (a half-written file is never loaded), a SIGHUP applies at once;
//! 2. the configuration is parsed, validated and its plugins built on a blocking thread, off
//!    the request path, by the same loader as at start ([`config::load_reusing`]), so a
//!    broken file fails with the error a start would print; plugin instances whose name, type
//!    and parameters are unchanged are carried over with their state (the prefix indexes, the
//!    precise scorer's index and KV-event subscriptions), except those holding other
//!    instances (a P/D handler's decider); everything else is built anew;
//! 3. the data layer must not change (`dataLayer`, `metrics-data-source`,
//!    `core-metrics-extractor` parameters): the scraper keeps running with its settings, so
//!    such an edit is refused as a whole with the reason (restart to apply it);
//! 4. the new configuration is swapped in with one atomic store ([`Director::set_config`]):
//!    requests routed from then on use it, requests in flight finish on the configuration
//!    they started with (their `Routed` holds it). Endpoint listeners of new plugins are
//!    registered before the swap, those of dropped plugins removed after it.
//!
//! A rejected file is logged at `error` with the reason and counted; the running
//! configuration stays, and the same content is not retried until the file changes again (a
//! SIGHUP retries it). Metrics: `llmsched_config_reloads_total{result="success"|"failure"}`,
//! `llmsched_config_last_reload_successful`, `llmsched_config_last_reload_success_timestamp_seconds`
//! and `llmsched_config_info{source, hash}` (the configuration in effect; set at start too).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use llmsched_core::config::{self, ConfigSource, LoadedConfig};
use llmsched_core::plugin::EndpointListener;
use llmsched_core::registry::{PluginHandle, Registry as PluginRegistry};
use llmsched_datalayer::EndpointStore;
use llmsched_director::Director;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::data_sources::DataLayerPlan;

/// `result` label of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: String,
}

/// Labels of the configuration info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// `file`, `text` or `default`.
    pub source: String,
    /// xxh3 of the configuration text, 16 hex digits.
    pub hash: String,
}

/// The configuration's metrics (cheap to clone; clones share the values).
#[derive(Clone, Debug, Default)]
pub struct ConfigMetrics {
    /// Reloads by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// 1 when the last reload (or the start) succeeded, 0 after a failure.
    pub last_successful: Gauge,
    /// Unix time of the last successful load (start or reload).
    pub last_success_time: Gauge<f64, AtomicU64>,
    /// The configuration in effect: one series, value 1.
    pub info: Family<InfoLabels, Gauge>,
}

impl ConfigMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_config_reloads",
            "Reloads of --config-file, by result (success, failure)",
            m.reloads.clone(),
        );
        registry.register(
            "llmsched_config_last_reload_successful",
            "1 when the last configuration (re)load succeeded, 0 when the last reload failed",
            m.last_successful.clone(),
        );
        registry.register(
            "llmsched_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start or reload)",
            m.last_success_time.clone(),
        );
        registry.register(
            "llmsched_config_info",
            "The configuration in effect: its source and the xxh3 hash of its text",
            m.info.clone(),
        );
        // Both results exist from the start, so a rate() sees the first failure.
        for r in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&ResultLabels { result: r.into() });
        }
        m
    }

    /// Records a configuration now in effect (`reload`: counted as a successful reload).
    pub fn loaded(&self, source: &ConfigSource, hash: u64, reload: bool) {
        if reload {
            self.count("success");
        }
        self.last_successful.set(1);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success_time.set(now);
        self.info.clear();
        self.info
            .get_or_create(&InfoLabels {
                source: source_label(source).into(),
                hash: hash_hex(hash),
            })
            .set(1);
    }

    /// Records a rejected reload.
    pub fn failed(&self) {
        self.count("failure");
        self.last_successful.set(0);
    }

    fn count(&self, result: &str) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Reloads with `result` so far.
    pub fn reloads_of(&self, result: &str) -> u64 {
        self.reloads
            .get(&ResultLabels {
                result: result.into(),
            })
            .map_or(0, |c| c.get())
    }
}

fn source_label(source: &ConfigSource) -> &'static str {
    match source {
        ConfigSource::File(_) => "file",
        ConfigSource::Text => "text",
        ConfigSource::Default => "default",
    }
}

/// The hash of a configuration text (xxh3, as the data layer's file watchers).
pub fn content_hash(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// A hash as 16 hex digits.
pub fn hash_hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Reads the configuration file as at start (same error text).
fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|error| {
        crate::run::EppError::ConfigRead {
            path: path.display().to_string(),
            error,
        }
        .to_string()
    })
}

/// What a successful reload changed.
#[derive(Debug, Default)]
struct Applied {
    carried_over: Vec<String>,
    built: Vec<String>,
    dropped: Vec<String>,
    profiles: Vec<String>,
}

fn same<T: ?Sized>(a: &Arc<T>, b: &Arc<T>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// The reload task (see the module documentation).
pub(crate) struct Reloader {
    pub path: PathBuf,
    pub source: ConfigSource,
    pub registry: PluginRegistry,
    pub handle: PluginHandle,
    pub director: Arc<Director>,
    pub store: Arc<EndpointStore>,
    pub plan: DataLayerPlan,
    pub metrics: ConfigMetrics,
    pub interval: Duration,
    /// Hash of the content in effect.
    pub applied: u64,
    /// Forces a reload (as SIGHUP does).
    pub trigger: Arc<Notify>,
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the configuration file is still polled");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

async fn next_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h.as_mut() {
        s.recv().await;
        return;
    }
    let _ = h;
    std::future::pending::<()>().await;
}

impl Reloader {
    pub async fn run(mut self, cancel: CancellationToken) {
        let file = self.path.display().to_string();
        let mut hup = hangup();
        let mut pending: Option<u64> = None;
        let mut rejected: Option<u64> = None;
        let mut last_read_error: Option<String> = None;
        tracing::info!(file = %file, interval = ?self.interval, "watching the configuration file (reloaded on change and on SIGHUP)");
        loop {
            let forced = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = next_hangup(&mut hup) => {
                    tracing::info!(file = %file, "SIGHUP: reloading the configuration");
                    true
                }
                _ = self.trigger.notified() => true,
                _ = tokio::time::sleep(self.interval) => false,
            };
            let path = self.path.clone();
            let text = match tokio::task::spawn_blocking(move || read(&path)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    if forced || last_read_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(error = %e, "configuration reload failed; the running configuration stays");
                        self.metrics.failed();
                        last_read_error = Some(e);
                    }
                    pending = None;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration read task failed");
                    continue;
                }
            };
            if last_read_error.take().is_some() {
                tracing::info!(file = %file, "configuration file readable again");
            }
            let hash = content_hash(&text);
            if hash == self.applied {
                if forced {
                    tracing::info!(file = %file, hash = %hash_hex(hash), "configuration unchanged");
                }
                pending = None;
                continue;
            }
            if !forced {
                if rejected == Some(hash) {
                    continue;
                }
                if pending != Some(hash) {
                    // Seen once: wait for the next poll to confirm the write has finished.
                    pending = Some(hash);
                    continue;
                }
            }
            pending = None;
            match self.apply(text).await {
                Ok(a) => {
                    self.applied = hash;
                    rejected = None;
                    self.metrics.loaded(&self.source, hash, true);
                    tracing::info!(
                        file = %file,
                        hash = %hash_hex(hash),
                        profiles = ?a.profiles,
                        carried_over = ?a.carried_over,
                        built = ?a.built,
                        dropped = ?a.dropped,
                        "configuration reloaded"
                    );
                }
                Err(e) => {
                    rejected = Some(hash);
                    self.metrics.failed();
                    tracing::error!(hash = %hash_hex(hash), error = %e, "configuration reload rejected; the running configuration stays");
                }
            }
        }
    }

    /// Builds, checks and swaps in `text`; the error is the message a start would print.
    async fn apply(&mut self, text: String) -> Result<Applied, String> {
        let previous = self.director.config();
        let (registry, handle, source) = (
            self.registry.clone(),
            self.handle.clone(),
            self.source.clone(),
        );
        let prev = previous.clone();
        let next = tokio::task::spawn_blocking(move || {
            config::load_reusing(&text, source, &registry, &handle, &prev)
        })
        .await
        .map_err(|e| format!("configuration build task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        let plan = DataLayerPlan::resolve(&next).map_err(|detail| {
            config::ConfigError {
                origin: self.source.clone(),
                detail,
            }
            .to_string()
        })?;
        if plan != self.plan {
            return Err(format!(
                "{}: the data layer changed (dataLayer, metrics-data-source or core-metrics-extractor parameters); the metrics scraper cannot change while running: restart the EPP to apply it (nothing of this version was applied)",
                self.source
            ));
        }
        let next = Arc::new(next);
        let applied = self.swap(&previous, next);
        Ok(applied)
    }

    fn swap(&self, previous: &Arc<LoadedConfig>, next: Arc<LoadedConfig>) -> Applied {
        let known = |l: &Arc<dyn EndpointListener>, in_: &[Arc<dyn EndpointListener>]| {
            in_.iter().any(|x| same(x, l))
        };
        // New listeners first: they learn the current endpoints before any request reaches
        // them.
        for l in &next.endpoint_listeners {
            if !known(l, &previous.endpoint_listeners) {
                self.store.add_listener(l.clone());
            }
        }
        self.director.set_config(next.clone());
        for l in &previous.endpoint_listeners {
            if !known(l, &next.endpoint_listeners) {
                self.store.remove_listener(l);
            }
        }
        let mut a = Applied {
            profiles: next
                .scheduler
                .profiles()
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
            ..Applied::default()
        };
        for (name, p) in &next.plugins {
            if previous.plugins.iter().any(|(_, q)| same(p, q)) {
                a.carried_over.push(name.clone());
            } else {
                a.built.push(name.clone());
            }
        }
        for (name, p) in &previous.plugins {
            if !next.plugins.iter().any(|(_, q)| same(p, q)) {
                a.dropped.push(name.clone());
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_follow_loads_and_failures() {
        let mut r = Registry::default();
        let m = ConfigMetrics::register(&mut r);
        let src = ConfigSource::File("/etc/epp.yaml".into());
        m.loaded(&src, 0xabc, false);
        assert_eq!(m.reloads_of("success"), 0, "the start is not a reload");
        m.failed();
        m.loaded(&src, 0xdef, true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            "llmsched_config_reloads_total{result=\"success\"} 1",
            "llmsched_config_reloads_total{result=\"failure\"} 1",
            "llmsched_config_last_reload_successful 1",
            "llmsched_config_info{source=\"file\",hash=\"0000000000000def\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(
            !text.contains("0000000000000abc"),
            "old hash series removed:\n{text}"
        );
        m.failed();
        assert_eq!(m.last_successful.get(), 0);
        assert!(m.last_success_time.get() > 1.6e9);
    }
}
