//! Result folders: writing a run's reports and reading them back.
//!
//! A run writes, in inference-perf's layout (JSON indented by 2):
//!
//! * `summary_lifecycle_metrics.json` — all requests (`report.request_lifecycle.summary`).
//! * `stage_N_lifecycle_metrics.json` — per stage, with the stage's `load_summary`
//!   (`report.request_lifecycle.per_stage`).
//! * `benchmark_report_v0.2,_stage_N_lifecycle_metrics.json.yaml` — llm-d-benchmark's
//!   "benchmark report" v0.2 for each stage, named as llm-d-benchmark's converter names it.
//! * `per_request_lifecycle_metrics.json` — one entry per request
//!   (`report.request_lifecycle.per_request`), without the request and response bodies.
//! * `config.yaml` — the effective config (defaults filled in, overrides applied).
//! * `bench_run.json` — llmsched extras: label, seeds, time scale, stage timings and the
//!   generator's own overhead.
//!
//! [`SavedRun::load`] reads a folder back (also plain inference-perf result folders, which
//! lack `bench_run.json`) for comparisons and plots.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::{BenchConfig, Distribution, DistributionType, LengthSpec, LoadStage};
use crate::error::BenchError;
use crate::metrics::{LifecycleSummary, RequestRecord, Stats};
use crate::overhead::GeneratorOverhead;
use crate::runner::{RunResult, StageResult, StageStatus};

/// File name of the run summary.
pub const SUMMARY_FILE: &str = "summary_lifecycle_metrics.json";
/// File name of the llmsched run metadata.
pub const RUN_META_FILE: &str = "bench_run.json";
/// File name of the per-request report.
pub const PER_REQUEST_FILE: &str = "per_request_lifecycle_metrics.json";
/// Tool name written into benchmark reports.
pub const TOOL: &str = "llmsched-bench";

/// `stage_N_lifecycle_metrics.json`.
pub fn stage_file(stage_id: usize) -> String {
    format!("stage_{stage_id}_lifecycle_metrics.json")
}

/// `benchmark_report_v0.2,_stage_N_lifecycle_metrics.json.yaml`.
pub fn benchmark_report_file(stage_id: usize) -> String {
    format!("benchmark_report_v0.2,_{}.yaml", stage_file(stage_id))
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Per-stage entry of `bench_run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageMeta {
    /// Stage index.
    pub stage_id: usize,
    /// Configured rate (`constant` / `poisson`).
    pub rate: Option<f64>,
    /// Configured duration in seconds.
    pub duration: Option<f64>,
    /// Configured request count (`concurrent`).
    pub num_requests: Option<u64>,
    /// Concurrency level (`concurrent`).
    pub concurrency: Option<u64>,
    /// Requests scheduled.
    pub planned_requests: u64,
    /// Requests finished.
    pub finished_requests: u64,
    /// How the stage ended.
    pub status: StageStatus,
    /// Wall-clock start (RFC 3339).
    pub start_time: String,
    /// Wall-clock end (RFC 3339).
    pub end_time: String,
}

/// Content of `bench_run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    /// `llmsched-bench`.
    pub tool: String,
    /// Crate version.
    pub tool_version: String,
    /// Run label.
    pub label: String,
    /// Run id (`run.eid` of the benchmark reports).
    pub run_id: String,
    /// Server base URL.
    pub base_url: String,
    /// Model name used.
    pub model: String,
    /// `completion` or `chat`.
    pub api_type: String,
    /// Streaming on or off.
    pub streaming: bool,
    /// Load type.
    pub load_type: String,
    /// Time scale F.
    pub time_scale: f64,
    /// Prompt seed.
    pub prompt_seed: u64,
    /// Arrival seed.
    pub arrival_seed: u64,
    /// Tokenizer.
    pub tokenizer: String,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339).
    pub ended_at: String,
    /// True when the run was cancelled.
    pub interrupted: bool,
    /// Non-JSON `data:` payloads skipped over the run.
    pub invalid_chunks: u64,
    /// Stages.
    pub stages: Vec<StageMeta>,
    /// The generator's own cost.
    pub overhead: GeneratorOverhead,
}

