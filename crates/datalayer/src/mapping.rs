//! Which Prometheus metrics mean what, per inference engine, and how a parsed `/metrics`
//! page becomes an [`EndpointMetrics`].
//!
//! The built-in mappings are the reference's (`vllm`, `sglang`, `trtllm-serve`,
//! `triton-tensorrt-llm`), chosen per endpoint by its `llm-d.ai/engine-type` label (the
//! legacy `inference.networking.k8s.io/engine-type` is honoured too; an unknown or missing
//! value means the default engine, `vllm` unless configured). `trtllm` and `triton` are
//! accepted as aliases of the two NVIDIA engines.
//!
//! Metric specifications use the PromQL instant-selector syntax of the reference's flags:
//! `name` or `name{label="value",other=value}` (quotes optional, only `=` matchers).
//!
//! Departures from the reference, on purpose:
//! * vLLM's KV usage is read from `vllm:kv_cache_usage_perc` **or**, when absent, the older
//!   `vllm:gpu_cache_usage_perc` (the rename silently zeroed the reference's KV signal);
//! * queue, running and KV usage are *required*: if one is missing or invalid (NaN, ±Inf,
//!   negative, KV usage above 1) the scrape fails as a whole and the previous metrics are
//!   kept (and go stale) instead of being half-updated with zeros; LoRA and cache geometry are
//!   optional (a server without LoRA exports no `vllm:lora_requests_info`) and keep their
//!   previous values when absent.
//!
//! Sample selection follows the reference: among the samples matching a specification, the
//! one with the newest explicit timestamp (first one on ties, i.e. without timestamps); for
//! LoRA info, the sample with the largest value (vLLM writes the series' creation time).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use llmsched_core::endpoint::{EndpointMetrics, label};

use crate::prom::{self, ParseError, Sample};

/// Legacy engine-type label of the Gateway API inference extension, still honoured.
pub const LEGACY_ENGINE_TYPE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// Built-in engine names.
pub mod engine {
    /// vLLM (the default).
    pub const VLLM: &str = "vllm";
    /// SGLang.
    pub const SGLANG: &str = "sglang";
    /// `trtllm-serve` (alias `trtllm`).
    pub const TRTLLM_SERVE: &str = "trtllm-serve";
    /// Triton with the TensorRT-LLM backend (alias `triton`).
    pub const TRITON_TENSORRT_LLM: &str = "triton-tensorrt-llm";
}

/// vLLM's KV-usage gauge.
pub const VLLM_KV_USAGE: &str = "vllm:kv_cache_usage_perc";
/// vLLM's KV-usage gauge before the rename.
pub const VLLM_KV_USAGE_OLD: &str = "vllm:gpu_cache_usage_perc";

/// A metric specification that does not parse, or a mapping that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid metric specification '{spec}': {reason}")]
pub struct SpecError {
    /// The input.
    pub spec: String,
    /// Why.
    pub reason: String,
}

/// One metric: a name plus required label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSpec {
    name: String,
    labels: Vec<(String, String)>,
}

impl fmt::Display for MetricSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"{v}\"")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

