//! inference-perf's configuration format.
//!
//! The same YAML file drives `inference-perf` and `llmsched bench`. The schema mirrors
//! inference-perf's pydantic models (`inference_perf/config/*`): the sections `api`, `server`,
//! `data`, `load` and `report` are parsed field by field and unknown keys in them are rejected
//! (as inference-perf does), so a typo such as `sytem_prompt_len` is an error that names the key
//! instead of a silently ignored setting. The sections `tokenizer`, `storage`, `metrics` and
//! `circuit_breakers` are accepted with any content and ignored.
//!
//! Parsing accepts everything inference-perf accepts; running supports a subset (shared-prefix
//! data, `constant` / `poisson` / `concurrent` load). [`BenchConfig::check_runnable`] rejects the
//! rest with an error naming the key. Differences from inference-perf that widen what is
//! accepted: stage `duration` may be fractional, and `variance` may be given without setting
//! `std_dev: 0`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// inference-perf's default percentile list.
pub const DEFAULT_PERCENTILES: [f64; 11] = [
    0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9,
];

/// Opaque YAML value for sections and keys that are accepted but not interpreted.
pub type Opaque = serde_norway::Value;

/// A whole inference-perf config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    /// Request API options.
    #[serde(default)]
    pub api: ApiConfig,
    /// Prompt generation.
    #[serde(default)]
    pub data: DataConfig,
    /// Load shape.
    #[serde(default)]
    pub load: LoadConfig,
    /// Which reports to produce.
    #[serde(default)]
    pub report: ReportConfig,
    /// The model server under test.
    #[serde(default)]
    pub server: Option<ServerConfig>,
    /// inference-perf's tokenizer section (Hugging Face model name); accepted and ignored.
    /// Use `--tokenizer FILE` to tokenize with a local `tokenizer.json` instead.
    #[serde(default)]
    pub tokenizer: Option<Opaque>,
    /// inference-perf's storage section; accepted and ignored (see `--output`).
    #[serde(default)]
    pub storage: Option<Opaque>,
    /// inference-perf's Prometheus metrics client; accepted and ignored.
    #[serde(default)]
    pub metrics: Option<Opaque>,
    /// inference-perf's circuit breaker definitions; accepted and ignored.
    #[serde(default)]
    pub circuit_breakers: Option<Opaque>,
}

/// Which OpenAI-style endpoint to call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiType {
    /// `POST /v1/completions`.
    #[default]
    Completion,
    /// `POST /v1/chat/completions`.
    Chat,
    /// Anthropic `/v1/messages` (parsed, not supported).
    AnthropicMessages,
}

/// The `api` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Endpoint type.
    #[serde(default, rename = "type")]
    pub kind: ApiType,
    /// Stream responses (server-sent events); needed for TTFT, TPOT and ITL.
    #[serde(default)]
    pub streaming: bool,
    /// Extra HTTP headers for every request.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// SLO header unit (goodput); accepted and ignored.
    #[serde(default)]
    pub slo_unit: Option<String>,
    /// SLO header name for TPOT; accepted and ignored.
    #[serde(default)]
    pub slo_tpot_header: Option<String>,
    /// SLO header name for TTFT; accepted and ignored.
    #[serde(default)]
    pub slo_ttft_header: Option<String>,
    /// Structured output settings, sent as `response_format`.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Header carrying the session id of multi-turn requests.
    #[serde(default)]
    pub session_id_header_key: Option<String>,
    /// Response header with a server session token to echo back; accepted and ignored.
    #[serde(default)]
    pub session_token_header_key: Option<String>,
}

/// `api.response_format`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    /// `json_schema` (default) or `json_object`.
    #[serde(default = "default_response_format_type", rename = "type")]
    pub kind: String,
    /// Schema name.
    #[serde(default = "default_response_format_name")]
    pub name: String,
    /// The JSON schema.
    #[serde(default)]
    pub json_schema: Option<Opaque>,
}

fn default_response_format_type() -> String {
    "json_schema".to_owned()
}

fn default_response_format_name() -> String {
    "structured_output".to_owned()
}

/// Kind of model server (only used for labelling; every kind speaks the OpenAI API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerType {
    /// vLLM (also the llmsched simulator).
    #[default]
    Vllm,
    /// SGLang.
    Sglang,
    /// Text Generation Inference.
    Tgi,
    /// inference-perf's mock client.
    Mock,
}

