//! `cargo run -p llmsched-gateway --example envoy_config -- <flags>`: the same as
//! `llmsched envoy-config <flags>` (prints or writes an Envoy bootstrap), for scripts that run
//! without the `llmsched` binary.

use clap::Parser;

#[derive(Parser)]
#[command(name = "envoy-config", about = "Print an Envoy bootstrap for llmsched")]
struct Cli {
    #[command(flatten)]
    args: llmsched_gateway::cli::Args,
}

fn main() {
    if let Err(e) = llmsched_gateway::cli::run(Cli::parse().args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
