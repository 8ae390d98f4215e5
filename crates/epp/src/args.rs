//! Command-line flags of `llmsched epp`: the reference EPP's flags, same names and defaults,
//! plus llmsched's own (endpoints and objectives without Kubernetes, the built-in proxy).
//!
//! Go's flag syntax (pflag) is honoured where deployments rely on it, so that the
//! `inferencepool` Helm chart's argument list starts llmsched unchanged:
//!
//! * `--flag value` and `--flag=value` for every flag that takes a value;
//! * booleans take `--flag`, `--flag=true` or `--flag=false` (also `1`/`0`, `t`/`f`, `TRUE`...);
//! * durations are Go durations (`50ms`, `2s`);
//! * literal quote characters around a value (`--total-queued-requests-metric="sglang:num_queue_reqs"`
//!   as newer charts render it) are stripped;
//! * an empty value means the flag's default where pflag's would (`--pool-namespace=` reads
//!   `NAMESPACE`), and is an error naming the flag where a number, duration or choice is
//!   expected.
//!
//! Flags of the reference with no llmsched equivalent are accepted and logged once (see
//! [`Args::compatibility_warnings`]): `--tracing=true` (no OpenTelemetry exporter is built
//! in), `--enable-pprof=true` (Go-only), `--zap-stacktrace-level`. Combinations that cannot
//! run are rejected by [`Args::validate`] with a reason.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use llmsched_core::units::parse_go_duration;

/// Strips one pair of matching literal quotes (`"v"` or `'v'`) around a value.
pub fn unquote(s: &str) -> &str {
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
}

fn unquoted(s: &str) -> Result<String, String> {
    Ok(unquote(s).to_string())
}

fn unquoted_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(unquote(s)))
}

fn go_duration(s: &str) -> Result<Duration, String> {
    let s = unquote(s);
    if s.is_empty() {
        return Err("empty value (expected a duration such as 50ms or 2s)".into());
    }
    parse_go_duration(s).map_err(|e| e.to_string())
}

/// Go's `strconv.ParseBool`, as pflag parses booleans.
fn go_bool(s: &str) -> Result<bool, String> {
    match unquote(s) {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("'{other}' is not a boolean (true or false)")),
    }
}

fn body_bytes(s: &str) -> Result<usize, String> {
    let v = llmsched_core::units::parse_quantity(unquote(s)).map_err(|e| e.to_string())?;
    if v == 0 {
        return Err("must be at least 1 byte".into());
    }
    usize::try_from(v).map_err(|_| format!("{v} bytes is more than this machine can address"))
}

fn port(s: &str) -> Result<u16, String> {
    // Quotes cannot be part of a port; a quoted list ("8000,8001") is split before this.
    let s = s.trim_matches(['"', '\'']);
    if s.is_empty() {
        return Err("empty value (expected a port number)".into());
    }
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a port number"))?;
    u16::try_from(v).map_err(|_| format!("port {v} is out of range (0-65535)"))
}

fn verbosity(s: &str) -> Result<u8, String> {
    let s = unquote(s);
    let v: i64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a verbosity level (an integer)"))?;
    Ok(u8::try_from(v.max(0)).unwrap_or(u8::MAX))
}

/// `--zap-encoder`: how log lines are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZapEncoder {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Console,
}

fn zap_encoder(s: &str) -> Result<ZapEncoder, String> {
    match unquote(s) {
        "json" => Ok(ZapEncoder::Json),
        "console" => Ok(ZapEncoder::Console),
        other => Err(format!(
            "unrecognized encoder '{other}' (expected json or console)"
        )),
    }
}

/// `--zap-log-level`: a level name or a verbosity integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZapLevel {
    /// `debug`.
    Debug,
    /// `info`.
    Info,
    /// `error` (and `panic`, which llmsched treats as `error`).
    Error,
    /// An integer: verbosity, as `-v`.
    Verbosity(u8),
}

fn zap_level(s: &str) -> Result<ZapLevel, String> {
    match unquote(s).to_ascii_lowercase().as_str() {
        "debug" => Ok(ZapLevel::Debug),
        "info" => Ok(ZapLevel::Info),
        "error" | "panic" | "dpanic" => Ok(ZapLevel::Error),
        other => other
            .parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(|v| ZapLevel::Verbosity(u8::try_from(v).unwrap_or(u8::MAX)))
            .ok_or_else(|| {
                format!(
                    "invalid log level '{other}' (expected debug, info, error, panic or an integer > 0)"
                )
            }),
    }
}

fn zap_stacktrace_level(s: &str) -> Result<String, String> {
    match unquote(s) {
        l @ ("info" | "error" | "panic") => Ok(l.to_string()),
        other => Err(format!(
            "invalid stacktrace level '{other}' (expected info, error or panic)"
        )),
    }
}

/// `--zap-time-encoding`: how log timestamps are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEncoding {
    /// Seconds since the Unix epoch, with a fraction.
    Epoch,
    /// Milliseconds since the Unix epoch, with a fraction.
    Millis,
    /// Nanoseconds since the Unix epoch.
    Nano,
    /// ISO 8601 with milliseconds (`2006-01-02T15:04:05.000Z`).
    Iso8601,
    /// RFC 3339, seconds (`2006-01-02T15:04:05Z`).
    Rfc3339,
    /// RFC 3339, nanoseconds.
    Rfc3339Nano,
}

fn zap_time_encoding(s: &str) -> Result<TimeEncoding, String> {
    match unquote(s) {
        "epoch" => Ok(TimeEncoding::Epoch),
        "millis" => Ok(TimeEncoding::Millis),
        "nano" => Ok(TimeEncoding::Nano),
        "iso8601" => Ok(TimeEncoding::Iso8601),
        "rfc3339" => Ok(TimeEncoding::Rfc3339),
        "rfc3339nano" => Ok(TimeEncoding::Rfc3339Nano),
        other => Err(format!(
            "invalid time encoding '{other}' (expected epoch, millis, nano, iso8601, rfc3339 or rfc3339nano)"
        )),
    }
}

/// How the binary sets up logging, from `-v`, `--log-format` and the zap flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `tracing` level directive when `RUST_LOG` is unset: `error`, `info`, `debug` or `trace`.
    pub level: &'static str,
    /// JSON lines instead of text.
    pub json: bool,
    /// Timestamp format (`None`: the subscriber's default, RFC 3339 with microseconds).
    pub time_encoding: Option<TimeEncoding>,
}

fn level_for_verbosity(v: u8) -> &'static str {
    match v {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    }
}

/// `--ha-mode`: how the EPP's replicas share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaMode {
    /// Leader election: one ready replica, the others wait for its Lease.
    ActivePassive,
    /// Every replica ready; replica state shared with the peers.
    ActiveActive,
}

