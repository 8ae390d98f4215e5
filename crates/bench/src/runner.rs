//! Running a benchmark.
//!
//! [`run`] generates the prompts, then drives the stages on one dedicated OS thread with a
//! single-threaded tokio runtime (so the generator's CPU cost is measurable and it cannot
//! steal cores from a simulator running in the same process), and summarizes the records.
//!
//! Per stage, as inference-perf's multi-process load generator does: the arrival schedule is
//! drawn ([`crate::schedule`]); request `i` uses prompt `i mod N` (every stage starts at
//! prompt 0); each request is sent at its scheduled time, or as soon as an in-flight slot is
//! free when a limit applies; the stage ends when every request has finished; the next stage
//! starts `load.interval` seconds later.
//!
//! **Time scale.** With `time_scale = F`, the schedule is compressed: rates × F, durations,
//! intervals and request timeouts ÷ F. Every measured duration is multiplied by F before the
//! metrics are computed, so reports are in the workload's own (simulated) seconds. Pair it with
//! `llmsched sim --time-scale F`, which runs every latency F× faster and reports simulated
//! seconds: the server then sees the same load shape F× faster, and the metrics match a run at
//! scale 1 as long as neither side is CPU-bound.
//!
//! **Multi-turn chat** (`data.shared_prefix.enable_multi_turn_chat`), as inference-perf's code
//! implements it: there is one session per prompt (`user_session_<n>`); request `i` belongs to
//! session `i mod N` and re-asks that session's prompt. A session's requests run one at a time
//! in order (a request waits for the previous turn before it is sent; the wait is not part of
//! its latency). Completions send `context + " " + prompt`, where `context` starts empty and
//! after each successful turn becomes that turn's prompt, a space and the response text; a
//! failed turn leaves the context unchanged. Sessions are reset at every stage. With
//! `api.type: chat` the history is sent as alternating user/assistant messages instead
//! (inference-perf sends multi-turn requests to the completions endpoint regardless).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{HttpTarget, ReadOptions};
use crate::config::{ApiType, BenchConfig, LoadStage, LoadType, ResponseFormat};
use crate::datagen::{PromptSet, generate_shared_prefix};
use crate::error::BenchError;
use crate::metrics::{
    LifecycleSummary, RequestRecord, StageLoad, SummaryOptions, summarize_requests,
};
use crate::overhead::{GeneratorOverhead, thread_cpu_seconds};
use crate::schedule::stage_offsets;
use crate::tokens::TokenCounter;

/// Seed used when neither `--seed`, `data.shared_prefix.seed` nor `load.base_seed` is set,
/// so that two runs (say, scheduler and round robin) see identical prompts and arrivals.
pub const DEFAULT_SEED: u64 = 42;

/// Progress notifications, delivered on the generator thread.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// A stage begins.
    StageStarted {
        /// Stage index.
        stage_id: usize,
        /// Number of stages.
        stages: usize,
        /// Requests the stage will send.
        total_requests: u64,
        /// Short description, e.g. `rate 10 req/s for 20 s`.
        description: String,
    },
    /// A request of the current stage finished.
    RequestFinished {
        /// Stage index.
        stage_id: usize,
        /// Finished so far (successes and failures).
        finished: u64,
        /// Failed so far.
        failed: u64,
        /// Requests in the stage.
        total_requests: u64,
    },
    /// A stage ended.
    StageFinished {
        /// Stage index.
        stage_id: usize,
        /// Requests finished.
        finished: u64,
        /// Requests failed.
        failed: u64,
        /// True when the run was cancelled during the stage.
        interrupted: bool,
    },
}

