//! Request lifecycle metrics, computed exactly as inference-perf's `summarize_requests`.
//!
//! Every request yields a [`RequestRecord`]: scheduled, start and end times, the arrival time
//! and token count of every content-bearing chunk, token counts and server usage, or an
//! error. Times are in *simulated* seconds (wall-clock seconds × time scale, see
//! [`crate::runner`]). For each stage and for the whole run, [`summarize_requests`] computes:
//!
//! * **request_latency** = `end − start` (successful requests).
//! * **output token times**: each chunk's arrival time, repeated once per token it carries
//!   (tokens of one chunk share its time; intra-chunk gaps are 0).
//! * **time_to_first_token** (TTFT) = `t_first_token − start`, defined when a request has more
//!   than one output token time.
//! * **time_per_output_token** (TPOT) = `(t_last − t_first) / (n_out − 1)`, defined when TTFT is
//!   and `n_out > 1`.
//! * **inter_token_latency** (ITL) = every gap `t[k+1] − t[k]` between consecutive output token
//!   times, pooled over all requests (not averaged per request).
//! * **normalized_time_per_output_token** (NTPOT) = `request_latency / n_out`, or 0 when
//!   `n_out = 0` (a zero still enters the statistics, as in inference-perf).
//! * `n_out` is the client-side token count of the whole output text, or the server's
//!   `usage.completion_tokens` when `report.request_lifecycle.use_server_output_tokens` is set.
//! * **throughput** = totals over successful requests ÷ `(max end − min start)` over all
//!   requests of the set (successes and failures): `input_tokens_per_sec` (server
//!   `prompt_tokens` when reported, else the client count), `output_tokens_per_sec`
//!   (`n_out`), `total_tokens_per_sec`, `requests_per_sec`.
//! * **prompt_tokens**: totals plus `cached` = Σ `usage.prompt_tokens_details.cached_tokens`
//!   and `uncached = max(total − cached, 0)`; the cached ratio is `cached / total`.
//! * **failures** grouped by a concise label (`503 - Service Unavailable`, `Connection Error`,
//!   `Timeout`, `clientpayloaderror`, ...), with distinct messages.
//! * Statistics: `mean`, `min`, `max` and percentiles 0.1, 1, 5, 10, 25, 50 (`median`), 75, 90,
//!   95, 99, 99.9 with NumPy's default linear interpolation.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::sse::Usage;

/// Arrival of one content-bearing chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMark {
    /// Simulated microseconds since the request's start (saturates at about 71 minutes).
    pub offset_us: u32,
    /// Tokens in the chunk's text.
    pub tokens: u32,
}

impl ChunkMark {
    /// A chunk `offset` simulated seconds after the request start carrying `tokens` tokens.
    pub fn at(offset: f64, tokens: u32) -> Self {
        let us = (offset * 1e6).round();
        Self {
            // Clamped into u32 range before the cast.
            offset_us: us.clamp(0.0, f64::from(u32::MAX)) as u32,
            tokens,
        }
    }

    /// Offset in seconds.
    pub fn offset(&self) -> f64 {
        f64::from(self.offset_us) * 1e-6
    }
}

/// Why a request failed, in inference-perf's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    /// `HTTP Error 503`, `ClientConnectorError`, `TimeoutError`, `ClientPayloadError`, ...
    pub error_type: String,
    /// Response body or error message.
    pub error_msg: String,
}