fn ha_mode(s: &str) -> Result<HaMode, String> {
    match unquote(s) {
        "active-passive" => Ok(HaMode::ActivePassive),
        "active-active" => Ok(HaMode::ActiveActive),
        other => Err(format!(
            "'{other}' is not an HA mode (expected active-passive or active-active)"
        )),
    }
}

/// API groups `--pool-group` accepts.
pub const POOL_GROUPS: [&str; 2] = [
    "inference.networking.k8s.io",
    "inference.networking.x-k8s.io",
];

/// `llmsched epp` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "epp",
    about = "Run the Endpoint Picker: Envoy ext_proc server (and optionally an OpenAI-compatible proxy)",
    long_about = None,
    // Go's flag package lets a later flag override an earlier one; deployments rely on it.
    args_override_self = true,
    // The reference's flag names are long; descriptions read better on their own line.
    next_line_help = true
)]
pub struct Args {
    // --- Ports and serving -------------------------------------------------------------
    /// gRPC port used for communicating with Envoy proxy (ext_proc).
    #[arg(long, default_value_t = 9002, value_parser = port)]
    pub grpc_port: u16,

    /// The port used for gRPC liveness and readiness probes.
    #[arg(long, default_value_t = 9003, value_parser = port)]
    pub grpc_health_port: u16,

    /// The metrics port exposed by the EPP (Prometheus text on /metrics).
    #[arg(long, default_value_t = 9090, value_parser = port)]
    pub metrics_port: u16,

    /// Address to bind the ext_proc, health, metrics and proxy listeners to (0.0.0.0: every
    /// interface; 127.0.0.1 or a pod IP to expose less, see the README's Security section).
    #[arg(long, default_value = "0.0.0.0", value_parser = unquoted)]
    pub bind_address: String,

    /// Serve ext_proc over TLS (self-signed certificate unless --cert-path). Use
    /// --secure-serving=false for plaintext.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub secure_serving: bool,

    /// Directory holding tls.crt and tls.key for secure serving.
    #[arg(long, value_parser = unquoted_path)]
    pub cert_path: Option<PathBuf>,

    /// Reload the certificates in --cert-path when they change.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub enable_cert_reload: bool,

    /// Largest request body accepted, in bytes (a plain number or a quantity such as 64Mi),
    /// on the ext_proc path and the proxy: a larger one is answered 413 (`PayloadTooLarge`)
    /// without being buffered. Also the most of a non-streaming response held for the
    /// model-name rewrite.
    #[arg(long, default_value = "67108864", value_parser = body_bytes, value_name = "BYTES")]
    pub max_request_body_bytes: usize,

    /// Also serve gRPC health on the ext_proc port (the health port always serves it).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub health_checking: bool,

    // --- Configuration ------------------------------------------------------------------
    /// The path to the EndpointPickerConfig file.
    #[arg(long, conflicts_with = "config_text", value_parser = unquoted_path)]
    pub config_file: Option<PathBuf>,

    /// The EndpointPickerConfig as text, in lieu of a file.
    #[arg(long, value_parser = unquoted)]
    pub config_text: Option<String>,

    /// Reload --config-file when it changes (checked every --config-reload-interval; a
    /// Kubernetes ConfigMap update is seen too) and on SIGHUP: the new configuration is
    /// built and validated off the request path, then swapped in atomically (requests in
    /// flight finish on the one they started with); a broken file is logged and counted and
    /// the running configuration stays. Unchanged plugin instances, with their state (prefix
    /// indexes), are carried over. false: the file is read once, at start.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub config_reload: bool,

    /// How often --config-file is checked for changes (a change is applied once it has been
    /// read the same twice in a row, so a half-written file is never loaded).
    #[arg(long, default_value = "1s", value_parser = go_duration)]
    pub config_reload_interval: Duration,

    // --- Endpoints without Kubernetes ----------------------------------------------------
    /// Static endpoints: ip:port[,ip:port...].
    #[arg(long, value_name = "IP:PORT,...", value_parser = unquoted)]
    pub endpoints: Option<String>,

    /// YAML file `endpoints: [{name, address, port, labels}]`, reloaded when it changes.
    #[arg(long, value_name = "FILE", value_parser = unquoted_path)]
    pub endpoints_file: Option<PathBuf>,

    /// Multi-document YAML of InferenceObjective / InferenceModelRewrite manifests, reloaded
    /// when it changes. In Kubernetes mode the file replaces the cluster's objectives.
    #[arg(long, value_name = "FILE", value_parser = unquoted_path)]
    pub objectives_file: Option<PathBuf>,

    /// Target ports of model server pods: with --endpoint-selector, one endpoint per pod per
    /// port (1 to 8 ports); endpoints-file entries without a port get one endpoint per
    /// target port. Repeatable and comma-separated; duplicates are dropped.
    #[arg(long, value_delimiter = ',', value_parser = port, action = ArgAction::Append)]
    pub endpoint_target_ports: Vec<u16>,

    // --- Kubernetes -----------------------------------------------------------------------
    /// Name of the InferencePool to serve: its pods become the endpoints (Kubernetes
    /// discovery; exactly one of --pool-name and --endpoint-selector, or a non-Kubernetes
    /// source).
    #[arg(long, value_parser = unquoted)]
    pub pool_name: Option<String>,

    /// Namespace of the InferencePool (and of the pods, objectives and rewrites watched).
    /// Empty: env NAMESPACE, else `default`.
    #[arg(long, value_parser = unquoted)]
    pub pool_namespace: Option<String>,

    /// API group of the InferencePool: inference.networking.k8s.io (v1) or
    /// inference.networking.x-k8s.io (v1alpha2).
    #[arg(long, default_value = "inference.networking.k8s.io", value_parser = unquoted)]
    pub pool_group: String,

    /// Label selector of model server pods without an InferencePool (`k=v,k2=v2`; equality
    /// only), with --endpoint-target-ports.
    #[arg(long, value_parser = unquoted)]
    pub endpoint_selector: Option<String>,

    /// Kubeconfig file (default: env KUBECONFIG, then ~/.kube/config, then the in-cluster
    /// service account).
    #[arg(long, value_name = "FILE", value_parser = unquoted_path)]
    pub kubeconfig: Option<PathBuf>,

    /// Leader election for HA (a coordination.k8s.io Lease in the pool namespace).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub ha_enable_leader_election: bool,

    /// How several replicas of this EPP run together: `active-passive` (leader election over
    /// a Lease, as --ha-enable-leader-election: only the leader is ready) or `active-active`
    /// (every replica ready and routing; replicas share their prefix and load state with
    /// their peers over --ha-port). Unset: one replica (or --ha-enable-leader-election).
    #[arg(long, value_parser = ha_mode, value_name = "MODE")]
    pub ha_mode: Option<HaMode>,