/// The `server` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Server kind.
    #[serde(default, rename = "type")]
    pub kind: ServerType,
    /// Model name sent in every request; discovered from `GET /v1/models` when unset.
    #[serde(default)]
    pub model_name: Option<String>,
    /// Base URL, e.g. `http://127.0.0.1:8080` (a path prefix is kept).
    pub base_url: String,
    /// Send `ignore_eos` so outputs reach `max_tokens`.
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    /// Bearer token.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Client TLS certificate (not supported).
    #[serde(default)]
    pub cert_path: Option<String>,
    /// Client TLS key (not supported).
    #[serde(default)]
    pub key_path: Option<String>,
}

fn yes() -> bool {
    true
}

/// `data.type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// inference-perf's default mock data.
    #[default]
    Mock,
    /// ShareGPT conversations.
    #[serde(rename = "shareGPT")]
    ShareGpt,
    /// Synthetic text.
    Synthetic,
    /// Random tokens.
    Random,
    /// Groups of prompts sharing a system prompt: the one `llmsched bench` runs.
    SharedPrefix,
    /// CNN/DailyMail.
    CnnDailymail,
    /// Infinity-Instruct.
    InfinityInstruct,
    /// BillSum.
    BillsumConversations,
    /// OpenTelemetry trace replay.
    OtelTraceReplay,
    /// Weka trace replay.
    WekaTraceReplay,
    /// Synthetic conversation replay.
    ConversationReplay,
    /// VisionArena.
    Visionarena,
}

impl DataType {
    /// The name used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mock => "mock",
            Self::ShareGpt => "shareGPT",
            Self::Synthetic => "synthetic",
            Self::Random => "random",
            Self::SharedPrefix => "shared_prefix",
            Self::CnnDailymail => "cnn_dailymail",
            Self::InfinityInstruct => "infinity_instruct",
            Self::BillsumConversations => "billsum_conversations",
            Self::OtelTraceReplay => "otel_trace_replay",
            Self::WekaTraceReplay => "weka_trace_replay",
            Self::ConversationReplay => "conversation_replay",
            Self::Visionarena => "visionarena",
        }
    }
}

/// The `data` section. Only `type: shared_prefix` runs; the other data sources' settings are
/// accepted so inference-perf configs for them still parse.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Data source.
    #[serde(default, rename = "type")]
    pub kind: DataType,
    /// ShareGPT path (ignored).
    #[serde(default)]
    pub path: Option<String>,
    /// Corpus file (ignored).
    #[serde(default)]
    pub corpus_file_path: Option<String>,
    /// Input length distribution of `synthetic` / `random` (ignored).
    #[serde(default)]
    pub input_distribution: Option<Distribution>,
    /// Output length distribution of `synthetic` / `random` (ignored).
    #[serde(default)]
    pub output_distribution: Option<Distribution>,
    /// Shared-prefix generator settings.
    #[serde(default)]
    pub shared_prefix: Option<SharedPrefixConfig>,
    /// Multimodal payloads (not supported).
    #[serde(default)]
    pub multimodal: Option<Opaque>,
    /// Prompt trace (ignored).
    #[serde(default)]
    pub trace: Option<Opaque>,
    /// OTel trace replay settings (ignored).
    #[serde(default)]
    pub otel_trace_replay: Option<Opaque>,
    /// Weka trace replay settings (ignored).
    #[serde(default)]
    pub weka_trace_replay: Option<Opaque>,
    /// Conversation replay settings (ignored).
    #[serde(default)]
    pub conversation_replay: Option<Opaque>,
    /// VisionArena settings (ignored).
    #[serde(default)]
    pub visionarena: Option<Opaque>,
    /// Chat-template wrapping of `random` prompts (ignored).
    #[serde(default)]
    pub use_chat_template: bool,
}