impl RunResult {
    /// The `bench_run.json` content.
    pub fn meta(&self) -> RunMeta {
        let server = self.config.server.as_ref();
        RunMeta {
            tool: TOOL.to_owned(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            label: self.label.clone(),
            run_id: self.run_id.clone(),
            base_url: server.map(|s| s.base_url.clone()).unwrap_or_default(),
            model: self.model.clone(),
            api_type: match self.config.api.kind {
                crate::config::ApiType::Chat => "chat",
                crate::config::ApiType::Completion => "completion",
                crate::config::ApiType::AnthropicMessages => "anthropic_messages",
            }
            .to_owned(),
            streaming: self.config.api.streaming,
            load_type: self.config.load.kind.as_str().to_owned(),
            time_scale: self.time_scale,
            prompt_seed: self.prompt_seed,
            arrival_seed: self.arrival_seed,
            tokenizer: self.tokenizer.clone(),
            started_at: rfc3339(self.started_at),
            ended_at: rfc3339(self.ended_at),
            interrupted: self.interrupted,
            invalid_chunks: self
                .records
                .iter()
                .map(|r| u64::from(r.invalid_chunks))
                .sum(),
            stages: self
                .stages
                .iter()
                .map(|s| {
                    let (rate, duration, num_requests, concurrency) = match s.stage {
                        LoadStage::Rate { rate, duration } => {
                            (Some(rate), Some(duration), None, None)
                        }
                        LoadStage::Concurrent {
                            num_requests,
                            concurrency,
                        } => (None, None, Some(num_requests), Some(concurrency)),
                    };
                    StageMeta {
                        stage_id: s.stage_id,
                        rate,
                        duration,
                        num_requests,
                        concurrency,
                        planned_requests: s.planned_requests,
                        finished_requests: s.summary.load_summary.count,
                        status: s.status,
                        start_time: rfc3339(s.start_time),
                        end_time: rfc3339(s.end_time),
                    }
                })
                .collect(),
            overhead: self.overhead.clone(),
        }
    }

    /// Writes the result folder (see the module docs) and returns the files written.
    pub fn write_to_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| BenchError::io("cannot create directory", dir, e))?;
        let mut written = Vec::new();
        let lifecycle = &self.config.report.request_lifecycle;

        write_text(
            dir,
            "config.yaml",
            &self.config.to_yaml_string()?,
            &mut written,
        )?;
        if lifecycle.summary {
            write_json(dir, SUMMARY_FILE, &self.summary, &mut written)?;
        }
        if lifecycle.per_stage {
            for s in &self.stages {
                write_json(dir, &stage_file(s.stage_id), &s.summary, &mut written)?;
                let br = benchmark_report_v02(self, s);
                let yaml = serde_norway::to_string(&br).map_err(|e| BenchError::Serialize {
                    what: "benchmark report",
                    message: e.to_string(),
                })?;
                write_text(dir, &benchmark_report_file(s.stage_id), &yaml, &mut written)?;
            }
        }
        if lifecycle.per_request {
            let entries: Vec<PerRequest<'_>> = self.records.iter().map(PerRequest::from).collect();
            write_json(dir, PER_REQUEST_FILE, &entries, &mut written)?;
        }
        write_json(dir, RUN_META_FILE, &self.meta(), &mut written)?;
        Ok(written)
    }
}

fn write_json<T: Serialize + ?Sized>(
    dir: &Path,
    name: &str,
    value: &T,
    written: &mut Vec<PathBuf>,
) -> Result<(), BenchError> {
    let path = dir.join(name);
    let file =
        std::fs::File::create(&path).map_err(|e| BenchError::io("cannot write", &path, e))?;
    let mut w = std::io::BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, value).map_err(|e| BenchError::Serialize {
        what: "JSON report",
        message: e.to_string(),
    })?;
    w.flush()
        .map_err(|e| BenchError::io("cannot write", &path, e))?;
    written.push(path);
    Ok(())
}