impl MetricSpec {
    /// A specification without labels.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            labels: Vec::new(),
        }
    }

    /// A specification requiring label values.
    pub fn with_labels(name: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The metric name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The required `(label, value)` pairs.
    pub fn labels(&self) -> &[(String, String)] {
        &self.labels
    }

    /// Parses `name` or `name{label="value",...}`; an empty (or blank) string is `None`
    /// (the metric is disabled), as in the reference.
    pub fn parse(input: &str) -> Result<Option<Self>, SpecError> {
        let s = input.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let fail = |reason: &str| SpecError {
            spec: input.to_string(),
            reason: reason.to_string(),
        };
        let b = s.as_bytes();
        let mut i = 0;
        if !(b[0].is_ascii_alphabetic() || b[0] == b'_' || b[0] == b':') {
            return Err(fail("expected a metric name"));
        }
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
            i += 1;
        }
        let name = &s[..i];
        let mut labels = Vec::new();
        let ws = |b: &[u8], mut i: usize| {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            i
        };
        i = ws(b, i);
        if i < b.len() {
            if b[i] != b'{' {
                return Err(fail("expected '{' or the end after the metric name"));
            }
            i += 1;
            loop {
                i = ws(b, i);
                match b.get(i) {
                    None => return Err(fail("unterminated label matchers")),
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {}
                    Some(_) => return Err(fail("expected a label name")),
                }
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let lname = &s[start..i];
                i = ws(b, i);
                match (b.get(i), b.get(i + 1)) {
                    (Some(b'='), Some(b'~')) | (Some(b'!'), _) => {
                        return Err(fail("only '=' label matchers are supported"));
                    }
                    (Some(b'='), _) => i += 1,
                    _ => return Err(fail("expected '=' after a label name")),
                }
                i = ws(b, i);
                let value = match b.get(i) {
                    Some(&q @ (b'"' | b'\'')) => {
                        i += 1;
                        let mut v = String::new();
                        loop {
                            match b.get(i) {
                                None => return Err(fail("unterminated label value")),
                                Some(&c) if c == q => {
                                    i += 1;
                                    break;
                                }
                                Some(b'\\') => {
                                    let Some(&e) = b.get(i + 1) else {
                                        return Err(fail("unterminated label value"));
                                    };
                                    v.push(if e == b'n' { '\n' } else { char::from(e) });
                                    i += 2;
                                }
                                Some(_) => {
                                    // Copy one UTF-8 character.
                                    let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
                                    v.push(ch);
                                    i += ch.len_utf8();
                                }
                            }
                        }
                        v
                    }
                    _ => {
                        let start = i;
                        while i < b.len()
                            && !b[i].is_ascii_whitespace()
                            && !matches!(b[i], b',' | b'}' | b'"' | b'\'')
                        {
                            i += 1;
                        }
                        if start == i {
                            return Err(fail("expected a label value"));
                        }
                        s[start..i].to_string()
                    }
                };
                // Pseudo labels (`__name__` …) are not label requirements, as in the reference.
                if !lname.starts_with("__") {
                    labels.push((lname.to_string(), value));
                }
                i = ws(b, i);
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {}
                    None => return Err(fail("unterminated label matchers")),
                    Some(_) => return Err(fail("expected ',' or '}' after a label matcher")),
                }
            }
            i = ws(b, i);
            if i < b.len() {
                return Err(fail("unexpected text after the label matchers"));
            }
        }
        Ok(Some(Self {
            name: name.to_string(),
            labels,
        }))
    }

    fn matches(&self, sample: &Sample<'_>) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| sample.label(k).is_some_and(|got| got == v.as_str()))
    }
}

/// The metrics of one engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineMapping {
    /// Requests waiting (required when set).
    pub queued_requests: Option<MetricSpec>,
    /// Requests running (required when set).
    pub running_requests: Option<MetricSpec>,
    /// KV-cache usage 0..1, alternatives in order of preference (the first present is used;
    /// required when not empty).
    pub kv_usage: Vec<MetricSpec>,
    /// vLLM-style LoRA info gauge (labels `running_lora_adapters`, `waiting_lora_adapters`,
    /// `max_lora`); optional.
    pub lora_info: Option<MetricSpec>,
    /// Info gauge carrying the cache geometry as labels; optional.
    pub cache_info: Option<MetricSpec>,
    /// Label of `cache_info` holding the block size.
    pub cache_block_size_label: String,
    /// Label of `cache_info` holding the number of blocks.
    pub cache_num_blocks_label: String,
    /// Gauge whose value is the block size (engines without an info gauge); optional.
    pub cache_block_size: Option<MetricSpec>,
    /// Gauge whose value is the number of blocks; optional.
    pub cache_num_blocks: Option<MetricSpec>,
}

impl EngineMapping {
    fn base() -> Self {
        Self {
            queued_requests: None,
            running_requests: None,
            kv_usage: Vec::new(),
            lora_info: None,
            cache_info: None,
            cache_block_size_label: "block_size".into(),
            cache_num_blocks_label: "num_gpu_blocks".into(),
            cache_block_size: None,
            cache_num_blocks: None,
        }
    }

    /// vLLM.
    pub fn vllm() -> Self {
        Self {
            queued_requests: Some(MetricSpec::named("vllm:num_requests_waiting")),
            running_requests: Some(MetricSpec::named("vllm:num_requests_running")),
            kv_usage: vec![
                MetricSpec::named(VLLM_KV_USAGE),
                MetricSpec::named(VLLM_KV_USAGE_OLD),
            ],
            lora_info: Some(MetricSpec::named("vllm:lora_requests_info")),
            cache_info: Some(MetricSpec::named("vllm:cache_config_info")),
            ..Self::base()
        }
    }

    /// SGLang.
    pub fn sglang() -> Self {
        Self {
            queued_requests: Some(MetricSpec::named("sglang:num_queue_reqs")),
            running_requests: Some(MetricSpec::named("sglang:num_running_reqs")),
            kv_usage: vec![MetricSpec::named("sglang:token_usage")],
            cache_info: Some(MetricSpec::named("sglang:cache_config_info")),
            cache_block_size_label: "page_size".into(),
            cache_num_blocks_label: "num_pages".into(),
            ..Self::base()
        }
    }

