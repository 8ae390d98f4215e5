//! Prometheus metrics of Kubernetes discovery, registered into the EPP's registry:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `llmsched_kube_watch_errors_total` | counter | `resource`, `reason` | failed lists/watches and refused objects |
//! | `llmsched_kube_objects` | gauge | `resource` | objects in effect: the pool (0/1), its selected pods, applied objectives and rewrites |
//! | `llmsched_kube_last_sync_timestamp_seconds` | gauge | `resource` | Unix time of the last successful list or watch event |
//! | `llmsched_kube_pool_synced` | gauge | | 1 while the pool and its pods are known (readiness) |
//!
//! `resource` is `inferencepools`, `pods`, `inferenceobjectives`, `inferencemodelrewrites` or
//! `discovery` (API discovery of the objective CRDs). `reason` is one of
//! [`ErrorReason::as_str`]: `unreachable`, `connection_lost`, `forbidden`, `unauthorized`,
//! `not_found`, `expired` (410 Gone; the watch re-lists), `server_error`, `malformed`,
//! `api_error`, `other`.

use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming a resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// The resource (plural).
    pub resource: String,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The resource (plural).
    pub resource: String,
    /// [`ErrorReason::as_str`].
    pub reason: String,
}

/// Why a list, a watch or an object failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// The API server cannot be reached (connect, TLS, DNS).
    Unreachable,
    /// An established watch broke off.
    ConnectionLost,
    /// 403: RBAC denies the request.
    Forbidden,
    /// 401: the credentials are refused.
    Unauthorized,
    /// 404: the resource (CRD) is not served.
    NotFound,
    /// 410 Gone: the resourceVersion expired; the watch re-lists.
    Expired,
    /// 5xx from the API server.
    ServerError,
    /// An object or response that cannot be used.
    Malformed,
    /// Any other API error status.
    ApiError,
    /// Anything else.
    Other,
}

impl ErrorReason {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::Unreachable => "unreachable",
            ErrorReason::ConnectionLost => "connection_lost",
            ErrorReason::Forbidden => "forbidden",
            ErrorReason::Unauthorized => "unauthorized",
            ErrorReason::NotFound => "not_found",
            ErrorReason::Expired => "expired",
            ErrorReason::ServerError => "server_error",
            ErrorReason::Malformed => "malformed",
            ErrorReason::ApiError => "api_error",
            ErrorReason::Other => "other",
        }
    }

    /// The reason of an HTTP status code.
    pub fn from_code(code: u16) -> Self {
        match code {
            401 => ErrorReason::Unauthorized,
            403 => ErrorReason::Forbidden,
            404 => ErrorReason::NotFound,
            410 => ErrorReason::Expired,
            500..=599 => ErrorReason::ServerError,
            _ => ErrorReason::ApiError,
        }
    }
}

/// Discovery's metrics. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    /// `llmsched_kube_watch_errors_total`.
    pub watch_errors: Family<ErrorLabels, Counter>,
    /// `llmsched_kube_objects`.
    pub objects: Family<ResourceLabels, Gauge>,
    /// `llmsched_kube_last_sync_timestamp_seconds`.
    pub last_sync: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    /// `llmsched_kube_pool_synced`.
    pub pool_synced: Gauge,
}

impl KubeMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_kube_watch_errors",
            "Failed Kubernetes lists/watches and refused objects, by resource and reason",
            m.watch_errors.clone(),
        );
        registry.register(
            "llmsched_kube_objects",
            "Kubernetes objects in effect, by resource",
            m.objects.clone(),
        );
        registry.register(
            "llmsched_kube_last_sync_timestamp_seconds",
            "Unix time of the last successful Kubernetes list or watch event, by resource",
            m.last_sync.clone(),
        );
        registry.register(
            "llmsched_kube_pool_synced",
            "1 while the InferencePool (or selector) and its pods are known",
            m.pool_synced.clone(),
        );
        m
    }

    /// Counts an error.
    pub fn error(&self, resource: &str, reason: ErrorReason) {
        self.watch_errors
            .get_or_create(&ErrorLabels {
                resource: resource.into(),
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Sets the object count of `resource`.
    pub fn set_objects(&self, resource: &str, n: usize) {
        self.objects
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records a successful list or event of `resource` now.
    pub fn synced_now(&self, resource: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .set(now);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn registered_names_and_values() {
        let mut reg = Registry::default();
        let m = KubeMetrics::register(&mut reg);
        m.error("pods", ErrorReason::Forbidden);
        m.error("pods", ErrorReason::Forbidden);
        m.set_objects("inferencepools", 1);
        m.synced_now("pods");
        m.pool_synced.set(1);
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(
                "llmsched_kube_watch_errors_total{resource=\"pods\",reason=\"forbidden\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("llmsched_kube_objects{resource=\"inferencepools\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("llmsched_kube_last_sync_timestamp_seconds{resource=\"pods\"} 1"),
            "{text}"
        );
        assert!(text.contains("llmsched_kube_pool_synced 1"), "{text}");
    }

    #[test]
    fn reasons_from_status_codes() {
        assert_eq!(ErrorReason::from_code(403), ErrorReason::Forbidden);
        assert_eq!(ErrorReason::from_code(401), ErrorReason::Unauthorized);
        assert_eq!(ErrorReason::from_code(404), ErrorReason::NotFound);
        assert_eq!(ErrorReason::from_code(410), ErrorReason::Expired);
        assert_eq!(ErrorReason::from_code(503), ErrorReason::ServerError);
        assert_eq!(ErrorReason::from_code(422), ErrorReason::ApiError);
    }
}