/// `data.shared_prefix`: `num_groups` system prompts, each followed by
/// `num_prompts_per_group` different questions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPrefixConfig {
    /// Number of distinct system prompts (alias `num_unique_system_prompts`).
    #[serde(default = "ten", alias = "num_unique_system_prompts")]
    pub num_groups: u64,
    /// Prompts per system prompt (alias `num_users_per_system_prompt`).
    #[serde(default = "ten", alias = "num_users_per_system_prompt")]
    pub num_prompts_per_group: u64,
    /// System prompt length in tokens (fixed or a distribution, sampled per group).
    #[serde(default = "len_100")]
    pub system_prompt_len: LengthSpec,
    /// Question length in tokens (sampled per prompt).
    #[serde(default = "len_50")]
    pub question_len: LengthSpec,
    /// Output length (`max_tokens`, sampled per prompt).
    #[serde(default = "len_50")]
    pub output_len: LengthSpec,
    /// Seed for prompt generation.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Legacy question length distribution (used when `question_len` is an integer).
    #[serde(default)]
    pub question_distribution: Option<Distribution>,
    /// Legacy output length distribution (used when `output_len` is an integer).
    #[serde(default)]
    pub output_distribution: Option<Distribution>,
    /// inference-perf's multi-turn chat (see the crate docs for the exact semantics).
    #[serde(default)]
    pub enable_multi_turn_chat: bool,
    /// Multimodal prefixes (not supported).
    #[serde(default)]
    pub multimodal: Option<Opaque>,
}

impl Default for SharedPrefixConfig {
    fn default() -> Self {
        Self {
            num_groups: 10,
            num_prompts_per_group: 10,
            system_prompt_len: LengthSpec::Fixed(100),
            question_len: LengthSpec::Fixed(50),
            output_len: LengthSpec::Fixed(50),
            seed: None,
            question_distribution: None,
            output_distribution: None,
            enable_multi_turn_chat: false,
            multimodal: None,
        }
    }
}

fn ten() -> u64 {
    10
}

fn len_100() -> LengthSpec {
    LengthSpec::Fixed(100)
}

fn len_50() -> LengthSpec {
    LengthSpec::Fixed(50)
}

/// A token length: a fixed integer or a [`Distribution`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LengthSpec {
    /// Exactly this many tokens.
    Fixed(u64),
    /// Sampled from a distribution.
    Dist(Distribution),
}

impl LengthSpec {
    /// The distribution to sample: `Fixed(n)` becomes `fixed` at `n` unless a legacy
    /// distribution overrides it (inference-perf's `_resolve_distribution`).
    pub fn resolve(&self, legacy: Option<&Distribution>) -> Distribution {
        match self {
            Self::Dist(d) => d.clone(),
            Self::Fixed(n) => match legacy {
                Some(d) => d.clone(),
                None => Distribution::fixed(*n),
            },
        }
    }
}

