//! Serves the minimal fake OpenAI server (see `llmsched_bench::fake_server`) on a fixed port,
//! to try the load generator without the simulator:
//!
//! ```text
//! cargo run --release -p llmsched-bench --example fake_server -- 8000 [TTFT_MS] [ITL_MS]
//! ```

use std::time::Duration;

use llmsched_bench::fake_server::{FakeServer, FakeServerConfig};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: f64| {
        args.get(i)
            .and_then(|a| a.parse::<f64>().ok())
            .unwrap_or(default)
    };
    let port = u16::try_from(num(0, 8000.0) as u64).unwrap_or(8000);
    let cfg = FakeServerConfig {
        ttft: Duration::from_secs_f64(num(1, 20.0) / 1e3),
        itl: Duration::from_secs_f64(num(2, 5.0) / 1e3),
        ..FakeServerConfig::default()
    };
    let server = FakeServer::start_on(port, cfg).await?;
    eprintln!(
        "fake OpenAI server on {} (Ctrl-C to stop)",
        server.base_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
