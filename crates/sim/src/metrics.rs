//! vLLM's Prometheus metrics, rendered in the text exposition format.
//!
//! Names, types, labels and histogram buckets follow vLLM v1's `PrometheusStatLogger`
//! (`vllm/v1/metrics/loggers.py`): per-engine series carry `model_name` and `engine` labels (in
//! that order, as `prometheus_client` prints them), counters end in `_total`, the info gauge
//! `vllm:cache_config_info` carries the cache configuration as labels plus `engine` (no
//! `model_name`), and `vllm:lora_requests_info` (present when LoRA is enabled) has labels
//! `max_lora`, `waiting_lora_adapters`, `running_lora_adapters` and the Unix time of the last
//! update as its value. The deprecated `vllm:gpu_cache_usage_perc` is exported next to
//! `vllm:kv_cache_usage_perc` for older scrapers. `_created` samples are omitted.
//!
//! With the NIXL connector on (`--role prefill|decode`, [`crate::pd`]) a replica also exports
//! vLLM's KV-connector families (`vllm:nixl_xfer_time_seconds`, `vllm:nixl_post_time_seconds`,
//! `vllm:nixl_bytes_transferred`, `vllm:nixl_num_descriptors`,
//! `vllm:nixl_num_failed_transfers_total`, `vllm:nixl_num_failed_notifications_total`,
//! `vllm:external_prefix_cache_{queries,hits}_total`) and the simulator's
//! `llmsched_sim_kv_transfer_*` series (blocks held for remote decoders, reads served, holds
//! expired, failed transfers recomputed or errored). `vllm:prompt_tokens_by_source_total{source}`
//! (`local_compute`, `local_cache_hit`, `external_kv_transfer`) and
//! `vllm:prompt_tokens_cached_total` are always there, and `llmsched_sim_info{role,kv_connector}`
//! says what the replica is.
//!
//! Every time is in simulated seconds. Three simulator-only series describe the simulation
//! itself: `llmsched_sim_steps_total`, `llmsched_sim_step_lag_seconds` (how late, in wall
//! seconds, each step finished relative to the simulated clock) and
//! `llmsched_sim_clock_resyncs_total`.

use std::fmt::Write;

use crate::engine::FinishReason;

/// TTFT buckets (vLLM).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Inter-token latency and time-per-output-token buckets (vLLM).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Request-phase latency buckets (vLLM `request_latency_buckets`).
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Tokens-per-step buckets (vLLM `iteration_tokens_total`).
pub const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Step-lag buckets (simulator-only, wall seconds).
pub const LAG_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// vLLM's `build_1_2_5_buckets(max)`: 1, 2, 5, 10, 20, 50, … up to `max`.
pub fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    loop {
        for m in [1usize, 2, 5] {
            let v = m.saturating_mul(scale);
            if v > max {
                return out;
            }
            out.push(v as f64);
        }
        scale = scale.saturating_mul(10);
    }
}

/// A Prometheus histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with upper bounds `bounds` (+Inf is implicit).
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Mean observation (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// Everything `/metrics` reports for one replica.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Running requests.
    pub running: usize,
    /// Waiting requests.
    pub waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_usage: f64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of requests that produced their first token.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Finished requests by reason: stop, length, abort, error.
    pub success: [u64; 4],
    /// Prompt tokens of requests that produced their first token, by where their KV came
    /// from: computed here, local prefix-cache hit, read from a remote prefill replica.
    pub prompt_tokens_by_source: [u64; 3],
    /// P/D (NIXL connector) counters.
    pub pd: crate::pd::PdMetrics,
    /// Time to first token.
    pub ttft: Histogram,
    /// Inter-token latency.
    pub itl: Histogram,
    /// Per-request mean time per output token.
    pub tpot: Histogram,
    /// End-to-end latency.
    pub e2e: Histogram,
    /// Time in the waiting queue before first scheduled.
    pub queue: Histogram,
    /// Running time (first scheduled → finish).
    pub inference: Histogram,
    /// Prefill time (first scheduled → first token).
    pub prefill: Histogram,
    /// Decode time (first token → finish).
    pub decode: Histogram,
    /// Prompt lengths.
    pub prompt_len: Histogram,
    /// Output lengths.
    pub generation_len: Histogram,
    /// `max_tokens` of requests.
    pub max_tokens: Histogram,
    /// Tokens per step.
    pub iteration_tokens: Histogram,
    /// Running adapters, comma-joined.
    pub lora_running: String,
    /// Waiting adapters, comma-joined.
    pub lora_waiting: String,
    /// When the LoRA info was last updated (Unix seconds).
    pub lora_updated_unix: f64,
    /// Engine steps run.
    pub steps: u64,
    /// Wall-clock lateness of each step's end.
    pub step_lag: Histogram,
    /// Largest step lag seen.
    pub lag_max: f64,
    /// Times the engine gave up catching up with the clock.
    pub resyncs: u64,
    /// Cached blocks evicted.
    pub evictions: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(40_960)
    }
}