/// Receives [`ProgressEvent`]s.
pub type ProgressCallback = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// How to run a config.
#[derive(Clone)]
pub struct RunOptions {
    /// Name of the run in reports, tables and plots.
    pub label: String,
    /// Time compression factor F (see the module docs); 1 runs in real time.
    pub time_scale: f64,
    /// Seed for prompts and arrivals (overrides the config's seeds).
    pub seed: Option<u64>,
    /// Tokenizer for prompts and output counting.
    pub tokenizer: TokenCounter,
    /// Progress sink; `None` is quiet.
    pub progress: Option<ProgressCallback>,
    /// Cancels the run; finished requests are kept and reported.
    pub cancel: Option<CancellationToken>,
    /// Cap on requests in flight for `constant` / `poisson` stages (overrides the config's
    /// `num_workers × worker_max_concurrency`).
    pub max_in_flight: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            label: "run".to_owned(),
            time_scale: 1.0,
            seed: None,
            tokenizer: TokenCounter::default(),
            progress: None,
            cancel: None,
            max_in_flight: None,
        }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("label", &self.label)
            .field("time_scale", &self.time_scale)
            .field("seed", &self.seed)
            .field("tokenizer", &self.tokenizer.name())
            .field("progress", &self.progress.is_some())
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    /// Every request finished.
    Completed,
    /// The run was cancelled during the stage.
    Interrupted,
}

/// One stage's outcome.
#[derive(Debug, Clone)]
pub struct StageResult {
    /// Stage index.
    pub stage_id: usize,
    /// The stage as configured.
    pub stage: LoadStage,
    /// How it ended.
    pub status: StageStatus,
    /// Wall-clock start.
    pub start_time: SystemTime,
    /// Wall-clock end.
    pub end_time: SystemTime,
    /// Requests scheduled.
    pub planned_requests: u64,
    /// Metrics of the stage's requests (`stage_N_lifecycle_metrics.json`).
    pub summary: LifecycleSummary,
}

/// A finished run, in memory.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The run's label.
    pub label: String,
    /// Random id shared by the run's benchmark reports (`run.eid`).
    pub run_id: String,
    /// The effective config (overrides applied).
    pub config: BenchConfig,
    /// Model name sent in requests (configured or discovered).
    pub model: String,
    /// Time scale F.
    pub time_scale: f64,
    /// Seed of the prompts.
    pub prompt_seed: u64,
    /// Seed of the arrival schedule.
    pub arrival_seed: u64,
    /// Tokenizer description.
    pub tokenizer: String,
    /// Wall-clock start of the first stage.
    pub started_at: SystemTime,
    /// Wall-clock end of the last stage.
    pub ended_at: SystemTime,
    /// True when the run was cancelled.
    pub interrupted: bool,
    /// Per-stage results, in order (stages not reached are absent).
    pub stages: Vec<StageResult>,
    /// Metrics of all requests (`summary_lifecycle_metrics.json`).
    pub summary: LifecycleSummary,
    /// Every request, in completion order.
    pub records: Vec<RequestRecord>,
    /// The generator's own cost.
    pub overhead: GeneratorOverhead,
}