    /// `trtllm-serve`.
    pub fn trtllm_serve() -> Self {
        Self {
            queued_requests: Some(MetricSpec::named("trtllm_num_requests_waiting")),
            running_requests: Some(MetricSpec::named("trtllm_num_requests_running")),
            kv_usage: vec![MetricSpec::named("trtllm_kv_cache_utilization")],
            cache_block_size: Some(MetricSpec::named("trtllm_kv_cache_tokens_per_block")),
            cache_num_blocks: Some(MetricSpec::named("trtllm_kv_cache_max_blocks")),
            ..Self::base()
        }
    }

    /// Triton with the TensorRT-LLM backend.
    pub fn triton_tensorrt_llm() -> Self {
        let block = "nv_trt_llm_kv_cache_block_metrics";
        Self {
            queued_requests: Some(MetricSpec::with_labels(
                "nv_trt_llm_request_metrics",
                &[("request_type", "waiting")],
            )),
            running_requests: Some(MetricSpec::with_labels(
                "nv_trt_llm_request_metrics",
                &[("request_type", "scheduled")],
            )),
            kv_usage: vec![MetricSpec::with_labels(
                block,
                &[("kv_cache_block_type", "fraction")],
            )],
            cache_block_size: Some(MetricSpec::with_labels(
                block,
                &[("kv_cache_block_type", "tokens_per")],
            )),
            cache_num_blocks: Some(MetricSpec::with_labels(
                block,
                &[("kv_cache_block_type", "max")],
            )),
            ..Self::base()
        }
    }

    /// Applies the deprecated per-metric flags (they replace the vLLM names).
    pub fn apply_overrides(&mut self, o: &MetricOverrides) -> Result<(), SpecError> {
        if let Some(s) = &o.total_queued_requests {
            self.queued_requests = MetricSpec::parse(s)?;
        }
        if let Some(s) = &o.total_running_requests {
            self.running_requests = MetricSpec::parse(s)?;
        }
        if let Some(s) = &o.kv_cache_usage_percentage {
            self.kv_usage = match MetricSpec::parse(s)? {
                None => Vec::new(),
                // Naming the current vLLM metric keeps the fallback to its old name.
                Some(spec) if spec == MetricSpec::named(VLLM_KV_USAGE) => vec![
                    MetricSpec::named(VLLM_KV_USAGE),
                    MetricSpec::named(VLLM_KV_USAGE_OLD),
                ],
                Some(spec) => vec![spec],
            };
        }
        if let Some(s) = &o.lora_info {
            self.lora_info = MetricSpec::parse(s)?;
        }
        if let Some(s) = &o.cache_info {
            self.cache_info = MetricSpec::parse(s)?;
        }
        Ok(())
    }
}

/// The reference's deprecated metric-name flags. `None`: not given; `Some("")`: disable that
/// metric; otherwise a [`MetricSpec`] string. They apply to the `vllm` mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricOverrides {
    /// `--total-queued-requests-metric`.
    pub total_queued_requests: Option<String>,
    /// `--total-running-requests-metric`.
    pub total_running_requests: Option<String>,
    /// `--kv-cache-usage-percentage-metric`.
    pub kv_cache_usage_percentage: Option<String>,
    /// `--lora-info-metric`.
    pub lora_info: Option<String>,
    /// `--cache-info-metric`.
    pub cache_info: Option<String>,
}

impl MetricOverrides {
    /// True when no flag was given.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone)]
struct Bound {
    family: usize,
    spec: MetricSpec,
}

/// Why a page could not be turned into metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    /// The page is not valid exposition text.
    #[error("malformed metrics page: {0}")]
    Parse(#[from] ParseError),
    /// A required metric is absent.
    #[error("required metric {0} not found")]
    Missing(String),
    /// A required metric has a value that cannot be used.
    #[error("metric {spec} has unusable value {value}: {reason}")]
    Invalid {
        /// The metric.
        spec: String,
        /// Its value.
        value: f64,
        /// Why it is unusable.
        reason: &'static str,
    },
}

impl ExtractError {
    /// A short reason for metric labels: `parse`, `missing_metric` or `invalid_value`.
    pub fn reason(&self) -> &'static str {
        match self {
            ExtractError::Parse(_) => "parse",
            ExtractError::Missing(_) => "missing_metric",
            ExtractError::Invalid { .. } => "invalid_value",
        }
    }
}