impl Metrics {
    /// Empty metrics; token-count histograms get 1-2-5 buckets up to `max_model_len`.
    pub fn new(max_model_len: usize) -> Self {
        let tok = buckets_1_2_5(max_model_len);
        Self {
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            success: [0; 4],
            prompt_tokens_by_source: [0; 3],
            pd: crate::pd::PdMetrics::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            tpot: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(REQUEST_LATENCY_BUCKETS),
            queue: Histogram::new(REQUEST_LATENCY_BUCKETS),
            inference: Histogram::new(REQUEST_LATENCY_BUCKETS),
            prefill: Histogram::new(REQUEST_LATENCY_BUCKETS),
            decode: Histogram::new(REQUEST_LATENCY_BUCKETS),
            prompt_len: Histogram::new(&tok),
            generation_len: Histogram::new(&tok),
            max_tokens: Histogram::new(&tok),
            iteration_tokens: Histogram::new(ITERATION_TOKEN_BUCKETS),
            lora_running: String::new(),
            lora_waiting: String::new(),
            lora_updated_unix: 0.0,
            steps: 0,
            step_lag: Histogram::new(LAG_BUCKETS),
            lag_max: 0.0,
            resyncs: 0,
            evictions: 0,
        }
    }

    /// Records a finished request (durations in simulated seconds; `None` when the phase never
    /// started, e.g. a request aborted while waiting).
    #[allow(clippy::too_many_arguments)]
    pub fn record_finished(
        &mut self,
        reason: FinishReason,
        e2e: f64,
        queue: Option<f64>,
        prefill: Option<f64>,
        decode: Option<f64>,
        inference: Option<f64>,
        prompt_tokens: usize,
        generated: usize,
        max_tokens: usize,
    ) {
        let idx = match reason {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Abort => 2,
            FinishReason::Error => 3,
        };
        self.success[idx] += 1;
        self.e2e.observe(e2e.max(0.0));
        self.queue.observe(queue.unwrap_or(e2e).max(0.0));
        self.prefill.observe(prefill.unwrap_or(0.0).max(0.0));
        self.decode.observe(decode.unwrap_or(0.0).max(0.0));
        self.inference.observe(inference.unwrap_or(0.0).max(0.0));
        self.prompt_len.observe(prompt_tokens as f64);
        self.generation_len.observe(generated as f64);
        self.max_tokens.observe(max_tokens as f64);
        if generated > 1
            && let Some(d) = decode
        {
            self.tpot.observe((d / (generated - 1) as f64).max(0.0));
        }
    }
}

/// Static facts rendered as labels.
#[derive(Debug, Clone)]
pub struct RenderInfo<'a> {
    /// `model_name` label.
    pub model: &'a str,
    /// Blocks in the KV cache.
    pub num_gpu_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// `max_lora` label; `None` when LoRA is disabled (the gauge is then absent, as in vLLM).
    pub max_lora: Option<usize>,
    /// The replica's P/D role (`prefill`, `decode`, `both`).
    pub role: &'a str,
    /// Whether the NIXL connector is on (its families are rendered only then).
    pub kv_connector: bool,
}

/// Python's `repr(float)`-like formatting, which every Prometheus parser accepts.
fn num(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v.is_nan() {
        return "NaN".into();
    }
    format!("{v:?}")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out<'a> {
    s: String,
    labels: String,
    info: &'a RenderInfo<'a>,
}

