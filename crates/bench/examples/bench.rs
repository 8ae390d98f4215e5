//! The `llmsched bench` command line as a standalone program, for use before (or without)
//! the `llmsched` binary:
//!
//! ```text
//! cargo run --release -p llmsched-bench --example bench -- --config workload.yaml --base-url http://127.0.0.1:8080
//! cargo run --release -p llmsched-bench --example bench -- selftest --streams 2000
//! ```

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "llmsched-bench",
    about = "inference-perf compatible load generator"
)]
struct Cli {
    #[command(flatten)]
    bench: llmsched_bench::cli::Args,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match llmsched_bench::cli::run(cli.bench).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
