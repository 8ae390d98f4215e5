//! Wiring of the built-in OpenAI-compatible proxy (`--proxy-port`, `--baseline`).

use std::sync::Arc;

use llmsched_director::Director;
use llmsched_proxy::{Baseline, ProxyOptions};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::Args;

/// Spawns the proxy server into `servers`.
pub(crate) fn spawn(
    servers: &mut JoinSet<(&'static str, Result<(), String>)>,
    listener: TcpListener,
    director: Arc<Director>,
    args: &Args,
    cancel: CancellationToken,
) {
    let baseline = match args.baseline.as_deref() {
        Some("round-robin") => Some(Baseline::RoundRobin),
        Some("random") => Some(Baseline::Random),
        _ => None,
    };
    let options = ProxyOptions {
        baseline,
        max_body_bytes: args.max_request_body_bytes,
        ..ProxyOptions::default()
    };
    servers.spawn(async move {
        let r = llmsched_proxy::serve(listener, director, options, cancel).await;
        ("proxy", r.map_err(|e| e.to_string()))
    });
}
