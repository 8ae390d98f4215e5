//! The EPP's request-level Prometheus metrics, with the reference's names, labels and buckets,
//! plus llmsched's own overhead metrics.
//!
//! Reference metrics (see `epp-protocol.md` section 6):
//!
//! * `inference_objective_request_total{model_name,target_model_name,priority}`,
//!   `inference_objective_request_error_total{model_name,target_model_name,error_code}`,
//!   `inference_objective_request_duration_seconds`, `..._request_sizes`,
//!   `..._response_sizes`, `..._input_tokens`, `..._output_tokens`,
//!   `..._prompt_cached_tokens`, `..._normalized_time_per_output_token_seconds`
//!   (`{model_name,target_model_name}`), `..._running_requests{model_name}`;
//! * `inference_pool_average_kv_cache_utilization`, `inference_pool_average_queue_size`,
//!   `inference_pool_average_running_requests`, `inference_pool_ready_pods`,
//!   `inference_pool_per_pod_queue_size` (label `name`): computed at scrape time from the
//!   endpoint snapshot by [`PoolCollector`], over endpoints with fresh metrics, as the
//!   reference's periodic refresher does;
//! * `inference_extension_info{commit,build_ref}`;
//! * `inference_extension_model_rewrite_decisions_total{model_rewrite_name,model_name,target_model}`;
//! * flow control: `inference_extension_flow_control_request_queue_duration_seconds`,
//!   `..._queue_size`, `..._queue_bytes`, `..._pool_saturation`.
//!
//! llmsched additions (the reference has no overhead metrics, weak spot #7):
//!
//! * `llmsched_request_processing_seconds{phase}` with phases `body_buffering` (transport:
//!   headers to the body's end of stream), `parse`, `admission` (incl. any flow-control
//!   wait), `scheduling` (candidates, data producers, admitters, scheduler, pre-request
//!   hooks) and `route` (the director's whole `route` call).
//! * `llmsched_profile_picks_total{profile,pod_name}`: per scheduled request, the first
//!   target of every profile that ran and chose one (with P/D: the decode pick under
//!   `decode`, the prefill pick under `prefill`), so each stage's load spread is visible.
//!
//! Per-phase histograms are resolved once, so recording a phase does not hash a label set.
//!
//! Label values a client chooses are bounded ([`llmsched_core::labels`]): `model_name`,
//! `target_model_name` and `model_name` of the rewrite decisions are the name only when an
//! objective/rewrite names it, an endpoint advertises it or a model server served it, else
//! `other`; the flow-control `fairness_id` keeps its first 64 distinct ids, then `other`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmsched_core::endpoint::EndpointSource;
use llmsched_core::labels::KnownNames;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets of long-running inference, 5 ms to 1 hour.
pub const GENERAL_LATENCY_BUCKETS: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// Request size buckets, 64 B to 1 GiB.
pub const REQUEST_SIZE_BUCKETS: [f64; 25] = [
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
/// Response size buckets (the reference's, including its `32778`).
pub const RESPONSE_SIZE_BUCKETS: [f64; 15] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0,
];
/// Input / cached token buckets.
pub const INPUT_TOKEN_BUCKETS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
/// Output token buckets.
pub const OUTPUT_TOKEN_BUCKETS: [f64; 12] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
/// Normalized time per output token buckets.
pub const NTPOT_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// Flow-control queue duration buckets.
pub const FLOW_QUEUE_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of `llmsched_request_processing_seconds`, 5 µs to 1 s.
pub const PROCESSING_BUCKETS: [f64; 16] = [
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 1.0,
];

/// `{model_name, target_model_name}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model the client asked for.
    pub model_name: String,
    /// Model the request was sent as.
    pub target_model_name: String,
}

/// `{model_name, target_model_name, priority}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    /// Model the client asked for.
    pub model_name: String,
    /// Model the request was sent as.
    pub target_model_name: String,
    /// Objective priority.
    pub priority: String,
}

/// `{model_name, target_model_name, error_code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Model the client asked for ("" when not known yet).
    pub model_name: String,
    /// Model the request was sent as ("" when not known yet).
    pub target_model_name: String,
    /// `BadRequest`, `ResourceExhausted`, ..., or `ModelServerError`.
    pub error_code: String,
}