/// Everything measured about one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Stage index.
    pub stage_id: usize,
    /// Index of the request within its stage (it used prompt `data_index mod N`).
    pub data_index: u64,
    /// Multi-turn session (user) index, if any.
    pub session: Option<u64>,
    /// When it was scheduled to be sent (simulated seconds since the run started).
    pub scheduled_time: f64,
    /// When it was sent.
    pub start_time: f64,
    /// When the response completed or failed.
    pub end_time: f64,
    /// Whether the response was streamed.
    pub streamed: bool,
    /// Content-bearing chunks in arrival order (streamed responses only).
    pub chunks: Vec<ChunkMark>,
    /// Input tokens: server `prompt_tokens` when reported, else the client count; 0 for
    /// failures (as inference-perf records them).
    pub input_tokens: u64,
    /// Client-side token count of the whole output text.
    pub output_tokens: u64,
    /// Server-reported usage, if any.
    pub usage: Option<Usage>,
    /// Size of the request body in bytes.
    pub request_bytes: u64,
    /// `data:` payloads that were not JSON (skipped, as inference-perf does).
    pub invalid_chunks: u32,
    /// The failure, if the request failed.
    pub error: Option<RequestError>,
}

impl RequestRecord {
    /// Request latency (`end − start`).
    pub fn latency(&self) -> f64 {
        self.end_time - self.start_time
    }

    /// Output token times (absolute), one per token.
    pub fn token_times(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.chunks.iter().map(|c| c.tokens as usize).sum());
        for c in &self.chunks {
            let t = self.start_time + c.offset();
            out.extend(std::iter::repeat_n(t, c.tokens as usize));
        }
        out
    }

    /// The output token count used for TPOT and NTPOT.
    pub fn effective_output_tokens(&self, use_server_output_tokens: bool) -> u64 {
        if use_server_output_tokens
            && let Some(n) = self.usage.and_then(|u| u.completion_tokens)
            && n > 0
        {
            return n;
        }
        self.output_tokens
    }
}

/// mean, min, max and percentiles of a sample (inference-perf's `summarize`), plus the
/// population standard deviation (not part of the lifecycle JSON; used by benchmark reports).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Arithmetic mean.
    pub mean: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// `(percentile, value)` in the configured order.
    pub percentiles: Vec<(f64, f64)>,
    /// Population standard deviation, when computed from raw values.
    pub stddev: Option<f64>,
}

impl Stats {
    /// Statistics of `values` (`None` when empty). Sorts `values`.
    pub fn of(values: &mut [f64], percentiles: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Some(Self {
            mean,
            min: values[0],
            max: values[values.len() - 1],
            percentiles: percentiles
                .iter()
                .map(|&p| (p, percentile_sorted(values, p)))
                .collect(),
            stddev: Some(var.sqrt()),
        })
    }

    /// The value at percentile `p`, if it was computed.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(q, _)| (q - p).abs() < 1e-9)
            .map(|&(_, v)| v)
    }

    /// The median (50th percentile), if computed.
    pub fn median(&self) -> Option<f64> {
        self.percentile(50.0)
    }
}

/// NumPy's default (`linear`) percentile of sorted data, including its lerp that is exact at
/// both ends.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let virtual_index = (p / 100.0) * (n - 1) as f64;
    let prev = virtual_index.floor().clamp(0.0, (n - 1) as f64);
    // Both indexes are clamped into 0..n, so the casts are exact.
    let lo = prev as usize;
    let hi = (lo + 1).min(n - 1);
    let gamma = virtual_index - prev;
    let (a, b) = (sorted[lo], sorted[hi]);
    let diff = b - a;
    if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    }
}

/// The key inference-perf uses for percentile `p`: `median` for 50, else `p{p:g}`.
pub fn percentile_key(p: f64) -> String {
    if (p - 50.0).abs() < 1e-12 {
        "median".to_owned()
    } else {
        format!("p{p}")
    }
}

fn parse_percentile_key(key: &str) -> Option<f64> {
    if key == "median" {
        return Some(50.0);
    }
    key.strip_prefix('p')?.parse().ok()
}

impl Serialize for Stats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3 + self.percentiles.len()))?;
        write_stats_entries(self, &mut m)?;
        m.end()
    }
}

fn write_stats_entries<M: SerializeMap>(st: &Stats, m: &mut M) -> Result<(), M::Error> {
    m.serialize_entry("mean", &st.mean)?;
    m.serialize_entry("min", &st.min)?;
    m.serialize_entry("max", &st.max)?;
    for &(p, v) in &st.percentiles {
        m.serialize_entry(&percentile_key(p), &v)?;
    }
    Ok(())
}