/// Metrics extracted from one page, plus complaints about optional metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The new metrics (`updated_at` set).
    pub metrics: EndpointMetrics,
    /// Malformed optional values (LoRA info, cache geometry), which kept their old values.
    pub warnings: Vec<String>,
}

/// A compiled [`EngineMapping`]: knows which names to collect and how to read them.
#[derive(Debug, Clone)]
pub struct Extractor {
    engine: String,
    wanted: Vec<String>,
    queued: Option<Bound>,
    running: Option<Bound>,
    kv: Vec<Bound>,
    lora: Option<Bound>,
    cache_info: Option<Bound>,
    block_size_label: String,
    num_blocks_label: String,
    cache_block_size: Option<Bound>,
    cache_num_blocks: Option<Bound>,
}

const KV_TOLERANCE: f64 = 1e-6;

impl Extractor {
    /// Compiles `mapping` for engine `engine` (the name is only used in logs).
    pub fn new(engine: &str, mapping: &EngineMapping) -> Self {
        let mut wanted: Vec<String> = Vec::new();
        let mut bind = |spec: &MetricSpec| {
            let family = match wanted.iter().position(|w| w == spec.name()) {
                Some(i) => i,
                None => {
                    wanted.push(spec.name().to_string());
                    wanted.len() - 1
                }
            };
            Bound {
                family,
                spec: spec.clone(),
            }
        };
        let queued = mapping.queued_requests.as_ref().map(&mut bind);
        let running = mapping.running_requests.as_ref().map(&mut bind);
        let kv = mapping.kv_usage.iter().map(&mut bind).collect();
        let lora = mapping.lora_info.as_ref().map(&mut bind);
        let cache_info = mapping.cache_info.as_ref().map(&mut bind);
        let cache_block_size = mapping.cache_block_size.as_ref().map(&mut bind);
        let cache_num_blocks = mapping.cache_num_blocks.as_ref().map(&mut bind);
        Self {
            engine: engine.to_string(),
            wanted,
            queued,
            running,
            kv,
            lora,
            cache_info,
            block_size_label: mapping.cache_block_size_label.clone(),
            num_blocks_label: mapping.cache_num_blocks_label.clone(),
            cache_block_size,
            cache_num_blocks,
        }
    }

    /// The engine this extractor was built for.
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// The metric names collected from a page.
    pub fn wanted(&self) -> &[String] {
        &self.wanted
    }

    /// Parses `text` and extracts metrics, starting from `previous` for the optional fields.
    pub fn extract_text(
        &self,
        text: &str,
        previous: &EndpointMetrics,
        now: Instant,
    ) -> Result<Extracted, ExtractError> {
        let mut samples = Vec::with_capacity(8);
        prom::parse(text, &self.wanted, &mut samples)?;
        self.extract(&samples, previous, now)
    }

