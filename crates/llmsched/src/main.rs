//! `llmsched`: an intelligent inference scheduler for LLM serving.
//!
//! One binary, five jobs:
//!
//! * `llmsched epp` — the Endpoint Picker: Envoy ext_proc server, a drop-in replacement for
//!   llm-d's EPP (same flags, config file, headers, metrics), optionally with a built-in
//!   OpenAI-compatible proxy (`--proxy-port`) for use without a gateway;
//! * `llmsched sim` — simulated vLLM replicas (API, metrics, KV events) for laptops without GPUs;
//! * `llmsched bench` — a load generator reading inference-perf configs, with reports,
//!   comparison tables and plots;
//! * `llmsched pd-sidecar` — the decode-side routing sidecar of prefill/decode disaggregation;
//! * `llmsched demo` — the whole story in one command.
//!
//! This file is the binary's edge: it parses arguments, sets up logging and turns library
//! errors into a non-zero exit status with a readable message.

mod demo;
mod logtime;

use std::io::IsTerminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "llmsched", version, about = "Intelligent inference scheduling for LLM serving", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the Endpoint Picker (Envoy ext_proc server, optional OpenAI proxy).
    Epp(Box<llmsched_epp::Args>),
    /// Run simulated vLLM replicas.
    Sim(Box<llmsched_sim::cli::Args>),
    /// Run a benchmark, or compare / plot results.
    Bench(Box<llmsched_bench::cli::Args>),
    /// The seed guide's comparison on a simulated cluster: round robin vs llmsched.
    Demo(Box<demo::Args>),
    /// Print or write an Envoy bootstrap (ext_proc EPP or round-robin baseline).
    EnvoyConfig(Box<llmsched_gateway::cli::Args>),
    /// The decode-side P/D routing sidecar (llm-d's pd-sidecar): prefill on the replica named
    /// by x-prefiller-host-port, then decode on the local replica with its kv_transfer_params.
    PdSidecar(Box<llmsched_pdsidecar::cli::Args>),
    /// Print the CustomResourceDefinitions llmsched reads (InferencePool v1 and v1alpha2,
    /// InferenceObjective and InferenceModelRewrite in both groups) as YAML.
    Crds,
}

/// Logging to stderr: `RUST_LOG` wins; otherwise `verbosity` picks the level.
fn init_logging(verbosity: u8, json: bool) {
    let default = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    init_logging_with(&llmsched_epp::LogSettings {
        level: default,
        json,
        time_encoding: None,
    });
}

/// Logging to stderr as the EPP's flags say (`-v`, `--log-format`, the zap flags);
/// `RUST_LOG` wins over the level.
fn init_logging_with(settings: &llmsched_epp::LogSettings) {
    // kube-rs logs every failed request at error level; discovery reports each failure
    // itself, once per change of reason, so that line is silenced unless RUST_LOG asks.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},kube_client::client::builder=off",
            settings.level
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(!settings.json && std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match (settings.json, settings.time_encoding) {
        (true, Some(t)) => builder.json().with_timer(logtime::ZapTime(t)).try_init(),
        (true, None) => builder.json().try_init(),
        (false, Some(t)) => builder.with_timer(logtime::ZapTime(t)).try_init(),
        (false, None) => builder.try_init(),
    };
}

/// The demo prints its own progress; logs only report problems unless `RUST_LOG` says more.
fn init_logging_quiet() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// mimalloc instead of glibc's malloc: the request path allocates and frees body buffers of
/// tens to hundreds of KB per request (gRPC frames, prost messages, TLS records), where
/// glibc's allocator spent ~10 % of the EPP's CPU (chunk coalescing, `mmap` above 128 KB and
/// the page faults that follow).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Epp(args) => {
                init_logging_with(&args.log_settings());
                llmsched_epp::run(*args).await.context("llmsched epp")
            }
            Command::Sim(args) => {
                init_logging(0, false);
                llmsched_sim::cli::run(*args).await.context("llmsched sim")
            }
            Command::Bench(args) => {
                init_logging(0, false);
                llmsched_bench::cli::run(*args)
                    .await
                    .context("llmsched bench")
            }
            Command::Demo(args) => {
                init_logging_quiet();
                demo::run(*args).await.context("llmsched demo")
            }
            Command::EnvoyConfig(args) => {
                llmsched_gateway::cli::run(*args).context("llmsched envoy-config")
            }
            Command::PdSidecar(args) => {
                init_logging(0, false);
                llmsched_pdsidecar::cli::run(*args)
                    .await
                    .context("llmsched pd-sidecar")
            }
            Command::Crds => {
                let yaml = llmsched_kube::crd::all_crds_yaml().context("llmsched crds")?;
                print!("{yaml}");
                Ok(())
            }
        }
    })
}
