//! The `llmsched bench` command line.
//!
//! ```text
//! llmsched bench --config FILE [--base-url URL] [--output DIR] [--label NAME]
//!                [--time-scale F] [--seed N] [--tokenizer FILE] [--max-in-flight N]
//!                [--per-request] [--no-progress]
//! llmsched bench run ...                       (same as above)
//! llmsched bench compare DIR_A DIR_B [--labels A,B] [--stage N] [--markdown] [--output FILE]
//! llmsched bench plot DIR... --output FILE.svg [--labels A,B,...]
//! llmsched bench selftest [--streams N] [--tokens N] [--itl-ms X] [--ttft-ms X]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::compare::{Comparison, fmt_num};
use crate::config::BenchConfig;
use crate::error::BenchError;
use crate::fake_server::{FakeServer, FakeServerConfig};
use crate::plot::{PlotSeries, write_svg};
use crate::progress::terminal_progress;
use crate::report::SavedRun;
use crate::runner::{RunOptions, RunResult, StageStatus, run as run_benchmark};
use crate::tokens::TokenCounter;

/// `llmsched bench`: run an inference-perf config, or compare / plot result folders.
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    /// What to do (default: run the config given with --config).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Run options (when no subcommand is given).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands of `llmsched bench`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Run a benchmark (the default when --config is given).
    Run(RunArgs),
    /// Compare two result folders in the seed guide's table form.
    Compare(CompareArgs),
    /// Plot TTFT and output throughput against request rate (SVG).
    Plot(PlotArgs),
    /// Measure the load generator's own overhead against a built-in fake server.
    Selftest(SelftestArgs),
}

/// Options of a benchmark run.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// inference-perf config file (YAML).
    #[arg(long, short = 'c', value_name = "FILE", required = true)]
    pub config: Option<PathBuf>,
    /// Override server.base_url (e.g. http://127.0.0.1:8080).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Result folder [default: reports-YYYYMMDD-HHMMSS].
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Name of the run in tables and plots [default: the result folder's name].
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,
    /// Compress time by F: rates × F, durations and timeouts ÷ F, measurements × F.
    /// Pair with `llmsched sim --time-scale F`.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seed for prompts and arrivals [default: the config's seeds, else 42].
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Hugging Face tokenizer.json (or a directory holding one) instead of the simulator's
    /// one-token-per-word tokenizer.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Cap on requests in flight for constant/poisson stages [default: the config's
    /// num_workers × worker_max_concurrency when set, else unlimited].
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<u64>,
    /// Also write per_request_lifecycle_metrics.json.
    #[arg(long)]
    pub per_request: bool,
    /// Do not draw progress bars (they are also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            config: None,
            base_url: None,
            output: None,
            label: None,
            time_scale: 1.0,
            seed: None,
            tokenizer: None,
            max_in_flight: None,
            per_request: false,
            no_progress: false,
        }
    }
}

/// Options of `compare`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// Baseline result folder (A).
    #[arg(value_name = "DIR_A")]
    pub dir_a: PathBuf,
    /// Candidate result folder (B).
    #[arg(value_name = "DIR_B")]
    pub dir_b: PathBuf,
    /// Column labels, comma-separated [default: the runs' labels].
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub labels: Option<Vec<String>>,
    /// Compare one stage instead of the whole run.
    #[arg(long, value_name = "N")]
    pub stage: Option<usize>,
    /// Print Markdown instead of a plain table.
    #[arg(long)]
    pub markdown: bool,
    /// Also write the Markdown table to this file.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Options of `plot`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// Result folders, one series each.
    #[arg(value_name = "DIR", required = true, num_args = 1..)]
    pub dirs: Vec<PathBuf>,
    /// SVG file to write.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Series labels, comma-separated [default: the runs' labels].
    #[arg(long, value_delimiter = ',', value_name = "A,B,...")]
    pub labels: Option<Vec<String>>,
}

/// Options of `selftest`.
#[derive(clap::Args, Debug, Clone)]
pub struct SelftestArgs {
    /// Concurrent streams to hold.
    #[arg(long, default_value_t = 2000)]
    pub streams: u64,
    /// Output tokens per stream (one token per chunk).
    #[arg(long, default_value_t = 200)]
    pub tokens: u64,
    /// Gap between chunks in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    pub itl_ms: f64,
    /// Time to first token in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub ttft_ms: f64,
}

/// Entry point of `llmsched bench`.
pub async fn run(args: Args) -> Result<(), BenchError> {
    match args.command {
        None => run_command(args.run).await,
        Some(Command::Run(r)) => run_command(r).await,
        Some(Command::Compare(c)) => compare_command(&c),
        Some(Command::Plot(p)) => plot_command(&p),
        Some(Command::Selftest(s)) => selftest_command(&s).await,
    }
}