fn write_text(
    dir: &Path,
    name: &str,
    text: &str,
    written: &mut Vec<PathBuf>,
) -> Result<(), BenchError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| BenchError::io("cannot write", &path, e))?;
    written.push(path);
    Ok(())
}

/// One entry of `per_request_lifecycle_metrics.json` (inference-perf's keys where they exist).
#[derive(Serialize)]
struct PerRequest<'a> {
    stage_id: usize,
    data_index: u64,
    session: Option<u64>,
    scheduled_time: f64,
    start_time: f64,
    end_time: f64,
    info: PerRequestInfo,
    error: Option<&'a crate::metrics::RequestError>,
}

#[derive(Serialize)]
struct PerRequestInfo {
    input_tokens: u64,
    response_metrics: PerRequestResponse,
}

#[derive(Serialize)]
struct PerRequestResponse {
    output_tokens: u64,
    server_usage: Option<serde_json::Value>,
    chunk_times: Vec<f64>,
    chunk_tokens: Vec<u32>,
    invalid_chunks: u32,
}

impl<'a> From<&'a RequestRecord> for PerRequest<'a> {
    fn from(r: &'a RequestRecord) -> Self {
        let server_usage = r.usage.map(|u| {
            let mut m = serde_json::Map::new();
            if let Some(p) = u.prompt_tokens {
                m.insert("prompt_tokens".into(), p.into());
            }
            if let Some(c) = u.completion_tokens {
                m.insert("completion_tokens".into(), c.into());
            }
            if let Some(c) = u.cached_tokens {
                m.insert(
                    "prompt_tokens_details".into(),
                    serde_json::json!({ "cached_tokens": c }),
                );
            }
            serde_json::Value::Object(m)
        });
        PerRequest {
            stage_id: r.stage_id,
            data_index: r.data_index,
            session: r.session,
            scheduled_time: r.scheduled_time,
            start_time: r.start_time,
            end_time: r.end_time,
            info: PerRequestInfo {
                input_tokens: r.input_tokens,
                response_metrics: PerRequestResponse {
                    output_tokens: r.output_tokens,
                    server_usage,
                    chunk_times: r.chunks.iter().map(|c| r.start_time + c.offset()).collect(),
                    chunk_tokens: r.chunks.iter().map(|c| c.tokens).collect(),
                    invalid_chunks: r.invalid_chunks,
                },
            },
            error: r.error.as_ref(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark report v0.2 (llm-d-benchmark)
// ---------------------------------------------------------------------------------------------

/// llm-d-benchmark "benchmark report" v0.2 (the subset a load generator can fill).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchmarkReportV02 {
    /// Always `0.2`.
    pub version: String,
    /// Run identity and time.
    pub run: BrRun,
    /// Stack and workload.
    pub scenario: BrScenario,
    /// Measurements.
    pub results: BrResults,
}

/// `run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrRun {
    /// Unique id of this report.
    pub uid: String,
    /// Id shared by the run's reports.
    pub eid: String,
    /// Stage timing.
    pub time: BrTime,
    /// Free text.
    pub description: String,
    /// Tags.
    pub keywords: Vec<String>,
}

/// `run.time`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrTime {
    /// RFC 3339 start.
    pub start: String,
    /// RFC 3339 end.
    pub end: String,
    /// ISO-8601 duration (`PT20.95S`) of the stage's requests (first start to last end), in
    /// simulated seconds: with a time scale F it is F times the wall-clock span of
    /// `start`..`end`.
    pub duration: String,
}

/// `scenario`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrScenario {
    /// The system under test, as one generic component.
    pub stack: Vec<BrComponent>,
    /// The workload.
    pub load: BrLoad,
}

/// A stack component.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrComponent {
    /// Identity.
    pub metadata: BrComponentMetadata,
    /// Kind and tool.
    pub standardized: BrComponentStandardized,
    /// Raw settings.
    pub native: BrNative,
}

/// Component metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrComponentMetadata {
    /// `0.0.1`.
    pub schema_version: String,
    /// Label (the run label).
    pub label: String,
    /// Hash of the component's settings.
    pub cfg_id: String,
    /// Free text.
    pub description: String,
}

