//! Wiring of the built-in OpenAI-compatible proxy (`--proxy-port`, `--baseline`).

use std::sync::Arc;

use llmsched_director::Director;
use llmsched_proxy::{Baseline, ListenerMetrics, ProxyOptions};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::Args;

/// Spawns the proxy server into `servers`; `drain` stops it (it then lets requests in
/// flight finish for `--drain-timeout`).
pub(crate) fn spawn(
    servers: &mut JoinSet<(&'static str, Result<(), String>)>,
    listener: TcpListener,
    director: Arc<Director>,
    args: &Args,
    listener_metrics: ListenerMetrics,
    drain: CancellationToken,
) {
    let baseline = match args.baseline.as_deref() {
        Some("round-robin") => Some(Baseline::RoundRobin),
        Some("random") => Some(Baseline::Random),
        _ => None,
    };
    let options = ProxyOptions {
        baseline,
        max_body_bytes: args.max_request_body_bytes,
        upstream_timeout: args.proxy_upstream_timeout,
        request_body_timeout: args.request_body_timeout,
        shutdown_grace: args.drain_timeout,
        limits: crate::run::listener_limits(args),
        listener_metrics,
        ..ProxyOptions::default()
    };
    servers.spawn(async move {
        let r = llmsched_proxy::serve(listener, director, options, drain).await;
        ("proxy", r.map_err(|e| e.to_string()))
    });
}