/// `{model_name}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelNameLabel {
    /// Model the client asked for.
    pub model_name: String,
}

/// `{model_rewrite_name, model_name, target_model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RewriteLabels {
    /// Name of the InferenceModelRewrite.
    pub model_rewrite_name: String,
    /// Requested model.
    pub model_name: String,
    /// Chosen target model.
    pub target_model: String,
}

/// `{commit, build_ref}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    /// Source commit.
    pub commit: String,
    /// Build reference (version).
    pub build_ref: String,
}

/// Labels of the flow-control queue gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowQueueLabels {
    /// Flow id.
    pub fairness_id: String,
    /// Priority band.
    pub priority: String,
    /// Pool name.
    pub inference_pool: String,
    /// Requested model.
    pub model_name: String,
    /// Target model.
    pub target_model_name: String,
}

/// Labels of the flow-control queue duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowOutcomeLabels {
    /// Flow id.
    pub fairness_id: String,
    /// Priority band.
    pub priority: String,
    /// `Dispatched`, `RejectedCapacity`, `EvictedTTL`, `EvictedContextCancelled`.
    pub outcome: String,
    /// Pool name.
    pub inference_pool: String,
    /// Requested model.
    pub model_name: String,
    /// Target model.
    pub target_model_name: String,
}

/// `{inference_pool}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// Pool name.
    pub inference_pool: String,
}

/// `{profile, pod_name}` of the per-profile pick counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfilePickLabels {
    /// Scheduling profile name.
    pub profile: String,
    /// The profile's first target.
    pub pod_name: String,
}

/// `{phase}` of the overhead histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Phase name.
    pub phase: &'static str,
}

/// A measured phase of request processing (`llmsched_request_processing_seconds{phase}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Transport: from the request headers to the body's end of stream.
    BodyBuffering,
    /// Running the parser.
    Parse,
    /// Shedding check or flow control (including the queue wait).
    Admission,
    /// Candidates, data producers, admitters, scheduler and pre-request hooks.
    Scheduling,
    /// The whole `Director::route` call.
    Route,
}

impl Phase {
    /// All phases.
    pub const ALL: [Phase; 5] = [
        Phase::BodyBuffering,
        Phase::Parse,
        Phase::Admission,
        Phase::Scheduling,
        Phase::Route,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::BodyBuffering => "body_buffering",
            Phase::Parse => "parse",
            Phase::Admission => "admission",
            Phase::Scheduling => "scheduling",
            Phase::Route => "route",
        }
    }
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn hist_family<L: Clone + std::hash::Hash + Eq>(ctor: fn() -> Histogram) -> HistFamily<L> {
    Family::new_with_constructor(ctor)
}

/// The director's metrics. Cheap to clone (every field is a shared handle).
#[derive(Clone)]
pub struct EppMetrics {
    /// `inference_objective_request_total`.
    pub request_total: Family<PriorityLabels, Counter>,
    /// `inference_objective_request_error_total`.
    pub request_error_total: Family<ErrorLabels, Counter>,
    /// `inference_objective_request_duration_seconds`.
    pub request_duration: HistFamily<ModelLabels>,
    /// `inference_objective_request_sizes`.
    pub request_sizes: HistFamily<ModelLabels>,
    /// `inference_objective_response_sizes`.
    pub response_sizes: HistFamily<ModelLabels>,
    /// `inference_objective_input_tokens`.
    pub input_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_output_tokens`.
    pub output_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_prompt_cached_tokens`.
    pub prompt_cached_tokens: HistFamily<ModelLabels>,
    /// `inference_objective_running_requests`.
    pub running_requests: Family<ModelNameLabel, Gauge>,
    /// `inference_objective_normalized_time_per_output_token_seconds`.
    pub ntpot: HistFamily<ModelLabels>,
    /// `inference_extension_model_rewrite_decisions_total`.
    pub rewrite_decisions: Family<RewriteLabels, Counter>,
    /// `inference_extension_info`.
    pub info: Family<InfoLabels, Gauge>,
    /// `inference_extension_flow_control_request_queue_duration_seconds`.
    pub flow_queue_duration: HistFamily<FlowOutcomeLabels>,
    /// `inference_extension_flow_control_queue_size`.
    pub flow_queue_size: Family<FlowQueueLabels, Gauge>,
    /// `inference_extension_flow_control_queue_bytes`.
    pub flow_queue_bytes: Family<FlowQueueLabels, Gauge>,
    /// `inference_extension_flow_control_pool_saturation`.
    pub flow_pool_saturation: Family<PoolLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// `llmsched_request_processing_seconds`.
    pub processing: HistFamily<PhaseLabel>,
    /// Which client-chosen names may be label values (shared with the scheduler metrics).
    pub known: KnownNames,
    phases: Arc<[Histogram; 5]>,
    /// `llmsched_profile_picks_total`.
    pub profile_picks: Family<ProfilePickLabels, Counter>,
}

