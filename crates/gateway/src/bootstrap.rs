//! Envoy bootstrap generation for standalone deployments.
//!
//! Two modes ([`Mode`]):
//!
//! * [`Mode::Epp`] — the reference's standalone gateway: the `ext_proc` HTTP filter calls the
//!   EPP for every request (headers, bodies and trailers both ways, `FULL_DUPLEX_STREAMED`),
//!   and the route goes to an `ORIGINAL_DST` cluster that connects to whatever `ip:port` the
//!   EPP wrote into `x-gateway-destination-endpoint`. The EPP is a gRPC cluster over TLS (the
//!   EPP's default; certificates are not verified, as the reference configures it) or
//!   plaintext, health-checked with gRPC health on service
//!   `envoy.service.ext_proc.v3.ExternalProcessor`.
//! * [`Mode::RoundRobin`] — the baseline "Kubernetes Service": the same listener and
//!   connection manager, no `ext_proc`, a `STATIC` cluster of the model servers with
//!   `ROUND_ROBIN` load balancing.
//!
//! [`BootstrapConfig::render`] writes commented YAML; every setting is explained where it is
//! written (see also the crate README).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::GatewayError;

/// Name of the HTTP listener (looked up by the launcher to learn its port).
pub const LISTENER_NAME: &str = "llmsched";
/// Name of the EPP cluster.
pub const EPP_CLUSTER: &str = "llmsched_epp";
/// Name of the `ORIGINAL_DST` cluster.
pub const ORIGINAL_DST_CLUSTER: &str = "original_destination_cluster";
/// Name of the round-robin cluster.
pub const ROUND_ROBIN_CLUSTER: &str = "llmsched_endpoints";
/// Response header carrying the upstream host Envoy used (with
/// [`BootstrapConfig::upstream_host_header`]).
pub const UPSTREAM_HOST_HEADER: &str = "x-llmsched-upstream-host";
/// The gRPC health service name Envoy checks.
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// What the gateway does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// ext_proc EPP + `ORIGINAL_DST` cluster driven by `x-gateway-destination-endpoint`.
    Epp,
    /// A plain `ROUND_ROBIN` cluster over the endpoints (the baseline).
    RoundRobin,
}

/// Where the EPP is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EppTarget {
    /// Host (IP address or DNS name) of the EPP.
    pub host: String,
    /// ext_proc gRPC port (`--grpc-port`, 9002).
    pub grpc_port: u16,
    /// Port Envoy health-checks: the EPP's `--grpc-health-port` (9003, plaintext), or the
    /// ext_proc port itself when equal to `grpc_port` (then the EPP must run with
    /// `--health-checking` so it serves health there too).
    pub health_port: u16,
    /// The EPP serves ext_proc over TLS (`--secure-serving`, the default).
    pub tls: bool,
}

impl Default for EppTarget {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            grpc_port: 9002,
            health_port: 9003,
            tls: true,
        }
    }
}

/// Everything the generated bootstrap depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapConfig {
    /// The mode.
    pub mode: Mode,
    /// Where clients connect (port 0: any free port; the launcher reports it).
    pub listen: SocketAddr,
    /// Envoy's admin interface (`/ready`, `/stats`, `/clusters`); keep it on loopback.
    pub admin: SocketAddr,
    /// The EPP (mode `epp`).
    pub epp: EppTarget,
    /// More replicas of the EPP (`--ha-mode=active-active`), in the same cluster as `epp`:
    /// each health-checked on its own; new ext_proc streams go to the healthy ones.
    pub extra_epps: Vec<EppTarget>,
    /// The model servers (mode `round-robin`).
    pub endpoints: Vec<SocketAddr>,
    /// Turn the request header `x-gateway-destination-endpoint-subset: ip[:port],…` into
    /// the `envoy.lb.subset_hint` metadata the EPP reads (a small Lua filter; mode `epp`).
    pub subset_hint_header: bool,
    /// Add `x-llmsched-upstream-host: <ip:port>` to responses (the host Envoy really used).
    pub upstream_host_header: bool,
    /// Log every request to stdout.
    pub access_log: bool,
    /// Let requests through unprocessed when the EPP cannot be reached (`failure_mode_allow`;
    /// the reference keeps it off: fail closed).
    pub failure_mode_allow: bool,
    /// How often Envoy health-checks the EPP (the reference: 10 s).
    pub health_check_interval: Duration,
    /// `per_connection_buffer_limit_bytes` of the listener and clusters (the reference:
    /// 32 KiB; Envoy's default is 1 MiB).
    pub buffer_limit_bytes: u32,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Epp,
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            admin: SocketAddr::from(([127, 0, 0, 1], 19000)),
            epp: EppTarget::default(),
            extra_epps: Vec::new(),
            endpoints: Vec::new(),
            subset_hint_header: false,
            upstream_host_header: false,
            access_log: false,
            failure_mode_allow: false,
            health_check_interval: Duration::from_secs(10),
            buffer_limit_bytes: 32 * 1024,
        }
    }
}

