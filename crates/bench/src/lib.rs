//! `llmsched bench`: an inference-perf compatible load generator with inference-perf's
//! metrics, llm-d-benchmark reports, comparison tables and plots.
//!
//! * [`config`] reads inference-perf's YAML format (`api`, `server`, `data.shared_prefix`,
//!   `load` with `constant` / `poisson` / `concurrent` stages, `report`).
//! * [`datagen`] builds seeded shared-prefix prompts of exact token lengths; [`schedule`]
//!   draws arrival times as inference-perf's load timers do.
//! * [`runner`] drives the stages on one dedicated thread, [`client`] speaks the OpenAI API
//!   over a pooled hyper client and [`sse`] parses the streams incrementally.
//! * [`metrics`] computes TTFT, TPOT, ITL, NTPOT, latency, throughput, failures by cause and
//!   cached prompt tokens exactly as inference-perf defines them.
//! * [`report`] writes `summary_lifecycle_metrics.json`, `stage_N_lifecycle_metrics.json` and
//!   benchmark report v0.2 YAML files; [`compare`] renders the seed guide's comparison table
//!   and [`plot`] draws TTFT and throughput against request rate.
//!
//! Library use (what `llmsched demo` does):
//!
//! ```no_run
//! # async fn demo() -> Result<(), llmsched_bench::BenchError> {
//! use llmsched_bench::{BenchConfig, Comparison, RunOptions, plot};
//! let mut config = BenchConfig::from_file("guide-mini.yaml".as_ref())?;
//! config.set_base_url("http://127.0.0.1:8080");
//! let opts = RunOptions { label: "llmsched".into(), time_scale: 10.0, ..RunOptions::default() };
//! let ours = llmsched_bench::run(config.clone(), opts).await?;
//! ours.write_to_dir("results/llmsched".as_ref())?;
//! config.set_base_url("http://127.0.0.1:8081");
//! let rr = llmsched_bench::run(config, RunOptions { label: "round-robin".into(), time_scale: 10.0, ..RunOptions::default() }).await?;
//! let table = Comparison::new(&rr.label, &rr.summary, &ours.label, &ours.summary);
//! println!("{}", table.to_text());
//! plot::write_svg(&[rr.plot_series(), ours.plot_series()], "results/plot.svg".as_ref())?;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod client;
pub mod compare;
pub mod config;
pub mod datagen;
pub mod error;
pub mod fake_server;
pub mod metrics;
pub mod overhead;
pub mod plot;
pub mod progress;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod sse;
pub mod tokens;

pub use compare::Comparison;
pub use config::BenchConfig;
pub use error::BenchError;
pub use metrics::{LifecycleSummary, RequestRecord};
pub use overhead::GeneratorOverhead;
pub use plot::PlotSeries;
pub use report::SavedRun;
pub use runner::{
    ProgressCallback, ProgressEvent, RunOptions, RunResult, StageResult, StageStatus, run,
};
pub use tokens::TokenCounter;
