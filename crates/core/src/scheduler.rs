//! Scheduling profiles and the scheduler.
//!
//! A [`SchedulerProfile`] runs its filters in order (an empty result fails the profile),
//! then its scorers, summing `weight · clamp(score, 0, 1)` per candidate, then its picker.
//! The [`Scheduler`] asks its profile handler which profiles to run (repeatedly, so a
//! handler can run a prefill profile only after seeing the decode result), runs them, and
//! lets the handler turn the results into a [`SchedulingResult`] whose primary profile's
//! targets become the destination.
//!
//! Cost per decision is a handful of small vectors (candidates, scores) and one clock read
//! per plugin for its duration histogram; no locks, no hashing of label sets.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::cycle::CycleState;
use crate::endpoint::Endpoint;
use crate::error::InferenceError;
use crate::metrics::{AttemptLabels, PluginTimer, ProfileLabel, SchedulerMetrics, point};
use crate::plugin::{
    Candidate, Filter, Picker, ProfileHandler, SchedulingContext, ScoredEndpoint, Scorer,
};
use crate::request::InferenceRequest;

/// A scorer with its weight.
#[derive(Clone)]
pub struct WeightedScorer {
    /// The scorer.
    pub scorer: Arc<dyn Scorer>,
    /// Its weight (default 1).
    pub weight: f64,
    timer: PluginTimer,
}

/// Filters → weighted scorers → picker.
pub struct SchedulerProfile {
    name: String,
    filters: Vec<(Arc<dyn Filter>, PluginTimer)>,
    scorers: Vec<WeightedScorer>,
    picker: (Arc<dyn Picker>, PluginTimer),
}

impl std::fmt::Debug for SchedulerProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerProfile")
            .field("name", &self.name)
            .field(
                "filters",
                &self
                    .filters
                    .iter()
                    .map(|(p, _)| p.name())
                    .collect::<Vec<_>>(),
            )
            .field(
                "scorers",
                &self
                    .scorers
                    .iter()
                    .map(|s| (s.scorer.name(), s.weight))
                    .collect::<Vec<_>>(),
            )
            .field("picker", &self.picker.0.name())
            .finish()
    }
}

/// The targets one profile chose, best first.
#[derive(Debug, Clone, Default)]
pub struct ProfileRunResult {
    /// Chosen endpoints (primary first, then fallbacks).
    pub targets: Vec<Arc<Endpoint>>,
}

/// Results of the profiles run so far: `None` for a profile that failed.
#[derive(Debug, Clone, Default)]
pub struct ProfileResults {
    /// `(profile index, profile name, result)` in run order.
    pub entries: Vec<(usize, String, Option<ProfileRunResult>)>,
}

impl ProfileResults {
    /// True when the profile at `index` has run.
    pub fn has_run(&self, index: usize) -> bool {
        self.entries.iter().any(|(i, _, _)| *i == index)
    }

    /// The result of the named profile, if it ran and succeeded.
    pub fn get(&self, name: &str) -> Option<&ProfileRunResult> {
        self.entries
            .iter()
            .find(|(_, n, _)| n == name)
            .and_then(|(_, _, r)| r.as_ref())
    }

    /// Number of profiles run.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none ran.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The outcome of scheduling one request.
#[derive(Debug, Clone)]
pub struct SchedulingResult {
    /// Name of the profile whose targets are the destination.
    pub primary_profile: String,
    /// Successful profile results by name.
    pub profiles: Vec<(String, ProfileRunResult)>,
}

impl SchedulingResult {
    /// The result of the named profile.
    pub fn profile(&self, name: &str) -> Option<&ProfileRunResult> {
        self.profiles
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
    }

