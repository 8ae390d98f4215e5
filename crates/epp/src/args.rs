//! Command-line flags of `llmsched epp`: the reference EPP's flags, same names and defaults,
//! plus llmsched's own (endpoints and objectives without Kubernetes, the built-in proxy).
//!
//! Go's flag syntax is honoured where users rely on it: booleans take `--flag`,
//! `--flag=true` or `--flag=false`; durations are Go durations (`50ms`, `2s`). Flags of the
//! reference that llmsched cannot honour (Kubernetes discovery, leader election, tracing,
//! pprof, authenticated metrics) are rejected with a message saying so, never silently
//! ignored; see [`Args::validate`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use llmsched_core::units::parse_go_duration;

fn go_duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).map_err(|e| e.to_string())
}

fn body_bytes(s: &str) -> Result<usize, String> {
    let v = llmsched_core::units::parse_quantity(s).map_err(|e| e.to_string())?;
    if v == 0 {
        return Err("must be at least 1 byte".into());
    }
    usize::try_from(v).map_err(|_| format!("{v} bytes is more than this machine can address"))
}

fn port(s: &str) -> Result<u16, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a port number"))?;
    u16::try_from(v).map_err(|_| format!("port {v} is out of range (0-65535)"))
}

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
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: String,

    /// Serve ext_proc over TLS (self-signed certificate unless --cert-path). Use
    /// --secure-serving=false for plaintext.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub secure_serving: bool,

    /// Directory holding tls.crt and tls.key for secure serving.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,

    /// Reload the certificates in --cert-path when they change.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_cert_reload: bool,

    /// Largest request body accepted, in bytes (a plain number or a quantity such as 64Mi),
    /// on the ext_proc path and the proxy: a larger one is answered 413 (`PayloadTooLarge`)
    /// without being buffered. Also the most of a non-streaming response held for the
    /// model-name rewrite.
    #[arg(long, default_value = "67108864", value_parser = body_bytes, value_name = "BYTES")]
    pub max_request_body_bytes: usize,

    /// Enables gRPC health checking (the health server always runs; accepted for compatibility).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub health_checking: bool,

    // --- Configuration ------------------------------------------------------------------
    /// The path to the EndpointPickerConfig file.
    #[arg(long, conflicts_with = "config_text")]
    pub config_file: Option<PathBuf>,

    /// The EndpointPickerConfig as text, in lieu of a file.
    #[arg(long)]
    pub config_text: Option<String>,

    // --- Endpoints without Kubernetes ----------------------------------------------------
    /// Static endpoints: ip:port[,ip:port...].
    #[arg(long, value_name = "IP:PORT,...")]
    pub endpoints: Option<String>,

    /// YAML file `endpoints: [{name, address, port, labels}]`, reloaded when it changes.
    #[arg(long, value_name = "FILE")]
    pub endpoints_file: Option<PathBuf>,

    /// Multi-document YAML of InferenceObjective / InferenceModelRewrite manifests, reloaded
    /// when it changes.
    #[arg(long, value_name = "FILE")]
    pub objectives_file: Option<PathBuf>,

    /// Target ports of model server pods (endpoints-file entries without a port get one
    /// endpoint per target port).
    #[arg(long, value_delimiter = ',', value_parser = port)]
    pub endpoint_target_ports: Vec<u16>,

    // --- Kubernetes (rejected: not supported yet) ----------------------------------------
    /// Name of the InferencePool (Kubernetes discovery; not supported yet).
    #[arg(long)]
    pub pool_name: Option<String>,

    /// Namespace of the InferencePool (Kubernetes discovery; not supported yet).
    #[arg(long)]
    pub pool_namespace: Option<String>,

    /// Resource group of the InferencePool.
    #[arg(long, default_value = "inference.networking.k8s.io")]
    pub pool_group: String,

    /// Label selector of model server pods (Kubernetes discovery; not supported yet).
    #[arg(long)]
    pub endpoint_selector: Option<String>,

    /// Leader election for HA (not supported yet).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ha_enable_leader_election: bool,

    // --- Scheduling ---------------------------------------------------------------------
    /// Ignore the gateway's subset hint.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub disable_endpoint_subset_filter: bool,

    // --- Data layer ---------------------------------------------------------------------
    /// Scheme used to scrape model-server metrics (only http is supported).
    #[arg(long, default_value = "http")]
    pub model_server_metrics_scheme: String,

    /// Path of the model servers' metrics.
    #[arg(long, default_value = "/metrics")]
    pub model_server_metrics_path: String,

    /// Port of the model servers' metrics (0: the serving port).
    #[arg(long, default_value_t = 0, value_parser = port)]
    pub model_server_metrics_port: u16,

    /// Deprecated; accepted for compatibility (https scraping is not supported).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
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
    #[arg(long, default_value = "vllm:num_requests_waiting")]
    pub total_queued_requests_metric: String,

    /// Prometheus metric for the number of running requests.
    #[arg(long, default_value = "vllm:num_requests_running")]
    pub total_running_requests_metric: String,

    /// Prometheus metric for the fraction of KV-cache blocks in use.
    #[arg(long, default_value = "vllm:kv_cache_usage_perc")]
    pub kv_cache_usage_percentage_metric: String,

    /// Prometheus metric for the LoRA info metrics.
    #[arg(long, default_value = "vllm:lora_requests_info")]
    pub lora_info_metric: String,

    /// Prometheus metric for the cache info metrics.
    #[arg(long, default_value = "vllm:cache_config_info")]
    pub cache_info_metric: String,

    // --- Observability ------------------------------------------------------------------
    /// Emit OpenTelemetry traces (not supported yet: pass --tracing=false to silence).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub tracing: Option<bool>,

    /// pprof handlers (Go-only; accepted as --enable-pprof=false).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub enable_pprof: Option<bool>,

    /// Authenticate /metrics with Kubernetes TokenReview (not supported yet; accepted as
    /// --metrics-endpoint-auth=false).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub metrics_endpoint_auth: Option<bool>,

    /// Log verbosity (0 info, 2 debug-ish, 4+ trace), as the reference's -v.
    #[arg(short = 'v', long = "v", default_value_t = 0)]
    pub verbosity: u8,

    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    // --- Endpoint health, connections, shutdown (llmsched) ---------------------------------
    /// Leave unhealthy endpoints out of scheduling: never scraped, metrics older than
    /// --metrics-staleness-threshold, or failing (connection refused or reset, timeouts, the
    /// gateway's "upstream connect error" reply; readmitted by the next successful scrape
    /// after a doubling backoff). When none is healthy, all are candidates (fail-open).
    /// false: every endpoint is always a candidate, as in the reference.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
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
}

