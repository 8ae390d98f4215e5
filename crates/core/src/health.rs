//! Endpoint health: which endpoints a request may be routed to.
//!
//! Every endpoint carries a [`HealthState`] of plain atomics, so the request path decides
//! "routable or not" with a few relaxed loads and no lock. Two kinds of evidence feed it:
//!
//! * **active** — the metrics scraper: an endpoint is routable only once a scrape has
//!   succeeded ([`Health::NeverScraped`] before) and while its last successful scrape is
//!   younger than the staleness threshold ([`Health::Stale`] after);
//! * **passive** — failures the transports see ([`FailureKind`]): a refused or reset
//!   connection, an upstream timeout, an Envoy local reply saying it could not reach the
//!   endpoint. A failure opens a circuit breaker at once ([`Health::Failing`]) for a backoff
//!   that doubles with every failure after a recovery (`backoff`, `2·backoff`, … up to
//!   `max_backoff`). When the backoff has run out the endpoint is half-open
//!   ([`Health::AwaitingProbe`]): it becomes routable again with the first successful scrape
//!   after its last failure (the probe is the scraper's next `/metrics` request, so no client
//!   request is ever spent on testing a dead endpoint). A successful response through the
//!   endpoint after it was routable again resets the backoff.
//!
//! Failures that arrive while the circuit is already open (the other in-flight requests of
//! a replica that died) do not lengthen the backoff; they only move the "last failure" so
//! the probe must succeed after them.
//!
//! Times are milliseconds since a process-wide origin ([`clock_ms`]), 0 meaning "never".

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How endpoint health is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Exclude unhealthy endpoints from the candidates (`--endpoint-health-checks`, on). Off:
    /// every endpoint is a candidate, as in the reference (health is still tracked and
    /// exported).
    pub enabled: bool,
    /// Metrics older than this make an endpoint [`Health::Stale`].
    pub staleness: Duration,
    /// First circuit-breaker backoff after a failure (1 s).
    pub backoff: Duration,
    /// Longest backoff (30 s).
    pub max_backoff: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            staleness: Duration::from_secs(2),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl HealthPolicy {
    /// The backoff after the `level`-th consecutive failure (1-based): doubling from
    /// [`Self::backoff`], capped at [`Self::max_backoff`].
    pub fn backoff_for(&self, level: u32) -> Duration {
        let factor = 1u32 << level.saturating_sub(1).min(20);
        self.backoff
            .saturating_mul(factor)
            .min(self.max_backoff.max(self.backoff))
    }
}

/// An endpoint's health at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Health {
    /// Routable.
    Healthy = 1,
    /// No scrape has succeeded yet.
    NeverScraped = 2,
    /// The last successful scrape is older than the staleness threshold.
    Stale = 3,
    /// A request or scrape failed; the circuit is open until the backoff runs out.
    Failing = 4,
    /// The backoff ran out; waiting for a successful scrape (the half-open probe).
    AwaitingProbe = 5,
}

impl Health {
    /// True for [`Health::Healthy`].
    pub fn is_healthy(self) -> bool {
        self == Health::Healthy
    }

    /// Lower-case name (`healthy`, `never_scraped`, `stale`, `failing`, `awaiting_probe`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::NeverScraped => "never_scraped",
            Health::Stale => "stale",
            Health::Failing => "failing",
            Health::AwaitingProbe => "awaiting_probe",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Health::Healthy,
            2 => Health::NeverScraped,
            3 => Health::Stale,
            4 => Health::Failing,
            5 => Health::AwaitingProbe,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong with an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A connection could not be opened (refused, unreachable, connect timeout).
    Connect = 0,
    /// An open connection broke (reset or closed before or during the response).
    Reset = 1,
    /// No response, or no response bytes, within the upstream timeout.
    Timeout = 2,
    /// The gateway reported it could not reach the endpoint (an Envoy local reply).
    Gateway = 3,
}

impl FailureKind {
    /// Every kind, in counter order.
    pub const ALL: [FailureKind; 4] = [
        FailureKind::Connect,
        FailureKind::Reset,
        FailureKind::Timeout,
        FailureKind::Gateway,
    ];

    /// Lower-case name (`connect`, `reset`, `timeout`, `gateway`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::Gateway => "gateway",
        }
    }
}