fn stats_from_map(map: &BTreeMap<String, f64>) -> Option<Stats> {
    let mean = *map.get("mean")?;
    let mut percentiles: Vec<(f64, f64)> = map
        .iter()
        .filter_map(|(k, &v)| parse_percentile_key(k).map(|p| (p, v)))
        .collect();
    percentiles.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(Stats {
        mean,
        min: map.get("min").copied().unwrap_or(f64::NAN),
        max: map.get("max").copied().unwrap_or(f64::NAN),
        percentiles,
        stddev: map.get("stddev").copied(),
    })
}

/// Reads a JSON/YAML object of numbers, skipping entries that are not numbers.
fn number_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, f64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of statistics")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(k) = a.next_key::<String>()? {
                let v: serde_json::Value = a.next_value()?;
                if let Some(x) = v.as_f64() {
                    out.insert(k, x);
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

impl<'de> Deserialize<'de> for Stats {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = number_map(d)?;
        stats_from_map(&map).ok_or_else(|| de::Error::custom("statistics without a `mean`"))
    }
}

/// `prompt_tokens` / `output_tokens`: totals followed by the per-request distribution.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenTotals {
    /// Sum over requests.
    pub total: f64,
    /// Cached prompt tokens (prompt side only).
    pub cached: Option<f64>,
    /// `max(total − cached, 0)` (prompt side only).
    pub uncached: Option<f64>,
    /// Per-request distribution.
    pub stats: Option<Stats>,
}

impl Serialize for TokenTotals {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("total", &self.total)?;
        if let Some(c) = self.cached {
            m.serialize_entry("cached", &c)?;
        }
        if let Some(u) = self.uncached {
            m.serialize_entry("uncached", &u)?;
        }
        if let Some(st) = &self.stats {
            write_stats_entries(st, &mut m)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for TokenTotals {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = number_map(d)?;
        Ok(Self {
            total: map.get("total").copied().unwrap_or(0.0),
            cached: map.get("cached").copied(),
            uncached: map.get("uncached").copied(),
            stats: stats_from_map(&map),
        })
    }
}

/// `load_summary`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadSummary {
    /// Requests in the set (successes and failures).
    pub count: u64,
    /// `start − scheduled` of every request.
    pub schedule_delay: Option<Stats>,
    /// `max start − min start` (stage reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_duration: Option<f64>,
    /// The stage's configured rate (stage reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_rate: Option<f64>,
    /// `count / send_duration` (stage reports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved_rate: Option<f64>,
    /// Concurrency level of a `concurrent` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}

/// `successes.latency`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Request latency (s).
    pub request_latency: Option<Stats>,
    /// NTPOT (s/token).
    pub normalized_time_per_output_token: Option<Stats>,
    /// TPOT (s/token).
    pub time_per_output_token: Option<Stats>,
    /// TTFT (s).
    pub time_to_first_token: Option<Stats>,
    /// Pooled ITL (s/token).
    pub inter_token_latency: Option<Stats>,
}

/// `successes.throughput`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Input tokens per second.
    pub input_tokens_per_sec: f64,
    /// Output tokens per second.
    pub output_tokens_per_sec: f64,
    /// Input plus output tokens per second.
    pub total_tokens_per_sec: f64,
    /// Successful requests per second.
    pub requests_per_sec: f64,
    /// Always 0 (no images).
    #[serde(default)]
    pub images_per_sec: f64,
    /// Always 0 (no videos).
    #[serde(default)]
    pub videos_per_sec: f64,
    /// Always 0 (no audio).
    #[serde(default)]
    pub audios_per_sec: f64,
}

/// `successes.image` (text-only workloads: counts are 0, the rest empty).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Images per request.
    pub count: Option<Stats>,
    /// Pixels per image.
    pub pixels: Option<Stats>,
    /// Bytes per image.
    pub bytes: Option<Stats>,
    /// Aspect ratio per image.
    pub aspect_ratio: Option<Stats>,
}