/// Component standardized section (`kind: generic`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrComponentStandardized {
    /// `generic`.
    pub kind: String,
    /// Tool name.
    pub tool: String,
    /// Tool version.
    pub tool_version: String,
}

/// `native`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrNative {
    /// Raw configuration.
    pub config: serde_json::Value,
}

/// `scenario.load`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrLoad {
    /// Identity.
    pub metadata: BrLoadMetadata,
    /// Normalized description.
    pub standardized: BrLoadStandardized,
    /// The config.
    pub native: BrNative,
}

/// `scenario.load.metadata`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrLoadMetadata {
    /// `0.0.1`.
    pub schema_version: String,
    /// Hash of the config.
    pub cfg_id: String,
    /// Free text.
    pub description: String,
}

/// `scenario.load.standardized`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrLoadStandardized {
    /// `llmsched-bench`.
    pub tool: String,
    /// Version.
    pub tool_version: String,
    /// `random` (synthetic tokens).
    pub source: String,
    /// Stage index.
    pub stage: usize,
    /// Prompt length.
    pub input_seq_len: BrSeqLen,
    /// Output length.
    pub output_seq_len: BrSeqLen,
    /// Shared prefix shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<BrPrefix>,
    /// Multi-turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_turn: Option<BrMultiTurn>,
    /// Requested rate (absent for `concurrent` stages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_qps: Option<f64>,
    /// Concurrency level (`concurrent` stages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}

/// A sequence-length description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrSeqLen {
    /// `fixed`, `gaussian`, `uniform` or `other`.
    pub distribution: String,
    /// Value or mean.
    pub value: f64,
    /// Standard deviation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std_dev: Option<f64>,
    /// Minimum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

/// `prefix`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrPrefix {
    /// System prompt length.
    pub prefix_len: BrSeqLen,
    /// Groups.
    pub num_groups: u64,
    /// Prompts per group.
    pub num_users_per_group: u64,
    /// Prefixes per prompt (1).
    pub num_prefixes: u64,
}

/// `multi_turn`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrMultiTurn {
    /// Always true when present.
    pub enabled: bool,
}

/// `results`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrResults {
    /// Client-side performance.
    pub request_performance: BrRequestPerformance,
    /// Cache hit rate reported by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observability: Option<BrObservability>,
}

/// `results.request_performance`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrRequestPerformance {
    /// Aggregate statistics.
    pub aggregate: BrAggregate,
}

/// `aggregate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrAggregate {
    /// Counts and lengths.
    pub requests: BrRequests,
    /// Latencies (absent when every request failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<BrLatency>,
    /// Throughputs (absent when every request failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<BrThroughput>,
}

/// `aggregate.requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrRequests {
    /// All requests.
    pub total: u64,
    /// Failed requests.
    pub failures: u64,
    /// Prompt tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_length: Option<BrStat>,
    /// Output tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_length: Option<BrStat>,
}

/// `aggregate.latency`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrLatency {
    /// TTFT (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_first_token: Option<BrStat>,
    /// NTPOT (s/token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_time_per_output_token: Option<BrStat>,
    /// TPOT (s/token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_per_output_token: Option<BrStat>,
    /// ITL (s/token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inter_token_latency: Option<BrStat>,
    /// Request latency (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_latency: Option<BrStat>,
}

/// `aggregate.throughput`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrThroughput {
    /// Output tokens/s.
    pub output_token_rate: BrStat,
    /// Total tokens/s.
    pub total_token_rate: BrStat,
    /// Input tokens/s.
    pub input_token_rate: BrStat,
    /// Requests/s.
    pub request_rate: BrStat,
}

/// `observability`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrObservability {
    /// One entry for the stack component.
    pub components: Vec<BrComponentObservability>,
}

/// A component's observability.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrComponentObservability {
    /// The component label in `scenario.stack`.
    pub component_label: String,
    /// Aggregates.
    pub aggregate: BrResourceMetrics,
}

/// Resource metrics (only the prefix cache hit rate here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrResourceMetrics {
    /// Cached prompt tokens ÷ prompt tokens, in percent, from response usage.
    pub cache_hit_rate: BrStat,
}