/// A flag combination llmsched cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgsError(pub String);

impl Args {
    /// Rejects what cannot be honoured, with a message that says why and what to do instead.
    pub fn validate(&self) -> Result<(), ArgsError> {
        let unsupported = |flag: &str, why: &str| {
            Err(ArgsError(format!(
                "flag --{flag} is not supported by llmsched yet: {why}"
            )))
        };
        if self.pool_name.is_some() || self.pool_namespace.is_some() {
            return unsupported(
                "pool-name/--pool-namespace",
                "Kubernetes InferencePool discovery is not implemented; list endpoints with --endpoints or --endpoints-file",
            );
        }
        if self.endpoint_selector.is_some() {
            return unsupported(
                "endpoint-selector",
                "Kubernetes pod discovery is not implemented; list endpoints with --endpoints or --endpoints-file",
            );
        }
        if self.ha_enable_leader_election {
            return unsupported("ha-enable-leader-election", "run a single replica");
        }
        if self.tracing == Some(true) {
            return unsupported(
                "tracing",
                "OpenTelemetry export is not implemented; pass --tracing=false",
            );
        }
        if self.enable_pprof == Some(true) {
            return unsupported(
                "enable-pprof",
                "pprof is Go-only; pass --enable-pprof=false",
            );
        }
        if self.metrics_endpoint_auth == Some(true) {
            return unsupported(
                "metrics-endpoint-auth",
                "Kubernetes TokenReview authentication is not implemented; pass --metrics-endpoint-auth=false",
            );
        }
        if self.model_server_metrics_scheme != "http" {
            if self.model_server_metrics_scheme == "https" {
                return unsupported(
                    "model-server-metrics-scheme=https",
                    "metrics are scraped over http only",
                );
            }
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
        if self.endpoint_target_ports.len() > 8 {
            return Err(ArgsError(
                "flag \"endpoint-target-ports\" should have length from 1 to 8".into(),
            ));
        }
        if self.endpoints.is_none() && self.endpoints_file.is_none() {
            return Err(ArgsError(
                "no endpoints: pass --endpoints ip:port[,ip:port...] or --endpoints-file FILE (Kubernetes discovery is not supported yet)".into(),
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
                "Kubernetes InferencePool discovery",
            ),
            (
                &["--endpoints=a:1", "--endpoint-selector=app=x"],
                "not supported by llmsched yet",
            ),
            (
                &["--endpoints=a:1", "--ha-enable-leader-election"],
                "ha-enable-leader-election",
            ),
            (&["--endpoints=a:1", "--tracing"], "--tracing=false"),
            (
                &["--endpoints=a:1", "--metrics-endpoint-auth=true"],
                "TokenReview",
            ),
            (
                &["--endpoints=a:1", "--model-server-metrics-scheme=ftp"],
                "can only be set to 'http' or 'https'",
            ),
            (
                &["--endpoints=a:1", "--model-server-metrics-scheme=https"],
                "http only",
            ),
            (&[], "no endpoints"),
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
                &["--endpoints=a:1", "--secure-serving", "false"],
                "unexpected argument",
            ),
        ];
        for (args, needle) in cases {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: expected '{needle}' in: {e}");
        }
    }
}
