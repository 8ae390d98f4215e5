//! # llmsched-proxy
//!
//! The built-in OpenAI-compatible HTTP proxy of `llmsched epp --proxy-port PORT`: standalone
//! mode without a gateway, the way users run SGLang's or vLLM's routers. Each request goes
//! through the very same [`Director`] as the Envoy ext_proc path (parse, rewrite, objective,
//! admission and flow control, subset hint, scheduling, pre-request hooks, response hooks,
//! usage accounting, metrics); only the transport differs.
//!
//! ```no_run
//! # async fn demo(director: std::sync::Arc<llmsched_director::Director>) -> Result<(), Box<dyn std::error::Error>> {
//! use llmsched_proxy::{ProxyOptions, serve};
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8000").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! serve(listener, director, ProxyOptions::default(), shutdown).await?;
//! # Ok(()) }
//! ```
//!
//! ## What a request does
//!
//! | request | what happens |
//! | --- | --- |
//! | with a body (`POST /v1/completions`, `/v1/chat/completions`, any other path) | body collected (at most [`ProxyOptions::max_body_bytes`], else 413 `PayloadTooLarge`; the buffer grows as bytes arrive, never pre-sized beyond 16 KiB from `content-length`; the single-frame case without a copy), then `Director::route`; the forwarded body is the director's (model rewritten when a rewrite applies) |
//! | without a body (`GET /v1/models`, `/health`, …) | `Director::route_without_body`: a random endpoint, exactly as the ext_proc path does for a header-only request; so `/v1/models` is **forwarded to one endpoint** (every endpoint of a pool serves the same models), not aggregated |
//! | director error | the error's status, body `inference error: <Code> - <message>`, its headers and `content-type: text/plain` — the ext_proc path's immediate response |
//!
//! The forwarded request keeps the client's method, path, query and headers (hop-by-hop
//! headers removed, `host` kept) and gets what Envoy would send after the EPP's header
//! mutation: `x-request-id` (generated when missing), `x-gateway-destination-endpoint`,
//! `content-length` of the forwarded body and the pre-request hooks' headers. Responses get
//! the response hooks' headers and `x-went-into-resp-headers: true` (the reference EPP's
//! marker; not on requests the parser skipped, whose ext_proc stream closes after routing).
//!
//! The director's `:path`, `:method`, `:authority` and `:scheme` pseudo-headers are filled
//! in as Envoy fills them, so the parser picks the API from the path in both transports.
//!
//! Subset hint: a gateway passes it as `envoy.lb.subset_hint` metadata; the proxy has no
//! gateway, so it reads the same list from the request header
//! `x-gateway-destination-endpoint-subset: ip[:port],…` (on by default,
//! [`ProxyOptions::subset_hint_header`]; the header is never forwarded). The generated Envoy
//! bootstrap of `llmsched-gateway` can turn that header into the metadata, so both front
//! doors answer a hint the same way.
//!
//! ## Responses
//!
//! Bodies are relayed frame by frame with backpressure and no buffering of their own
//! ([`ProxyBody`]); `text/event-stream` chunks reach the client as the model server writes
//! them. A client that disconnects drops the response body: the upstream request is
//! cancelled (its connection is closed) and the routed request is dropped, which releases the
//! in-flight counts. The director's [`llmsched_director::Routed`] owns the response contract:
//! every chunk goes through it (usage, hooks, the model name rewritten back) and the proxy
//! sends on what it returns. Only a non-streaming response whose model name must be
//! rewritten back (a rewrite changed the model) is read whole first, so it keeps an exact
//! `content-length`; one larger than [`ProxyOptions::max_body_bytes`] is relayed unchanged
//! from there, as the ext_proc path does.
//!
//! ## Upstream connections and fallbacks
//!
//! One keep-alive connection pool per endpoint (hyper-util's client; HTTP/1.1 by default,
//! h2c with [`UpstreamProtocol::H2c`]). The targets of [`llmsched_director::Routed::targets`]
//! are tried in order when connecting fails (never after the request may have reached a model
//! server); the endpoint that served is reported with `Routed::set_served_endpoint`. When
//! every target refused, the director schedules the request again without them
//! ([`llmsched_director::Director::reroute`], up to [`ProxyOptions::max_reroutes`] times), so
//! a retry always has a next candidate even with `maxNumOfEndpoints: 1`. When no endpoint
//! can be reached the client gets `503` and a body starting with
//! `upstream connect error or disconnect/reset before headers`, as Envoy answers.
//!
//! Every refused connection, broken connection and timeout is reported to the endpoint's
//! health, which takes it out of the candidates at once (see `llmsched_core::health`).
//! [`ProxyOptions::upstream_timeout`] bounds the wait for response headers (then `504
//! upstream request timeout`, Envoy's answer) and the gap between response chunks (then the
//! response is cut).
//!
//! ## Connections
//!
//! The listener enforces [`ProxyOptions::limits`] (`llmsched-listener`): a connection limit
//! at which idle connections are closed to admit new ones, a header timeout (a client that
//! connects and sends nothing, or stalls in its request head, is closed) and an idle timeout
//! for keep-alive connections; a request body that stalls for
//! [`ProxyOptions::request_body_timeout`] is answered `408` and its connection closed.
//!
//! ## Prefill/decode disaggregation
//!
//! With [`ProxyOptions::pd_router`] set, a decision that carries a prefill endpoint (the P/D
//! plugins' `x-prefiller-host-port` header) is served by `llmsched-pdsidecar`'s
//! [`PdRouter`] in process: prefill hop to that endpoint with `max_tokens: 1` and
//! `kv_transfer_params` asking for a remote decode, then the decode hop to the decode pick
//! with the returned parameters, relayed as usual (streams stay streams; the usage's cached
//! tokens are the prefill replica's). A failing prefiller is retried and then replaced by a
//! local prefill on the decoder (counted). The router's metrics are served on the proxy at
//! `GET /pd-sidecar/metrics`. Without it the header goes to the decode endpoint, whose own
//! `pd-sidecar` acts on it, as behind Envoy.
//!
//! ## Baselines
//!
//! [`Baseline::RoundRobin`] and [`Baseline::Random`] (flag `--baseline`) replace the
//! scheduler by a naive choice over every endpoint of the pool, for comparisons. A baseline
//! request uses the same listener, the same body collection, the same forwarding,
//! connection pools and relaying as a scheduled one, and the same fallback rule (on a connect
//! failure the next endpoints in turn are tried, up to [`ProxyOptions::baseline_attempts`]).
//! It charges the chosen endpoint's in-flight counters (`Endpoint::dispatch`/`complete`:
//! `dispatched_total`, in-flight requests; tokens are not estimated). It does **not** parse
//! the body (invalid JSON reaches the model server, which answers 400 itself), rewrite the
//! model, apply objectives, admission or flow control, honour the subset hint, run the
//! scheduler or any hook, or record the EPP's request metrics — it is what a Kubernetes
//! Service behind a plain proxy does, so a comparison isolates the scheduling decision.
//!
//! ## Protocols
//!
//! HTTP/1.1 (keep-alive) and h2c (prior knowledge) on the same port; no TLS, no upgrades.
//! Request trailers are not forwarded; response trailers are.