impl<'de> Deserialize<'de> for LengthSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenVisitor;
        impl<'de> Visitor<'de> for LenVisitor {
            type Value = LengthSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token count (non-negative integer) or a distribution mapping")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LengthSpec, E> {
                Ok(LengthSpec::Fixed(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LengthSpec, E> {
                u64::try_from(v)
                    .map(LengthSpec::Fixed)
                    .map_err(|_| E::custom(format!("token count must be >= 0, got {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LengthSpec, E> {
                if v >= 0.0 && v.fract() == 0.0 && v <= 1e15 {
                    // Integral and in range, so the cast is exact.
                    Ok(LengthSpec::Fixed(v as u64))
                } else {
                    Err(E::custom(format!(
                        "token count must be a non-negative integer, got {v}"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LengthSpec, A::Error> {
                Distribution::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(LengthSpec::Dist)
            }
        }
        deserializer.deserialize_any(LenVisitor)
    }
}

/// Shape of a [`Distribution`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DistributionType {
    /// Gaussian, clipped to `[min, max]`.
    #[default]
    Normal,
    /// Skew-normal (Azzalini), clipped.
    SkewNormal,
    /// Log-normal with the given mean and standard deviation, clipped.
    Lognormal,
    /// Uniform integers in `[min, max]`.
    Uniform,
    /// Poisson with mean `mean`, clipped.
    Poisson,
    /// Always `mean`.
    Fixed,
}

/// inference-perf's `Distribution` model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Distribution {
    /// Lower clamp.
    #[serde(default = "dist_min")]
    pub min: i64,
    /// Upper clamp.
    #[serde(default = "dist_max")]
    pub max: i64,
    /// Mean.
    #[serde(default = "dist_mean")]
    pub mean: f64,
    /// Standard deviation (default 200 unless `variance` is given).
    #[serde(default)]
    pub std_dev: Option<f64>,
    /// Sample count hint (ignored).
    #[serde(default)]
    pub total_count: Option<u64>,
    /// Shape.
    #[serde(default, rename = "type")]
    pub kind: DistributionType,
    /// Variance (alternative to `std_dev`).
    #[serde(default)]
    pub variance: Option<f64>,
    /// Skewness for `skew_normal`.
    #[serde(default)]
    pub skew: f64,
}

fn dist_min() -> i64 {
    10
}

fn dist_max() -> i64 {
    1024
}

fn dist_mean() -> f64 {
    512.0
}

impl Distribution {
    /// A degenerate distribution at `n`.
    pub fn fixed(n: u64) -> Self {
        let n_i = i64::try_from(n).unwrap_or(i64::MAX);
        Self {
            min: n_i,
            max: n_i,
            mean: n as f64,
            std_dev: Some(0.0),
            total_count: None,
            kind: DistributionType::Fixed,
            variance: None,
            skew: 0.0,
        }
    }

    /// Effective standard deviation: `std_dev`, else `sqrt(variance)`, else 200.
    pub fn effective_std_dev(&self) -> f64 {
        match (self.std_dev, self.variance) {
            (Some(s), _) => s,
            (None, Some(v)) => v.sqrt(),
            (None, None) => 200.0,
        }
    }

    fn validate(&self, key: &str) -> Result<(), BenchError> {
        if self.min > self.max {
            return Err(BenchError::invalid(
                key,
                format!(
                    "min ({}) cannot be greater than max ({})",
                    self.min, self.max
                ),
            ));
        }
        if let (Some(s), Some(_)) = (self.std_dev, self.variance)
            && s > 0.0
        {
            return Err(BenchError::invalid(
                key,
                "specify either 'std_dev' or 'variance', not both",
            ));
        }
        if self.variance.is_some_and(|v| v < 0.0) {
            return Err(BenchError::invalid(key, "variance cannot be negative"));
        }
        if self.effective_std_dev() < 0.0 {
            return Err(BenchError::invalid(key, "std_dev cannot be negative"));
        }
        if self.kind == DistributionType::Lognormal && self.mean <= 0.0 {
            return Err(BenchError::invalid(
                key,
                "lognormal distribution requires mean > 0",
            ));
        }
        if self.kind != DistributionType::Fixed && self.max < 0 {
            return Err(BenchError::invalid(
                key,
                "max must be >= 0 for a token length",
            ));
        }
        Ok(())
    }
}

/// `load.type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadType {
    /// `int(rate × duration)` requests spread over `duration` with random gaps.
    #[default]
    Constant,
    /// Per 1-s window, k ~ Poisson(rate) requests spread over the window.
    Poisson,
    /// Replay of request timestamps from a trace (not supported).
    TraceReplay,
    /// `num_requests` requests with at most `concurrency_level` in flight.
    Concurrent,
    /// Session trace replay (not supported).
    TraceSessionReplay,
}

impl LoadType {
    /// The name used in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Poisson => "poisson",
            Self::TraceReplay => "trace_replay",
            Self::Concurrent => "concurrent",
            Self::TraceSessionReplay => "trace_session_replay",
        }
    }
}

/// One entry of `load.stages` as written; which fields are required depends on `load.type`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Requests per second (`constant`, `poisson`).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Seconds (`constant`, `poisson`).
    #[serde(default)]
    pub duration: Option<f64>,
    /// Total requests (`concurrent`).
    #[serde(default)]
    pub num_requests: Option<u64>,
    /// Maximum requests in flight (`concurrent`).
    #[serde(default)]
    pub concurrency_level: Option<u64>,
    /// Session replay field (not supported).
    #[serde(default)]
    pub concurrent_sessions: Option<u64>,
    /// Session replay field (not supported).
    #[serde(default)]
    pub session_rate: Option<f64>,
    /// Session replay field (not supported).
    #[serde(default)]
    pub num_sessions: Option<u64>,
    /// Session replay field (not supported).
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// A validated stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadStage {
    /// `constant` or `poisson`: `rate` req/s for `duration` s.
    Rate {
        /// Requests per second.
        rate: f64,
        /// Seconds.
        duration: f64,
    },
    /// `concurrent`: `num_requests` requests, at most `concurrency` in flight.
    Concurrent {
        /// Total requests.
        num_requests: u64,
        /// In-flight limit.
        concurrency: u64,
    },
}

impl LoadStage {
    /// Number of requests the stage sends: `int(rate × duration)` or `num_requests`.
    pub fn num_requests(&self) -> u64 {
        match *self {
            // Truncation toward zero is inference-perf's `int(rate * duration)`.
            Self::Rate { rate, duration } => (rate * duration).max(0.0) as u64,
            Self::Concurrent { num_requests, .. } => num_requests,
        }
    }

    /// The rate inference-perf reports as `requested_rate` (for `concurrent` it is
    /// `num_requests`, because inference-perf sends them all within one second).
    pub fn requested_rate(&self) -> f64 {
        match *self {
            Self::Rate { rate, .. } => rate,
            Self::Concurrent { num_requests, .. } => num_requests as f64,
        }
    }

    /// The concurrency level of a `concurrent` stage.
    pub fn concurrency(&self) -> Option<u64> {
        match *self {
            Self::Rate { .. } => None,
            Self::Concurrent { concurrency, .. } => Some(concurrency),
        }
    }
}

/// The `load` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadConfig {
    /// Load type.
    #[serde(default, rename = "type")]
    pub kind: LoadType,
    /// Seconds to wait between stages.
    #[serde(default = "one")]
    pub interval: f64,
    /// Stages, run in order.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// Automatic stage generation (not supported).
    #[serde(default)]
    pub sweep: Option<Opaque>,
    /// inference-perf worker processes; with `worker_max_concurrency` it caps requests in
    /// flight (see [`LoadConfig::max_in_flight`]).
    #[serde(default)]
    pub num_workers: Option<u64>,
    /// Requests in flight per worker.
    #[serde(default)]
    pub worker_max_concurrency: Option<u64>,
    /// TCP connections per worker (ignored: one connection per stream).
    #[serde(default)]
    pub worker_max_tcp_connections: Option<u64>,
    /// Timing trace (not supported).
    #[serde(default)]
    pub trace: Option<Opaque>,
    /// Names of circuit breakers to enable (ignored).
    #[serde(default)]
    pub circuit_breakers: Vec<String>,
    /// Per-request timeout in seconds.
    #[serde(default)]
    pub request_timeout: Option<f64>,
    /// LoRA traffic split (not supported).
    #[serde(default)]
    pub lora_traffic_split: Option<Opaque>,
    /// Seed for the arrival process (prompt generation uses `data.shared_prefix.seed`).
    #[serde(default)]
    pub base_seed: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            kind: LoadType::Constant,
            interval: 1.0,
            stages: Vec::new(),
            sweep: None,
            num_workers: None,
            worker_max_concurrency: None,
            worker_max_tcp_connections: None,
            trace: None,
            circuit_breakers: Vec::new(),
            request_timeout: None,
            lora_traffic_split: None,
            base_seed: None,
        }
    }
}