/// Runs `config` (see the module docs) and returns the measurements.
pub async fn run(mut config: BenchConfig, opts: RunOptions) -> Result<RunResult, BenchError> {
    config.validate()?;
    config.check_runnable()?;
    let stages = config.stages()?;
    if !(opts.time_scale > 0.0 && opts.time_scale.is_finite()) {
        return Err(BenchError::Usage(format!(
            "--time-scale must be a positive number, got {}",
            opts.time_scale
        )));
    }
    let shared_prefix = config.data.shared_prefix.clone().unwrap_or_default();
    let prompt_seed = opts.seed.or(shared_prefix.seed).unwrap_or(DEFAULT_SEED);
    let arrival_seed = opts.seed.or(config.load.base_seed).unwrap_or(DEFAULT_SEED);
    let target = HttpTarget::new(&config)?;

    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_config = config.clone();
    let thread_opts = opts.clone();
    std::thread::Builder::new()
        .name("llmsched-bench-loadgen".to_owned())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(generate(
                    thread_config,
                    thread_opts,
                    stages,
                    target,
                    prompt_seed,
                    arrival_seed,
                )),
                Err(e) => Err(BenchError::Runtime(format!(
                    "cannot start tokio runtime: {e}"
                ))),
            };
            // The receiver is gone only if the caller stopped waiting; nothing to do then.
            let _ = tx.send(result);
        })
        .map_err(|e| BenchError::Runtime(format!("cannot spawn the load generator thread: {e}")))?;
    let raw = rx.await.map_err(|_| {
        BenchError::Runtime("the load generator thread stopped unexpectedly".into())
    })??;

    let lifecycle = &config.report.request_lifecycle;
    let sopts = SummaryOptions {
        percentiles: lifecycle.percentiles.clone(),
        use_server_output_tokens: lifecycle.use_server_output_tokens,
        max_error_messages: lifecycle.max_error_messages,
    };
    let stages = raw
        .stages
        .into_iter()
        .map(|s| {
            let load = StageLoad {
                rate: s.stage.requested_rate(),
                concurrency: s.stage.concurrency(),
            };
            let summary = summarize_requests(
                raw.records.iter().filter(|r| r.stage_id == s.stage_id),
                &sopts,
                Some(load),
            );
            StageResult {
                stage_id: s.stage_id,
                stage: s.stage,
                status: s.status,
                start_time: s.start_time,
                end_time: s.end_time,
                planned_requests: s.planned_requests,
                summary,
            }
        })
        .collect::<Vec<_>>();
    let summary = summarize_requests(raw.records.iter(), &sopts, None);
    // Record what was used, so that `config.yaml` reproduces the run.
    if let Some(server) = config.server.as_mut() {
        server.model_name = Some(raw.model.clone());
    }
    if let Some(sp) = config.data.shared_prefix.as_mut() {
        sp.seed = Some(prompt_seed);
    }
    config.load.base_seed = Some(arrival_seed);
    Ok(RunResult {
        label: opts.label,
        run_id: format!("{:032x}", rand::random::<u128>()),
        config,
        model: raw.model,
        time_scale: opts.time_scale,
        prompt_seed,
        arrival_seed,
        tokenizer: opts.tokenizer.name(),
        started_at: stages.first().map_or(raw.started_at, |s| s.start_time),
        ended_at: stages.last().map_or(raw.started_at, |s| s.end_time),
        interrupted: raw.interrupted,
        stages,
        summary,
        records: raw.records,
        overhead: raw.overhead,
    })
}

struct RawStage {
    stage_id: usize,
    stage: LoadStage,
    status: StageStatus,
    start_time: SystemTime,
    end_time: SystemTime,
    planned_requests: u64,
}

struct RawRun {
    model: String,
    started_at: SystemTime,
    stages: Vec<RawStage>,
    records: Vec<RequestRecord>,
    interrupted: bool,
    overhead: GeneratorOverhead,
}

/// State shared by all request tasks of a run.
struct Shared {
    target: HttpTarget,
    api: ApiType,
    streaming: bool,
    model: String,
    prompts: PromptSet,
    /// Pre-serialized bodies, one per prompt (empty for multi-turn, built per request).
    bodies: Vec<Bytes>,
    multi_turn: bool,
    ignore_eos: bool,
    response_format: Option<serde_json::Value>,
    session_header: Option<HeaderName>,
    counter: TokenCounter,
    time_scale: f64,
    epoch: Instant,
    request_timeout: Option<Duration>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    chunks: AtomicU64,
    lags_ms: StdMutex<Vec<f64>>,
}

impl Shared {
    /// Simulated seconds since the run started.
    fn sim(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64() * self.time_scale
    }
}

/// A multi-turn session's history.
#[derive(Default)]
struct Session {
    /// Completions context (`prompt response prompt response ...`).
    context: String,
    /// Chat: assistant replies of the finished turns.
    replies: Vec<String>,
}