impl Out<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.s, "# HELP {name} {help}");
        let _ = writeln!(self.s, "# TYPE {name} {kind}");
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.s, "{name}{{{}}} {}", self.labels, num(v));
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.s, "{name}{{{}}} {}", self.labels, num(v as f64));
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let mut cum = 0;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(
                self.s,
                "{name}_bucket{{{},le=\"{}\"}} {}",
                self.labels,
                num(*b),
                num(cum as f64)
            );
        }
        let _ = writeln!(
            self.s,
            "{name}_bucket{{{},le=\"+Inf\"}} {}",
            self.labels,
            num(h.count as f64)
        );
        let _ = writeln!(
            self.s,
            "{name}_count{{{}}} {}",
            self.labels,
            num(h.count as f64)
        );
        let _ = writeln!(self.s, "{name}_sum{{{}}} {}", self.labels, num(h.sum));
    }
}

/// Renders `m` in the Prometheus text format (version 0.0.4).
pub fn render(m: &Metrics, info: &RenderInfo<'_>) -> String {
    let mut o = Out {
        s: String::with_capacity(16 * 1024),
        labels: format!("model_name=\"{}\",engine=\"0\"", escape(info.model)),
        info,
    };
    o.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        m.running as f64,
    );
    o.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        m.waiting as f64,
    );
    o.gauge(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        m.kv_usage,
    );
    o.gauge(
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
        m.kv_usage,
    );
    o.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        m.prefix_queries,
    );
    o.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        m.prefix_hits,
    );
    o.counter(
        "vllm:num_preemptions_total",
        "Cumulative number of preemption from the engine.",
        m.preemptions,
    );
    o.counter(
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
        m.prompt_tokens,
    );
    o.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        m.generation_tokens,
    );
    o.header(
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (reason, v) in ["stop", "length", "abort", "error"].iter().zip(m.success) {
        let _ = writeln!(
            o.s,
            "vllm:request_success_total{{{},finished_reason=\"{reason}\"}} {}",
            o.labels,
            num(v as f64)
        );
    }
    o.header(
        "vllm:prompt_tokens_by_source_total",
        "counter",
        "Number of prompt tokens by source.",
    );
    for (source, v) in ["local_compute", "local_cache_hit", "external_kv_transfer"]
        .iter()
        .zip(m.prompt_tokens_by_source)
    {
        let _ = writeln!(
            o.s,
            "vllm:prompt_tokens_by_source_total{{{},source=\"{source}\"}} {}",
            o.labels,
            num(v as f64)
        );
    }
    o.counter(
        "vllm:prompt_tokens_cached_total",
        "Number of cached prompt tokens (local prefix cache and external KV transfer).",
        m.prompt_tokens_by_source[1] + m.prompt_tokens_by_source[2],
    );
    o.histogram(
        "vllm:request_prompt_tokens",
        "Number of prefill tokens processed.",
        &m.prompt_len,
    );
    o.histogram(
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
        &m.generation_len,
    );
    o.histogram(
        "vllm:iteration_tokens_total",
        "Histogram of number of tokens per engine_step.",
        &m.iteration_tokens,
    );
    o.histogram(
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
        &m.max_tokens,
    );
    o.histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &m.ttft,
    );
    o.histogram(
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &m.itl,
    );
    o.histogram(
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        &m.tpot,
    );
    o.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &m.e2e,
    );
    o.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &m.queue,
    );
    o.histogram(
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        &m.inference,
    );
    o.histogram(
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
        &m.prefill,
    );
    o.histogram(
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
        &m.decode,
    );
    if let Some(max_lora) = o.info.max_lora {
        o.header(
            "vllm:lora_requests_info",
            "gauge",
            "Running stats on lora requests.",
        );
        let _ = writeln!(
            o.s,
            "vllm:lora_requests_info{{max_lora=\"{max_lora}\",waiting_lora_adapters=\"{}\",running_lora_adapters=\"{}\"}} {}",
            escape(&m.lora_waiting),
            escape(&m.lora_running),
            num(m.lora_updated_unix)
        );
    }
    o.header(
        "vllm:cache_config_info",
        "gauge",
        "Information of the LLMEngine CacheConfig",
    );
    let _ = writeln!(
        o.s,
        "vllm:cache_config_info{{block_size=\"{}\",gpu_memory_utilization=\"0.9\",swap_space=\"4\",is_attention_free=\"False\",num_gpu_blocks_override=\"None\",sliding_window=\"None\",enable_prefix_caching=\"True\",prefix_caching_hash_algo=\"xxh3_64\",cpu_offload_gb=\"0\",cache_dtype=\"auto\",calculate_kv_scales=\"False\",num_gpu_blocks=\"{}\",num_cpu_blocks=\"None\",engine=\"0\"}} 1.0",
        o.info.block_size, o.info.num_gpu_blocks
    );
    o.counter(
        "llmsched_sim_steps_total",
        "Engine steps simulated.",
        m.steps,
    );
    o.histogram(
        "llmsched_sim_step_lag_seconds",
        "Wall-clock seconds each simulated step ended late (timer and CPU lag).",
        &m.step_lag,
    );
    o.counter(
        "llmsched_sim_clock_resyncs_total",
        "Times the engine fell more than 50 ms behind the simulated clock and re-synchronised.",
        m.resyncs,
    );
    render_pd(&mut o, m);
    o.s
}