    /// Extracts metrics from samples collected with [`Self::wanted`].
    pub fn extract(
        &self,
        samples: &[Sample<'_>],
        previous: &EndpointMetrics,
        now: Instant,
    ) -> Result<Extracted, ExtractError> {
        let mut m = previous.clone();
        let mut warnings = Vec::new();
        if let Some(b) = &self.queued {
            m.waiting_queue_size = count(b, required(b, samples)?)?;
        }
        if let Some(b) = &self.running {
            m.running_requests = count(b, required(b, samples)?)?;
        }
        if !self.kv.is_empty() {
            let found = self
                .kv
                .iter()
                .find_map(|b| select(b, samples).map(|s| (b, s)));
            let Some((b, s)) = found else {
                let names: Vec<String> = self.kv.iter().map(|b| b.spec.to_string()).collect();
                return Err(ExtractError::Missing(names.join(" or ")));
            };
            m.kv_cache_usage = kv_usage(b, s)?;
        }
        if let Some(b) = &self.lora
            && let Some(s) = select_newest_value(b, samples)
        {
            m.running_lora_adapters = adapters(s.label("running_lora_adapters").as_deref());
            m.waiting_lora_adapters = adapters(s.label("waiting_lora_adapters").as_deref());
            if let Some(v) = s.label("max_lora").filter(|v| !v.is_empty()) {
                match v.trim().parse::<u32>() {
                    Ok(n) => m.max_lora = n,
                    Err(_) => warnings.push(format!("{}: invalid max_lora '{v}'", b.spec)),
                }
            }
        }
        if let Some(b) = &self.cache_info
            && let Some(s) = select(b, samples)
        {
            m.block_size = label_number(b, s, &self.block_size_label, &mut warnings);
            m.num_gpu_blocks = label_number(b, s, &self.num_blocks_label, &mut warnings);
        }
        if let Some(b) = &self.cache_block_size
            && let Some(s) = select(b, samples)
        {
            match gauge_number::<u32>(s.value) {
                Some(v) => m.block_size = Some(v),
                None => warnings.push(format!("{}: invalid block size {}", b.spec, s.value)),
            }
        }
        if let Some(b) = &self.cache_num_blocks
            && let Some(s) = select(b, samples)
        {
            match gauge_number::<u64>(s.value) {
                Some(v) => m.num_gpu_blocks = Some(v),
                None => warnings.push(format!("{}: invalid block count {}", b.spec, s.value)),
            }
        }
        m.updated_at = Some(now);
        Ok(Extracted {
            metrics: m,
            warnings,
        })
    }
}

/// The matching sample with the newest explicit timestamp (the first on ties).
fn select<'s, 'a>(b: &Bound, samples: &'s [Sample<'a>]) -> Option<&'s Sample<'a>> {
    let mut best: Option<(&Sample<'a>, i64)> = None;
    for s in samples
        .iter()
        .filter(|s| s.family == b.family && b.spec.matches(s))
    {
        let ts = s.timestamp_ms.unwrap_or(0);
        if best.is_none_or(|(_, t)| ts > t) {
            best = Some((s, ts));
        }
    }
    best.map(|(s, _)| s)
}

/// The matching sample with the largest value (LoRA info: the value is a creation time).
fn select_newest_value<'s, 'a>(b: &Bound, samples: &'s [Sample<'a>]) -> Option<&'s Sample<'a>> {
    let mut best: Option<&Sample<'a>> = None;
    let mut recent = -1.0;
    for s in samples
        .iter()
        .filter(|s| s.family == b.family && b.spec.matches(s))
    {
        if s.value > recent {
            recent = s.value;
            best = Some(s);
        }
    }
    best
}

fn required<'s, 'a>(b: &Bound, samples: &'s [Sample<'a>]) -> Result<&'s Sample<'a>, ExtractError> {
    select(b, samples).ok_or_else(|| ExtractError::Missing(b.spec.to_string()))
}

fn invalid(b: &Bound, value: f64, reason: &'static str) -> ExtractError {
    ExtractError::Invalid {
        spec: b.spec.to_string(),
        value,
        reason,
    }
}

fn count(b: &Bound, s: &Sample<'_>) -> Result<u32, ExtractError> {
    let v = s.value;
    if !v.is_finite() {
        return Err(invalid(b, v, "not a finite number"));
    }
    if v < 0.0 {
        return Err(invalid(b, v, "negative"));
    }
    if v > f64::from(u32::MAX) {
        return Err(invalid(b, v, "too large"));
    }
    // Truncation, as the reference converts with int(); the range was checked above.
    Ok(v as u32)
}

fn kv_usage(b: &Bound, s: &Sample<'_>) -> Result<f64, ExtractError> {
    let v = s.value;
    if !v.is_finite() {
        return Err(invalid(b, v, "not a finite number"));
    }
    if v < 0.0 {
        return Err(invalid(b, v, "negative"));
    }
    if v > 1.0 + KV_TOLERANCE {
        return Err(invalid(
            b,
            v,
            "above 1 (KV usage must be a fraction 0..1, not a percentage)",
        ));
    }
    Ok(v.min(1.0))
}

fn adapters(csv: Option<&str>) -> Vec<String> {
    csv.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn label_number<T: std::str::FromStr>(
    b: &Bound,
    s: &Sample<'_>,
    label: &str,
    warnings: &mut Vec<String>,
) -> Option<T> {
    let v = s.label(label)?;
    if v.is_empty() {
        return None;
    }
    match v.trim().parse::<T>() {
        Ok(n) => Some(n),
        Err(_) => {
            warnings.push(format!("{}: invalid {label} '{v}'", b.spec));
            None
        }
    }
}

fn gauge_number<T: TryFrom<u64>>(v: f64) -> Option<T> {
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return None;
    }
    // In range (checked above); truncation is intended.
    T::try_from(v as u64).ok()
}

/// Extractors for every known engine plus the default one, chosen per endpoint by label.
#[derive(Debug, Clone)]
pub struct MetricMappings {
    engines: HashMap<String, Arc<Extractor>>,
    default: Arc<Extractor>,
    engine_label_key: String,
}

