//! The metrics scraper: one task per endpoint, each polling `http://ip:port/metrics` (or
//! `https://`, see [`crate::tls`]).
//!
//! A supervisor task follows the [`EndpointStore`] (its `watch` of the generation) and starts
//! a task for every new endpoint and cancels the task of every departed one. Tasks share one
//! keep-alive HTTP/1 client (hyper-util's pooled client, two idle connections per host), and
//! each task has at most one scrape in flight, so a dead or slow endpoint only ever delays
//! itself.
//!
//! Each scrape is bounded by the scrape timeout (connect, response and body together; 1 s by
//! default, the reference's per-poll timeout) and by a body-size cap. On success the
//! endpoint's metrics are swapped in with `updated_at = now`; on failure the previous metrics
//! stay (and go stale by age), the error is counted, and the task backs off exponentially
//! from the refresh interval up to `max_backoff` (1 s by default, below the 2 s staleness
//! threshold, so a recovered endpoint is fresh again within a second). A failing endpoint is
//! logged at `warn` when the kind of failure changes and at `info` when it recovers, not on
//! every attempt.
//!
//! Scrapes also drive the endpoint's health ([`llmsched_core::health`]): a successful scrape
//! is the active signal (and the half-open probe of an endpoint whose circuit is open), a
//! scrape whose connection is refused or reset is reported as a failure at once (a replica
//! that died is excluded within one refresh interval even when no request reaches it), and
//! after every attempt the endpoint's health is observed so each transition is logged and
//! counted (a stale endpoint is noticed here, by age).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSource};
use llmsched_core::health::{FailureKind, HealthPolicy};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mapping::{ExtractError, Extracted, Extractor, MetricMappings};
use crate::metrics::{DataLayerMetrics, EndpointLabels, ScrapeErrorLabels};
use crate::store::EndpointStore;
use crate::tls::{MetricsScheme, is_tls_error};

const ACCEPT_VALUE: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// How to scrape.
#[derive(Debug, Clone)]
pub struct ScrapeSettings {
    /// Time between scrapes of one endpoint.
    pub interval: Duration,
    /// Bound on one scrape (connect + response + body).
    pub timeout: Duration,
    /// Longest wait between attempts while an endpoint keeps failing.
    pub max_backoff: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// `http` or `https`.
    pub scheme: MetricsScheme,
    /// TLS client settings for `https` (`None`: accept any server certificate, as the
    /// reference's default `insecureSkipVerify: true`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// URL path (`/metrics`).
    pub path: String,
    /// Scrape this port instead of the endpoint's own (changeable while running).
    pub metrics_port: MetricsPort,
    /// How endpoint health is judged (scrapes feed it).
    pub health: HealthPolicy,
}

/// The port scraped instead of each endpoint's own, shared between the scraper and a
/// discovery source that may change it while running (Kubernetes discovery follows the
/// reference: `--model-server-metrics-port` applies only while the pool has exactly one
/// target port). Cheap to clone; clones share the value. Running scrapers pick a change up
/// before their next scrape.
#[derive(Debug, Clone, Default)]
pub struct MetricsPort(Arc<AtomicU32>);

impl MetricsPort {
    /// A shared value holding `port` (`None`: each endpoint's own port).
    pub fn new(port: Option<u16>) -> Self {
        Self(Arc::new(AtomicU32::new(port.map_or(0, u32::from))))
    }

    /// The port in effect (`None`: each endpoint's own port).
    pub fn get(&self) -> Option<u16> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            p => u16::try_from(p).ok(),
        }
    }

    /// Changes the port for every endpoint (`None` or `Some(0)`: each endpoint's own port).
    pub fn set(&self, port: Option<u16>) {
        self.0.store(port.map_or(0, u32::from), Ordering::Release);
    }
}

impl From<Option<u16>> for MetricsPort {
    fn from(port: Option<u16>) -> Self {
        Self::new(port)
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request could not be sent or the response headers not received.
    #[error("request failed: {0}")]
    Request(String),
    /// The connection broke: refused, reset or closed before the response (the endpoint's
    /// health records a failure).
    #[error("request failed: {detail}")]
    Connection {
        /// `Connect` (refused, unreachable) or `Reset` (broke after connecting).
        kind: FailureKind,
        /// The error chain.
        detail: String,
    },
    /// The TLS handshake failed (certificate not trusted, wrong name, no client
    /// certificate...): not counted against the endpoint's health, its metrics go stale.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The scrape took longer than the timeout.
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    /// A status other than 200.
    #[error("HTTP status {0}")]
    Status(StatusCode),
    /// The body exceeds the cap.
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    /// Reading the body failed.
    #[error("reading the response body failed: {0}")]
    Body(String),
    /// The body is not UTF-8.
    #[error("response body is not UTF-8 (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// The body is not usable metrics.
    #[error(transparent)]
    Extract(#[from] ExtractError),
}

impl ScrapeError {
    /// The `reason` label of the error counter.
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Request(_) | ScrapeError::Connection { .. } => "connect",
            ScrapeError::Tls(_) => "tls",
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Status(_) => "http_status",
            ScrapeError::TooLarge(_) => "body_too_large",
            ScrapeError::Body(_) => "body",
            ScrapeError::NotUtf8(_) => "parse",
            ScrapeError::Extract(e) => e.reason(),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct Shared {
    client: HttpClient,
    settings: ScrapeSettings,
    metrics: DataLayerMetrics,
    mappings: Arc<MetricMappings>,
}

fn build_client(settings: &ScrapeSettings) -> Result<HttpClient, crate::tls::ScrapeTlsError> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.timeout));
    // https URIs pass through the TLS layer; the plain connector must accept them.
    connector.enforce_http(false);
    let tls = match &settings.tls {
        Some(c) => c.as_ref().clone(),
        None => crate::tls::client_config(&crate::tls::ScrapeTls::default())?,
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(2)
        .build(connector))
}

