//! Wiring of the built-in OpenAI-compatible proxy (`--proxy-port`, `--baseline`,
//! `--proxy-pd-routing`).

use std::sync::Arc;

use llmsched_director::Director;
use llmsched_proxy::{
    Baseline, ListenerMetrics, PdRouter, PdRouterConfig, ProxyOptions, SidecarMetrics,
};
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
    // The in-process P/D router (`--proxy-pd-routing in-process`, the default): the
    // pd-sidecar's defaults (2 prefill retries 50 ms apart, doubled; then a local prefill).
    let pd_router = if baseline.is_none() && args.proxy_pd_routing == "in-process" {
        match PdRouter::new(
            PdRouterConfig::per_call_decoder(),
            Arc::new(SidecarMetrics::new()),
        ) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                // Only TLS setup can fail here (none is used for plain-HTTP endpoints).
                tracing::error!(error = %e, "in-process P/D routing unavailable; x-prefiller-host-port goes to the decode endpoint");
                None
            }
        }
    } else {
        None
    };
    let options = ProxyOptions {
        baseline,
        max_body_bytes: args.max_request_body_bytes,
        upstream_timeout: args.proxy_upstream_timeout,
        request_body_timeout: args.request_body_timeout,
        shutdown_grace: args.drain_timeout,
        limits: crate::run::listener_limits(args),
        listener_metrics,
        pd_router,
        ..ProxyOptions::default()
    };
    servers.spawn(async move {
        let r = llmsched_proxy::serve(listener, director, options, drain).await;
        ("proxy", r.map_err(|e| e.to_string()))
    });
}