impl Default for MetricMappings {
    fn default() -> Self {
        let vllm = Arc::new(Extractor::new(engine::VLLM, &EngineMapping::vllm()));
        let mut engines = HashMap::new();
        engines.insert(engine::VLLM.to_string(), vllm.clone());
        for (name, m) in [
            (engine::SGLANG, EngineMapping::sglang()),
            (engine::TRTLLM_SERVE, EngineMapping::trtllm_serve()),
            (
                engine::TRITON_TENSORRT_LLM,
                EngineMapping::triton_tensorrt_llm(),
            ),
        ] {
            engines.insert(name.to_string(), Arc::new(Extractor::new(name, &m)));
        }
        Self {
            engines,
            default: vllm,
            engine_label_key: label::ENGINE_TYPE.to_string(),
        }
    }
}

fn canonical_engine(name: &str) -> &str {
    match name {
        "trtllm" => engine::TRTLLM_SERVE,
        "triton" => engine::TRITON_TENSORRT_LLM,
        other => other,
    }
}

impl MetricMappings {
    /// The built-in mappings with `overrides` applied to vLLM, `default_engine` for
    /// endpoints without (or with an unknown) engine label, and the engine read from label
    /// `engine_label_key` (empty: `llm-d.ai/engine-type`).
    pub fn new(
        default_engine: &str,
        engine_label_key: &str,
        overrides: &MetricOverrides,
    ) -> Result<Self, SpecError> {
        let mut out = Self::default();
        if !overrides.is_empty() {
            let mut vllm = EngineMapping::vllm();
            vllm.apply_overrides(overrides)?;
            out.insert(engine::VLLM, &vllm);
        }
        if !engine_label_key.is_empty() {
            out.engine_label_key = engine_label_key.to_string();
        }
        let default_engine = canonical_engine(if default_engine.is_empty() {
            engine::VLLM
        } else {
            default_engine
        });
        out.default = out
            .engines
            .get(default_engine)
            .cloned()
            .ok_or_else(|| SpecError {
                spec: default_engine.to_string(),
                reason: format!(
                    "unknown default engine; known engines: {}",
                    out.engine_names().join(", ")
                ),
            })?;
        Ok(out)
    }

    /// [`Self::new`], then `engines` added or replacing the built-in mapping of the same name
    /// (the reference's `engineConfigs`); `default_engine` may name one of them.
    pub fn with_engines(
        default_engine: &str,
        engine_label_key: &str,
        overrides: &MetricOverrides,
        engines: &[(String, EngineMapping)],
    ) -> Result<Self, SpecError> {
        if engines.is_empty() {
            return Self::new(default_engine, engine_label_key, overrides);
        }
        let mut out = Self::new(engine::VLLM, engine_label_key, overrides)?;
        for (name, m) in engines {
            out.insert(name, m);
        }
        let default_engine = canonical_engine(if default_engine.is_empty() {
            engine::VLLM
        } else {
            default_engine
        });
        out.default = out
            .engines
            .get(default_engine)
            .cloned()
            .ok_or_else(|| SpecError {
                spec: default_engine.to_string(),
                reason: format!(
                    "unknown default engine; known engines: {}",
                    out.engine_names().join(", ")
                ),
            })?;
        Ok(out)
    }

    /// Adds or replaces the mapping of an engine (custom engines).
    pub fn insert(&mut self, engine: &str, mapping: &EngineMapping) {
        let engine = canonical_engine(engine);
        let ex = Arc::new(Extractor::new(engine, mapping));
        if self.default.engine() == engine {
            self.default = ex.clone();
        }
        self.engines.insert(engine.to_string(), ex);
    }