/// Builds the scrape URI of `endpoint`.
pub fn scrape_uri(endpoint: &Endpoint, settings: &ScrapeSettings) -> Result<Uri, String> {
    scrape_uri_with(endpoint, settings.metrics_port.get(), settings)
}

fn scrape_uri_with(
    endpoint: &Endpoint,
    metrics_port: Option<u16>,
    settings: &ScrapeSettings,
) -> Result<Uri, String> {
    let port = metrics_port.unwrap_or(endpoint.meta().port);
    let addr = SocketAddr::new(endpoint.meta().address, port);
    format!("{}://{addr}{}", settings.scheme, settings.path)
        .parse::<Uri>()
        .map_err(|e| format!("invalid scrape URL for {}: {e}", endpoint.name()))
}

async fn fetch(shared: &Shared, uri: &Uri) -> Result<Bytes, ScrapeError> {
    let req = Request::get(uri.clone())
        .header(ACCEPT, ACCEPT_VALUE)
        .header(USER_AGENT, "llmsched-epp")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ScrapeError::Request(e.to_string()))?;
    let resp = shared.client.request(req).await.map_err(|e| {
        // Connect errors and connections that broke before the response (refused, reset,
        // closed); not our own request-building errors.
        if llmsched_core::health::is_local_resource_error(&e) {
            // Out of descriptors or ports here: not the endpoint's fault.
            ScrapeError::Request(error_chain(&e))
        } else if is_tls_error(&e) {
            // A certificate we do not trust (or a server that wants a client certificate):
            // the endpoint may serve requests fine; its metrics go stale.
            ScrapeError::Tls(error_chain(&e))
        } else if e.is_connect() {
            ScrapeError::Connection {
                kind: FailureKind::Connect,
                detail: error_chain(&e),
            }
        } else if std::error::Error::source(&e).is_some() {
            ScrapeError::Connection {
                kind: FailureKind::Reset,
                detail: error_chain(&e),
            }
        } else {
            ScrapeError::Request(error_chain(&e))
        }
    })?;
    if resp.status() != StatusCode::OK {
        return Err(ScrapeError::Status(resp.status()));
    }
    let max = shared.settings.max_body_bytes;
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ScrapeError::TooLarge(max));
    }
    let collected = Limited::new(resp.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ScrapeError::TooLarge(max)
            } else {
                ScrapeError::Body(error_chain(&*e))
            }
        })?;
    Ok(collected.to_bytes())
}

async fn scrape(
    shared: &Shared,
    uri: &Uri,
    endpoint: &Endpoint,
    extractor: &Extractor,
) -> Result<Extracted, ScrapeError> {
    let timeout = shared.settings.timeout;
    let body = tokio::time::timeout(timeout, fetch(shared, uri))
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))??;
    let text = std::str::from_utf8(&body).map_err(|e| ScrapeError::NotUtf8(e.valid_up_to()))?;
    let previous = endpoint.metrics();
    Ok(extractor.extract_text(text, &previous, std::time::Instant::now())?)
}

fn backoff(settings: &ScrapeSettings, failures: u32) -> Duration {
    let cap = settings.max_backoff.max(settings.interval);
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    settings.interval.saturating_mul(factor).min(cap)
}