/// `successes.video`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct VideoSummary {
    /// Videos per request.
    pub count: Option<Stats>,
    /// Frames per video.
    pub frames: Option<Stats>,
    /// Pixels per frame.
    pub pixels: Option<Stats>,
    /// Bytes per video.
    pub bytes: Option<Stats>,
    /// Aspect ratio.
    pub aspect_ratio: Option<Stats>,
}

/// `successes.audio`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AudioSummary {
    /// Clips per request.
    pub count: Option<Stats>,
    /// Seconds per clip.
    pub seconds: Option<Stats>,
    /// Bytes per clip.
    pub bytes: Option<Stats>,
}

/// `successes`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Successes {
    /// Successful requests.
    pub count: u64,
    /// Latency statistics.
    pub latency: Latency,
    /// Throughput.
    pub throughput: Throughput,
    /// Request body sizes.
    #[serde(default)]
    pub request_size_bytes: Option<Stats>,
    /// Image payloads.
    #[serde(default)]
    pub image: ImageSummary,
    /// Video payloads.
    #[serde(default)]
    pub video: VideoSummary,
    /// Audio payloads.
    #[serde(default)]
    pub audio: AudioSummary,
    /// Input tokens (server `prompt_tokens` when reported), with cached/uncached split.
    #[serde(default)]
    pub prompt_tokens: TokenTotals,
    /// Distribution of input tokens under the pre-0.5 inference-perf name, kept because
    /// llm-d-benchmark's report converter reads it.
    #[serde(default)]
    pub prompt_len: Option<Stats>,
    /// Client-side output token counts.
    #[serde(default)]
    pub output_len: Option<Stats>,
    /// Server `completion_tokens` (client count when the server sent no usage).
    #[serde(default)]
    pub output_tokens: TokenTotals,
    /// Streamed requests whose per-chunk token sum differs from `completion_tokens`.
    #[serde(default)]
    pub token_count_mismatches: u64,
}

/// One failure label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureLabel {
    /// Failures with this label.
    pub count: u64,
    /// Distinct messages (capped).
    pub messages: Vec<FailureMessage>,
}

/// One distinct failure message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureMessage {
    /// The message (inner `error.message` of JSON bodies).
    pub message: String,
}

/// Failure labels in descending count order (serialized as an ordered JSON object).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FailureLabels(pub Vec<(String, FailureLabel)>);

impl Serialize for FailureLabels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for FailureLabels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FailureLabels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of failure labels")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, FailureLabel>()? {
                    out.push((k, v));
                }
                Ok(FailureLabels(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `failures`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Failures {
    /// Failed requests.
    pub count: u64,
    /// Their latencies.
    pub request_latency: Option<Stats>,
    /// Their input tokens (0 each, as in inference-perf).
    #[serde(default)]
    pub prompt_tokens: TokenTotals,
    /// Same under the pre-0.5 name.
    #[serde(default)]
    pub prompt_len: Option<Stats>,
    /// Failures by cause.
    #[serde(default)]
    pub by_label: FailureLabels,
}

/// The content of `summary_lifecycle_metrics.json` / `stage_N_lifecycle_metrics.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LifecycleSummary {
    /// `max end − min start` over the set.
    pub benchmark_time_seconds: f64,
    /// Offered load.
    pub load_summary: LoadSummary,
    /// Successful requests.
    pub successes: Successes,
    /// Failed requests.
    pub failures: Failures,
}

impl LifecycleSummary {
    /// `cached / total` prompt tokens of successful requests, if any were counted.
    pub fn cached_prompt_ratio(&self) -> Option<f64> {
        let t = &self.successes.prompt_tokens;
        (t.total > 0.0).then(|| t.cached.unwrap_or(0.0) / t.total)
    }
}

/// Report options (from `report.request_lifecycle`).
#[derive(Debug, Clone)]
pub struct SummaryOptions {
    /// Percentiles.
    pub percentiles: Vec<f64>,
    /// Use server `completion_tokens` for TPOT/NTPOT/throughput.
    pub use_server_output_tokens: bool,
    /// Distinct messages kept per failure label.
    pub max_error_messages: usize,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        Self {
            percentiles: crate::config::DEFAULT_PERCENTILES.to_vec(),
            use_server_output_tokens: false,
            max_error_messages: 100,
        }
    }
}