mod body;
mod handler;
mod headers;
mod server;
mod timeout;

use std::sync::Arc;
use std::time::Duration;

use llmsched_director::Director;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use body::ProxyBody;
pub use llmsched_listener::{Limits, ListenerMetrics};
/// The in-process P/D router and its settings ([`ProxyOptions::pd_router`]).
pub use llmsched_pdsidecar::{PdRouter, PdRouterConfig, SidecarMetrics};

/// A naive routing policy used instead of the scheduler, for comparisons (see the crate
/// documentation for exactly what a baseline does and does not do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Endpoints in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// How the proxy talks to the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive (vLLM's default).
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (InferencePool `appProtocol:
    /// kubernetes.io/h2c`).
    H2c,
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Route with a baseline instead of the scheduler.
    pub baseline: Option<Baseline>,
    /// Largest request body accepted (413 beyond it); also the limit of a non-streaming
    /// response read whole for a model-name rewrite (a larger one is relayed unchanged).
    /// Default 64 MiB.
    pub max_body_bytes: usize,
    /// Read the subset hint from the `x-gateway-destination-endpoint-subset` request header.
    /// Default on.
    pub subset_hint_header: bool,
    /// Protocol to the endpoints.
    pub upstream_protocol: UpstreamProtocol,
    /// Connect timeout to an endpoint (then the next target is tried). Default 5 s.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per endpoint. Default unlimited.
    pub pool_max_idle_per_host: usize,
    /// Endpoints a baseline request tries when connecting fails. Default 3.
    pub baseline_attempts: usize,
    /// On shutdown, connections get this long to finish their requests (the EPP passes
    /// `--drain-timeout`). Default 60 s.
    pub shutdown_grace: Duration,
    /// Upstream response timeout (`--proxy-upstream-timeout`): longest wait for a model
    /// server's response headers (then 504 `upstream request timeout`) and longest gap
    /// between two chunks of its response body (then the response is cut). Zero: none.
    /// Default 10 min.
    pub upstream_timeout: Duration,
    /// Longest gap between two chunks of a client's request body (`--request-body-timeout`;
    /// then 408 and the connection closes). Zero: none. Default 30 s.
    pub request_body_timeout: Duration,
    /// How many times a request whose targets all refused the connection is scheduled again
    /// without them. Default 2.
    pub max_reroutes: usize,
    /// Connection limit and timeouts of the proxy's listener.
    pub limits: Limits,
    /// Metrics of the proxy's listener (unregistered by default).
    pub listener_metrics: ListenerMetrics,
    /// Prefill/decode disaggregation in process: when the decision names a prefill endpoint
    /// (`x-prefiller-host-port`, set by the P/D plugins) this router does the sidecar's work
    /// (prefill hop, then decode hop on the decode pick), so no `pd-sidecar` process is
    /// needed. `None` forwards the header to the decode endpoint, whose own sidecar acts on
    /// it. Default `None` (`llmsched epp` turns it on: `--proxy-pd-routing`).
    pub pd_router: Option<Arc<PdRouter>>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            baseline: None,
            max_body_bytes: 64 << 20,
            subset_hint_header: true,
            upstream_protocol: UpstreamProtocol::Http1,
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: usize::MAX,
            baseline_attempts: 3,
            shutdown_grace: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(600),
            request_body_timeout: Duration::from_secs(30),
            max_reroutes: 2,
            limits: Limits::default(),
            listener_metrics: ListenerMetrics::default(),
            pd_router: None,
        }
    }
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listening socket is unusable.
    #[error("proxy listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the proxy on `listener` until `shutdown`; then stops accepting, lets open
/// connections finish for up to [`ProxyOptions::shutdown_grace`] and returns.
pub async fn serve(
    listener: TcpListener,
    director: Arc<Director>,
    options: ProxyOptions,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    server::serve(listener, director, options, shutdown).await
}