async fn run_endpoint(endpoint: Arc<Endpoint>, shared: Arc<Shared>, cancel: CancellationToken) {
    let extractor = shared.mappings.for_labels(&endpoint.meta().labels).clone();
    let mut port = shared.settings.metrics_port.get();
    let mut uri = match scrape_uri_with(&endpoint, port, &shared.settings) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(endpoint = %endpoint.name(), error = %e, "not scraping endpoint");
            return;
        }
    };
    tracing::debug!(endpoint = %endpoint.name(), url = %uri, engine = extractor.engine(), "scraper started");
    let name = endpoint.name().to_string();
    let successes = shared.metrics.scrapes.get_or_create_owned(&EndpointLabels {
        endpoint: name.clone(),
    });
    let health: &HealthPolicy = &shared.settings.health;
    endpoint.observe_health(std::time::Instant::now(), health);
    let mut failures: u32 = 0;
    let mut last_reason: Option<&'static str> = None;
    let mut last_warnings: Vec<String> = Vec::new();
    loop {
        let now_port = shared.settings.metrics_port.get();
        if now_port != port {
            match scrape_uri_with(&endpoint, now_port, &shared.settings) {
                Ok(u) => {
                    tracing::info!(endpoint = %name, url = %u, "metrics port changed");
                    uri = u;
                    port = now_port;
                }
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "not scraping endpoint");
                    return;
                }
            }
        }
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = scrape(&shared, &uri, &endpoint, &extractor) => r,
        };
        shared
            .metrics
            .scrape_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(out) => {
                endpoint.set_metrics(out.metrics);
                successes.inc();
                if failures > 0 {
                    tracing::info!(endpoint = %name, url = %uri, failed_attempts = failures, "scrape recovered");
                }
                failures = 0;
                last_reason = None;
                if out.warnings != last_warnings {
                    for w in &out.warnings {
                        tracing::warn!(endpoint = %name, url = %uri, warning = %w, "ignoring malformed optional metric");
                    }
                    last_warnings = out.warnings;
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if let ScrapeError::Connection { kind, .. } = &e {
                    endpoint.record_failure(*kind, std::time::Instant::now(), health);
                }
                let reason = e.reason();
                shared
                    .metrics
                    .scrape_errors
                    .get_or_create(&ScrapeErrorLabels {
                        endpoint: name.clone(),
                        reason: reason.to_string(),
                    })
                    .inc();
                if last_reason != Some(reason) {
                    tracing::warn!(endpoint = %name, url = %uri, error = %e, "scrape failed; keeping the last metrics until they go stale");
                    last_reason = Some(reason);
                } else {
                    tracing::debug!(endpoint = %name, url = %uri, error = %e, attempts = failures, "scrape failed again");
                }
            }
        }
        endpoint.observe_health(std::time::Instant::now(), health);
        let delay = if failures == 0 {
            shared.settings.interval
        } else {
            backoff(&shared.settings, failures)
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(started + delay) => {}
        }
    }
}

struct Running {
    name: String,
    cancel: CancellationToken,
}

/// Scrapes every endpoint of `store` until `cancel` fires; returns once every per-endpoint
/// task has stopped.
pub async fn run_scraper(
    store: Arc<EndpointStore>,
    mappings: Arc<MetricMappings>,
    settings: ScrapeSettings,
    metrics: DataLayerMetrics,
    cancel: CancellationToken,
) {
    let client = match build_client(&settings) {
        Ok(c) => c,
        Err(e) => {
            // start() builds the same TLS settings first and fails there; not reached.
            tracing::error!(error = %e, "metrics scraper cannot start");
            return;
        }
    };
    let shared = Arc::new(Shared {
        client,
        settings,
        metrics,
        mappings,
    });
    let tracker = TaskTracker::new();
    let mut running: HashMap<EndpointId, Running> = HashMap::new();
    let mut changes = store.subscribe();
    loop {
        changes.borrow_and_update();
        let snapshot = store.snapshot();
        let present: HashMap<EndpointId, &Arc<Endpoint>> =
            snapshot.endpoints.iter().map(|e| (e.id(), e)).collect();
        running.retain(|id, r| {
            if present.contains_key(id) {
                return true;
            }
            r.cancel.cancel();
            // A replacement under the same name keeps its counters.
            if snapshot.by_name(&r.name).is_none() {
                shared.metrics.forget_endpoint(&r.name);
            }
            tracing::debug!(endpoint = %r.name, "scraper stopped");
            false
        });
        for (id, ep) in present {
            if running.contains_key(&id) {
                continue;
            }
            let token = cancel.child_token();
            tracker.spawn(run_endpoint(
                Arc::clone(ep),
                Arc::clone(&shared),
                token.clone(),
            ));
            running.insert(
                id,
                Running {
                    name: ep.name().to_string(),
                    cancel: token,
                },
            );
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = changes.changed() => if r.is_err() { break },
        }
    }
    for r in running.values() {
        r.cancel.cancel();
    }
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_never_below_the_interval() {
        let s = ScrapeSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            max_body_bytes: 1,
            scheme: MetricsScheme::Http,
            tls: None,
            path: "/metrics".into(),
            metrics_port: MetricsPort::default(),
            health: HealthPolicy::default(),
        };
        let got: Vec<u64> = (1..=7).map(|f| backoff(&s, f).as_millis() as u64).collect();
        assert_eq!(got, [50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&s, u32::MAX), Duration::from_secs(1));
        let slow = ScrapeSettings {
            interval: Duration::from_secs(5),
            ..s
        };
        assert_eq!(backoff(&slow, 3), Duration::from_secs(5));
    }
}