    /// Active-active: the port of the replica state sync (gRPC; TLS like ext_proc).
    #[arg(long, default_value_t = 9004, value_parser = port)]
    pub ha_port: u16,

    /// Active-active: the peers' sync addresses (`host:port,...`; this replica's own address
    /// may be listed and is skipped). Unset: the other pods of this EPP's Deployment, found
    /// through the Kubernetes API (pods with this pod's labels, read via env POD_NAME and
    /// NAMESPACE), each at its pod IP and --ha-port.
    #[arg(long, value_name = "HOST:PORT,...", value_parser = unquoted)]
    pub ha_peers: Option<String>,

    /// Active-active: a starting replica waits this long at most for a peer's snapshot
    /// before it reports ready (cold) anyway.
    #[arg(long, default_value = "10s", value_parser = go_duration)]
    pub ha_bootstrap_timeout: Duration,

    /// Active-active: on SIGTERM, readiness turns NOT_SERVING at once but ext_proc keeps
    /// accepting new streams this long, so that the gateway's health check moves new
    /// requests to the other replicas before this one's listener closes (keep it above the
    /// gateway's health-check interval); then the drain goes on as --drain-timeout says.
    #[arg(long, default_value = "2s", value_parser = go_duration)]
    pub ha_handover_delay: Duration,

    /// Active-active: how often local changes are batched and sent to the peers. Hidden: for
    /// experiments.
    #[arg(long, default_value = "10ms", value_parser = go_duration, hide = true)]
    pub ha_sync_interval: Duration,

    /// Leader election: how long a Lease stays valid after its last renewal (whole
    /// seconds). Hidden: for tests; controller-runtime's default.
    #[arg(long, default_value = "15s", value_parser = go_duration, hide = true)]
    pub leader_election_lease_duration: Duration,

    /// Leader election: how long the leader keeps trying to renew before it steps down.
    /// Hidden: for tests; controller-runtime's default.
    #[arg(long, default_value = "10s", value_parser = go_duration, hide = true)]
    pub leader_election_renew_deadline: Duration,

    /// Leader election: time between attempts. Hidden: for tests; controller-runtime's
    /// default.
    #[arg(long, default_value = "2s", value_parser = go_duration, hide = true)]
    pub leader_election_retry_period: Duration,

    // --- Scheduling ---------------------------------------------------------------------
    /// Ignore the gateway's subset hint.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub disable_endpoint_subset_filter: bool,

    // --- Data layer ---------------------------------------------------------------------
    /// Scheme used to scrape model-server metrics: http or https (a `metrics-data-source`
    /// `scheme` parameter in the configuration wins).
    #[arg(long, default_value = "http", value_parser = unquoted)]
    pub model_server_metrics_scheme: String,

    /// Path of the model servers' metrics.
    #[arg(long, default_value = "/metrics", value_parser = unquoted)]
    pub model_server_metrics_path: String,

    /// Port of the model servers' metrics (0: the serving port). With Kubernetes
    /// discovery it applies only while the pool has exactly one target port, as in the
    /// reference.
    #[arg(long, default_value_t = 0, value_parser = port)]
    pub model_server_metrics_port: u16,

    /// With --model-server-metrics-scheme=https: accept any model-server certificate
    /// (default true, as the reference); false verifies it against the system roots, or the
    /// `caCertPath` of the configuration's `metrics-data-source`.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub model_server_metrics_https_insecure_skip_verify: bool,

    /// Interval to refresh metrics.
    #[arg(long, default_value = "50ms", value_parser = go_duration)]
    pub refresh_metrics_interval: Duration,

    /// Interval to flush Prometheus metrics (llmsched computes pool gauges at scrape time).
    #[arg(long, default_value = "5s", value_parser = go_duration)]
    pub refresh_prometheus_metrics_interval: Duration,

    /// Duration after which an endpoint's metrics are considered stale.
    #[arg(long, default_value = "2s", value_parser = go_duration)]
    pub metrics_staleness_threshold: Duration,

    /// Prometheus metric for the number of queued requests.
    #[arg(long, default_value = "vllm:num_requests_waiting", value_parser = unquoted)]
    pub total_queued_requests_metric: String,

    /// Prometheus metric for the number of running requests.
    #[arg(long, default_value = "vllm:num_requests_running", value_parser = unquoted)]
    pub total_running_requests_metric: String,

    /// Prometheus metric for the fraction of KV-cache blocks in use.
    #[arg(long, default_value = "vllm:kv_cache_usage_perc", value_parser = unquoted)]
    pub kv_cache_usage_percentage_metric: String,

    /// Prometheus metric for the LoRA info metrics.
    #[arg(long, default_value = "vllm:lora_requests_info", value_parser = unquoted)]
    pub lora_info_metric: String,

    /// Prometheus metric for the cache info metrics.
    #[arg(long, default_value = "vllm:cache_config_info", value_parser = unquoted)]
    pub cache_info_metric: String,

    // --- Observability ------------------------------------------------------------------
    /// OpenTelemetry tracing. Accepted for the chart's sake; no OTLP exporter is built in,
    /// so `--tracing=true` logs a warning and traces nothing.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub tracing: Option<bool>,

    /// pprof handlers: Go-only; accepted, and `--enable-pprof=true` logs that nothing is served.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub enable_pprof: Option<bool>,

    /// Authenticate /metrics: a bearer token allowed by a Kubernetes TokenReview and a
    /// SubjectAccessReview (get on /metrics); `--metrics-endpoint-auth=false` turns it off.
    /// Default: on, as the reference, whenever endpoints come from Kubernetes; off (with a
    /// log line) for static endpoints, where no Kubernetes client exists.
    /// `--metrics-endpoint-auth=true` without a usable kubeconfig is a startup error.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub metrics_endpoint_auth: Option<bool>,

    /// Log verbosity (0-1 info, 2-3 debug, 4+ trace), as the reference's -v.
    #[arg(short = 'v', long = "v", default_value_t = 0, value_parser = verbosity)]
    pub verbosity: u8,

    /// Log format: text or json (--zap-encoder wins when both are given).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log encoding, as controller-runtime's zap flag: json or console (text).
    #[arg(long, value_parser = zap_encoder)]
    pub zap_encoder: Option<ZapEncoder>,

    /// Log level, as controller-runtime's zap flag: debug, info, error, panic (as error) or
    /// an integer verbosity; wins over -v.
    #[arg(long, value_parser = zap_level)]
    pub zap_log_level: Option<ZapLevel>,

    /// zap development mode: debug level unless --zap-log-level says otherwise.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub zap_devel: bool,