/// A v0.2 statistic (`units` then `mean`, `stddev`, `min`, `p0p1` … `p99p9`, `max`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrStat {
    /// Units: `s`, `s/token`, `count`, `tokens/s`, `queries/s`, `percent`.
    pub units: String,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stddev: Option<f64>,
    /// Minimum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// 0.1th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p0p1: Option<f64>,
    /// 1st percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p1: Option<f64>,
    /// 5th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p5: Option<f64>,
    /// 10th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p10: Option<f64>,
    /// 25th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p25: Option<f64>,
    /// Median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    /// 75th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p75: Option<f64>,
    /// 90th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90: Option<f64>,
    /// 95th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95: Option<f64>,
    /// 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    /// 99.9th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99p9: Option<f64>,
    /// Maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl BrStat {
    /// A statistic from [`Stats`].
    pub fn from_stats(units: &str, s: &Stats) -> Self {
        Self {
            units: units.to_owned(),
            mean: s.mean,
            stddev: s.stddev,
            min: Some(s.min),
            p0p1: s.percentile(0.1),
            p1: s.percentile(1.0),
            p5: s.percentile(5.0),
            p10: s.percentile(10.0),
            p25: s.percentile(25.0),
            p50: s.percentile(50.0),
            p75: s.percentile(75.0),
            p90: s.percentile(90.0),
            p95: s.percentile(95.0),
            p99: s.percentile(99.0),
            p99p9: s.percentile(99.9),
            max: Some(s.max),
        }
    }

    /// A mean-only statistic.
    pub fn mean_only(units: &str, mean: f64) -> Self {
        Self {
            units: units.to_owned(),
            mean,
            ..Self::default()
        }
    }
}

/// A 128-bit FNV-1a style hash as 32 hex digits (stable across builds).
fn hash_hex(text: &str) -> String {
    let h = |seed: u64| {
        text.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        h(0xcbf2_9ce4_8422_2325),
        h(0x8422_2325_cbf2_9ce4)
    )
}

fn seq_len(d: &Distribution) -> BrSeqLen {
    let distribution = match d.kind {
        DistributionType::Fixed => "fixed",
        DistributionType::Normal => "gaussian",
        DistributionType::Uniform => "uniform",
        _ => "other",
    };
    if d.kind == DistributionType::Fixed {
        return BrSeqLen {
            distribution: distribution.to_owned(),
            value: d.mean.max(0.0).trunc(),
            std_dev: None,
            min: None,
            max: None,
        };
    }
    BrSeqLen {
        distribution: distribution.to_owned(),
        value: d.mean.max(0.0),
        std_dev: Some(d.effective_std_dev().max(0.0)),
        min: Some(d.min.max(0)),
        max: Some(d.max.max(1)),
    }
}

fn sum_seq_len(a: &Distribution, b: &Distribution) -> BrSeqLen {
    if a.kind == DistributionType::Fixed && b.kind == DistributionType::Fixed {
        return BrSeqLen {
            distribution: "fixed".to_owned(),
            value: a.mean.max(0.0).trunc() + b.mean.max(0.0).trunc(),
            std_dev: None,
            min: None,
            max: None,
        };
    }
    let std = (a.effective_std_dev().powi(2)
        * f64::from(u8::from(a.kind != DistributionType::Fixed))
        + b.effective_std_dev().powi(2) * f64::from(u8::from(b.kind != DistributionType::Fixed)))
    .sqrt();
    BrSeqLen {
        distribution: "other".to_owned(),
        value: a.mean.max(0.0) + b.mean.max(0.0),
        std_dev: Some(std),
        min: Some(a.min.max(0) + b.min.max(0)),
        max: Some((a.max + b.max).max(1)),
    }
}