/// True when `error` (or one of its sources) is a shortage on this side of the connection —
/// out of file descriptors (`EMFILE`, `ENFILE`), buffers or memory (`ENOBUFS`, `ENOMEM`),
/// local ports (`EADDRNOTAVAIL`) — which says nothing about the endpoint's health.
pub fn is_local_resource_error(error: &(dyn std::error::Error + 'static)) -> bool {
    // Linux errno values (the EPP runs on Linux; elsewhere this matches nothing it should).
    const LOCAL: [i32; 5] = [24, 23, 105, 12, 99];
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.raw_os_error().is_some_and(|c| LOCAL.contains(&c))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    // An hour back (when the clock allows), so instants taken shortly before the first
    // call still map to distinct, non-zero values.
    *ORIGIN.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    })
}

/// `t` in milliseconds since the process-wide origin, plus one (so 0 can mean "never").
pub fn clock_ms(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin()).as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counters of an endpoint's health history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthCounters {
    /// Transitions from healthy to unhealthy.
    pub became_unhealthy: u64,
    /// Transitions from unhealthy to healthy.
    pub became_healthy: u64,
    /// Failures reported, by [`FailureKind`] (index = kind as usize).
    pub failures: [u64; 4],
}

/// A transition of an endpoint's health, as reported by [`HealthState::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The previously reported health (`None` on the first observation).
    pub from: Option<Health>,
    /// The health now.
    pub to: Health,
}

impl Transition {
    /// True when healthy-ness flipped (not just the reason for being unhealthy).
    pub fn flipped(&self) -> bool {
        self.from
            .is_some_and(|f| f.is_healthy() != self.to.is_healthy())
    }
}

/// The health bookkeeping of one endpoint: atomics only.
#[derive(Debug, Default)]
pub struct HealthState {
    scraped_at: AtomicU64,
    last_failure: AtomicU64,
    open_until: AtomicU64,
    level: AtomicU32,
    reported: AtomicU8,
    became_unhealthy: AtomicU64,
    became_healthy: AtomicU64,
    failures: [AtomicU64; 4],
}

impl HealthState {
    /// A state that has seen nothing yet.
    pub fn new() -> Self {
        // Pin the clock's origin before any instant of this endpoint is stored.
        let _ = origin();
        Self::default()
    }

    /// A scrape succeeded at `at` (`None`: forget the scrape, as if never scraped).
    pub fn set_scraped(&self, at: Option<Instant>) {
        self.scraped_at
            .store(at.map_or(0, clock_ms), Ordering::Release);
    }

    /// The health at `now_ms` ([`clock_ms`]).
    pub fn health_at(&self, now_ms: u64, policy: &HealthPolicy) -> Health {
        let scraped = self.scraped_at.load(Ordering::Acquire);
        let failed = self.last_failure.load(Ordering::Acquire);
        if failed != 0 {
            if now_ms < self.open_until.load(Ordering::Acquire) {
                return Health::Failing;
            }
            if scraped <= failed {
                return Health::AwaitingProbe;
            }
        }
        if scraped == 0 {
            return Health::NeverScraped;
        }
        if now_ms.saturating_sub(scraped) > ms(policy.staleness) {
            return Health::Stale;
        }
        Health::Healthy
    }

    /// True when [`Self::health_at`] is healthy.
    #[inline]
    pub fn is_routable_at(&self, now_ms: u64, policy: &HealthPolicy) -> bool {
        self.health_at(now_ms, policy).is_healthy()
    }