    /// Level from which zap prints stack traces (info, error, panic); accepted, llmsched
    /// logs no stack traces.
    #[arg(long, value_parser = zap_stacktrace_level)]
    pub zap_stacktrace_level: Option<String>,

    /// Log timestamp format: epoch, millis, nano, iso8601, rfc3339 or rfc3339nano.
    #[arg(long, value_parser = zap_time_encoding)]
    pub zap_time_encoding: Option<TimeEncoding>,

    // --- Endpoint health, connections, shutdown (llmsched) ---------------------------------
    /// Leave unhealthy endpoints out of scheduling: never scraped, metrics older than
    /// --metrics-staleness-threshold, or failing (connection refused or reset, timeouts, the
    /// gateway's "upstream connect error" reply; readmitted by the next successful scrape
    /// after a doubling backoff). When none is healthy, all are candidates (fail-open).
    /// false: every endpoint is always a candidate, as in the reference.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub endpoint_health_checks: bool,

    /// Most open connections per listener (ext_proc, health, metrics, proxy). At the limit the
    /// connection idle the longest is closed to admit the new one; only when every
    /// connection has a request in flight is the new one refused.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_connections: usize,

    /// A new connection must start a request within this long (finish its TLS handshake and
    /// send a request head or gRPC stream); also the HTTP/1.1 header read timeout, which
    /// bounds the wait for the next request on a keep-alive connection.
    #[arg(long, default_value = "30s", value_parser = go_duration)]
    pub request_header_timeout: Duration,

    /// A connection with no request in flight for this long is closed (keep-alive idle).
    #[arg(long, default_value = "60s", value_parser = go_duration)]
    pub connection_idle_timeout: Duration,

    /// Proxy: longest gap between two chunks of a client's request body (then 408 and the
    /// connection closes). 0 disables.
    #[arg(long, default_value = "30s", value_parser = go_duration)]
    pub request_body_timeout: Duration,

    /// Proxy: longest wait for a model server's response headers (then 504 "upstream request
    /// timeout") and longest gap between two chunks of its response body (then the response
    /// is cut); the endpoint is marked failing either way. 0 disables.
    #[arg(long, default_value = "10m", value_parser = go_duration)]
    pub proxy_upstream_timeout: Duration,

    /// On SIGTERM or Ctrl-C: readiness turns NOT_SERVING at once, the ext_proc and proxy
    /// listeners stop accepting connections and streams, and requests in flight get this long
    /// to finish before they are cut. A second signal exits at once.
    #[arg(long, default_value = "60s", value_parser = go_duration)]
    pub drain_timeout: Duration,

    // --- Standalone mode ------------------------------------------------------------------
    /// Also serve an OpenAI-compatible HTTP proxy on this port (standalone mode, no gateway).
    #[arg(long, value_parser = port)]
    pub proxy_port: Option<u16>,

    /// Route proxy requests with a naive baseline instead of the scheduler (for comparisons).
    #[arg(long, value_parser = ["round-robin", "random"], requires = "proxy_port")]
    pub baseline: Option<String>,

    /// Prefill/decode disaggregation through the proxy: `in-process` runs the pd-sidecar's
    /// prefill and decode hops inside the proxy when the P/D plugins name a prefill endpoint;
    /// `sidecar` forwards `x-prefiller-host-port` to the decode endpoint, whose own
    /// `llmsched pd-sidecar` acts on it (as behind Envoy).
    #[arg(long, value_parser = ["in-process", "sidecar"], default_value = "in-process", requires = "proxy_port")]
    pub proxy_pd_routing: String,
}

/// A flag combination llmsched cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgsError(pub String);

/// Where the endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// `--endpoints` / `--endpoints-file`.
    Static,
    /// `--pool-name`: the InferencePool's pods.
    Pool {
        /// Pool name.
        name: String,
        /// Pool namespace (flag, else env `NAMESPACE`, else `default`).
        namespace: String,
        /// Pool API group.
        group: String,
    },
    /// `--endpoint-selector`: pods by label, without a pool.
    Selector {
        /// Equality selector.
        labels: std::collections::BTreeMap<String, String>,
        /// Target ports (1-8, unique).
        target_ports: Vec<u16>,
        /// Namespace (flag, else env `NAMESPACE`, else `default`).
        namespace: String,
    },
}