/// Builds the v0.2 benchmark report of one stage.
pub fn benchmark_report_v02(run: &RunResult, stage: &StageResult) -> BenchmarkReportV02 {
    let cfg: &BenchConfig = &run.config;
    let config_json = serde_json::to_value(cfg).unwrap_or(serde_json::Value::Null);
    let cfg_id = hash_hex(&config_json.to_string());
    let sp = cfg.data.shared_prefix.clone().unwrap_or_default();
    let sys = sp.system_prompt_len.resolve(None);
    let question = sp.question_len.resolve(sp.question_distribution.as_ref());
    let output = sp.output_len.resolve(sp.output_distribution.as_ref());
    let server_config = serde_json::json!({
        "base_url": cfg.server.as_ref().map(|s| s.base_url.clone()),
        "model_name": run.model,
    });
    let summary = &stage.summary;
    let succ = &summary.successes;
    let all_failed = succ.count == 0;
    let lat = &succ.latency;
    let stat = |units: &str, s: &Option<Stats>| s.as_ref().map(|s| BrStat::from_stats(units, s));
    let sim_duration = summary.benchmark_time_seconds;
    let multi_turn = sp
        .enable_multi_turn_chat
        .then_some(BrMultiTurn { enabled: true });
    let prefix_len = match &sp.system_prompt_len {
        LengthSpec::Fixed(n) => BrSeqLen {
            distribution: "fixed".into(),
            value: *n as f64,
            std_dev: None,
            min: None,
            max: None,
        },
        LengthSpec::Dist(d) => seq_len(d),
    };
    let cache_reported = run
        .records
        .iter()
        .any(|r| r.stage_id == stage.stage_id && r.usage.and_then(|u| u.cached_tokens).is_some());
    let cache = summary
        .cached_prompt_ratio()
        .filter(|_| cache_reported)
        .map(|r| BrObservability {
            components: vec![BrComponentObservability {
                component_label: run.label.clone(),
                aggregate: BrResourceMetrics {
                    cache_hit_rate: BrStat::mean_only("percent", r * 100.0),
                },
            }],
        });

    BenchmarkReportV02 {
        version: "0.2".to_owned(),
        run: BrRun {
            uid: format!("{:032x}", rand::random::<u128>()),
            eid: run.run_id.clone(),
            time: BrTime {
                start: rfc3339(stage.start_time),
                end: rfc3339(stage.end_time),
                duration: format!("PT{sim_duration}S"),
            },
            description: format!(
                "llmsched bench run '{}', stage {}",
                run.label, stage.stage_id
            ),
            keywords: vec!["llmsched".to_owned(), run.label.clone()],
        },
        scenario: BrScenario {
            stack: vec![BrComponent {
                metadata: BrComponentMetadata {
                    schema_version: "0.0.1".to_owned(),
                    label: run.label.clone(),
                    cfg_id: hash_hex(&server_config.to_string()),
                    description: "OpenAI-compatible endpoint under test".to_owned(),
                },
                standardized: BrComponentStandardized {
                    kind: "generic".to_owned(),
                    tool: "openai-compatible-endpoint".to_owned(),
                    tool_version: "unknown".to_owned(),
                },
                native: BrNative {
                    config: server_config,
                },
            }],
            load: BrLoad {
                metadata: BrLoadMetadata {
                    schema_version: "0.0.1".to_owned(),
                    cfg_id,
                    description: format!("time scale {}", run.time_scale),
                },
                standardized: BrLoadStandardized {
                    tool: TOOL.to_owned(),
                    tool_version: env!("CARGO_PKG_VERSION").to_owned(),
                    source: "random".to_owned(),
                    stage: stage.stage_id,
                    input_seq_len: sum_seq_len(&sys, &question),
                    output_seq_len: seq_len(&output),
                    prefix: Some(BrPrefix {
                        prefix_len,
                        num_groups: sp.num_groups,
                        num_users_per_group: sp.num_prompts_per_group,
                        num_prefixes: 1,
                    }),
                    multi_turn,
                    rate_qps: match stage.stage {
                        LoadStage::Rate { rate, .. } => Some(rate),
                        LoadStage::Concurrent { .. } => None,
                    },
                    concurrency: stage.stage.concurrency(),
                },
                native: BrNative {
                    config: config_json,
                },
            },
        },
        results: BrResults {
            request_performance: BrRequestPerformance {
                aggregate: BrAggregate {
                    requests: BrRequests {
                        total: summary.load_summary.count,
                        failures: summary.failures.count,
                        input_length: stat("count", &succ.prompt_tokens.stats),
                        output_length: stat("count", &succ.output_len),
                    },
                    latency: (!all_failed).then(|| BrLatency {
                        time_to_first_token: stat("s", &lat.time_to_first_token),
                        normalized_time_per_output_token: stat(
                            "s/token",
                            &lat.normalized_time_per_output_token,
                        ),
                        time_per_output_token: stat("s/token", &lat.time_per_output_token),
                        inter_token_latency: stat("s/token", &lat.inter_token_latency),
                        request_latency: stat("s", &lat.request_latency),
                    }),
                    throughput: (!all_failed).then(|| BrThroughput {
                        output_token_rate: BrStat::mean_only(
                            "tokens/s",
                            succ.throughput.output_tokens_per_sec,
                        ),
                        total_token_rate: BrStat::mean_only(
                            "tokens/s",
                            succ.throughput.total_tokens_per_sec,
                        ),
                        input_token_rate: BrStat::mean_only(
                            "tokens/s",
                            succ.throughput.input_tokens_per_sec,
                        ),
                        request_rate: BrStat::mean_only(
                            "queries/s",
                            succ.throughput.requests_per_sec,
                        ),
                    }),
                },
            },
            observability: cache,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Reading result folders
// ---------------------------------------------------------------------------------------------

/// A result folder read back from disk.
#[derive(Debug, Clone)]
pub struct SavedRun {
    /// Label: `bench_run.json`'s label, else the folder name.
    pub label: String,
    /// The folder.
    pub dir: PathBuf,
    /// `bench_run.json`, when present (llmsched runs).
    pub meta: Option<RunMeta>,
    /// `summary_lifecycle_metrics.json`, when present.
    pub summary: Option<LifecycleSummary>,
    /// `(stage index, stage_N_lifecycle_metrics.json)`, sorted by index.
    pub stages: Vec<(usize, LifecycleSummary)>,
}

impl SavedRun {
    /// Reads a result folder written by `llmsched bench` or inference-perf.
    pub fn load(dir: &Path) -> Result<Self, BenchError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| BenchError::io("cannot read result folder", dir, e))?;
        let mut stages = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| BenchError::io("cannot read result folder", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(idx) = name
                .strip_prefix("stage_")
                .and_then(|r| r.strip_suffix("_lifecycle_metrics.json"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            stages.push((idx, read_json::<LifecycleSummary>(&entry.path())?));
        }
        stages.sort_by_key(|(i, _)| *i);
        let summary_path = dir.join(SUMMARY_FILE);
        let summary = if summary_path.exists() {
            Some(read_json::<LifecycleSummary>(&summary_path)?)
        } else {
            None
        };
        let meta_path = dir.join(RUN_META_FILE);
        let meta = if meta_path.exists() {
            Some(read_json::<RunMeta>(&meta_path)?)
        } else {
            None
        };
        if summary.is_none() && stages.is_empty() {
            return Err(BenchError::ResultFormat {
                path: dir.to_path_buf(),
                message: format!("no {SUMMARY_FILE} or stage_N_lifecycle_metrics.json found"),
            });
        }
        let label = meta.as_ref().map(|m| m.label.clone()).unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string())
        });
        Ok(Self {
            label,
            dir: dir.to_path_buf(),
            meta,
            summary,
            stages,
        })
    }

    /// The summary, or the single stage when the folder has only one.
    pub fn overall(&self) -> Option<&LifecycleSummary> {
        self.summary
            .as_ref()
            .or_else(|| (self.stages.len() == 1).then(|| &self.stages[0].1))
    }

    /// The metrics of stage `i`.
    pub fn stage(&self, i: usize) -> Option<&LifecycleSummary> {
        self.stages.iter().find(|(j, _)| *j == i).map(|(_, s)| s)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("cannot read", path, e))?;
    serde_json::from_str(&text).map_err(|e| BenchError::ResultFormat {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