    /// The primary profile's targets (never empty for a result returned by the scheduler).
    pub fn targets(&self) -> &[Arc<Endpoint>] {
        self.profile(&self.primary_profile)
            .map_or(&[], |r| r.targets.as_slice())
    }
}

/// Builds a [`SchedulerProfile`].
pub struct ProfileBuilder {
    name: String,
    filters: Vec<(Arc<dyn Filter>, PluginTimer)>,
    scorers: Vec<WeightedScorer>,
    picker: Option<(Arc<dyn Picker>, PluginTimer)>,
    metrics: Option<Arc<SchedulerMetrics>>,
}

impl ProfileBuilder {
    fn timer(&self, point: &str, type_name: &str, name: &str) -> PluginTimer {
        self.metrics
            .as_ref()
            .map(|m| m.plugin_timer(point, type_name, name))
            .unwrap_or_default()
    }

    /// Appends a filter.
    pub fn filter(mut self, f: Arc<dyn Filter>) -> Self {
        let t = self.timer(point::FILTER, f.type_name(), f.name());
        self.filters.push((f, t));
        self
    }

    /// Appends a scorer with `weight`.
    pub fn scorer(mut self, s: Arc<dyn Scorer>, weight: f64) -> Self {
        let timer = self.timer(point::SCORER, s.type_name(), s.name());
        self.scorers.push(WeightedScorer {
            scorer: s,
            weight,
            timer,
        });
        self
    }

    /// Sets the picker.
    pub fn picker(mut self, p: Arc<dyn Picker>) -> Self {
        let t = self.timer(point::PICKER, p.type_name(), p.name());
        self.picker = Some((p, t));
        self
    }

    /// True once a picker is set.
    pub fn has_picker(&self) -> bool {
        self.picker.is_some()
    }

    /// The profile; `None` when no picker was set.
    pub fn build(self) -> Option<SchedulerProfile> {
        Some(SchedulerProfile {
            name: self.name,
            filters: self.filters,
            scorers: self.scorers,
            picker: self.picker?,
        })
    }
}

/// Message of a profile whose filters left nothing.
pub const NO_ENDPOINTS_MSG: &str = "no endpoints available for the given request";

/// Why scheduling a request failed. The scheduler turns it into the reference's 429
/// `failed to find target endpoint: <this error>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulingError {
    /// The profile's filters (or its picker) left no endpoint.
    #[error("no endpoints available for the given request")]
    NoEndpoints,
    /// A profile ran and failed (what the single-profile handler reports).
    #[error("failed to run scheduler profile '{0}'")]
    ProfileFailed(String),
    /// The profile handler picked a profile index that does not exist.
    #[error("profile handler picked unknown profile #{0}")]
    UnknownProfile(usize),
    /// The profile handler picked no profile at all.
    #[error("failed to run any scheduler profile for request {request_id}")]
    NoProfileRan {
        /// The request.
        request_id: String,
    },
    /// The primary profile's result holds no endpoint.
    #[error("primary profile '{0}' chose no endpoint")]
    EmptyPrimary(String),
    /// A profile handler's own reason (its message is shown as is).
    #[error("{0}")]
    Handler(String),
}

impl From<SchedulingError> for InferenceError {
    fn from(e: SchedulingError) -> Self {
        InferenceError::resource_exhausted(format!("failed to find target endpoint: {e}"))
    }
}

