//! `--metrics-endpoint-auth`: the `/metrics` endpoint delegates authentication and
//! authorization to the Kubernetes API server, as the reference EPP does through
//! controller-runtime's `WithAuthenticationAndAuthorization` filter.
//!
//! * The bearer token is reviewed with a `TokenReview` (`authentication.k8s.io/v1`); not
//!   authenticated ⇒ 401.
//! * The user it names is checked with a `SubjectAccessReview` (`authorization.k8s.io/v1`)
//!   for the request's verb (`get`) on the non-resource URL (`/metrics`); not allowed ⇒ 403.
//! * A review that cannot be made (API server unreachable, or this EPP's service account
//!   lacks `create` on `tokenreviews` / `subjectaccessreviews`) ⇒ 500 and an error log line
//!   naming the cause, as controller-runtime answers. Transient failures (unreachable, 429,
//!   5xx) are retried with controller-runtime's backoff first (0.5 s × 1.5, 5 tries).
//!
//! One difference on purpose: controller-runtime answers 500 for a token that the
//! TokenReview rejects (its union authenticator turns "invalid bearer token" into an error);
//! llmsched answers 401 there, as the API server itself does.
//!
//! Decisions are cached as controller-runtime caches them: token reviews 1 minute (both
//! outcomes), allowed access 5 minutes, denied access 30 seconds; failures are never cached.
//! Each cache holds at most [`AuthCacheConfig::max_entries`] entries, so a flood of random
//! tokens cannot grow memory. A Prometheus scraping every 15 s therefore costs two API calls
//! about every 5 minutes, not per scrape.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use llmsched_ops::metrics_auth::{
    MetricsAuthDecision, MetricsAuthError, MetricsAuthRequest, MetricsAuthorizer,
};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Cache lifetimes and bounds; the defaults are controller-runtime's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthCacheConfig {
    /// How long a TokenReview answer (authenticated or not) is reused.
    pub token_ttl: Duration,
    /// How long an allowed SubjectAccessReview is reused.
    pub allow_ttl: Duration,
    /// How long a denied SubjectAccessReview is reused.
    pub deny_ttl: Duration,
    /// Entries per cache.
    pub max_entries: usize,
    /// Tries per review when the API server fails transiently.
    pub attempts: u32,
    /// Wait before the first retry; each next wait is 1.5× longer (±20% jitter).
    pub first_backoff: Duration,
    /// The longest one review may take, retries included.
    pub review_timeout: Duration,
}

impl Default for AuthCacheConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(60),
            allow_ttl: Duration::from_secs(300),
            deny_ttl: Duration::from_secs(30),
            max_entries: 1024,
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            review_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    review: &'static str,
    outcome: &'static str,
}

/// `llmsched_metrics_auth_decisions_total{decision}` and
/// `llmsched_metrics_auth_reviews_total{review,outcome}`.
#[derive(Debug, Clone, Default)]
pub struct MetricsAuthMetrics {
    decisions: Family<DecisionLabels, Counter>,
    reviews: Family<ReviewLabels, Counter>,
}

impl MetricsAuthMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_metrics_auth_decisions",
            "Requests to /metrics that carried a bearer token, by decision (allowed, unauthenticated, denied, error).",
            m.decisions.clone(),
        );
        registry.register(
            "llmsched_metrics_auth_reviews",
            "TokenReview and SubjectAccessReview calls made for /metrics (cache misses), by outcome (ok, error).",
            m.reviews.clone(),
        );
        m
    }

    /// Requests decided `decision`.
    pub fn decisions(&self, decision: &'static str) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabels { decision })
            .get()
    }

    /// Review calls of `review` (`TokenReview`, `SubjectAccessReview`) with `outcome`.
    pub fn reviews(&self, review: &'static str, outcome: &'static str) -> u64 {
        self.reviews
            .get_or_create(&ReviewLabels { review, outcome })
            .get()
    }
}

/// A user as the TokenReview names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct User {
    name: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