    /// Known engine names, sorted.
    pub fn engine_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.engines.keys().cloned().collect();
        v.sort();
        v
    }

    /// The extractor for an endpoint with these labels.
    pub fn for_labels(&self, labels: &BTreeMap<String, String>) -> &Arc<Extractor> {
        let engine = labels
            .get(&self.engine_label_key)
            .filter(|v| !v.is_empty())
            .or_else(|| {
                labels
                    .get(LEGACY_ENGINE_TYPE_LABEL)
                    .filter(|v| !v.is_empty())
            });
        match engine {
            Some(e) => self
                .engines
                .get(canonical_engine(e))
                .unwrap_or(&self.default),
            None => &self.default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract(ex: &Extractor, text: &str) -> Result<Extracted, ExtractError> {
        ex.extract_text(text, &EndpointMetrics::default(), Instant::now())
    }

    #[test]
    fn spec_syntax() {
        let s = MetricSpec::parse("vllm:num_requests_waiting")
            .unwrap()
            .unwrap();
        assert_eq!(s.name(), "vllm:num_requests_waiting");
        assert!(s.labels().is_empty());
        let s = MetricSpec::parse(" m{a=b, c=\"d e\",f='g',__name__=\"m\",} ")
            .unwrap()
            .unwrap();
        assert_eq!(s.name(), "m");
        assert_eq!(
            s.labels(),
            &[
                ("a".to_string(), "b".to_string()),
                ("c".to_string(), "d e".to_string()),
                ("f".to_string(), "g".to_string())
            ]
        );
        assert_eq!(s.to_string(), "m{a=\"b\",c=\"d e\",f=\"g\"}");
        assert_eq!(MetricSpec::parse("  ").unwrap(), None);
        for (bad, needle) in [
            ("{a=b}", "metric name"),
            ("m{a!=b}", "only '='"),
            ("m{a=~b}", "only '='"),
            ("m{a=b", "unterminated"),
            ("m{a}", "expected '='"),
            ("m{a=}", "label value"),
            ("m x", "expected '{'"),
            ("m{a=b} x", "after the label"),
            ("m{a=\"b}", "unterminated label value"),
        ] {
            let e = MetricSpec::parse(bad).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn overrides_replace_vllm_names_and_empty_disables() {
        let o = MetricOverrides {
            total_queued_requests: Some("custom_queue{kind=\"wait\"}".into()),
            kv_cache_usage_percentage: Some("custom_kv".into()),
            lora_info: Some(String::new()),
            ..Default::default()
        };
        let mm = MetricMappings::new("", "", &o).unwrap();
        let ex = mm.for_labels(&BTreeMap::new());
        assert_eq!(ex.engine(), "vllm");
        let text = "custom_queue{kind=\"other\"} 100\ncustom_queue{kind=\"wait\"} 4\n\
                    vllm:num_requests_running 2\ncustom_kv 0.5\nvllm:kv_cache_usage_perc 0.9\n\
                    vllm:lora_requests_info{running_lora_adapters=\"a\",waiting_lora_adapters=\"\",max_lora=\"1\"} 5\n";
        let m = extract(ex, text).unwrap().metrics;
        assert_eq!(m.waiting_queue_size, 4);
        assert_eq!(m.running_requests, 2);
        assert_eq!(m.kv_cache_usage, 0.5);
        assert!(m.running_lora_adapters.is_empty(), "LoRA disabled");
        // KV override without fallback: the old name is not consulted.
        let e = extract(ex, "custom_queue{kind=\"wait\"} 1\nvllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.1\n")
            .unwrap_err();
        assert_eq!(e, ExtractError::Missing("custom_kv".into()));
        assert!(
            MetricMappings::new(
                "",
                "",
                &MetricOverrides {
                    total_running_requests: Some("m{".into()),
                    ..Default::default()
                }
            )
            .unwrap_err()
            .to_string()
            .contains("m{")
        );
        let e = MetricMappings::new("tgi", "", &MetricOverrides::default()).unwrap_err();
        assert!(e.to_string().contains("known engines: sglang"), "{e}");
    }

    #[test]
    fn engine_is_chosen_by_label_with_legacy_key_and_aliases() {
        let mm = MetricMappings::default();
        let labels = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(
            mm.for_labels(&labels(label::ENGINE_TYPE, "sglang"))
                .engine(),
            "sglang"
        );
        assert_eq!(
            mm.for_labels(&labels(LEGACY_ENGINE_TYPE_LABEL, "triton"))
                .engine(),
            "triton-tensorrt-llm"
        );
        assert_eq!(
            mm.for_labels(&labels(label::ENGINE_TYPE, "trtllm"))
                .engine(),
            "trtllm-serve"
        );
        assert_eq!(
            mm.for_labels(&labels(label::ENGINE_TYPE, "unknown"))
                .engine(),
            "vllm"
        );
        let mm = MetricMappings::new("sglang", "engine", &MetricOverrides::default()).unwrap();
        assert_eq!(mm.for_labels(&BTreeMap::new()).engine(), "sglang");
        assert_eq!(mm.for_labels(&labels("engine", "vllm")).engine(), "vllm");
    }

    #[test]
    fn triton_and_trtllm_read_values_by_label_and_gauge() {
        let mm = MetricMappings::default();
        let triton = mm.for_labels(&BTreeMap::from([(
            label::ENGINE_TYPE.to_string(),
            "triton-tensorrt-llm".to_string(),
        )]));
        let text = "# TYPE nv_trt_llm_request_metrics gauge\n\
            nv_trt_llm_request_metrics{model=\"ensemble\",request_type=\"context\",version=\"1\"} 1\n\
            nv_trt_llm_request_metrics{model=\"ensemble\",request_type=\"scheduled\",version=\"1\"} 6\n\
            nv_trt_llm_request_metrics{model=\"ensemble\",request_type=\"waiting\",version=\"1\"} 2\n\
            nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\",model=\"m\"} 0.25\n\
            nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"tokens_per\",model=\"m\"} 64\n\
            nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"m\"} 4096\n";
        let m = extract(triton, text).unwrap().metrics;
        assert_eq!(
            (m.waiting_queue_size, m.running_requests, m.kv_cache_usage),
            (2, 6, 0.25)
        );
        assert_eq!((m.block_size, m.num_gpu_blocks), (Some(64), Some(4096)));

        let trt = mm.for_labels(&BTreeMap::from([(
            label::ENGINE_TYPE.to_string(),
            "trtllm-serve".to_string(),
        )]));
        let text = "trtllm_num_requests_waiting 3\ntrtllm_num_requests_running 1\n\
            trtllm_kv_cache_utilization 0.75\ntrtllm_kv_cache_tokens_per_block 32\n\
            trtllm_kv_cache_max_blocks 1000\n";
        let m = extract(trt, text).unwrap().metrics;
        assert_eq!(
            (m.waiting_queue_size, m.running_requests, m.kv_cache_usage),
            (3, 1, 0.75)
        );
        assert_eq!((m.block_size, m.num_gpu_blocks), (Some(32), Some(1000)));
    }

    #[test]
    fn newest_timestamp_wins_then_first() {
        let mm = MetricMappings::default();
        let ex = mm.for_labels(&BTreeMap::new());
        let text = "vllm:num_requests_waiting{engine=\"0\"} 1\n\
                    vllm:num_requests_waiting{engine=\"1\"} 2\n\
                    vllm:num_requests_running{engine=\"0\"} 5 100\n\
                    vllm:num_requests_running{engine=\"1\"} 6 200\n\
                    vllm:num_requests_running{engine=\"2\"} 7 150\n\
                    vllm:kv_cache_usage_perc 0.1\n";
        let m = extract(ex, text).unwrap().metrics;
        assert_eq!(m.waiting_queue_size, 1);
        assert_eq!(m.running_requests, 6);
    }

    #[test]
    fn unusable_values_fail_required_and_warn_optional() {
        let mm = MetricMappings::default();
        let ex = mm.for_labels(&BTreeMap::new());
        let ok = "vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n";
        for (q, reason) in [
            ("NaN", "finite"),
            ("+Inf", "finite"),
            ("-1", "negative"),
            ("1e12", "too large"),
        ] {
            let e = extract(ex, &format!("vllm:num_requests_waiting {q}\n{ok}")).unwrap_err();
            assert_eq!(e.reason(), "invalid_value");
            assert!(e.to_string().contains(reason), "{e}");
            assert!(e.to_string().contains("vllm:num_requests_waiting"), "{e}");
        }
        let e = extract(
            ex,
            "vllm:num_requests_waiting 1\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 57\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("percentage"), "{e}");
        let e = extract(
            ex,
            "vllm:num_requests_waiting 1\nvllm:num_requests_running 1\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "required metric vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc not found"
        );
        // Optional metrics with garbage labels keep their previous values and warn.
        let prev = EndpointMetrics {
            max_lora: 3,
            ..Default::default()
        };
        let text = format!(
            "vllm:num_requests_waiting 1\n{ok}\
             vllm:lora_requests_info{{max_lora=\"many\",running_lora_adapters=\"a\",waiting_lora_adapters=\"\"}} 1\n\
             vllm:cache_config_info{{block_size=\"x\",num_gpu_blocks=\"100\"}} 1\n"
        );
        let out = ex.extract_text(&text, &prev, Instant::now()).unwrap();
        assert_eq!(out.metrics.max_lora, 3);
        assert_eq!(out.metrics.running_lora_adapters, vec!["a".to_string()]);
        assert_eq!(out.metrics.block_size, None);
        assert_eq!(out.metrics.num_gpu_blocks, Some(100));
        assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("max_lora 'many'"));
    }

    #[test]
    fn kv_slightly_above_one_is_clamped() {
        let mm = MetricMappings::default();
        let ex = mm.for_labels(&BTreeMap::new());
        let m = extract(
            ex,
            "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 1.0000001\n",
        )
        .unwrap()
        .metrics;
        assert_eq!(m.kv_cache_usage, 1.0);
    }
}