async fn generate(
    config: BenchConfig,
    opts: RunOptions,
    stages: Vec<LoadStage>,
    target: HttpTarget,
    prompt_seed: u64,
    arrival_seed: u64,
) -> Result<RawRun, BenchError> {
    let shared_prefix = config.data.shared_prefix.clone().unwrap_or_default();
    let prompts = generate_shared_prefix(&shared_prefix, prompt_seed, &opts.tokenizer)?;
    let server = config
        .server
        .as_ref()
        .ok_or_else(|| BenchError::invalid("server.base_url", "no server configured"))?;
    let model = match &server.model_name {
        Some(m) => m.clone(),
        None => target.discover_model().await?,
    };
    let response_format = config
        .api
        .response_format
        .as_ref()
        .map(response_format_json);
    let multi_turn = shared_prefix.enable_multi_turn_chat;
    let mut shared = Shared {
        target,
        api: config.api.kind,
        streaming: config.api.streaming,
        model,
        prompts,
        bodies: Vec::new(),
        multi_turn,
        ignore_eos: server.ignore_eos,
        response_format,
        session_header: match &config.api.session_id_header_key {
            Some(k) => Some(HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                BenchError::invalid("api.session_id_header_key", "not a valid header name")
            })?),
            None => None,
        },
        counter: opts.tokenizer.clone(),
        time_scale: opts.time_scale,
        epoch: Instant::now(),
        request_timeout: config
            .load
            .request_timeout
            .map(|t| Duration::from_secs_f64(t / opts.time_scale)),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        chunks: AtomicU64::new(0),
        lags_ms: StdMutex::new(Vec::new()),
    };
    if !multi_turn {
        let bodies: Vec<Bytes> = shared
            .prompts
            .prompts
            .iter()
            .map(|p| shared.body(&p.text, p.max_tokens, &[]))
            .collect();
        shared.bodies = bodies;
    }
    let shared = Arc::new(shared);
    let mut arrivals = StdRng::seed_from_u64(arrival_seed);
    let cap = opts.max_in_flight.or_else(|| config.load.max_in_flight());

    let cpu_start = thread_cpu_seconds();
    let wall_start = Instant::now();
    let started_at = SystemTime::now();
    let mut records = Vec::new();
    let mut raw_stages = Vec::new();
    let mut interrupted = false;
    let n_stages = stages.len();
    for (stage_id, stage) in stages.iter().enumerate() {
        if is_cancelled(&opts.cancel) {
            interrupted = true;
            break;
        }
        let offsets: Vec<f64> = stage_offsets(config.load.kind, stage, &mut arrivals)
            .into_iter()
            .map(|o| o / opts.time_scale)
            .collect();
        let stage_cap = match stage {
            LoadStage::Concurrent { concurrency, .. } => {
                Some(cap.map_or(*concurrency, |c| c.min(*concurrency)))
            }
            LoadStage::Rate { .. } => cap,
        };
        let description = describe_stage(config.load.kind, stage);
        tracing::info!(stage = stage_id, %description, requests = offsets.len(), "stage started");
        let start_time = SystemTime::now();
        let (stage_records, stage_interrupted) = run_stage(
            &shared,
            stage_id,
            n_stages,
            offsets,
            stage_cap,
            description,
            &opts,
        )
        .await;
        let planned = stage.num_requests();
        tracing::info!(
            stage = stage_id,
            finished = stage_records.len(),
            interrupted = stage_interrupted,
            "stage finished"
        );
        records.extend(stage_records);
        raw_stages.push(RawStage {
            stage_id,
            stage: *stage,
            status: if stage_interrupted {
                StageStatus::Interrupted
            } else {
                StageStatus::Completed
            },
            start_time,
            end_time: SystemTime::now(),
            planned_requests: planned,
        });
        if stage_interrupted {
            interrupted = true;
            break;
        }
        if stage_id + 1 < n_stages && config.load.interval > 0.0 {
            let pause = tokio::time::sleep(Duration::from_secs_f64(
                config.load.interval / opts.time_scale,
            ));
            tokio::select! {
                () = pause => {}
                () = cancelled(&opts.cancel) => { interrupted = true; break; }
            }
        }
    }
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu = match (cpu_start, thread_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let lags = std::mem::take(
        &mut *shared
            .lags_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    let overhead = GeneratorOverhead::finish(
        cpu,
        wall,
        records.len() as u64,
        shared.chunks.load(Ordering::Relaxed),
        shared.max_in_flight.load(Ordering::Relaxed),
        lags,
    );
    Ok(RawRun {
        model: shared.model.clone(),
        started_at,
        stages: raw_stages,
        records,
        interrupted,
        overhead,
    })
}

fn describe_stage(kind: LoadType, stage: &LoadStage) -> String {
    match *stage {
        LoadStage::Rate { rate, duration } => {
            format!("{} {rate} req/s for {duration} s", kind.as_str())
        }
        LoadStage::Concurrent {
            num_requests,
            concurrency,
        } => format!("{num_requests} requests, concurrency {concurrency}"),
    }
}

async fn run_stage(
    shared: &Arc<Shared>,
    stage_id: usize,
    n_stages: usize,
    offsets: Vec<f64>,
    cap: Option<u64>,
    description: String,
    opts: &RunOptions,
) -> (Vec<RequestRecord>, bool) {
    let total = offsets.len() as u64;
    notify(
        &opts.progress,
        &ProgressEvent::StageStarted {
            stage_id,
            stages: n_stages,
            total_requests: total,
            description,
        },
    );
    let sessions = shared.multi_turn.then(|| {
        Arc::new(
            (0..shared.prompts.len())
                .map(|_| Mutex::new(Session::default()))
                .collect::<Vec<_>>(),
        )
    });
    let sem = cap.map(|c| {
        Arc::new(Semaphore::new(
            usize::try_from(c)
                .unwrap_or(Semaphore::MAX_PERMITS)
                .min(Semaphore::MAX_PERMITS),
        ))
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dispatcher = tokio::spawn(dispatch(
        shared.clone(),
        stage_id,
        offsets,
        sem,
        sessions,
        tx,
    ));

    let mut records = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut failed = 0u64;
    let mut interrupted = false;
    while (records.len() as u64) < total {
        tokio::select! {
            biased;
            () = cancelled(&opts.cancel) => { interrupted = true; break; }
            rec = rx.recv() => match rec {
                Some(r) => {
                    let r: RequestRecord = r;
                    failed += u64::from(r.error.is_some());
                    records.push(r);
                    notify(&opts.progress, &ProgressEvent::RequestFinished {
                        stage_id,
                        finished: records.len() as u64,
                        failed,
                        total_requests: total,
                    });
                }
                None => break,
            },
        }
    }
    if interrupted {
        // Dropping the dispatcher drops its JoinSet, which aborts the requests in flight.
        dispatcher.abort();
    }
    if let Err(e) = dispatcher.await
        && !e.is_cancelled()
    {
        tracing::error!(error = %e, "request dispatcher failed");
    }
    // Requests that finished while the stage was being torn down.
    while let Ok(r) = rx.try_recv() {
        failed += u64::from(r.error.is_some());
        records.push(r);
    }
    notify(
        &opts.progress,
        &ProgressEvent::StageFinished {
            stage_id,
            finished: records.len() as u64,
            failed,
            interrupted,
        },
    );
    (records, interrupted)
}

async fn dispatch(
    shared: Arc<Shared>,
    stage_id: usize,
    offsets: Vec<f64>,
    sem: Option<Arc<Semaphore>>,
    sessions: Option<Arc<Vec<Mutex<Session>>>>,
    tx: mpsc::UnboundedSender<RequestRecord>,
) {
    let stage_start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut lags = Vec::with_capacity(offsets.len());
    for (i, off) in offsets.iter().enumerate() {
        let scheduled = stage_start + Duration::from_secs_f64(*off);
        // Only sleep for future times: a past-due sleep (or an available permit) would still
        // go through the scheduler queue, behind every stream that is ready, and dispatching
        // a burst would cost one full queue cycle per request.
        if Instant::now() < scheduled {
            tokio::time::sleep_until(scheduled).await;
        }
        lags.push(
            Instant::now()
                .saturating_duration_since(scheduled)
                .as_secs_f64()
                * 1e3,
        );
        let permit = match &sem {
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => match s.clone().acquire_owned().await {
                    Ok(p) => Some(p),
                    // Closed: never happens, the semaphore is private to the stage.
                    Err(_) => break,
                },
            },
            None => None,
        };
        tasks.spawn(request_task(
            shared.clone(),
            stage_id,
            i as u64,
            scheduled,
            sessions.clone(),
            tx.clone(),
            permit,
        ));
        while tasks.try_join_next().is_some() {}
    }
    drop(tx);
    shared
        .lags_ms
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(lags);
    while tasks.join_next().await.is_some() {}
}

async fn request_task(
    shared: Arc<Shared>,
    stage_id: usize,
    data_index: u64,
    scheduled: Instant,
    sessions: Option<Arc<Vec<Mutex<Session>>>>,
    tx: mpsc::UnboundedSender<RequestRecord>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let n = shared.prompts.len() as u64;
    let idx = (data_index % n.max(1)) as usize;
    let Some(prompt) = shared.prompts.prompts.get(idx) else {
        return;
    };
    let header = shared.session_header.as_ref().and_then(|h| {
        HeaderValue::from_str(&format!("user_session_{}", prompt.origin_index))
            .ok()
            .map(|v| (h.clone(), v))
    });
    let read = |keep_text: bool| ReadOptions {
        streaming: shared.streaming,
        counter: &shared.counter,
        keep_text,
        timeout: shared.request_timeout,
        time_scale: shared.time_scale,
    };

    let track = |delta_in: bool| {
        if delta_in {
            let now = shared.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            shared.max_in_flight.fetch_max(now, Ordering::Relaxed);
        } else {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    };

    let (ex, client_tokens, request_bytes, session) = match &sessions {
        Some(sessions) => {
            let Some(lock) = sessions.get(idx) else {
                return;
            };
            let mut state = lock.lock().await;
            let (body, client_tokens) =
                shared.multi_turn_body(&prompt.text, prompt.max_tokens, &state);
            let bytes = body.len() as u64;
            track(true);
            let ex = shared
                .target
                .send(shared.api, body, header.as_ref(), read(true))
                .await;
            track(false);
            if ex.error.is_none() {
                let reply = ex.text.clone().unwrap_or_default();
                match shared.api {
                    ApiType::Chat => state.replies.push(reply),
                    _ => {
                        let wire = multi_turn_prompt(&state.context, &prompt.text);
                        state.context = format!("{wire} {reply}");
                    }
                }
            }
            (ex, client_tokens, bytes, Some(idx as u64))
        }
        None => {
            let Some(body) = shared.bodies.get(idx).cloned() else {
                return;
            };
            let bytes = body.len() as u64;
            track(true);
            let ex = shared
                .target
                .send(shared.api, body, header.as_ref(), read(false))
                .await;
            track(false);
            (ex, prompt.input_tokens, bytes, None)
        }
    };
    shared
        .chunks
        .fetch_add(ex.chunks.len() as u64, Ordering::Relaxed);
    let input_tokens = if ex.error.is_some() {
        0
    } else {
        ex.usage
            .and_then(|u| u.prompt_tokens)
            .unwrap_or(client_tokens)
    };
    let record = RequestRecord {
        stage_id,
        data_index,
        session,
        scheduled_time: shared.sim(scheduled),
        start_time: shared.sim(ex.start),
        end_time: shared.sim(ex.end),
        streamed: shared.streaming,
        chunks: ex.chunks,
        input_tokens,
        output_tokens: ex.output_tokens,
        usage: ex.usage,
        request_bytes,
        invalid_chunks: ex.invalid_chunks,
        error: ex.error,
    };
    // The receiver is gone only when the stage was cancelled.
    let _ = tx.send(record);
}

/// Completions prompt of a multi-turn request: `context + " " + prompt`.
fn multi_turn_prompt(context: &str, prompt: &str) -> String {
    let mut s = String::with_capacity(context.len() + 1 + prompt.len());
    s.push_str(context);
    s.push(' ');
    s.push_str(prompt);
    s
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct WireBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Message<'a>>>,
    max_tokens: u64,
    ignore_eos: bool,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a serde_json::Value>,
}

impl Shared {
    /// The request body for `prompt`; for chat, `history` holds earlier (user, assistant)
    /// turns.
    fn body(&self, prompt: &str, max_tokens: u64, history: &[(&str, &str)]) -> Bytes {
        let (prompt_field, messages) = match self.api {
            ApiType::Chat => {
                let mut m = Vec::with_capacity(history.len() * 2 + 1);
                for (u, a) in history {
                    m.push(Message {
                        role: "user",
                        content: u,
                    });
                    m.push(Message {
                        role: "assistant",
                        content: a,
                    });
                }
                m.push(Message {
                    role: "user",
                    content: prompt,
                });
                (None, Some(m))
            }
            _ => (Some(prompt), None),
        };
        let body = WireBody {
            model: &self.model,
            prompt: prompt_field,
            messages,
            max_tokens,
            ignore_eos: self.ignore_eos,
            stream: self.streaming,
            stream_options: self.streaming.then_some(StreamOptions {
                include_usage: true,
            }),
            response_format: self.response_format.as_ref(),
        };
        // Serializing plain strings and numbers into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// Body and client-side input token count of a multi-turn request.
    fn multi_turn_body(&self, prompt: &str, max_tokens: u64, state: &Session) -> (Bytes, u64) {
        match self.api {
            ApiType::Chat => {
                let history: Vec<(&str, &str)> =
                    state.replies.iter().map(|r| (prompt, r.as_str())).collect();
                let tokens = self.counter.count(prompt) * (history.len() as u64 + 1)
                    + state
                        .replies
                        .iter()
                        .map(|r| self.counter.count(r))
                        .sum::<u64>();
                (self.body(prompt, max_tokens, &history), tokens)
            }
            _ => {
                let wire = multi_turn_prompt(&state.context, prompt);
                let tokens = self.counter.count(&wire);
                (self.body(&wire, max_tokens, &[]), tokens)
            }
        }
    }
}

fn response_format_json(rf: &ResponseFormat) -> serde_json::Value {
    if rf.kind == "json_object" {
        return serde_json::json!({"type": "json_object"});
    }
    let schema = rf
        .json_schema
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "type": "json_schema",
        "json_schema": {"name": rf.name, "schema": schema},
    })
}

fn notify(progress: &Option<ProgressCallback>, event: &ProgressEvent) {
    if let Some(cb) = progress {
        cb(event);
    }
}

fn is_cancelled(token: &Option<CancellationToken>) -> bool {
    token.as_ref().is_some_and(CancellationToken::is_cancelled)
}

async fn cancelled(token: &Option<CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_turn_prompt_grows_like_inference_perf() {
        // Round 0: context "" → " P"; after reply R0 the context is " P R0".
        let p0 = multi_turn_prompt("", "P");
        assert_eq!(p0, " P");
        let ctx = format!("{p0} R0");
        assert_eq!(multi_turn_prompt(&ctx, "P"), " P R0 P");
    }
}