impl std::fmt::Debug for EppMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EppMetrics")
    }
}

impl Default for EppMetrics {
    fn default() -> Self {
        let processing: HistFamily<PhaseLabel> = hist_family(|| Histogram::new(PROCESSING_BUCKETS));
        let phases = Arc::new(Phase::ALL.map(|p| {
            processing
                .get_or_create(&PhaseLabel { phase: p.as_str() })
                .clone()
        }));
        Self {
            request_total: Family::default(),
            request_error_total: Family::default(),
            request_duration: hist_family(|| Histogram::new(GENERAL_LATENCY_BUCKETS)),
            request_sizes: hist_family(|| Histogram::new(REQUEST_SIZE_BUCKETS)),
            response_sizes: hist_family(|| Histogram::new(RESPONSE_SIZE_BUCKETS)),
            input_tokens: hist_family(|| Histogram::new(INPUT_TOKEN_BUCKETS)),
            output_tokens: hist_family(|| Histogram::new(OUTPUT_TOKEN_BUCKETS)),
            prompt_cached_tokens: hist_family(|| Histogram::new(INPUT_TOKEN_BUCKETS)),
            running_requests: Family::default(),
            ntpot: hist_family(|| Histogram::new(NTPOT_BUCKETS)),
            rewrite_decisions: Family::default(),
            info: Family::default(),
            flow_queue_duration: hist_family(|| Histogram::new(FLOW_QUEUE_BUCKETS)),
            flow_queue_size: Family::default(),
            flow_queue_bytes: Family::default(),
            flow_pool_saturation: Family::default(),
            processing,
            known: KnownNames::default(),
            phases,
            profile_picks: Family::default(),
        }
    }
}

impl EppMetrics {
    /// New metrics registered into `registry` (which should carry no prefix), with
    /// `inference_extension_info{commit, build_ref}` set to 1.
    pub fn register(registry: &mut Registry, commit: &str, build_ref: &str) -> Self {
        let m = Self::default();
        let r = registry;
        r.register(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model",
            m.request_total.clone(),
        );
        r.register(
            "inference_objective_request_error",
            "Counter of inference objective requests errors broken out for each model and target model",
            m.request_error_total.clone(),
        );
        r.register(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model",
            m.request_duration.clone(),
        );
        r.register(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model",
            m.request_sizes.clone(),
        );
        r.register(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model",
            m.response_sizes.clone(),
        );
        r.register(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model",
            m.input_tokens.clone(),
        );
        r.register(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model",
            m.output_tokens.clone(),
        );
        r.register(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model",
            m.prompt_cached_tokens.clone(),
        );
        r.register(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model",
            m.running_requests.clone(),
        );
        r.register(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each model and target model",
            m.ntpot.clone(),
        );
        r.register(
            "inference_extension_model_rewrite_decisions",
            "Total number of inference model rewrite decisions",
            m.rewrite_decisions.clone(),
        );
        r.register(
            "inference_extension_info",
            "General information of the current build of Inference Extension",
            m.info.clone(),
        );
        r.register(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Distribution of total time requests spend in the Flow Control layer (from enqueue to final outcome)",
            m.flow_queue_duration.clone(),
        );
        r.register(
            "inference_extension_flow_control_queue_size",
            "Current number of requests actively held in the Flow Control queue",
            m.flow_queue_size.clone(),
        );
        r.register(
            "inference_extension_flow_control_queue_bytes",
            "Current total size in bytes of requests actively held in the Flow Control queue",
            m.flow_queue_bytes.clone(),
        );
        r.register(
            "inference_extension_flow_control_pool_saturation",
            "Current saturation level of the inference pool (0.0 = empty, 1.0 = fully saturated)",
            m.flow_pool_saturation.clone(),
        );
        r.register(
            "llmsched_request_processing_seconds",
            "Time the EPP spends on each phase of a request before it is forwarded, in seconds",
            m.processing.clone(),
        );
        r.register(
            "llmsched_profile_picks",
            "Scheduled requests by scheduling profile and the profile's first target",
            m.profile_picks.clone(),
        );
        m.info
            .get_or_create(&InfoLabels {
                commit: commit.to_string(),
                build_ref: build_ref.to_string(),
            })
            .set(1);
        m
    }