/// Stage parameters for `load_summary` (stage reports only).
#[derive(Debug, Clone, Copy)]
pub struct StageLoad {
    /// Requested rate.
    pub rate: f64,
    /// Concurrency level (`concurrent` stages).
    pub concurrency: Option<u64>,
}

/// Summarizes a set of requests (a stage or the whole run).
pub fn summarize_requests<'a, I>(
    records: I,
    opts: &SummaryOptions,
    stage: Option<StageLoad>,
) -> LifecycleSummary
where
    I: IntoIterator<Item = &'a RequestRecord>,
{
    let all: Vec<&RequestRecord> = records.into_iter().collect();
    if all.is_empty() {
        return LifecycleSummary::default();
    }
    let pct = &opts.percentiles;
    let min_start = all
        .iter()
        .map(|r| r.start_time)
        .fold(f64::INFINITY, f64::min);
    let max_start = all
        .iter()
        .map(|r| r.start_time)
        .fold(f64::NEG_INFINITY, f64::max);
    let max_end = all
        .iter()
        .map(|r| r.end_time)
        .fold(f64::NEG_INFINITY, f64::max);
    let total_time = max_end - min_start;
    let per_sec = |x: f64| {
        if total_time > 0.0 {
            x / total_time
        } else {
            0.0
        }
    };

    let mut delays: Vec<f64> = all
        .iter()
        .map(|r| r.start_time - r.scheduled_time)
        .collect();
    let mut load_summary = LoadSummary {
        count: all.len() as u64,
        schedule_delay: Stats::of(&mut delays, pct),
        ..LoadSummary::default()
    };
    if let Some(st) = stage {
        let send_duration = max_start - min_start;
        load_summary.send_duration = Some(send_duration);
        load_summary.requested_rate = Some(st.rate);
        load_summary.achieved_rate = Some(if send_duration > 0.0 {
            all.len() as f64 / send_duration
        } else {
            0.0
        });
        load_summary.concurrency = st.concurrency;
    }

    let (ok, failed): (Vec<&RequestRecord>, Vec<&RequestRecord>) =
        all.iter().copied().partition(|r| r.error.is_none());

    let mut latency = Vec::with_capacity(ok.len());
    let mut ntpot = Vec::with_capacity(ok.len());
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut itl = Vec::new();
    let mut mismatches = 0u64;
    let (mut in_sum, mut out_sum) = (0.0f64, 0.0f64);
    for r in &ok {
        let lat = r.latency();
        latency.push(lat);
        let n_out = r.effective_output_tokens(opts.use_server_output_tokens);
        in_sum += r.input_tokens as f64;
        out_sum += n_out as f64;
        if r.streamed && !r.chunks.is_empty() {
            let accumulated: u64 = r.chunks.iter().map(|c| u64::from(c.tokens)).sum();
            if let Some(expected) = r.usage.and_then(|u| u.completion_tokens)
                && expected != accumulated
            {
                mismatches += 1;
            }
        }
        ntpot.push(if n_out > 0 { lat / n_out as f64 } else { 0.0 });
        let times = r.token_times();
        if times.len() > 1 {
            ttft.push(times[0] - r.start_time);
            if n_out > 1 {
                tpot.push((times[times.len() - 1] - times[0]) / (n_out - 1) as f64);
            }
            itl.extend(times.windows(2).map(|w| w[1] - w[0]));
        }
    }

    let mut sizes: Vec<f64> = ok.iter().map(|r| r.request_bytes as f64).collect();
    let mut zeros = vec![0.0; ok.len()];
    let media_count = Stats::of(&mut zeros, pct);
    let mut output_len: Vec<f64> = ok.iter().map(|r| r.output_tokens as f64).collect();
    let mut server_out: Vec<f64> = ok
        .iter()
        .map(|r| match r.usage {
            Some(u) => u.completion_tokens.unwrap_or(0) as f64,
            None => r.output_tokens as f64,
        })
        .collect();

    let successes = Successes {
        count: ok.len() as u64,
        latency: Latency {
            request_latency: Stats::of(&mut latency, pct),
            normalized_time_per_output_token: Stats::of(&mut ntpot, pct),
            time_per_output_token: Stats::of(&mut tpot, pct),
            time_to_first_token: Stats::of(&mut ttft, pct),
            inter_token_latency: Stats::of(&mut itl, pct),
        },
        throughput: Throughput {
            input_tokens_per_sec: per_sec(in_sum),
            output_tokens_per_sec: per_sec(out_sum),
            total_tokens_per_sec: per_sec(in_sum + out_sum),
            requests_per_sec: per_sec(ok.len() as f64),
            images_per_sec: 0.0,
            videos_per_sec: 0.0,
            audios_per_sec: 0.0,
        },
        request_size_bytes: Stats::of(&mut sizes, pct),
        image: ImageSummary {
            count: media_count.clone(),
            ..ImageSummary::default()
        },
        video: VideoSummary {
            count: media_count.clone(),
            ..VideoSummary::default()
        },
        audio: AudioSummary {
            count: media_count,
            ..AudioSummary::default()
        },
        prompt_tokens: prompt_totals(&ok, pct),
        prompt_len: prompt_totals(&ok, pct).stats,
        output_len: Stats::of(&mut output_len, pct),
        output_tokens: TokenTotals {
            total: server_out.iter().sum(),
            cached: None,
            uncached: None,
            stats: Stats::of(&mut server_out, pct),
        },
        token_count_mismatches: mismatches,
    };

    let mut failed_latency: Vec<f64> = failed.iter().map(|r| r.latency()).collect();
    let failures = Failures {
        count: failed.len() as u64,
        request_latency: Stats::of(&mut failed_latency, pct),
        prompt_tokens: prompt_totals(&failed, pct),
        prompt_len: prompt_totals(&failed, pct).stats,
        by_label: build_error_counts(
            failed.iter().filter_map(|r| r.error.as_ref()),
            opts.max_error_messages,
        ),
    };

    LifecycleSummary {
        benchmark_time_seconds: total_time,
        load_summary,
        successes,
        failures,
    }
}