    /// Records a failure at `now_ms`. Returns true when it opened the circuit (the endpoint
    /// was not already failing or awaiting its probe); the backoff then doubles from the
    /// previous one.
    pub fn record_failure(&self, kind: FailureKind, now_ms: u64, policy: &HealthPolicy) -> bool {
        self.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
        let prev = self.last_failure.fetch_max(now_ms, Ordering::AcqRel);
        let until = self.open_until.load(Ordering::Acquire);
        let scraped = self.scraped_at.load(Ordering::Acquire);
        let was_closed = prev == 0 || (now_ms >= until && scraped > prev);
        if !was_closed {
            return false;
        }
        let level = self.level.load(Ordering::Acquire).saturating_add(1);
        let next = now_ms.saturating_add(ms(policy.backoff_for(level)));
        // Concurrent failures of the same outage: only one of them escalates.
        if self
            .open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.level.store(level, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// A response came back through the endpoint: once it is healthy again, the backoff
    /// starts over from [`HealthPolicy::backoff`]. One relaxed load when there is nothing
    /// to reset.
    #[inline]
    pub fn record_success(&self, now_ms: u64, policy: &HealthPolicy) {
        if self.level.load(Ordering::Relaxed) != 0 && self.is_routable_at(now_ms, policy) {
            self.level.store(0, Ordering::Release);
        }
    }

    /// The consecutive-failure level (0 after a success; the backoff is
    /// `policy.backoff_for(level)`).
    pub fn level(&self) -> u32 {
        self.level.load(Ordering::Acquire)
    }

    /// Compares the health at `now_ms` with the last one reported and reports a change
    /// exactly once (concurrent observers race on an atomic swap). Counts flips between
    /// healthy and unhealthy.
    pub fn observe(&self, now_ms: u64, policy: &HealthPolicy) -> Option<Transition> {
        let now = self.health_at(now_ms, policy);
        let prev = self.reported.swap(now as u8, Ordering::AcqRel);
        if prev == now as u8 {
            return None;
        }
        let t = Transition {
            from: Health::from_u8(prev),
            to: now,
        };
        if t.flipped() {
            if now.is_healthy() {
                self.became_healthy.fetch_add(1, Ordering::Relaxed);
            } else {
                self.became_unhealthy.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(t)
    }

    /// The counters.
    pub fn counters(&self) -> HealthCounters {
        HealthCounters {
            became_unhealthy: self.became_unhealthy.load(Ordering::Relaxed),
            became_healthy: self.became_healthy.load(Ordering::Relaxed),
            failures: std::array::from_fn(|i| self.failures[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            enabled: true,
            staleness: Duration::from_millis(2000),
            backoff: Duration::from_millis(1000),
            max_backoff: Duration::from_millis(8000),
        }
    }

    /// A state scraped at `t` (ms on the health clock).
    fn scraped_at(s: &HealthState, t: u64) {
        s.scraped_at.store(t, Ordering::Release);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy();
        let got: Vec<u128> = (1..=6).map(|l| p.backoff_for(l).as_millis()).collect();
        assert_eq!(got, [1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(p.backoff_for(u32::MAX).as_millis(), 8000);
        assert_eq!(p.backoff_for(0).as_millis(), 1000);
    }

    #[test]
    fn never_scraped_then_healthy_then_stale() {
        let p = policy();
        let s = HealthState::new();
        assert_eq!(s.health_at(10_000, &p), Health::NeverScraped);
        scraped_at(&s, 10_000);
        assert_eq!(s.health_at(10_000, &p), Health::Healthy);
        assert_eq!(s.health_at(12_000, &p), Health::Healthy);
        assert_eq!(s.health_at(12_001, &p), Health::Stale);
        // A new scrape makes it fresh again.
        scraped_at(&s, 12_500);
        assert!(s.is_routable_at(13_000, &p));
    }

    #[test]
    fn a_failure_opens_the_circuit_until_the_backoff_and_a_later_probe() {
        let p = policy();
        let s = HealthState::new();
        scraped_at(&s, 1_000);
        assert!(s.record_failure(FailureKind::Connect, 1_500, &p));
        assert_eq!(s.health_at(1_500, &p), Health::Failing);
        assert_eq!(s.health_at(2_499, &p), Health::Failing);
        // Backoff over, but no scrape since the failure: half-open, still not routable.
        assert_eq!(s.health_at(2_500, &p), Health::AwaitingProbe);
        // A scrape during the backoff counts as the probe once the backoff is over.
        scraped_at(&s, 2_000);
        assert_eq!(s.health_at(2_400, &p), Health::Failing);
        assert_eq!(s.health_at(2_500, &p), Health::Healthy);
        assert_eq!(s.level(), 1);
    }

    #[test]
    fn failures_during_an_outage_do_not_escalate_but_need_a_later_probe() {
        let p = policy();
        let s = HealthState::new();
        scraped_at(&s, 1_000);
        assert!(s.record_failure(FailureKind::Connect, 1_100, &p));
        // The other in-flight requests of the dead replica fail too.
        assert!(!s.record_failure(FailureKind::Reset, 1_200, &p));
        assert!(!s.record_failure(FailureKind::Reset, 1_300, &p));
        assert_eq!(s.level(), 1);
        // A scrape between the first and the last failure is not a probe.
        scraped_at(&s, 1_250);
        assert_eq!(s.health_at(2_200, &p), Health::AwaitingProbe);
        // Failed scrapes while waiting do not escalate either.
        assert!(!s.record_failure(FailureKind::Connect, 3_000, &p));
        scraped_at(&s, 3_100);
        assert_eq!(s.health_at(3_100, &p), Health::Healthy);
        let c = s.counters();
        assert_eq!(c.failures, [2, 2, 0, 0]);
    }

    #[test]
    fn repeated_failures_after_recovery_double_the_backoff_and_success_resets_it() {
        let p = policy();
        let s = HealthState::new();
        let mut t = 1_000;
        scraped_at(&s, t);
        for (level, backoff) in [(1, 1000), (2, 2000), (3, 4000), (4, 8000), (5, 8000)] {
            assert!(
                s.record_failure(FailureKind::Gateway, t, &p),
                "level {level}"
            );
            assert_eq!(s.level(), level);
            assert_eq!(s.health_at(t + backoff - 1, &p), Health::Failing);
            t += backoff;
            scraped_at(&s, t);
            assert_eq!(s.health_at(t, &p), Health::Healthy, "level {level}");
        }
        // A response through the endpoint while healthy resets the escalation.
        s.record_success(t, &p);
        assert_eq!(s.level(), 0);
        assert!(s.record_failure(FailureKind::Timeout, t + 1, &p));
        assert_eq!(s.level(), 1);
        // A success while the circuit is open changes nothing.
        s.record_success(t + 2, &p);
        assert_eq!(s.level(), 1);
    }

    #[test]
    fn observe_reports_each_change_once_and_counts_flips() {
        let p = policy();
        let s = HealthState::new();
        let t = s.observe(1_000, &p).unwrap();
        assert_eq!((t.from, t.to), (None, Health::NeverScraped));
        assert!(!t.flipped());
        assert_eq!(s.observe(1_001, &p), None);
        scraped_at(&s, 1_100);
        let t = s.observe(1_100, &p).unwrap();
        assert!(t.flipped() && t.to.is_healthy());
        s.record_failure(FailureKind::Connect, 1_200, &p);
        let t = s.observe(1_200, &p).unwrap();
        assert_eq!((t.from, t.to), (Some(Health::Healthy), Health::Failing));
        assert!(t.flipped());
        // Reason change only: reported, not counted as a flip.
        let t = s.observe(2_300, &p).unwrap();
        assert_eq!(t.to, Health::AwaitingProbe);
        assert!(!t.flipped());
        let c = s.counters();
        assert_eq!((c.became_healthy, c.became_unhealthy), (1, 1));
    }

    #[test]
    fn concurrent_failures_escalate_once() {
        let p = policy();
        let s = std::sync::Arc::new(HealthState::new());
        scraped_at(&s, 1_000);
        let opened: usize = std::thread::scope(|scope| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    let p = p.clone();
                    scope.spawn(move || {
                        (0..100)
                            .filter(|i| s.record_failure(FailureKind::Reset, 2_000 + i, &p))
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(opened, 1);
        assert_eq!(s.level(), 1);
        assert_eq!(s.counters().failures[FailureKind::Reset as usize], 800);
    }

    #[test]
    fn local_resource_errors_are_recognised_through_the_chain() {
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connect failed")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = Wrap(std::io::Error::from_raw_os_error(24));
        assert!(is_local_resource_error(&emfile));
        let refused = Wrap(std::io::Error::from_raw_os_error(111));
        assert!(!is_local_resource_error(&refused));
        assert!(!is_local_resource_error(&std::fmt::Error));
    }

    #[test]
    fn clock_is_monotonic_and_never_zero() {
        let a = Instant::now();
        let b = a + Duration::from_millis(5);
        assert!(clock_ms(a) >= 1);
        assert_eq!(clock_ms(b) - clock_ms(a), 5);
    }
}