/// A bounded map whose entries expire.
struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    max: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    fn get(&mut self, k: &K, now: Instant) -> Option<V> {
        match self.entries.get(k) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                self.entries.remove(k);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, k: K, v: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        if self.entries.len() >= self.max && !self.entries.contains_key(&k) {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= self.max
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(k, (v, now + ttl));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

type AccessKey = (User, String, String);

/// The Kubernetes [`MetricsAuthorizer`]: TokenReview + SubjectAccessReview, cached.
pub struct KubeMetricsAuthorizer {
    token_reviews: Api<TokenReview>,
    access_reviews: Api<SubjectAccessReview>,
    config: AuthCacheConfig,
    metrics: MetricsAuthMetrics,
    tokens: Mutex<TtlCache<String, Option<User>>>,
    access: Mutex<TtlCache<AccessKey, (bool, String)>>,
}

impl std::fmt::Debug for KubeMetricsAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMetricsAuthorizer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why one review call failed.
#[derive(Debug)]
struct ReviewError {
    message: String,
    retry: bool,
}

impl ReviewError {
    fn from_kube(review: &str, resource: &str, e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 403 => Self {
                message: format!(
                    "403 Forbidden: this EPP's service account may not create {resource} ({}); grant it `create` on {resource} (the chart's ClusterRole for metrics auth, or system:auth-delegator)",
                    s.message
                ),
                retry: false,
            },
            kube::Error::Api(s) if s.code == 401 => Self {
                message: format!(
                    "401 Unauthorized: the API server rejects this EPP's own credentials ({})",
                    s.message
                ),
                retry: false,
            },
            kube::Error::Api(s) => Self {
                message: format!("{review}: API server answered {}: {}", s.code, s.message),
                retry: s.code == 429 || s.code >= 500,
            },
            kube::Error::SerdeError(_) => Self {
                message: format!("{review}: malformed answer from the API server: {e}"),
                retry: false,
            },
            _ => Self {
                message: format!("{review}: the Kubernetes API server is unreachable: {e}"),
                retry: true,
            },
        }
    }
}

impl KubeMetricsAuthorizer {
    /// An authorizer using `client` with controller-runtime's cache lifetimes.
    pub fn new(client: kube::Client, metrics: MetricsAuthMetrics) -> Self {
        Self::with_config(client, metrics, AuthCacheConfig::default())
    }

    /// An authorizer with explicit cache lifetimes and retries.
    pub fn with_config(
        client: kube::Client,
        metrics: MetricsAuthMetrics,
        config: AuthCacheConfig,
    ) -> Self {
        Self {
            token_reviews: Api::all(client.clone()),
            access_reviews: Api::all(client),
            tokens: Mutex::new(TtlCache::new(config.max_entries)),
            access: Mutex::new(TtlCache::new(config.max_entries)),
            config,
            metrics,
        }
    }

    /// Cached entries (token reviews, access reviews).
    pub fn cached(&self) -> (usize, usize) {
        (self.tokens.lock().len(), self.access.lock().len())
    }

    /// Runs `call` with retries on transient failures, within the review timeout.
    async fn with_retries<T, F, Fut>(
        &self,
        review: &'static str,
        mut call: F,
    ) -> Result<T, ReviewError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ReviewError>>,
    {
        let deadline = Instant::now() + self.config.review_timeout;
        let mut wait = self.config.first_backoff;
        let mut attempt = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match tokio::time::timeout(left, call()).await {
                Ok(r) => r,
                Err(_) => Err(ReviewError {
                    message: format!(
                        "{review}: no answer from the Kubernetes API server within {:?}",
                        self.config.review_timeout
                    ),
                    retry: false,
                }),
            };
            let outcome = if result.is_ok() { "ok" } else { "error" };
            self.metrics
                .reviews
                .get_or_create(&ReviewLabels { review, outcome })
                .inc();
            match result {
                Err(e) if e.retry && attempt < self.config.attempts => {
                    let jitter = 0.8 + 0.4 * jitter_fraction();
                    let pause = wait.mul_f64(jitter);
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(review, attempt, error = %e.message, "metrics auth: retrying");
                    tokio::time::sleep(pause).await;
                    wait = wait.mul_f64(1.5);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn authenticate(&self, token: &str) -> Result<Option<User>, MetricsAuthError> {
        if let Some(hit) = self.tokens.lock().get(&token.to_string(), Instant::now()) {
            return Ok(hit);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = self
            .with_retries("TokenReview", || async {
                self.token_reviews
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| {
                        ReviewError::from_kube(
                            "TokenReview",
                            "tokenreviews.authentication.k8s.io",
                            &e,
                        )
                    })
            })
            .await
            .map_err(|e| MetricsAuthError::Authentication(e.message))?;
        let status = answer.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(u)) if u.username.as_deref().is_some_and(|n| !n.is_empty()) => {
                Some(User {
                    name: u.username.unwrap_or_default(),
                    uid: u.uid,
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                })
            }
            _ => {
                tracing::debug!(
                    error = status.error.as_deref().unwrap_or(""),
                    "metrics auth: TokenReview did not authenticate the token"
                );
                None
            }
        };
        self.tokens.lock().insert(
            token.to_string(),
            user.clone(),
            self.config.token_ttl,
            Instant::now(),
        );
        Ok(user)
    }

    async fn access(
        &self,
        user: &User,
        verb: &str,
        path: &str,
    ) -> Result<(bool, String), MetricsAuthError> {
        let key = (user.clone(), verb.to_string(), path.to_string());
        if let Some(hit) = self.access.lock().get(&key, Instant::now()) {
            return Ok(hit);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: (!user.groups.is_empty()).then(|| user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                resource_attributes: None,
            },
            ..SubjectAccessReview::default()
        };
        let answer = self
            .with_retries("SubjectAccessReview", || async {
                self.access_reviews
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|e| {
                        ReviewError::from_kube(
                            "SubjectAccessReview",
                            "subjectaccessreviews.authorization.k8s.io",
                            &e,
                        )
                    })
            })
            .await
            .map_err(|e| MetricsAuthError::Authorization {
                user: user.name.clone(),
                error: e.message,
            })?;
        let status = answer.status.unwrap_or_default();
        let allowed = status.allowed && status.denied != Some(true);
        let reason = status
            .reason
            .or(status.evaluation_error)
            .unwrap_or_default();
        let ttl = if allowed {
            self.config.allow_ttl
        } else {
            self.config.deny_ttl
        };
        let decision = (allowed, reason);
        self.access
            .lock()
            .insert(key, decision.clone(), ttl, Instant::now());
        Ok(decision)
    }

    async fn decide(
        &self,
        request: MetricsAuthRequest<'_>,
    ) -> Result<MetricsAuthDecision, MetricsAuthError> {
        let Some(user) = self.authenticate(request.token).await? else {
            return Ok(MetricsAuthDecision::Unauthenticated);
        };
        let (allowed, reason) = self.access(&user, request.verb, request.path).await?;
        Ok(if allowed {
            MetricsAuthDecision::Allowed { user: user.name }
        } else {
            MetricsAuthDecision::Denied {
                user: user.name,
                reason,
            }
        })
    }
}

fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl MetricsAuthorizer for KubeMetricsAuthorizer {
    fn authorize<'a>(
        &'a self,
        request: MetricsAuthRequest<'a>,
    ) -> BoxFuture<'a, Result<MetricsAuthDecision, MetricsAuthError>> {
        Box::pin(async move {
            let outcome = self.decide(request).await;
            let decision = match &outcome {
                Ok(MetricsAuthDecision::Allowed { .. }) => "allowed",
                Ok(MetricsAuthDecision::Unauthenticated) => "unauthenticated",
                Ok(MetricsAuthDecision::Denied { .. }) => "denied",
                Err(_) => "error",
            };
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels { decision })
                .inc();
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entries_expire() {
        let mut c = TtlCache::new(8);
        let t0 = Instant::now();
        c.insert("a", 1, Duration::from_secs(10), t0);
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(9)), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(10)), None);
        assert_eq!(c.len(), 0, "expired entries are dropped when seen");
        c.insert("b", 2, Duration::ZERO, t0);
        assert_eq!(c.get(&"b", t0), None, "a zero TTL caches nothing");
    }

    #[test]
    fn cache_is_bounded_and_evicts_expired_then_oldest() {
        let mut c = TtlCache::new(3);
        let t0 = Instant::now();
        c.insert(1, (), Duration::from_secs(1), t0);
        c.insert(2, (), Duration::from_secs(30), t0);
        c.insert(3, (), Duration::from_secs(20), t0);
        // 1 has expired at t0+2s: it goes first.
        c.insert(4, (), Duration::from_secs(60), t0 + Duration::from_secs(2));
        assert_eq!(c.len(), 3);
        assert!(c.get(&1, t0 + Duration::from_secs(2)).is_none());
        // Nothing expired: the entry expiring soonest (3) makes room.
        c.insert(5, (), Duration::from_secs(60), t0 + Duration::from_secs(3));
        assert_eq!(c.len(), 3);
        let now = t0 + Duration::from_secs(3);
        assert!(c.get(&3, now).is_none());
        assert!(c.get(&2, now).is_some() && c.get(&4, now).is_some() && c.get(&5, now).is_some());
        for i in 0..1000 {
            c.insert(100 + i, (), Duration::from_secs(60), now);
        }
        assert_eq!(c.len(), 3, "never grows past its bound");
    }

    #[test]
    fn defaults_are_controller_runtimes() {
        let c = AuthCacheConfig::default();
        assert_eq!(c.token_ttl, Duration::from_secs(60));
        assert_eq!(c.allow_ttl, Duration::from_secs(300));
        assert_eq!(c.deny_ttl, Duration::from_secs(30));
        assert_eq!(c.attempts, 5);
        assert_eq!(c.first_backoff, Duration::from_millis(500));
    }
}