fn prompt_totals(records: &[&RequestRecord], pct: &[f64]) -> TokenTotals {
    let mut per: Vec<f64> = records.iter().map(|r| r.input_tokens as f64).collect();
    let total: f64 = per.iter().sum();
    let cached: f64 = records
        .iter()
        .map(|r| r.usage.and_then(|u| u.cached_tokens).unwrap_or(0) as f64)
        .sum();
    TokenTotals {
        total,
        cached: Some(cached),
        uncached: Some((total - cached).max(0.0)),
        stats: Stats::of(&mut per, pct),
    }
}

/// inference-perf's `build_error_counts`: label each failure, count per label, keep up to
/// `max_messages` distinct messages per label, order labels by descending count (ties in
/// first-seen order).
pub fn build_error_counts<'a>(
    errors: impl IntoIterator<Item = &'a RequestError>,
    max_messages: usize,
) -> FailureLabels {
    let mut order: Vec<String> = Vec::new();
    let mut counts: BTreeMap<String, (u64, Vec<String>)> = BTreeMap::new();
    for e in errors {
        let msg = parse_error_message(&e.error_msg);
        let label = make_concise_label(&e.error_type, &msg);
        let entry = counts.entry(label.clone()).or_insert_with(|| {
            order.push(label.clone());
            (0, Vec::new())
        });
        entry.0 += 1;
        if !entry.1.contains(&msg) && entry.1.len() < max_messages {
            entry.1.push(msg);
        }
    }
    let mut labels: Vec<(String, FailureLabel)> = order
        .into_iter()
        .filter_map(|l| {
            counts.remove(&l).map(|(count, msgs)| {
                let messages = msgs
                    .into_iter()
                    .map(|message| FailureMessage { message })
                    .collect();
                (l, FailureLabel { count, messages })
            })
        })
        .collect();
    labels.sort_by_key(|l| std::cmp::Reverse(l.1.count));
    FailureLabels(labels)
}