    /// These metrics with the scheduler metrics' [`KnownNames`], so a model name is the
    /// same label value (itself or `other`) in every family; unchanged without scheduler
    /// metrics.
    pub fn sharing_known_names(
        mut self,
        scheduler: Option<&llmsched_core::metrics::SchedulerMetrics>,
    ) -> Self {
        if let Some(s) = scheduler {
            self.known = s.known.clone();
        }
        self
    }

    /// Records the duration of one processing phase.
    pub fn observe_phase(&self, phase: Phase, d: Duration) {
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.phases[i].observe(d.as_secs_f64());
    }

    /// Records a request error (`error_code` is an [`llmsched_core::ErrorCode`] name or
    /// `ModelServerError`).
    pub fn record_error(&self, model: &str, target: &str, error_code: &str) {
        self.request_error_total
            .get_or_create(&ErrorLabels {
                model_name: model.to_string(),
                target_model_name: target.to_string(),
                error_code: error_code.to_string(),
            })
            .inc();
    }
}

/// Computes the `inference_pool_*` gauges from the endpoint snapshot on every scrape.
pub struct PoolCollector {
    endpoints: Arc<dyn EndpointSource>,
    pool_name: String,
    staleness: Duration,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector")
            .field("pool_name", &self.pool_name)
            .finish()
    }
}

impl PoolCollector {
    /// A collector for the pool named `pool_name` (the `name` label); endpoints whose
    /// metrics are older than `staleness` are not counted as ready.
    pub fn new(
        endpoints: Arc<dyn EndpointSource>,
        pool_name: impl Into<String>,
        staleness: Duration,
    ) -> Self {
        Self {
            endpoints,
            pool_name: pool_name.into(),
            staleness,
        }
    }

    /// Registers the collector into `registry`.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }

    /// `(ready pods, avg kv, avg queue, avg running)` over endpoints with fresh metrics.
    pub fn compute(&self, now: Instant) -> (usize, f64, f64, f64) {
        let snap = self.endpoints.snapshot();
        let (mut n, mut kv, mut q, mut run) = (0usize, 0.0, 0.0, 0.0);
        for e in &snap.endpoints {
            let m = e.metrics();
            if m.is_stale(now, self.staleness) {
                continue;
            }
            n += 1;
            kv += m.kv_cache_usage;
            q += f64::from(m.waiting_queue_size);
            run += f64::from(m.running_requests);
        }
        if n == 0 {
            return (0, 0.0, 0.0, 0.0);
        }
        let d = n as f64;
        (n, kv / d, q / d, run / d)
    }
}

fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    labels: &[(&'static str, String)],
    value: f64,
) -> Result<(), std::fmt::Error> {
    let family: Family<Vec<(&'static str, String)>, Gauge<f64, std::sync::atomic::AtomicU64>> =
        Family::default();
    family.get_or_create(&labels.to_vec()).set(value);
    let metric_encoder = encoder.encode_descriptor(name, help, None, family.metric_type())?;
    family.encode(metric_encoder)
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (ready, kv, q, run) = self.compute(Instant::now());
        let pool = [("name", self.pool_name.clone())];
        encode_gauge(
            &mut encoder,
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool",
            &pool,
            kv,
        )?;
        encode_gauge(
            &mut encoder,
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue",
            &pool,
            q,
        )?;
        encode_gauge(
            &mut encoder,
            "inference_pool_average_running_requests",
            "The average number of running requests across model servers in the pool",
            &pool,
            run,
        )?;
        encode_gauge(
            &mut encoder,
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool",
            &pool,
            ready as f64,
        )?;
        let snap = self.endpoints.snapshot();
        if !snap.endpoints.is_empty() {
            let family: Family<
                Vec<(&'static str, String)>,
                Gauge<f64, std::sync::atomic::AtomicU64>,
            > = Family::default();
            for e in &snap.endpoints {
                family
                    .get_or_create(&vec![
                        ("name", self.pool_name.clone()),
                        ("model_server_pod", e.name().to_string()),
                    ])
                    .set(f64::from(e.metrics().waiting_queue_size));
            }
            let me = encoder.encode_descriptor(
                "inference_pool_per_pod_queue_size",
                "The total number of requests pending in the model server queue for each underlying pod",
                None,
                family.metric_type(),
            )?;
            family.encode(me)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
    use prometheus_client::encoding::text::encode;

    #[test]
    fn names_labels_and_pool_gauges() {
        let mut reg = Registry::default();
        let m = EppMetrics::register(&mut reg, "abc", "v1");
        let eps = Arc::new(StaticEndpoints::from_addrs(&[
            "10.0.0.1:8000".parse().unwrap(),
            "10.0.0.2:8000".parse().unwrap(),
            "10.0.0.3:8000".parse().unwrap(),
        ]));
        let now = Instant::now();
        for (i, (q, kv)) in [(2u32, 0.5), (4, 0.25)].iter().enumerate() {
            eps.0.endpoints[i].set_metrics(EndpointMetrics {
                waiting_queue_size: *q,
                kv_cache_usage: *kv,
                running_requests: 3,
                updated_at: Some(now),
                ..Default::default()
            });
        }
        PoolCollector::new(eps, "pool", Duration::from_secs(2)).register(&mut reg);
        m.request_total
            .get_or_create(&PriorityLabels {
                model_name: "m".into(),
                target_model_name: "t".into(),
                priority: "0".into(),
            })
            .inc();
        m.record_error("m", "t", "ModelServerError");
        m.running_requests
            .get_or_create(&ModelNameLabel {
                model_name: "m".into(),
            })
            .set(2);
        m.ntpot
            .get_or_create(&ModelLabels {
                model_name: "m".into(),
                target_model_name: "t".into(),
            })
            .observe(0.0005);
        m.observe_phase(Phase::Parse, Duration::from_micros(7));
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        for needle in [
            "inference_objective_request_total{model_name=\"m\",target_model_name=\"t\",priority=\"0\"} 1",
            "inference_objective_request_error_total{model_name=\"m\",target_model_name=\"t\",error_code=\"ModelServerError\"} 1",
            "inference_extension_info{commit=\"abc\",build_ref=\"v1\"} 1",
            "inference_pool_ready_pods{name=\"pool\"} 2",
            "inference_pool_average_queue_size{name=\"pool\"} 3",
            "inference_pool_average_kv_cache_utilization{name=\"pool\"} 0.375",
            "inference_pool_average_running_requests{name=\"pool\"} 3",
            "inference_pool_per_pod_queue_size{name=\"pool\",model_server_pod=\"10.0.0.3:8000\"} 0",
            "llmsched_request_processing_seconds_bucket{le=\"0.00001\",phase=\"parse\"} 1",
            "inference_objective_running_requests{model_name=\"m\"} 2",
            "inference_objective_normalized_time_per_output_token_seconds_bucket{le=\"0.001\",model_name=\"m\",target_model_name=\"t\"} 1",
        ] {
            assert!(out.contains(needle), "missing {needle} in\n{out}");
        }
    }
}