/// `reports-YYYYMMDD-HHMMSS`, inference-perf's default folder name.
pub fn default_output_dir() -> PathBuf {
    timestamped_dir("reports")
}

/// `<prefix>-YYYYMMDD-HHMMSS` (UTC), a fresh result folder name.
pub fn timestamped_dir(prefix: &str) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = stamp
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect();
    PathBuf::from(format!("{prefix}-{digits}"))
}

async fn run_command(args: RunArgs) -> Result<(), BenchError> {
    let path = args
        .config
        .as_ref()
        .ok_or_else(|| BenchError::Usage("--config FILE is required".into()))?;
    let mut config = BenchConfig::from_file(path)?;
    if let Some(url) = &args.base_url {
        config.set_base_url(url.clone());
    }
    if args.per_request {
        config.report.request_lifecycle.per_request = true;
    }
    let output = args.output.clone().unwrap_or_else(default_output_dir);
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| label_from_dir(&output));
    let tokenizer = match &args.tokenizer {
        Some(p) => TokenCounter::hf(p)?,
        None => TokenCounter::default(),
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    let signal_task = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing reports for the requests completed so far");
            on_signal.cancel();
        }
    });
    let opts = RunOptions {
        label,
        time_scale: args.time_scale,
        seed: args.seed,
        tokenizer,
        progress: if args.no_progress {
            None
        } else {
            terminal_progress()
        },
        cancel: Some(cancel),
        max_in_flight: args.max_in_flight,
    };
    let result = run_benchmark(config, opts).await;
    signal_task.abort();
    let result = result?;
    result.write_to_dir(&output)?;
    println!("{}", stage_table(&result));
    println!("{}", result.overhead.describe());
    if result.interrupted {
        println!("run interrupted: reports cover the requests that finished");
    }
    println!("results written to {}", output.display());
    Ok(())
}

fn label_from_dir(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "run".to_owned())
}