impl LoadConfig {
    /// The global in-flight cap inference-perf applies to `constant` / `poisson` stages:
    /// `num_workers × worker_max_concurrency` (defaults: CPU count and 100). inference-perf
    /// always applies it; `llmsched bench` applies it only when one of the two keys is set, so
    /// an overloaded server is measured the same on a 2-core laptop and on a 224-core host.
    pub fn max_in_flight(&self) -> Option<u64> {
        if self.num_workers.is_none() && self.worker_max_concurrency.is_none() {
            return None;
        }
        let workers = self
            .num_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
        Some(workers.max(1) * self.worker_max_concurrency.unwrap_or(100).max(1))
    }
}

/// The `report` section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Client-side request lifecycle reports.
    #[serde(default)]
    pub request_lifecycle: RequestLifecycleReportConfig,
    /// Prometheus reports (ignored).
    #[serde(default)]
    pub prometheus: Option<Opaque>,
    /// Session reports (ignored).
    #[serde(default)]
    pub session_lifecycle: Option<Opaque>,
    /// Goodput SLOs (ignored).
    #[serde(default)]
    pub goodput: Option<Opaque>,
}

/// `report.request_lifecycle`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLifecycleReportConfig {
    /// Write `summary_lifecycle_metrics.json`.
    #[serde(default = "yes")]
    pub summary: bool,
    /// Write `stage_N_lifecycle_metrics.json` (and the benchmark reports).
    #[serde(default = "yes")]
    pub per_stage: bool,
    /// Write `per_request_lifecycle_metrics.json`.
    #[serde(default)]
    pub per_request: bool,
    /// Per-LoRA-adapter reports (no adapters here; ignored).
    #[serde(default = "yes")]
    pub per_adapter: bool,
    /// Per adapter and stage (ignored).
    #[serde(default)]
    pub per_adapter_stage: bool,
    /// Percentiles to report.
    #[serde(default = "default_percentiles")]
    pub percentiles: Vec<f64>,
    /// Normalize TPOT and NTPOT by the server's `completion_tokens` instead of the client count.
    #[serde(default)]
    pub use_server_output_tokens: bool,
    /// Distinct error messages kept per failure label.
    #[serde(default = "hundred")]
    pub max_error_messages: usize,
}