impl SchedulerProfile {
    /// A builder; `metrics` resolves the per-plugin duration histograms.
    pub fn builder(
        name: impl Into<String>,
        metrics: Option<Arc<SchedulerMetrics>>,
    ) -> ProfileBuilder {
        ProfileBuilder {
            name: name.into(),
            filters: Vec::new(),
            scorers: Vec::new(),
            picker: None,
            metrics,
        }
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weighted scorers.
    pub fn scorers(&self) -> &[WeightedScorer] {
        &self.scorers
    }

    /// The filters.
    pub fn filters(&self) -> impl Iterator<Item = &Arc<dyn Filter>> {
        self.filters.iter().map(|(f, _)| f)
    }

    /// The picker.
    pub fn picker(&self) -> &Arc<dyn Picker> {
        &self.picker.0
    }

    /// Runs the profile over `candidates`.
    pub fn run(
        &self,
        cx: &SchedulingContext<'_>,
        candidates: &[Candidate<'_>],
    ) -> Result<ProfileRunResult, SchedulingError> {
        let mut eps: Vec<Candidate<'_>> = candidates.to_vec();
        for (filter, timer) in &self.filters {
            let t0 = Instant::now();
            filter.filter(cx, &mut eps);
            timer.record(t0.elapsed());
            if eps.is_empty() {
                return Err(SchedulingError::NoEndpoints);
            }
        }
        if eps.is_empty() {
            return Err(SchedulingError::NoEndpoints);
        }

        let n = eps.len();
        let mut total = vec![0.0f64; n];
        if !self.scorers.is_empty() {
            let mut scratch = vec![0.0f64; n];
            for ws in &self.scorers {
                scratch.fill(0.0);
                let t0 = Instant::now();
                ws.scorer.score(cx, &eps, &mut scratch);
                ws.timer.record(t0.elapsed());
                for (t, s) in total.iter_mut().zip(&scratch) {
                    *t += clamp_score(*s) * ws.weight;
                }
            }
        }

        let mut scored: Vec<ScoredEndpoint<'_>> = eps
            .iter()
            .zip(&total)
            .map(|(e, s)| ScoredEndpoint {
                endpoint: e,
                score: *s,
            })
            .collect();
        let t0 = Instant::now();
        let picked = self.picker.0.pick(cx, &mut scored);
        self.picker.1.record(t0.elapsed());
        if picked.is_empty() {
            return Err(SchedulingError::NoEndpoints);
        }
        Ok(ProfileRunResult {
            targets: picked.into_iter().map(Arc::clone).collect(),
        })
    }
}

/// Clamps a score into [0, 1]; NaN becomes 0.
pub fn clamp_score(s: f64) -> f64 {
    if s.is_nan() { 0.0 } else { s.clamp(0.0, 1.0) }
}

/// Runs profiles as the profile handler directs.
pub struct Scheduler {
    profiles: Vec<Arc<SchedulerProfile>>,
    handler: Arc<dyn ProfileHandler>,
    pick_timer: PluginTimer,
    process_timer: PluginTimer,
    metrics: Option<Arc<SchedulerMetrics>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profiles)
            .field("handler", &self.handler.name())
            .finish()
    }
}

/// Guards against a profile handler that never stops picking.
const MAX_PROFILE_ROUNDS: usize = 16;

impl Scheduler {
    /// A scheduler over `profiles` driven by `handler`.
    pub fn new(
        profiles: Vec<SchedulerProfile>,
        handler: Arc<dyn ProfileHandler>,
        metrics: Option<Arc<SchedulerMetrics>>,
    ) -> Self {
        let timer = |p: &str| {
            metrics
                .as_ref()
                .map(|m| m.plugin_timer(p, handler.type_name(), handler.name()))
                .unwrap_or_default()
        };
        let pick_timer = timer(point::PROFILE_PICKER);
        let process_timer = timer(point::PROCESS_PROFILES_RESULTS);
        Self {
            profiles: profiles.into_iter().map(Arc::new).collect(),
            handler,
            pick_timer,
            process_timer,
            metrics,
        }
    }

    /// The profiles.
    pub fn profiles(&self) -> &[Arc<SchedulerProfile>] {
        &self.profiles
    }

    /// The profile handler.
    pub fn handler(&self) -> &Arc<dyn ProfileHandler> {
        &self.handler
    }