/// A per-stage overview of a run for the terminal.
pub fn stage_table(result: &RunResult) -> String {
    let header = [
        "stage",
        "load",
        "sent",
        "ok",
        "failed",
        "req/s",
        "out tok/s",
        "TTFT mean s",
        "TTFT p90 s",
        "TPOT mean ms",
        "cached %",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in &result.stages {
        let sum = &s.summary;
        let lat = &sum.successes.latency;
        let load = match s.stage {
            crate::config::LoadStage::Rate { rate, duration } => format!("{rate}/s×{duration}s"),
            crate::config::LoadStage::Concurrent {
                num_requests,
                concurrency,
            } => format!("{num_requests}@c{concurrency}"),
        };
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), fmt_num);
        let mut stage = s.stage_id.to_string();
        if s.status == StageStatus::Interrupted {
            stage.push('*');
        }
        rows.push(vec![
            stage,
            load,
            sum.load_summary.count.to_string(),
            sum.successes.count.to_string(),
            sum.failures.count.to_string(),
            fmt_num(sum.successes.throughput.requests_per_sec),
            fmt_num(sum.successes.throughput.output_tokens_per_sec),
            opt(lat.time_to_first_token.as_ref().map(|t| t.mean)),
            opt(lat
                .time_to_first_token
                .as_ref()
                .and_then(|t| t.percentile(90.0))),
            opt(lat.time_per_output_token.as_ref().map(|t| t.mean * 1e3)),
            opt(sum.cached_prompt_ratio().map(|r| r * 100.0)),
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  "));
    };
    line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for r in &rows {
        line(r);
    }
    let failures = &result.summary.failures;
    if failures.count > 0 {
        let _ = writeln!(out, "failures by cause:");
        for (label, f) in &failures.by_label.0 {
            let _ = writeln!(out, "  {label}: {}", f.count);
        }
    }
    out
}

fn pick_labels(
    explicit: &Option<Vec<String>>,
    runs: &[SavedRun],
) -> Result<Vec<String>, BenchError> {
    match explicit {
        Some(l) if l.len() != runs.len() => Err(BenchError::Usage(format!(
            "--labels has {} entries but {} result folders were given",
            l.len(),
            runs.len()
        ))),
        Some(l) => Ok(l.clone()),
        None => Ok(runs.iter().map(|r| r.label.clone()).collect()),
    }
}

/// Builds the comparison of two saved runs (whole run, or one stage).
pub fn compare_saved(
    a: &SavedRun,
    b: &SavedRun,
    labels: [&str; 2],
    stage: Option<usize>,
) -> Result<Comparison, BenchError> {
    let pick = |r: &SavedRun| -> Result<crate::metrics::LifecycleSummary, BenchError> {
        let found = match stage {
            Some(i) => r.stage(i),
            None => r.overall(),
        };
        found.cloned().ok_or_else(|| BenchError::ResultFormat {
            path: r.dir.clone(),
            message: match stage {
                Some(i) => format!("no stage_{i}_lifecycle_metrics.json"),
                None => "no summary_lifecycle_metrics.json".into(),
            },
        })
    };
    Ok(Comparison::new(labels[0], &pick(a)?, labels[1], &pick(b)?))
}

fn compare_command(args: &CompareArgs) -> Result<(), BenchError> {
    let runs = [SavedRun::load(&args.dir_a)?, SavedRun::load(&args.dir_b)?];
    let labels = pick_labels(&args.labels, &runs)?;
    let table = compare_saved(&runs[0], &runs[1], [&labels[0], &labels[1]], args.stage)?;
    if args.markdown {
        print!("{}", table.to_markdown());
    } else {
        print!("{}", table.to_text());
    }
    if let Some(path) = &args.output {
        std::fs::write(path, table.to_markdown())
            .map_err(|e| BenchError::io("cannot write", path, e))?;
        eprintln!("markdown table written to {}", path.display());
    }
    Ok(())
}

fn plot_command(args: &PlotArgs) -> Result<(), BenchError> {
    let runs = args
        .dirs
        .iter()
        .map(|d| SavedRun::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    let labels = pick_labels(&args.labels, &runs)?;
    let series: Vec<PlotSeries> = runs
        .iter()
        .zip(&labels)
        .map(|(r, l)| PlotSeries {
            label: l.clone(),
            ..r.plot_series()
        })
        .collect();
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(BenchError::Usage(
            "no stage_N_lifecycle_metrics.json in the given folders; nothing to plot".into(),
        ));
    }
    write_svg(&series, &args.output)?;
    println!("plot written to {}", args.output.display());
    Ok(())
}

/// The config used by `selftest`: one `concurrent` stage holding `streams` streams.
pub fn selftest_config(base_url: &str, streams: u64, tokens: u64) -> String {
    format!(
        "api: {{type: completion, streaming: true}}\n\
         server: {{type: vllm, model_name: fake-model, base_url: '{base_url}', ignore_eos: true}}\n\
         data:\n  type: shared_prefix\n  shared_prefix: {{num_groups: 10, num_prompts_per_group: 10, \
         system_prompt_len: 200, question_len: 20, output_len: {tokens}}}\n\
         load:\n  type: concurrent\n  stages:\n  - {{num_requests: {streams}, concurrency_level: {streams}}}\n\
         report:\n  request_lifecycle: {{summary: true, per_stage: true, per_request: false}}\n"
    )
}

async fn selftest_command(args: &SelftestArgs) -> Result<(), BenchError> {
    if args.streams == 0 || args.tokens == 0 {
        return Err(BenchError::Usage(
            "--streams and --tokens must be > 0".into(),
        ));
    }
    let server = FakeServer::start(FakeServerConfig {
        ttft: Duration::from_secs_f64(args.ttft_ms.max(0.0) / 1e3),
        itl: Duration::from_secs_f64(args.itl_ms.max(0.0) / 1e3),
        cache_key_words: 0,
        ..FakeServerConfig::default()
    })
    .await
    .map_err(|e| BenchError::Runtime(format!("cannot start the fake server: {e}")))?;
    let config = BenchConfig::from_yaml_str(
        &selftest_config(&server.base_url(), args.streams, args.tokens),
        None,
    )?;
    let result = run_benchmark(
        config,
        RunOptions {
            label: "selftest".into(),
            progress: terminal_progress(),
            ..RunOptions::default()
        },
    )
    .await?;
    server.shutdown();
    let o = &result.overhead;
    println!(
        "selftest: {} streams × {} tokens against an in-process fake server ({} failed)",
        args.streams, args.tokens, result.summary.failures.count
    );
    println!("{}", o.describe());
    let lat = &result.summary.successes.latency;
    let ms = |s: Option<&crate::metrics::Stats>, p: f64| {
        s.and_then(|s| s.percentile(p))
            .map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v * 1e3))
    };
    println!(
        "client-side TTFT p50/p99/max: {}/{}/{} ms (server: {} ms); ITL p50/p99: {}/{} ms (server: {} ms); \
         wall {:.2} s",
        ms(lat.time_to_first_token.as_ref(), 50.0),
        ms(lat.time_to_first_token.as_ref(), 99.0),
        lat.time_to_first_token
            .as_ref()
            .map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s.max * 1e3)),
        args.ttft_ms,
        ms(lat.inter_token_latency.as_ref(), 50.0),
        ms(lat.inter_token_latency.as_ref(), 99.0),
        args.itl_ms,
        o.wall_seconds,
    );
    println!(
        "max streams open at the server: {}",
        server
            .stats()
            .max_open_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