fn default_percentiles() -> Vec<f64> {
    DEFAULT_PERCENTILES.to_vec()
}

fn hundred() -> usize {
    100
}

impl Default for RequestLifecycleReportConfig {
    fn default() -> Self {
        Self {
            summary: true,
            per_stage: true,
            per_request: false,
            per_adapter: true,
            per_adapter_stage: false,
            percentiles: default_percentiles(),
            use_server_output_tokens: false,
            max_error_messages: 100,
        }
    }
}

impl BenchConfig {
    /// Parses and validates a YAML document. An empty document is the default config (as in
    /// inference-perf). `origin` names the source in error messages.
    pub fn from_yaml_str(yaml: &str, origin: Option<&str>) -> Result<Self, BenchError> {
        let parse_err = |e: serde_norway::Error| BenchError::ConfigParse {
            origin: origin.map(str::to_owned),
            message: e.to_string(),
        };
        let value: serde_norway::Value = serde_norway::from_str(yaml).map_err(parse_err)?;
        let config = match value {
            serde_norway::Value::Null => Self::default(),
            serde_norway::Value::Mapping(_) => serde_norway::from_str(yaml).map_err(parse_err)?,
            other => {
                return Err(BenchError::ConfigParse {
                    origin: origin.map(str::to_owned),
                    message: format!(
                        "the document must be a mapping of sections (api, server, data, load, \
                         report, ...), found {}",
                        yaml_kind(&other)
                    ),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BenchError::io("cannot read config", path, e))?;
        Self::from_yaml_str(&text, Some(&path.display().to_string()))
    }

    /// Sets `server.base_url`, creating the `server` section if needed.
    pub fn set_base_url(&mut self, base_url: impl Into<String>) {
        let base_url = base_url.into();
        match &mut self.server {
            Some(server) => server.base_url = base_url,
            None => {
                self.server = Some(ServerConfig {
                    kind: ServerType::Vllm,
                    model_name: None,
                    base_url,
                    ignore_eos: true,
                    api_key: None,
                    cert_path: None,
                    key_path: None,
                });
            }
        }
    }

    /// The effective config as YAML (defaults filled in), as inference-perf writes
    /// `config.yaml`.
    pub fn to_yaml_string(&self) -> Result<String, BenchError> {
        serde_norway::to_string(self).map_err(|e| BenchError::Serialize {
            what: "config.yaml",
            message: e.to_string(),
        })
    }

    /// Checks values inference-perf's models would reject.
    pub fn validate(&self) -> Result<(), BenchError> {
        let load = &self.load;
        if !(load.interval >= 0.0 && load.interval.is_finite()) {
            return Err(BenchError::invalid(
                "load.interval",
                "must be a finite number >= 0",
            ));
        }
        if let Some(t) = load.request_timeout
            && !(t > 0.0 && t.is_finite())
        {
            return Err(BenchError::invalid("load.request_timeout", "must be > 0"));
        }
        self.stages()?;
        if self.data.kind == DataType::SharedPrefix && self.data.shared_prefix.is_none() {
            return Err(BenchError::invalid(
                "data.shared_prefix",
                "data.type 'shared_prefix' requires the 'shared_prefix' section",
            ));
        }
        if let Some(sp) = &self.data.shared_prefix {
            if sp.num_groups == 0 {
                return Err(BenchError::invalid(
                    "data.shared_prefix.num_groups",
                    "must be >= 1",
                ));
            }
            if sp.num_prompts_per_group == 0 {
                return Err(BenchError::invalid(
                    "data.shared_prefix.num_prompts_per_group",
                    "must be >= 1",
                ));
            }
            for (key, spec, legacy) in [
                (
                    "data.shared_prefix.system_prompt_len",
                    &sp.system_prompt_len,
                    None,
                ),
                (
                    "data.shared_prefix.question_len",
                    &sp.question_len,
                    sp.question_distribution.as_ref(),
                ),
                (
                    "data.shared_prefix.output_len",
                    &sp.output_len,
                    sp.output_distribution.as_ref(),
                ),
            ] {
                if let (LengthSpec::Dist(_), Some(_)) = (spec, legacy) {
                    return Err(BenchError::invalid(
                        key,
                        "cannot combine an inline distribution with the legacy *_distribution key",
                    ));
                }
                spec.resolve(legacy).validate(key)?;
            }
        }
        for (key, dist) in [
            ("data.input_distribution", &self.data.input_distribution),
            ("data.output_distribution", &self.data.output_distribution),
        ] {
            if let Some(d) = dist {
                d.validate(key)?;
            }
        }
        for (i, p) in self.report.request_lifecycle.percentiles.iter().enumerate() {
            if !(0.0..=100.0).contains(p) {
                return Err(BenchError::invalid(
                    format!("report.request_lifecycle.percentiles[{i}]"),
                    format!("{p} is outside 0..=100"),
                ));
            }
        }
        if let Some(server) = &self.server
            && server.base_url.trim().is_empty()
        {
            return Err(BenchError::invalid("server.base_url", "must not be empty"));
        }
        Ok(())
    }

    /// The stages, checked against `load.type` (which fields each type requires and forbids).
    pub fn stages(&self) -> Result<Vec<LoadStage>, BenchError> {
        let kind = self.load.kind;
        let mut out = Vec::with_capacity(self.load.stages.len());
        for (i, s) in self.load.stages.iter().enumerate() {
            let key = |field: &str| format!("load.stages[{i}].{field}");
            match kind {
                LoadType::Constant | LoadType::Poisson | LoadType::TraceReplay => {
                    if s.num_requests.is_some() {
                        return Err(BenchError::invalid(
                            key("num_requests"),
                            format!("not allowed for load type '{}'", kind.as_str()),
                        ));
                    }
                    if s.concurrency_level.is_some() {
                        return Err(BenchError::invalid(
                            key("concurrency_level"),
                            format!("not allowed for load type '{}'", kind.as_str()),
                        ));
                    }
                    reject_session_fields(s, i, kind)?;
                    let rate = s.rate.ok_or_else(|| {
                        BenchError::invalid(
                            key("rate"),
                            format!("required for load type '{}'", kind.as_str()),
                        )
                    })?;
                    let duration = s.duration.ok_or_else(|| {
                        BenchError::invalid(
                            key("duration"),
                            format!("required for load type '{}'", kind.as_str()),
                        )
                    })?;
                    if !(rate > 0.0 && rate.is_finite()) {
                        return Err(BenchError::invalid(key("rate"), "must be > 0"));
                    }
                    if !(duration > 0.0 && duration.is_finite()) {
                        return Err(BenchError::invalid(key("duration"), "must be > 0"));
                    }
                    out.push(LoadStage::Rate { rate, duration });
                }
                LoadType::Concurrent => {
                    reject_session_fields(s, i, kind)?;
                    let n = s.num_requests.ok_or_else(|| {
                        BenchError::invalid(
                            key("num_requests"),
                            "required for load type 'concurrent'",
                        )
                    })?;
                    let c = s.concurrency_level.ok_or_else(|| {
                        BenchError::invalid(
                            key("concurrency_level"),
                            "required for load type 'concurrent'",
                        )
                    })?;
                    if n == 0 {
                        return Err(BenchError::invalid(key("num_requests"), "must be > 0"));
                    }
                    if c == 0 {
                        return Err(BenchError::invalid(key("concurrency_level"), "must be > 0"));
                    }
                    out.push(LoadStage::Concurrent {
                        num_requests: n,
                        concurrency: c,
                    });
                }
                LoadType::TraceSessionReplay => {
                    if s.concurrent_sessions.is_none() {
                        return Err(BenchError::invalid(
                            key("concurrent_sessions"),
                            "required for load type 'trace_session_replay'",
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Rejects configs that parse but use features `llmsched bench` does not implement.
    /// Everything that is accepted but ignored is logged with `tracing::warn!`.
    pub fn check_runnable(&self) -> Result<(), BenchError> {
        if self.data.kind != DataType::SharedPrefix {
            return Err(BenchError::unsupported(
                "data.type",
                format!(
                    "'{}' is not supported; llmsched bench generates 'shared_prefix' data only",
                    self.data.kind.as_str()
                ),
            ));
        }
        match self.load.kind {
            LoadType::Constant | LoadType::Poisson | LoadType::Concurrent => {}
            other => {
                return Err(BenchError::unsupported(
                    "load.type",
                    format!(
                        "'{}' is not supported (supported: constant, poisson, concurrent)",
                        other.as_str()
                    ),
                ));
            }
        }
        if self.load.sweep.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(BenchError::unsupported(
                "load.sweep",
                "automatic stage generation is not supported; list the stages explicitly",
            ));
        }
        if self
            .load
            .lora_traffic_split
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(BenchError::unsupported(
                "load.lora_traffic_split",
                "LoRA traffic splits",
            ));
        }
        if self.load.stages.is_empty() {
            return Err(BenchError::invalid(
                "load.stages",
                "at least one stage is required",
            ));
        }
        if self.api.kind == ApiType::AnthropicMessages {
            return Err(BenchError::unsupported(
                "api.type",
                "'anthropic_messages' is not supported (use completion or chat)",
            ));
        }
        if self.data.multimodal.as_ref().is_some_and(|v| !v.is_null())
            || self
                .data
                .shared_prefix
                .as_ref()
                .and_then(|s| s.multimodal.as_ref())
                .is_some_and(|v| !v.is_null())
        {
            return Err(BenchError::unsupported(
                "data.shared_prefix.multimodal",
                "multimodal data",
            ));
        }
        let server = self.server.as_ref().ok_or_else(|| {
            BenchError::invalid(
                "server.base_url",
                "no server configured: set server.base_url or pass --base-url",
            )
        })?;
        if server.cert_path.is_some() || server.key_path.is_some() {
            return Err(BenchError::unsupported(
                "server.cert_path",
                "client TLS certificates",
            ));
        }
        if server
            .base_url
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("https://")
        {
            return Err(BenchError::unsupported(
                "server.base_url",
                "https is not supported; benchmark over plain http",
            ));
        }
        if !self.load.circuit_breakers.is_empty() {
            tracing::warn!("load.circuit_breakers is ignored by llmsched bench");
        }
        if self.report.goodput.as_ref().is_some_and(|v| !v.is_null()) {
            tracing::warn!("report.goodput is ignored by llmsched bench");
        }
        if self.api.session_token_header_key.is_some() {
            tracing::warn!("api.session_token_header_key is ignored by llmsched bench");
        }
        Ok(())
    }
}

fn reject_session_fields(s: &StageConfig, i: usize, kind: LoadType) -> Result<(), BenchError> {
    for (name, set) in [
        ("concurrent_sessions", s.concurrent_sessions.is_some()),
        ("session_rate", s.session_rate.is_some()),
        ("num_sessions", s.num_sessions.is_some()),
        ("timeout", s.timeout.is_some()),
    ] {
        if set {
            return Err(BenchError::invalid(
                format!("load.stages[{i}].{name}"),
                format!("not allowed for load type '{}'", kind.as_str()),
            ));
        }
    }
    if kind != LoadType::Concurrent {
        return Ok(());
    }
    if s.rate.is_some() || s.duration.is_some() {
        tracing::debug!(stage = i, "rate/duration of a concurrent stage are ignored");
    }
    Ok(())
}

fn yaml_kind(v: &serde_norway::Value) -> &'static str {
    match v {
        serde_norway::Value::Null => "nothing",
        serde_norway::Value::Bool(_) => "a boolean",
        serde_norway::Value::Number(_) => "a number",
        serde_norway::Value::String(_) => "a string",
        serde_norway::Value::Sequence(_) => "a sequence",
        serde_norway::Value::Mapping(_) => "a mapping",
        serde_norway::Value::Tagged(_) => "a tagged value",
    }
}
