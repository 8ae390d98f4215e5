//! Runs the simulator standalone with the same flags as `llmsched sim` (until Ctrl-C).
//!
//! ```text
//! cargo run --release -p llmsched-sim --example serve -- --replicas 2 --base-port 8000 \
//!     --kv-events-endpoint 'tcp://*:5557' --kv-events-replay-endpoint 'tcp://*:5600'
//! ```

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "A vLLM simulator (llmsched-sim)")]
struct Cli {
    #[command(flatten)]
    sim: llmsched_sim::cli::Args,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(llmsched_sim::cli::run(cli.sim)) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