/// The human-readable message of an error body: `error.message` (or `message`) of a JSON
/// object, else the raw text.
pub fn parse_error_message(raw: &str) -> String {
    if let Ok(serde_json::Value::Object(body)) = serde_json::from_str::<serde_json::Value>(raw) {
        let inner = match body.get("error") {
            Some(serde_json::Value::Object(e)) => Some(e),
            Some(v) if !v.is_null() && v.as_bool() != Some(false) => None,
            _ => Some(&body),
        };
        if let Some(m) = inner.and_then(|e| e.get("message")) {
            return match m {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
        }
    }
    raw.to_owned()
}

/// inference-perf's `make_concise_label`.
///
/// HTTP errors (`HTTP Error <code>`) become `<code> - <label>` with the label from the code
/// (429, 500, 502, 503, 504), else from the message (Context Window, Invalid JSON, Timeout,
/// Model Not Found), else `other`. Other errors become `Timeout` or `Connection Error` when
/// the message says so, else the lowercased error type.
pub fn make_concise_label(error_type: &str, error_msg: &str) -> String {
    let msg = error_msg.to_lowercase();
    if let Some(code) = error_type.strip_prefix("HTTP Error ") {
        let code = code.split_whitespace().last().unwrap_or("?");
        let by_code = match code {
            "429" => Some("Rate Limit"),
            "500" => Some("Internal Server Error"),
            "502" => Some("Bad Gateway"),
            "503" => Some("Service Unavailable"),
            "504" => Some("Gateway Timeout"),
            _ => None,
        };
        if let Some(l) = by_code {
            return format!("{code} - {l}");
        }
        const BY_MESSAGE: [(&[&str], &str); 4] = [
            (
                &[
                    "context.window",
                    "context length",
                    "maximum context",
                    "max.?tokens",
                    "token.?limit",
                ],
                "Context Window",
            ),
            (
                &[
                    "invalid.?json",
                    "json.?parse",
                    "malformed.?json",
                    "unexpected.?token",
                    "expecting value",
                    "unterminated string",
                    "expecting ',' delimiter",
                ],
                "Invalid JSON",
            ),
            (&["timeout", "timed.?out"], "Timeout"),
            (&["model.?not.?found", "no such model"], "Model Not Found"),
        ];
        for (patterns, label) in BY_MESSAGE {
            if patterns.iter().any(|p| contains_pattern(&msg, p)) {
                return format!("{code} - {label}");
            }
        }
        return format!("{code} - other");
    }
    if ["timeout", "timed.?out"]
        .iter()
        .any(|p| contains_pattern(&msg, p))
    {
        return "Timeout".to_owned();
    }
    if ["connection.?refused", "connect"]
        .iter()
        .any(|p| contains_pattern(&msg, p))
    {
        return "Connection Error".to_owned();
    }
    error_type.to_lowercase().trim().to_owned()
}

/// Whether `hay` contains a match of `pat`, a literal where `.` matches any one character and
/// `.?` matches zero or one character (the subset of regex the labels use).
fn contains_pattern(hay: &str, pat: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Lit(char),
        Any,
        OptAny,
    }
    let mut toks = Vec::new();
    let mut it = pat.chars().peekable();
    while let Some(c) = it.next() {
        if c == '.' {
            if it.peek() == Some(&'?') {
                it.next();
                toks.push(Tok::OptAny);
            } else {
                toks.push(Tok::Any);
            }
        } else {
            toks.push(Tok::Lit(c));
        }
    }
    fn matches(h: &[char], t: &[Tok]) -> bool {
        match t.split_first() {
            None => true,
            Some((Tok::Lit(c), rest)) => h.first() == Some(c) && matches(&h[1..], rest),
            Some((Tok::Any, rest)) => !h.is_empty() && matches(&h[1..], rest),
            Some((Tok::OptAny, rest)) => {
                matches(h, rest) || (!h.is_empty() && matches(&h[1..], rest))
            }
        }
    }
    let chars: Vec<char> = hay.chars().collect();
    (0..=chars.len()).any(|i| matches(&chars[i..], &toks))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-9;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // np.percentile([1, 2, 3, 4, 10], [0, 10, 25, 50, 90, 99.9, 100])
        //   = [1, 1.4, 2, 3, 7.6, 9.976, 10]
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        let got: Vec<f64> = [0.0, 10.0, 25.0, 50.0, 90.0, 99.9, 100.0]
            .iter()
            .map(|&p| percentile_sorted(&v, p))
            .collect();
        let want = [1.0, 1.4, 2.0, 3.0, 7.6, 9.976, 10.0];
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g, w), "{got:?}");
        }
        assert_eq!(percentile_sorted(&[5.0], 99.0), 5.0);
    }

    #[test]
    fn percentile_keys_are_inference_perf_names() {
        let keys: Vec<String> = crate::config::DEFAULT_PERCENTILES
            .iter()
            .map(|&p| percentile_key(p))
            .collect();
        assert_eq!(
            keys,
            [
                "p0.1", "p1", "p5", "p10", "p25", "median", "p75", "p90", "p95", "p99", "p99.9"
            ]
        );
    }

    #[test]
    fn labels_follow_inference_perf() {
        assert_eq!(
            make_concise_label("HTTP Error 503", "busy"),
            "503 - Service Unavailable"
        );
        assert_eq!(
            make_concise_label(
                "HTTP Error 400",
                "This model's maximum context length is 8192"
            ),
            "400 - Context Window"
        );
        assert_eq!(
            make_concise_label("HTTP Error 400", "Expecting value: line 1"),
            "400 - Invalid JSON"
        );
        assert_eq!(
            make_concise_label("HTTP Error 404", "The model `x` does not exist"),
            "404 - other"
        );
        assert_eq!(
            make_concise_label("HTTP Error 404", "model not_found"),
            "404 - Model Not Found"
        );
        assert_eq!(
            make_concise_label("TimeoutError", "Request timed out"),
            "Timeout"
        );
        assert_eq!(
            make_concise_label("ClientConnectorError", "Cannot connect to host 127.0.0.1:9"),
            "Connection Error"
        );
        assert_eq!(
            make_concise_label("ClientPayloadError", "Response payload is not completed"),
            "clientpayloaderror"
        );
        assert_eq!(
            parse_error_message(r#"{"error":{"message":"boom","type":"x"}}"#),
            "boom"
        );
        assert_eq!(parse_error_message(r#"{"message":"flat"}"#), "flat");
        assert_eq!(parse_error_message("plain text"), "plain text");
    }

    #[test]
    fn error_counts_are_sorted_and_deduplicated() {
        let e = |t: &str, m: &str| RequestError {
            error_type: t.into(),
            error_msg: m.into(),
        };
        let errs = [
            e("TimeoutError", "Request timed out"),
            e("HTTP Error 503", r#"{"error":{"message":"overloaded"}}"#),
            e("HTTP Error 503", r#"{"error":{"message":"overloaded"}}"#),
            e("HTTP Error 503", "other text"),
        ];
        let labels = build_error_counts(errs.iter(), 1);
        assert_eq!(labels.0.len(), 2);
        assert_eq!(labels.0[0].0, "503 - Service Unavailable");
        assert_eq!(labels.0[0].1.count, 3);
        assert_eq!(
            labels.0[0].1.messages,
            vec![FailureMessage {
                message: "overloaded".into()
            }]
        );
        assert_eq!(labels.0[1].0, "Timeout");
    }
}