/// The NIXL connector's families (vLLM's names) and the simulator's P/D series.
fn render_pd(o: &mut Out<'_>, m: &Metrics) {
    o.header(
        "llmsched_sim_info",
        "gauge",
        "The simulated replica's P/D role and whether its NIXL KV connector is on.",
    );
    let _ = writeln!(
        o.s,
        "llmsched_sim_info{{{},role=\"{}\",kv_connector=\"{}\"}} 1.0",
        o.labels,
        escape(o.info.role),
        if o.info.kv_connector {
            "NixlConnector"
        } else {
            "none"
        }
    );
    if !o.info.kv_connector {
        return;
    }
    let p = &m.pd;
    o.counter(
        "vllm:external_prefix_cache_queries_total",
        "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
        p.external_queries,
    );
    o.counter(
        "vllm:external_prefix_cache_hits_total",
        "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
        p.external_hits,
    );
    o.histogram(
        "vllm:nixl_xfer_time_seconds",
        "Histogram of transfer duration for NIXL KV Cache transfers.",
        &p.xfer_time,
    );
    o.histogram(
        "vllm:nixl_post_time_seconds",
        "Histogram of transfer post time for NIXL KV Cache transfers.",
        &p.post_time,
    );
    o.histogram(
        "vllm:nixl_bytes_transferred",
        "Histogram of bytes transferred per NIXL KV Cache transfers.",
        &p.bytes,
    );
    o.histogram(
        "vllm:nixl_num_descriptors",
        "Histogram of number of descriptors per NIXL KV Cache transfers.",
        &p.descriptors,
    );
    o.counter(
        "vllm:nixl_num_failed_transfers_total",
        "Number of failed NIXL KV Cache transfers.",
        p.failed_transfers,
    );
    o.counter(
        "vllm:nixl_num_failed_notifications_total",
        "Number of failed NIXL KV Cache notifications.",
        p.failed_notifications,
    );
    o.gauge(
        "llmsched_sim_kv_transfer_held_requests",
        "Finished prefills whose KV blocks are held for a remote decoder.",
        p.held_requests as f64,
    );
    o.gauge(
        "llmsched_sim_kv_transfer_held_blocks",
        "KV blocks held (allocated, not evictable) for remote decoders.",
        p.held_blocks as f64,
    );
    o.counter(
        "llmsched_sim_kv_transfer_served_total",
        "Held prefills whose blocks a decoder read (then freed).",
        p.served,
    );
    o.counter(
        "llmsched_sim_kv_transfer_expired_total",
        "Held prefills freed by the abort timeout because no decoder read them.",
        p.expired,
    );
    o.counter(
        "llmsched_sim_kv_transfer_recomputed_total",
        "Requests whose KV transfer failed and whose prompt was computed locally instead (kv-load-failure-policy recompute).",
        p.recomputed,
    );
    o.counter(
        "llmsched_sim_kv_transfer_errored_total",
        "Requests that ended with finish reason error because their KV transfer failed (kv-load-failure-policy fail).",
        p.errored,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_two_five_buckets_match_vllm() {
        assert_eq!(
            buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(buckets_1_2_5(40_960).last(), Some(&20_000.0));
    }

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 2]);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), 8.0);
        assert_eq!(h.mean(), 1.6);
    }

    #[test]
    fn numbers_look_like_python_floats() {
        assert_eq!(num(1.0), "1.0");
        assert_eq!(num(0.25), "0.25");
        assert_eq!(num(f64::INFINITY), "+Inf");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