/// Parses an equality label selector (`k=v,k2==v2`), as the reference's
/// `--endpoint-selector`. Set-based selectors (`in`, `!=`, `!k`) are refused.
pub fn parse_label_selector(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        if part.contains("!=") {
            return Err(format!(
                "'{part}': only equality selectors (k=v) are supported"
            ));
        }
        let (k, v) = part
            .split_once("==")
            .or_else(|| part.split_once('='))
            .ok_or_else(|| format!("'{part}' is not of the form key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.contains(char::is_whitespace) || v.contains(char::is_whitespace) {
            return Err(format!("'{part}' is not of the form key=value"));
        }
        if let Some(prev) = out.insert(k.to_string(), v.to_string())
            && prev != v
        {
            return Err(format!("label '{k}' is given twice with different values"));
        }
    }
    if out.is_empty() {
        return Err("empty selector".into());
    }
    Ok(out)
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

impl Args {
    /// The namespace of the pool (or selected pods): `--pool-namespace`, else `namespace_env`
    /// (the value of env `NAMESPACE`), else `default`; empty values count as unset.
    pub fn resolved_namespace(&self, namespace_env: Option<&str>) -> String {
        non_empty(&self.pool_namespace)
            .or(namespace_env.filter(|s| !s.is_empty()))
            .unwrap_or("default")
            .to_string()
    }

    /// Where the endpoints come from; `namespace_env` is env `NAMESPACE`. Assumes
    /// [`Self::validate`] passed.
    pub fn discovery(&self, namespace_env: Option<&str>) -> Result<Discovery, ArgsError> {
        if let Some(name) = non_empty(&self.pool_name) {
            return Ok(Discovery::Pool {
                name: name.to_string(),
                namespace: self.resolved_namespace(namespace_env),
                group: self.pool_group.clone(),
            });
        }
        if let Some(sel) = non_empty(&self.endpoint_selector) {
            let labels = parse_label_selector(sel)
                .map_err(|e| ArgsError(format!("--endpoint-selector: {e}")))?;
            return Ok(Discovery::Selector {
                labels,
                target_ports: self.target_ports(),
                namespace: self.resolved_namespace(namespace_env),
            });
        }
        Ok(Discovery::Static)
    }

    /// `--endpoint-target-ports` without duplicates, in order.
    pub fn target_ports(&self) -> Vec<u16> {
        let mut out: Vec<u16> = Vec::with_capacity(self.endpoint_target_ports.len());
        for p in &self.endpoint_target_ports {
            if !out.contains(p) {
                out.push(*p);
            }
        }
        out
    }

    /// The HA mode: `--ha-mode`, else active-passive with `--ha-enable-leader-election`.
    pub fn resolved_ha_mode(&self) -> Option<HaMode> {
        self.ha_mode.or(self
            .ha_enable_leader_election
            .then_some(HaMode::ActivePassive))
    }

    /// True with leader election (`--ha-mode=active-passive` or
    /// `--ha-enable-leader-election`).
    pub fn leader_election(&self) -> bool {
        self.resolved_ha_mode() == Some(HaMode::ActivePassive)
    }

    /// `--ha-peers` as a list (empty entries dropped; `--ha-peers=` is an empty list);
    /// `None` when unset.
    pub fn ha_peer_list(&self) -> Option<Vec<String>> {
        // `--ha-peers=` (empty) is an empty list: a first replica with no peers yet.
        self.ha_peers.as_deref().map(|s| {
            s.split(',')
                .map(|p| unquote(p.trim()).to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
    }

    /// True when endpoints come from Kubernetes (`--pool-name` or `--endpoint-selector`).
    pub fn kubernetes(&self) -> bool {
        non_empty(&self.pool_name).is_some() || non_empty(&self.endpoint_selector).is_some()
    }

    /// Logging as the flags ask (`RUST_LOG`, when set, still wins in the binary).
    pub fn log_settings(&self) -> LogSettings {
        let level = match self.zap_log_level {
            Some(ZapLevel::Debug) => "debug",
            Some(ZapLevel::Info) => "info",
            Some(ZapLevel::Error) => "error",
            Some(ZapLevel::Verbosity(v)) => level_for_verbosity(v),
            None if self.zap_devel => "debug",
            None => level_for_verbosity(self.verbosity),
        };
        let json = match self.zap_encoder {
            Some(e) => e == ZapEncoder::Json,
            None => self.log_format == "json",
        };
        LogSettings {
            level,
            json,
            time_encoding: self.zap_time_encoding,
        }
    }

    /// Warnings about accepted flags that change nothing in llmsched, to log once at start.
    pub fn compatibility_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tracing == Some(true) {
            out.push(
                "--tracing=true: OpenTelemetry export is not built into llmsched; no traces are sent (pass --tracing=false to silence this)".to_string(),
            );
        }
        if self.enable_pprof == Some(true) {
            out.push(
                "--enable-pprof=true: pprof is Go-only; llmsched serves no pprof handlers"
                    .to_string(),
            );
        }
        if self.zap_stacktrace_level.is_some() {
            out.push("--zap-stacktrace-level: llmsched logs no stack traces; ignored".to_string());
        }
        if self.model_server_metrics_port != 0
            && self.endpoint_target_ports.len() > 1
            && !self.kubernetes()
        {
            out.push(
                "--model-server-metrics-port applies to every endpoint; with several target ports the reference ignores it".to_string(),
            );
        }
        out
    }

    /// Rejects what cannot be honoured, with a message that says why and what to do instead.
    pub fn validate(&self) -> Result<(), ArgsError> {
        let pool = non_empty(&self.pool_name).is_some();
        let selector = non_empty(&self.endpoint_selector).is_some();
        let file_or_flag = self.endpoints.is_some() || self.endpoints_file.is_some();
        if pool && selector {
            return Err(ArgsError(
                "either pool-name or endpoint-selector must be set, not both".into(),
            ));
        }
        if (pool || selector) && file_or_flag {
            return Err(ArgsError(format!(
                "--{} discovers endpoints from Kubernetes: drop --endpoints/--endpoints-file",
                if pool {
                    "pool-name"
                } else {
                    "endpoint-selector"
                }
            )));
        }
        if pool && !POOL_GROUPS.contains(&self.pool_group.as_str()) {
            return Err(ArgsError(format!(
                "--pool-group: unknown group '{}' (expected {})",
                self.pool_group,
                POOL_GROUPS.join(" or ")
            )));
        }
        if selector {
            if let Some(sel) = non_empty(&self.endpoint_selector) {
                parse_label_selector(sel)
                    .map_err(|e| ArgsError(format!("--endpoint-selector: {e}")))?;
            }
            let ports = self.target_ports();
            if ports.is_empty() || ports.len() > 8 {
                return Err(ArgsError(
                    "flag \"endpoint-target-ports\" should have length from 1 to 8".into(),
                ));
            }
        }
        if self.ha_enable_leader_election && self.ha_mode == Some(HaMode::ActiveActive) {
            return Err(ArgsError(
                "--ha-enable-leader-election is active-passive; it cannot be combined with --ha-mode=active-active (drop one)".into(),
            ));
        }
        if self.leader_election() && !pool && !selector {
            return Err(ArgsError(format!(
                "--{} needs Kubernetes discovery (--pool-name or --endpoint-selector)",
                if self.ha_enable_leader_election {
                    "ha-enable-leader-election"
                } else {
                    "ha-mode=active-passive"
                }
            )));
        }
        if self.ha_mode != Some(HaMode::ActiveActive) && self.ha_peers.is_some() {
            return Err(ArgsError(
                "--ha-peers is for --ha-mode=active-active".into(),
            ));
        }
        if let Some(peers) = self.ha_peer_list() {
            for p in &peers {
                let ok = p.rsplit_once(':').is_some_and(|(h, port)| {
                    !h.is_empty() && port.parse::<u16>().is_ok_and(|v| v != 0)
                });
                if !ok {
                    return Err(ArgsError(format!("--ha-peers: '{p}' is not host:port")));
                }
            }
        }
        if self.ha_mode == Some(HaMode::ActiveActive) && self.ha_sync_interval.is_zero() {
            return Err(ArgsError("--ha-sync-interval must be positive".into()));
        }
        if self.model_server_metrics_scheme != "http" && self.model_server_metrics_scheme != "https"
        {
            return Err(ArgsError(format!(
                "unexpected \"{}\" value for \"model-server-metrics-scheme\" flag, it can only be set to 'http' or 'https'",
                self.model_server_metrics_scheme
            )));
        }
        if !self.model_server_metrics_path.starts_with('/') {
            return Err(ArgsError(format!(
                "--model-server-metrics-path must start with '/', got '{}'",
                self.model_server_metrics_path
            )));
        }
        if self.target_ports().len() > 8 {
            return Err(ArgsError(
                "flag \"endpoint-target-ports\" should have length from 1 to 8".into(),
            ));
        }
        if !file_or_flag && !pool && !selector {
            return Err(ArgsError(
                "no endpoints: pass --pool-name NAME (Kubernetes InferencePool), --endpoint-selector k=v with --endpoint-target-ports (Kubernetes pods), --endpoints ip:port[,ip:port...] or --endpoints-file FILE".into(),
            ));
        }
        if self.endpoints.is_some() && self.endpoints_file.is_some() {
            return Err(ArgsError(
                "--endpoints and --endpoints-file cannot be used together".into(),
            ));
        }
        if self.cert_path.is_some() && !self.secure_serving {
            return Err(ArgsError(
                "--cert-path is set but --secure-serving=false: drop one of them".into(),
            ));
        }
        if self.config_reload_interval.is_zero() {
            return Err(ArgsError(
                "--config-reload-interval must be positive".into(),
            ));
        }
        if self.refresh_metrics_interval.is_zero() {
            return Err(ArgsError(
                "--refresh-metrics-interval must be positive".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ArgsError("--max-connections must be at least 1".into()));
        }
        for (flag, d) in [
            ("request-header-timeout", self.request_header_timeout),
            ("connection-idle-timeout", self.connection_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(ArgsError(format!("--{flag} must be positive")));
            }
        }
        let ports = [
            ("grpc-port", Some(self.grpc_port)),
            ("grpc-health-port", Some(self.grpc_health_port)),
            ("metrics-port", Some(self.metrics_port)),
            ("proxy-port", self.proxy_port),
            (
                "ha-port",
                (self.ha_mode == Some(HaMode::ActiveActive)).then_some(self.ha_port),
            ),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if let (Some(pa), Some(pb)) = (pa, pb)
                    && *pa != 0
                    && pa == pb
                {
                    return Err(ArgsError(format!("--{a} and --{b} are both {pa}")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        let mut v = vec!["epp"];
        v.extend_from_slice(args);
        let a = Args::try_parse_from(v).map_err(|e| e.to_string())?;
        a.validate().map_err(|e| e.to_string())?;
        Ok(a)
    }

    #[test]
    fn defaults_match_the_reference() {
        let a = parse(&["--endpoints", "127.0.0.1:8000"]).unwrap();
        assert_eq!(a.grpc_port, 9002);
        assert_eq!(a.grpc_health_port, 9003);
        assert_eq!(a.metrics_port, 9090);
        assert!(a.secure_serving);
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(
            a.refresh_prometheus_metrics_interval,
            Duration::from_secs(5)
        );
        assert_eq!(a.metrics_staleness_threshold, Duration::from_secs(2));
        assert_eq!(
            a.kv_cache_usage_percentage_metric,
            "vllm:kv_cache_usage_perc"
        );
        assert_eq!(a.total_queued_requests_metric, "vllm:num_requests_waiting");
        assert_eq!(a.pool_group, "inference.networking.k8s.io");
        assert_eq!(a.max_request_body_bytes, 64 << 20, "the proxy's 64 MiB");
        assert!(a.endpoint_health_checks);
        assert_eq!(a.max_connections, 10_000);
        assert_eq!(a.request_header_timeout, Duration::from_secs(30));
        assert_eq!(a.connection_idle_timeout, Duration::from_secs(60));
        assert_eq!(a.request_body_timeout, Duration::from_secs(30));
        assert_eq!(a.proxy_upstream_timeout, Duration::from_secs(600));
        assert_eq!(
            a.drain_timeout,
            Duration::from_secs(60),
            "inside the chart's 130 s"
        );
        let a = parse(&["--endpoints=a:1", "--max-request-body-bytes=1Mi"]).unwrap();
        assert_eq!(a.max_request_body_bytes, 1 << 20);
        let a = parse(&["--endpoints=a:1", "--max-request-body-bytes", "4096"]).unwrap();
        assert_eq!(a.max_request_body_bytes, 4096);
        let a = parse(&[
            "--endpoints=a:1",
            "--model-server-metrics-scheme=https",
            "--model-server-metrics-https-insecure-skip-verify=false",
        ])
        .unwrap();
        assert_eq!(a.model_server_metrics_scheme, "https");
        assert!(!a.model_server_metrics_https_insecure_skip_verify);
        let a = parse(&["--endpoints=a:1"]).unwrap();
        assert!(a.config_reload);
        assert_eq!(a.config_reload_interval, Duration::from_secs(1));
        let a = parse(&[
            "--endpoints=a:1",
            "--config-reload=false",
            "--config-reload-interval=250ms",
        ])
        .unwrap();
        assert!(!a.config_reload);
        assert_eq!(a.config_reload_interval, Duration::from_millis(250));
    }

    #[test]
    fn go_style_booleans_and_durations() {
        let a = parse(&[
            "--endpoints=127.0.0.1:8000",
            "--secure-serving=false",
            "--refresh-metrics-interval=100ms",
            "--metrics-staleness-threshold=1m30s",
            "--disable-endpoint-subset-filter",
            "--tracing=false",
            "--enable-pprof=false",
            "-v",
            "4",
        ])
        .unwrap();
        assert!(!a.secure_serving);
        assert!(a.disable_endpoint_subset_filter);
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(100));
        assert_eq!(a.metrics_staleness_threshold, Duration::from_secs(90));
        assert_eq!(a.verbosity, 4);
    }

    #[test]
    fn bad_and_unsupported_flags_are_rejected_with_reasons() {
        let cases: &[(&[&str], &str)] = &[
            (&["--endpoints=a:1", "--grpc-port=99999"], "out of range"),
            (
                &["--endpoints=a:1", "--refresh-metrics-interval=50"],
                "missing unit",
            ),
            (&["--endpoints=a:1", "--no-such-flag"], "no-such-flag"),
            (
                &["--endpoints=a:1", "--pool-name=p"],
                "drop --endpoints/--endpoints-file",
            ),
            (
                &["--endpoints-file=f", "--endpoint-selector=app=x"],
                "drop --endpoints/--endpoints-file",
            ),
            (
                &["--pool-name=p", "--endpoint-selector=app=x"],
                "either pool-name or endpoint-selector",
            ),
            (
                &["--pool-name=p", "--pool-group=example.com"],
                "unknown group",
            ),
            (&["--pool-name=p", "--pool-group="], "unknown group ''"),
            (
                &["--endpoint-selector=app=x"],
                "\"endpoint-target-ports\" should have length from 1 to 8",
            ),
            (
                &["--endpoint-selector=app!=x", "--endpoint-target-ports=8000"],
                "only equality selectors",
            ),
            (
                &["--endpoint-selector=app", "--endpoint-target-ports=8000"],
                "key=value",
            ),
            (
                &[
                    "--endpoint-selector=a=1",
                    "--endpoint-target-ports=1,2,3,4,5,6,7,8,9",
                ],
                "length from 1 to 8",
            ),
            (
                &["--endpoints=a:1", "--ha-enable-leader-election"],
                "needs Kubernetes discovery",
            ),
            (
                &["--endpoints=a:1", "--ha-mode=active-passive"],
                "ha-mode=active-passive needs Kubernetes discovery",
            ),
            (&["--endpoints=a:1", "--ha-mode=both"], "not an HA mode"),
            (
                &[
                    "--pool-name=p",
                    "--ha-mode=active-active",
                    "--ha-enable-leader-election",
                ],
                "cannot be combined",
            ),
            (
                &["--endpoints=a:1", "--ha-peers=b:1"],
                "for --ha-mode=active-active",
            ),
            (
                &[
                    "--endpoints=a:1",
                    "--ha-mode=active-active",
                    "--ha-peers=b:1,c",
                ],
                "'c' is not host:port",
            ),
            (
                &[
                    "--endpoints=a:1",
                    "--ha-mode=active-active",
                    "--ha-peers=b:0",
                ],
                "not host:port",
            ),
            (
                &[
                    "--endpoints=a:1",
                    "--ha-mode=active-active",
                    "--ha-port=9002",
                ],
                "--grpc-port and --ha-port are both 9002",
            ),
            (
                &[
                    "--endpoints=a:1",
                    "--ha-mode=active-active",
                    "--ha-bootstrap-timeout=x",
                ],
                "ha-bootstrap-timeout",
            ),
            (&["--pool-name=p", "--tracing=maybe"], "not a boolean"),
            (&["--pool-name=p", "--tracing="], "not a boolean"),
            (&["--pool-name=p", "--grpc-port="], "empty value"),
            (&["--pool-name=p", "--grpc-port", ""], "empty value"),
            (
                &["--pool-name=p", "--refresh-metrics-interval="],
                "empty value",
            ),
            (&["--pool-name=p", "--v="], "not a verbosity level"),
            (&["--pool-name=p", "--zap-encoder=yaml"], "json or console"),
            (&["--pool-name=p", "--zap-encoder", ""], "json or console"),
            (
                &["--pool-name=p", "--zap-log-level=loud"],
                "invalid log level",
            ),
            (&["--pool-name=p", "--zap-log-level=0"], "invalid log level"),
            (
                &["--pool-name=p", "--zap-stacktrace-level=warn"],
                "info, error or panic",
            ),
            (
                &["--pool-name=p", "--zap-time-encoding=unix"],
                "rfc3339nano",
            ),
            (
                &["--endpoints=a:1", "--model-server-metrics-scheme=ftp"],
                "can only be set to 'http' or 'https'",
            ),
            (&[], "no endpoints: pass --pool-name"),
            (&["--pool-name="], "no endpoints"),
            (
                &["--endpoints=a:1", "--endpoints-file=x"],
                "cannot be used together",
            ),
            (
                &["--endpoints=a:1", "--config-file=a", "--config-text=b"],
                "cannot be used with",
            ),
            (&["--endpoints=a:1", "--metrics-port=9002"], "both 9002"),
            (
                &["--endpoints=a:1", "--max-request-body-bytes=0"],
                "at least 1 byte",
            ),
            (&["--endpoints=a:1", "--max-connections=0"], "at least 1"),
            (
                &["--endpoints=a:1", "--request-header-timeout=0"],
                "must be positive",
            ),
            (
                &["--endpoints=a:1", "--drain-timeout=forever"],
                "drain-timeout",
            ),
            (
                &["--endpoints=a:1", "--config-reload-interval=0s"],
                "--config-reload-interval must be positive",
            ),
            (
                &["--endpoints=a:1", "--config-reload=sometimes"],
                "config-reload",
            ),
            (
                &["--endpoints=a:1", "--endpoint-health-checks=maybe"],
                "endpoint-health-checks",
            ),
            (
                &["--endpoints=a:1", "--max-request-body-bytes=lots"],
                "max-request-body-bytes",
            ),
            (
                &["--endpoints=a:1", "--baseline=round-robin"],
                "--proxy-port",
            ),
            (
                &["--endpoints=a:1", "--proxy-port=8080", "--baseline=fastest"],
                "fastest",
            ),
            (
                &[
                    "--endpoints=a:1",
                    "--proxy-port=8080",
                    "--proxy-pd-routing=both",
                ],
                "in-process",
            ),
            (
                &["--endpoints=a:1", "--proxy-pd-routing=sidecar"],
                "--proxy-port",
            ),
            (
                &["--endpoints=a:1", "--secure-serving", "false"],
                "unexpected argument",
            ),
        ];
        for (args, needle) in cases {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: expected '{needle}' in: {e}");
        }
    }

    /// The `inferencepool` chart's argument list, exactly as the container receives it.
    #[test]
    fn the_charts_exact_arguments_start_the_epp() {
        let a = parse(&[
            "--pool-name",
            "gaie-inference-scheduling",
            "--pool-namespace",
            "llm-d",
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--kv-cache-usage-percentage-metric",
            "vllm:kv_cache_usage_perc",
            "--v",
            "1",
            "--tracing=false",
        ])
        .unwrap();
        assert_eq!(
            a.discovery(None).unwrap(),
            Discovery::Pool {
                name: "gaie-inference-scheduling".into(),
                namespace: "llm-d".into(),
                group: "inference.networking.k8s.io".into(),
            }
        );
        assert_eq!(
            a.config_file.as_deref(),
            Some(std::path::Path::new("/config/default-plugins.yaml"))
        );
        assert_eq!(a.verbosity, 1);
        assert_eq!(a.tracing, Some(false));
        assert_eq!(
            a.metrics_endpoint_auth, None,
            "unset: on whenever a Kubernetes client exists, as the reference"
        );
        assert_eq!(a.leader_election_lease_duration, Duration::from_secs(15));
        assert_eq!(a.leader_election_renew_deadline, Duration::from_secs(10));
        assert_eq!(a.leader_election_retry_period, Duration::from_secs(2));
        assert!(!a.ha_enable_leader_election);
        assert_eq!(
            a.log_settings(),
            LogSettings {
                level: "info",
                json: true,
                time_encoding: None
            }
        );
        assert!(a.compatibility_warnings().is_empty());
        // The same list in --flag=value form, with the quotes newer charts render.
        let b = parse(&[
            "--pool-name=gaie-inference-scheduling",
            "--pool-namespace=\"llm-d\"",
            "--pool-group=\"inference.networking.k8s.io\"",
            "--zap-encoder=\"json\"",
            "--config-file=\"/config/default-plugins.yaml\"",
            "--kv-cache-usage-percentage-metric=\"vllm:kv_cache_usage_perc\"",
            "--total-queued-requests-metric=\"sglang:num_queue_reqs\"",
            "--v=\"1\"",
            "--tracing=false",
            "--ha-enable-leader-election",
        ])
        .unwrap();
        assert_eq!(b.discovery(None).unwrap(), a.discovery(None).unwrap());
        assert_eq!(b.config_file, a.config_file);
        assert_eq!(b.total_queued_requests_metric, "sglang:num_queue_reqs");
        assert_eq!(
            b.kv_cache_usage_percentage_metric,
            "vllm:kv_cache_usage_perc"
        );
        assert!(b.ha_enable_leader_election);
        assert_eq!(b.log_settings(), a.log_settings());
    }

    #[test]
    fn ha_modes() {
        let a = parse(&["--endpoints=a:1"]).unwrap();
        assert_eq!(a.resolved_ha_mode(), None);
        assert_eq!(a.ha_port, 9004);
        assert_eq!(a.ha_bootstrap_timeout, Duration::from_secs(10));
        let b = parse(&["--pool-name=p", "--ha-enable-leader-election"]).unwrap();
        assert_eq!(b.resolved_ha_mode(), Some(HaMode::ActivePassive));
        assert!(b.leader_election());
        let c = parse(&["--pool-name=p", "--ha-mode=active-passive"]).unwrap();
        assert!(c.leader_election());
        let d = parse(&[
            "--endpoints=a:1",
            "--ha-mode",
            "active-active",
            "--ha-port=0",
            "--ha-peers",
            "\"10.0.0.2:9004, epp-1.epp:9004,,[::1]:9004\"",
        ])
        .unwrap();
        assert_eq!(d.resolved_ha_mode(), Some(HaMode::ActiveActive));
        assert!(!d.leader_election());
        assert_eq!(
            d.ha_peer_list().unwrap(),
            vec!["10.0.0.2:9004", "epp-1.epp:9004", "[::1]:9004"]
        );
        // Active-active without --ha-peers finds its peers through Kubernetes.
        let e = parse(&["--pool-name=p", "--ha-mode=active-active"]).unwrap();
        assert_eq!(e.ha_peer_list(), None);
    }

    #[test]
    fn pool_namespace_falls_back_to_env_then_default() {
        let a = parse(&["--pool-name=p"]).unwrap();
        assert_eq!(a.resolved_namespace(Some("from-env")), "from-env");
        assert_eq!(a.resolved_namespace(None), "default");
        assert_eq!(a.resolved_namespace(Some("")), "default");
        let b = parse(&["--pool-name=p", "--pool-namespace="]).unwrap();
        assert_eq!(b.resolved_namespace(Some("from-env")), "from-env");
        let c = parse(&["--pool-name=p", "--pool-namespace", "ns"]).unwrap();
        assert_eq!(c.resolved_namespace(Some("from-env")), "ns");
        let d = parse(&[
            "--pool-name=p",
            "--pool-group=inference.networking.x-k8s.io",
        ])
        .unwrap();
        assert!(matches!(
            d.discovery(None).unwrap(),
            Discovery::Pool { group, .. } if group == "inference.networking.x-k8s.io"
        ));
    }

    #[test]
    fn endpoint_selector_mode() {
        let a = parse(&[
            "--endpoint-selector",
            "app=vllm, llm-d.ai/role==decode",
            "--endpoint-target-ports",
            "8000,8001",
            "--endpoint-target-ports=8000",
            "--endpoint-target-ports",
            "\"8002\"",
        ])
        .unwrap();
        assert_eq!(
            a.discovery(Some("ns")).unwrap(),
            Discovery::Selector {
                labels: [
                    ("app".to_string(), "vllm".to_string()),
                    ("llm-d.ai/role".to_string(), "decode".to_string())
                ]
                .into(),
                target_ports: vec![8000, 8001, 8002],
                namespace: "ns".into(),
            }
        );
        assert!(a.kubernetes());
        assert!(!parse(&["--endpoints=1.2.3.4:5"]).unwrap().kubernetes());
    }

    #[test]
    fn zap_flags_map_onto_logging() {
        let a = parse(&[
            "--pool-name=p",
            "--zap-encoder=console",
            "--log-format=json",
            "--zap-log-level",
            "debug",
            "--zap-time-encoding",
            "rfc3339nano",
            "--zap-stacktrace-level=error",
            "--v=5",
        ])
        .unwrap();
        assert_eq!(
            a.log_settings(),
            LogSettings {
                level: "debug",
                json: false,
                time_encoding: Some(TimeEncoding::Rfc3339Nano)
            }
        );
        assert_eq!(a.compatibility_warnings().len(), 1, "stacktrace level");
        let levels = [
            (vec!["--zap-log-level=info"], "info"),
            (vec!["--zap-log-level=error"], "error"),
            (vec!["--zap-log-level=panic"], "error"),
            (vec!["--zap-log-level=3"], "debug"),
            (vec!["--zap-log-level=4"], "trace"),
            (vec!["--zap-devel"], "debug"),
            (vec!["--zap-devel=false"], "info"),
            (vec!["-v", "4"], "trace"),
            (vec!["-v=2"], "debug"),
            (vec!["--v", "1"], "info"),
        ];
        for (flags, level) in levels {
            let mut argv = vec!["--pool-name=p"];
            argv.extend(flags.iter().copied());
            assert_eq!(
                parse(&argv).unwrap().log_settings().level,
                level,
                "{flags:?}"
            );
        }
        assert!(
            parse(&["--pool-name=p", "--log-format=json"])
                .unwrap()
                .log_settings()
                .json
        );
    }

    #[test]
    fn reference_only_flags_are_accepted_with_a_warning() {
        let a = parse(&[
            "--pool-name=p",
            "--tracing",
            "--enable-pprof=true",
            "--health-checking",
            "--enable-cert-reload=True",
            "--metrics-endpoint-auth=false",
        ])
        .unwrap();
        let w = a.compatibility_warnings().join("\n");
        assert!(
            w.contains("OpenTelemetry export is not built into llmsched"),
            "{w}"
        );
        assert!(w.contains("pprof is Go-only"), "{w}");
        assert!(a.health_checking);
        assert!(a.enable_cert_reload);
        assert_eq!(a.metrics_endpoint_auth, Some(false));
        for (flag, want) in [
            ("--metrics-endpoint-auth", true),
            ("--metrics-endpoint-auth=true", true),
            ("--metrics-endpoint-auth=0", false),
            ("--metrics-endpoint-auth=F", false),
        ] {
            assert_eq!(
                parse(&["--pool-name=p", flag])
                    .unwrap()
                    .metrics_endpoint_auth,
                Some(want),
                "{flag}"
            );
        }
    }

    #[test]
    fn unquote_strips_one_matching_pair() {
        assert_eq!(unquote("\"a\""), "a");
        assert_eq!(unquote("'a'"), "a");
        assert_eq!(unquote("\"\""), "");
        assert_eq!(unquote("\""), "\"");
        assert_eq!(unquote("\"a'"), "\"a'");
        assert_eq!(unquote("a\"b\""), "a\"b\"");
        assert_eq!(unquote("\"\"a\"\""), "\"a\"");
    }
}