/// The Lua filter turning the subset-hint header into `envoy.lb.subset_hint` metadata.
/// A Lua array becomes a protobuf `ListValue`, which is the shape the EPP expects; an empty
/// header value gives a list of one empty entry, which matches no endpoint (503), as an
/// empty list does.
const SUBSET_HINT_LUA: &str = r#"function envoy_on_request(handle)
  local value = handle:headers():get("x-gateway-destination-endpoint-subset")
  if value == nil then
    return
  end
  handle:headers():remove("x-gateway-destination-endpoint-subset")
  local list = {}
  for entry in string.gmatch(value, "[^,%s]+") do
    list[#list + 1] = entry
  end
  if #list == 0 then
    -- An empty Lua table would become a struct, not a list: keep it a list, of nothing
    -- the EPP can match.
    list[1] = ""
  end
  handle:streamInfo():dynamicMetadata():set("envoy.lb.subset_hint", "x-gateway-destination-endpoint-subset", list)
end"#;

fn ip_str(ip: IpAddr) -> String {
    ip.to_string()
}

fn secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// True when `host` is a valid DNS name or IP literal (nothing YAML could misread).
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':')
}

impl BootstrapConfig {
    /// Checks the settings make a bootstrap Envoy accepts.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |m: String| Err(GatewayError::Config(m));
        match self.mode {
            Mode::Epp => {
                for epp in std::iter::once(&self.epp).chain(&self.extra_epps) {
                    if !valid_host(&epp.host) {
                        return bad(format!("invalid EPP host {:?}", epp.host));
                    }
                    if epp.grpc_port == 0 {
                        return bad("the EPP's gRPC port must not be 0".into());
                    }
                    if epp.tls != self.epp.tls {
                        return bad("every EPP replica must serve TLS, or none".into());
                    }
                }
                if self.health_check_interval.is_zero() {
                    return bad("the health-check interval must be positive".into());
                }
                if !self.endpoints.is_empty() {
                    return bad(
                        "endpoints are for --mode round-robin; in epp mode the EPP knows them"
                            .into(),
                    );
                }
            }
            Mode::RoundRobin => {
                if self.endpoints.is_empty() {
                    return bad("--mode round-robin needs --endpoints ip:port[,ip:port...]".into());
                }
                if let Some(e) = self.endpoints.iter().find(|e| e.port() == 0) {
                    return bad(format!("endpoint {e} has port 0"));
                }
            }
        }
        if self.buffer_limit_bytes < 1024 {
            return bad("the buffer limit must be at least 1024 bytes".into());
        }
        Ok(())
    }

    /// The bootstrap as commented YAML.
    pub fn render(&self) -> Result<String, GatewayError> {
        self.validate()?;
        let mut y = String::with_capacity(8 * 1024);
        self.write(&mut y)
            .map_err(|e| GatewayError::Config(format!("rendering failed: {e}")))?;
        Ok(y)
    }

    fn write(&self, y: &mut String) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Epp => "epp",
            Mode::RoundRobin => "round-robin",
        };
        writeln!(
            y,
            "# Envoy bootstrap generated by `llmsched envoy-config --mode {mode}` (llmsched {}).",
            env!("CARGO_PKG_VERSION")
        )?;
        match self.mode {
            Mode::Epp => writeln!(
                y,
                "# Standalone EPP gateway: every request goes through the EPP (ext_proc), which picks\n\
                 # the model server and writes it into x-gateway-destination-endpoint; the\n\
                 # ORIGINAL_DST cluster connects there."
            )?,
            Mode::RoundRobin => writeln!(
                y,
                "# Baseline gateway (a \"Kubernetes Service\"): requests go round robin to the model\n\
                 # servers, without the EPP."
            )?,
        }
        writeln!(y, "# Run: envoy -c <this file> --concurrency <cores>")?;
        writeln!(y)?;
        writeln!(
            y,
            "admin:\n  # /ready, /stats, /clusters, /listeners: keep it on loopback.\n  address:\n    socket_address: {{ address: \"{}\", port_value: {} }}",
            ip_str(self.admin.ip()),
            self.admin.port()
        )?;
        writeln!(y)?;
        writeln!(
            y,
            "# Envoy warns without a cap on downstream connections; this one is generous.\n\
             overload_manager:\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig\n      max_active_downstream_connections: 50000"
        )?;
        writeln!(y)?;
        writeln!(y, "static_resources:")?;
        self.write_listener(y)?;
        writeln!(y, "  clusters:")?;
        match self.mode {
            Mode::Epp => {
                self.write_original_dst_cluster(y)?;
                self.write_epp_cluster(y)?;
            }
            Mode::RoundRobin => self.write_round_robin_cluster(y)?,
        }
        Ok(())
    }

    fn write_listener(&self, y: &mut String) -> std::fmt::Result {
        let cluster = match self.mode {
            Mode::Epp => ORIGINAL_DST_CLUSTER,
            Mode::RoundRobin => ROUND_ROBIN_CLUSTER,
        };
        writeln!(
            y,
            "  listeners:\n  - name: {LISTENER_NAME}\n    address:\n      socket_address: {{ address: \"{}\", port_value: {} }}\n    # Flow-control watermark per connection (bodies are streamed, never fully buffered).\n    per_connection_buffer_limit_bytes: {}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {LISTENER_NAME}\n          # HTTP/1.1 and HTTP/2 (h2c prior knowledge) on the same port.\n          codec_type: AUTO\n          # Clients' x-forwarded-for is not trusted; their x-request-id is kept, so the id a\n          # client sends is the one the EPP and the model server see.\n          use_remote_address: true\n          preserve_external_request_id: true\n          normalize_path: true\n          merge_slashes: true\n          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n          # The model server's `server` header reaches the client unchanged.\n          server_header_transformation: PASS_THROUGH\n          common_http_protocol_options:\n            headers_with_underscores_action: REJECT_REQUEST\n          http2_protocol_options:\n            max_concurrent_streams: 100\n            initial_stream_window_size: 65536\n            initial_connection_window_size: 1048576",
            ip_str(self.listen.ip()),
            self.listen.port(),
            self.buffer_limit_bytes
        )?;
        if self.access_log {
            writeln!(
                y,
                "          access_log:\n          - name: envoy.access_loggers.stdout\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
            )?;
        }
        writeln!(
            y,
            "          route_config:\n            name: {LISTENER_NAME}\n            virtual_hosts:\n            - name: {LISTENER_NAME}\n              domains: [\"*\"]\n              routes:\n              - match: {{ prefix: \"/\" }}\n                route:\n                  cluster: {cluster}\n                  # Long generations: no per-request or idle deadline short of a day.\n                  timeout: 86400s\n                  idle_timeout: 86400s"
        )?;
        if self.upstream_host_header {
            writeln!(
                y,
                "                # The model server Envoy really sent the request to.\n                response_headers_to_add:\n                - header: {{ key: {UPSTREAM_HOST_HEADER}, value: \"%UPSTREAM_HOST%\" }}\n                  append_action: OVERWRITE_IF_EXISTS_OR_ADD"
            )?;
        }
        writeln!(y, "          http_filters:")?;
        if self.mode == Mode::Epp {
            if self.subset_hint_header {
                writeln!(
                    y,
                    "          # Subset hint from a header: x-gateway-destination-endpoint-subset: ip[:port],...\n          # becomes filter metadata envoy.lb.subset_hint (a list), which ext_proc forwards.\n          - name: envoy.filters.http.lua\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n              default_source_code:\n                inline_string: |"
                )?;
                for line in SUBSET_HINT_LUA.lines() {
                    writeln!(y, "                  {line}")?;
                }
            }
            let authority = format!("{}:{}", self.epp.host, self.epp.grpc_port);
            writeln!(
                y,
                "          - name: envoy.filters.http.ext_proc\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor\n              grpc_service:\n                envoy_grpc:\n                  cluster_name: {EPP_CLUSTER}\n                  authority: \"{authority}\"\n                # Deadline of each ext_proc stream's setup.\n                timeout: 10s\n              # The reference's modes: headers, bodies and trailers of both directions go to\n              # the EPP; bodies stream both ways at once (FULL_DUPLEX_STREAMED): the EPP\n              # collects the request body, picks the endpoint, then sends the headers\n              # mutation and the (possibly rewritten) body back in chunks.\n              processing_mode:\n                request_header_mode: SEND\n                response_header_mode: SEND\n                request_body_mode: FULL_DUPLEX_STREAMED\n                response_body_mode: FULL_DUPLEX_STREAMED\n                request_trailer_mode: SEND\n                response_trailer_mode: SEND\n              # How long Envoy waits for each EPP answer (flow control may queue a request).\n              message_timeout: 1000s\n              # Fail closed: without the EPP, requests fail (500) instead of going nowhere.\n              failure_mode_allow: {}\n              # Namespaces of dynamic metadata sent to the EPP: the subset hint.\n              metadata_options:\n                forwarding_namespaces:\n                  untyped: [\"envoy.lb.subset_hint\"]",
                self.failure_mode_allow
            )?;
        }
        writeln!(
            y,
            "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n              # No x-envoy-* headers added to requests and responses.\n              suppress_envoy_headers: true"
        )?;
        Ok(())
    }

    fn write_original_dst_cluster(&self, y: &mut String) -> std::fmt::Result {
        writeln!(
            y,
            "  # The model servers: wherever the EPP's x-gateway-destination-endpoint header points.\n  - name: {ORIGINAL_DST_CLUSTER}\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    original_dst_lb_config:\n      use_http_header: true\n      http_header_name: x-gateway-destination-endpoint\n    connect_timeout: 10s\n    per_connection_buffer_limit_bytes: {}\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000 }}",
            self.buffer_limit_bytes
        )
    }

    fn write_round_robin_cluster(&self, y: &mut String) -> std::fmt::Result {
        writeln!(
            y,
            "  # The model servers, in turn (what a Kubernetes Service in front of them does).\n  - name: {ROUND_ROBIN_CLUSTER}\n    type: STATIC\n    lb_policy: ROUND_ROBIN\n    connect_timeout: 10s\n    per_connection_buffer_limit_bytes: {}\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000 }}\n    load_assignment:\n      cluster_name: {ROUND_ROBIN_CLUSTER}\n      endpoints:\n      - lb_endpoints:",
            self.buffer_limit_bytes
        )?;
        for e in &self.endpoints {
            writeln!(
                y,
                "        - endpoint:\n            address:\n              socket_address: {{ address: \"{}\", port_value: {} }}",
                ip_str(e.ip()),
                e.port()
            )?;
        }
        Ok(())
    }

    fn write_epp_cluster(&self, y: &mut String) -> std::fmt::Result {
        let epp = &self.epp;
        let all: Vec<&EppTarget> = std::iter::once(epp).chain(&self.extra_epps).collect();
        let several = all.len() > 1;
        let dns = all.iter().any(|e| e.host.parse::<IpAddr>().is_err());
        let separate_health = all
            .iter()
            .any(|e| e.health_port != e.grpc_port && e.health_port != 0);
        writeln!(
            y,
            "  # The EPP: gRPC (HTTP/2) to its ext_proc port.\n  - name: {EPP_CLUSTER}\n    type: {}\n    lb_policy: LEAST_REQUEST\n    connect_timeout: 10s\n    circuit_breakers:\n      thresholds:\n      - {{ max_connections: 40000, max_pending_requests: 40000, max_requests: 40000, max_retries: 1024 }}\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options:\n            initial_stream_window_size: 65536\n            initial_connection_window_size: 1048576",
            if dns { "STRICT_DNS" } else { "STATIC" }
        )?;
        if epp.tls {
            writeln!(
                y,
                "    # The EPP serves TLS (--secure-serving, default) with a self-signed certificate\n    # unless --cert-path: the empty validation context accepts it, as the reference does.\n    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context:\n          alpn_protocols: [\"h2\"]\n          validation_context: {{}}"
            )?;
            if separate_health {
                writeln!(
                    y,
                    "    # The health port is plaintext: health checks pick this socket.\n    transport_socket_matches:\n    - name: plaintext-health\n      match: {{ llmsched-health: plaintext }}\n      transport_socket:\n        name: envoy.transport_sockets.raw_buffer\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                )?;
            }
        }
        let interval = secs(self.health_check_interval);
        // Several replicas: one failed check (NOT_SERVING while draining, or no answer)
        // moves new streams to the others, and one failed connection ejects a replica
        // before its next check (a killed one).
        let (unhealthy, healthy) = if several { (1, 1) } else { (3, 2) };
        if several {
            writeln!(
                y,
                "    # Active-active EPP replicas: a replica whose connection fails is ejected at once\n    # (until its health check passes again).\n    outlier_detection:\n      split_external_local_origin_errors: true\n      consecutive_local_origin_failure: 1\n      consecutive_5xx: 1000000\n      consecutive_gateway_failure: 1000000\n      interval: 1s\n      base_ejection_time: 2s\n      max_ejection_percent: 100"
            )?;
        }
        writeln!(
            y,
            "    # gRPC health (grpc.health.v1) of the ext_proc service: SERVING once the EPP knows\n    # its endpoints. With every EPP host unhealthy Envoy still tries them (panic mode).\n    health_checks:\n    - timeout: 2s\n      interval: {interval}\n      no_traffic_interval: {interval}\n      unhealthy_threshold: {unhealthy}\n      healthy_threshold: {healthy}\n      reuse_connection: true\n      grpc_health_check:\n        service_name: \"{EXT_PROC_SERVICE}\""
        )?;
        if epp.tls && separate_health {
            writeln!(
                y,
                "      transport_socket_match_criteria: {{ llmsched-health: plaintext }}"
            )?;
        } else if epp.tls {
            writeln!(y, "      tls_options:\n        alpn_protocols: [\"h2\"]")?;
        }
        writeln!(
            y,
            "    load_assignment:\n      cluster_name: {EPP_CLUSTER}\n      endpoints:\n      - lb_endpoints:"
        )?;
        for e in &all {
            writeln!(
                y,
                "        - endpoint:\n            address:\n              socket_address: {{ address: \"{}\", port_value: {} }}",
                e.host, e.grpc_port
            )?;
            if e.health_port != e.grpc_port && e.health_port != 0 {
                writeln!(
                    y,
                    "            # The EPP serves gRPC health on its own port (--grpc-health-port).\n            health_check_config: {{ port_value: {} }}",
                    e.health_port
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epp_mode_has_the_reference_filter_settings() {
        let y = BootstrapConfig::default().render().unwrap();
        for needle in [
            "request_header_mode: SEND",
            "response_header_mode: SEND",
            "request_body_mode: FULL_DUPLEX_STREAMED",
            "response_body_mode: FULL_DUPLEX_STREAMED",
            "request_trailer_mode: SEND",
            "response_trailer_mode: SEND",
            "message_timeout: 1000s",
            "type: ORIGINAL_DST",
            "http_header_name: x-gateway-destination-endpoint",
            "service_name: \"envoy.service.ext_proc.v3.ExternalProcessor\"",
            "UpstreamTlsContext",
            "health_check_config: { port_value: 9003 }",
            "transport_socket_match_criteria",
            "failure_mode_allow: false",
        ] {
            assert!(y.contains(needle), "missing {needle:?} in\n{y}");
        }
        assert!(!y.contains("envoy.filters.http.lua"));
        assert!(!y.contains(ROUND_ROBIN_CLUSTER));
    }

    #[test]
    fn plaintext_epp_and_health_on_the_grpc_port() {
        let cfg = BootstrapConfig {
            epp: EppTarget {
                host: "epp.default.svc".into(),
                grpc_port: 9002,
                health_port: 9002,
                tls: false,
            },
            subset_hint_header: true,
            upstream_host_header: true,
            access_log: true,
            ..BootstrapConfig::default()
        };
        let y = cfg.render().unwrap();
        assert!(!y.contains("UpstreamTlsContext"));
        assert!(!y.contains("health_check_config"));
        assert!(y.contains("type: STRICT_DNS"));
        assert!(y.contains("envoy.filters.http.lua"));
        assert!(y.contains("%UPSTREAM_HOST%"));
        assert!(y.contains("StdoutAccessLog"));
    }

    #[test]
    fn round_robin_mode() {
        let cfg = BootstrapConfig {
            mode: Mode::RoundRobin,
            endpoints: vec![
                "127.0.0.2:8000".parse().unwrap(),
                "[::1]:8001".parse().unwrap(),
            ],
            ..BootstrapConfig::default()
        };
        let y = cfg.render().unwrap();
        assert!(y.contains("lb_policy: ROUND_ROBIN"));
        assert!(y.contains("address: \"127.0.0.2\", port_value: 8000"));
        assert!(y.contains("address: \"::1\", port_value: 8001"));
        assert!(!y.contains("ext_proc"));
        assert!(!y.contains("ORIGINAL_DST"));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let rr = BootstrapConfig {
            mode: Mode::RoundRobin,
            ..BootstrapConfig::default()
        };
        assert!(rr.render().unwrap_err().to_string().contains("--endpoints"));
        let bad_host = BootstrapConfig {
            epp: EppTarget {
                host: "a\nb: c".into(),
                ..EppTarget::default()
            },
            ..BootstrapConfig::default()
        };
        assert!(bad_host.render().is_err());
        let epp_with_endpoints = BootstrapConfig {
            endpoints: vec!["127.0.0.2:8000".parse().unwrap()],
            ..BootstrapConfig::default()
        };
        assert!(epp_with_endpoints.render().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(secs(Duration::from_secs(10)), "10s");
        assert_eq!(secs(Duration::from_millis(1500)), "1.500s");
    }
}