    /// Schedules `request` over `candidates`. Errors are 429 `ResourceExhausted` with the
    /// reference's message `failed to find target endpoint: ...`.
    pub fn schedule(
        &self,
        request: &InferenceRequest,
        cycle: &CycleState,
        candidates: &[Candidate<'_>],
    ) -> Result<SchedulingResult, InferenceError> {
        self.schedule_with_held_back(request, cycle, candidates, &[])
    }

    /// [`Self::schedule`] with the endpoints the caller held back as unhealthy. A profile
    /// whose filters leave none of `candidates` runs again over `candidates` and `held_back`
    /// together (fail-open per profile): when one role's endpoints are all held back (P/D
    /// decoders not scraped yet while the prefillers are), that profile still finds them, as
    /// the whole request fails open when no endpoint at all is healthy. Counted in
    /// `llmsched_endpoint_health_profile_fail_open_total{profile}`.
    pub fn schedule_with_held_back(
        &self,
        request: &InferenceRequest,
        cycle: &CycleState,
        candidates: &[Candidate<'_>],
        held_back: &[Candidate<'_>],
    ) -> Result<SchedulingResult, InferenceError> {
        let start = Instant::now();
        let cx = SchedulingContext {
            request,
            cycle,
            now: start,
        };
        let outcome = self.run_profiles(&cx, candidates, held_back);
        if let Some(m) = &self.metrics {
            m.e2e.observe(start.elapsed().as_secs_f64());
            let labels = match &outcome {
                Ok(r) => {
                    let primary = r.targets().first();
                    AttemptLabels {
                        status: "success".into(),
                        target_model_name: m.known.model(&request.target_model).to_string(),
                        pod_name: primary.map(|e| e.name().to_string()).unwrap_or_default(),
                        namespace: String::new(),
                        port: primary
                            .map(|e| e.meta().port.to_string())
                            .unwrap_or_default(),
                    }
                }
                Err(_) => AttemptLabels {
                    status: "failure".into(),
                    target_model_name: m.known.model(&request.target_model).to_string(),
                    pod_name: String::new(),
                    namespace: String::new(),
                    port: String::new(),
                },
            };
            m.attempts.get_or_create(&labels).inc();
        }
        outcome.map_err(InferenceError::from)
    }

    fn run_profiles(
        &self,
        cx: &SchedulingContext<'_>,
        candidates: &[Candidate<'_>],
        held_back: &[Candidate<'_>],
    ) -> Result<SchedulingResult, SchedulingError> {
        let mut results = ProfileResults::default();
        for _ in 0..MAX_PROFILE_ROUNDS {
            let t0 = Instant::now();
            let picked: SmallVec<[usize; 2]> =
                self.handler.pick_profiles(cx, &self.profiles, &results);
            self.pick_timer.record(t0.elapsed());
            if picked.is_empty() {
                break;
            }
            for idx in picked {
                let Some(profile) = self.profiles.get(idx) else {
                    return Err(SchedulingError::UnknownProfile(idx));
                };
                if results.has_run(idx) {
                    continue;
                }
                let r = match self.run_profile(profile, cx, candidates, held_back) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::debug!(profile = profile.name(), error = %e, "profile failed");
                        None
                    }
                };
                results.entries.push((idx, profile.name().to_string(), r));
            }
        }
        if results.is_empty() {
            return Err(SchedulingError::NoProfileRan {
                request_id: cx.request.request_id.clone(),
            });
        }
        let t0 = Instant::now();
        let out = self.handler.process_results(cx, results);
        self.process_timer.record(t0.elapsed());
        let out = out?;
        if out.targets().is_empty() {
            return Err(SchedulingError::EmptyPrimary(out.primary_profile));
        }
        Ok(out)
    }

    /// One profile over the candidates, or over the held-back endpoints too when its filters
    /// leave no candidate (see [`Self::schedule_with_held_back`]).
    fn run_profile(
        &self,
        profile: &SchedulerProfile,
        cx: &SchedulingContext<'_>,
        candidates: &[Candidate<'_>],
        held_back: &[Candidate<'_>],
    ) -> Result<ProfileRunResult, SchedulingError> {
        match profile.run(cx, candidates) {
            Err(SchedulingError::NoEndpoints) if !held_back.is_empty() => {
                let all: Vec<Candidate<'_>> = candidates.iter().chain(held_back).copied().collect();
                let r = profile.run(cx, &all)?;
                tracing::debug!(
                    profile = profile.name(),
                    held_back = held_back.len(),
                    "no healthy endpoint passed the profile's filters: scheduled over the unhealthy ones too (fail-open)"
                );
                if let Some(m) = &self.metrics {
                    m.profile_fail_open
                        .get_or_create(&ProfileLabel {
                            profile: profile.name().to_string(),
                        })
                        .inc();
                }
                Ok(r)
            }
            r => r,
        }
    }
}
