//! `llmsched pd-sidecar`: the reference sidecar's flags (`cmd/pd-sidecar`), its YAML
//! configuration (`--configuration`, `--configuration-file`; flags win), and llmsched's
//! additions (retries, timeouts, a static SSRF allowlist, a metrics port).
//!
//! ```text
//! llmsched pd-sidecar --port 8000 --vllm-port 8200 --secure-proxy=false
//! llmsched pd-sidecar --port 8000 --vllm-port 8200 --enable-ssrf-protection --ssrf-allowlist 10.0.0.0/8
//! ```
//!
//! Boolean flags accept `--flag`, `--flag=true` and `--flag=false`, as Go's flag package does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::allowlist::Allowlist;
use crate::error::SidecarError;
use crate::metrics::SidecarMetrics;
use crate::router::{PdRouter, PdRouterConfig, Upstream};
use crate::server::{serve, serve_metrics};

/// Flags of `llmsched pd-sidecar`.
#[derive(ClapArgs, Debug, Clone, Default)]
pub struct Args {
    /// The port the sidecar listens on [default: 8000].
    #[arg(long)]
    pub port: Option<u16>,

    /// The port vLLM listens on (on --vllm-host) [default: 8001].
    #[arg(long)]
    pub vllm_port: Option<u16>,

    /// Host of the local decode replica (llmsched extension) [default: localhost].
    #[arg(long)]
    pub vllm_host: Option<String>,

    /// Address the sidecar binds (llmsched extension) [default: 0.0.0.0, all interfaces].
    #[arg(long)]
    pub listen_address: Option<IpAddr>,

    /// vLLM's data-parallel size: rank r listens on port + r in front of vllm-port + r
    /// [default: 1].
    #[arg(long)]
    pub data_parallel_size: Option<u16>,

    /// KV protocol between prefiller and decoder; only nixlv2 (vLLM's NixlConnector) is
    /// supported [default: nixlv2].
    #[arg(long)]
    pub kv_connector: Option<String>,

    /// Deprecated alias of --kv-connector.
    #[arg(long, hide = true)]
    pub connector: Option<String>,

    /// Encoder connector (E/PD); not supported.
    #[arg(long)]
    pub ec_connector: Option<String>,

    /// Only call prefill targets in the allowlist (--ssrf-allowlist / --ssrf-allowlist-file).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub enable_ssrf_protection: Option<bool>,

    /// Pick a random prefiller among the header's candidates instead of the first.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, env = "ENABLE_PREFILLER_SAMPLING")]
    pub enable_prefiller_sampling: Option<bool>,

    /// Serve TLS on --port (self-signed unless --cert-path) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub secure_proxy: Option<bool>,

    /// Directory with tls.crt and tls.key for --secure-proxy.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,

    /// Stages to call over TLS: prefiller, decoder (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub enable_tls: Vec<String>,

    /// Stages whose TLS certificates are not verified: prefiller, decoder.
    #[arg(long, value_delimiter = ',')]
    pub tls_insecure_skip_verify: Vec<String>,

    /// Deprecated: --enable-tls=prefiller.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub prefiller_use_tls: Option<bool>,

    /// Deprecated: --enable-tls=decoder.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub decoder_use_tls: Option<bool>,

    /// Deprecated: --tls-insecure-skip-verify=prefiller.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub prefiller_tls_insecure_skip_verify: Option<bool>,

    /// Deprecated: --tls-insecure-skip-verify=decoder.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub decoder_tls_insecure_skip_verify: Option<bool>,

    /// InferencePool (namespace/name) whose pods the reference allowlists; llmsched needs the
    /// list itself (--ssrf-allowlist).
    #[arg(long, env = "INFERENCE_POOL")]
    pub inference_pool: Option<String>,

    /// Deprecated: the InferencePool's namespace.
    #[arg(long, hide = true, env = "INFERENCE_POOL_NAMESPACE")]
    pub inference_pool_namespace: Option<String>,

    /// Deprecated: the InferencePool's name.
    #[arg(long, hide = true, env = "INFERENCE_POOL_NAME")]
    pub inference_pool_name: Option<String>,

    /// API group of the InferencePool (accepted for compatibility).
    #[arg(long)]
    pub pool_group: Option<String>,

    /// Idle keep-alive connections kept per upstream [default: 1024].
    #[arg(long)]
    pub max_idle_conns_per_host: Option<usize>,

    /// Chunked decode token budget; only 0 (off) is supported.
    #[arg(long)]
    pub decode_chunk_size: Option<i64>,

    /// Sidecar configuration as inline YAML (the reference's keys; flags take precedence).
    #[arg(long, conflicts_with = "configuration_file")]
    pub configuration: Option<String>,

    /// Sidecar configuration from a YAML file.
    #[arg(long)]
    pub configuration_file: Option<PathBuf>,

    /// Extra prefill attempts after a connect error or a 5xx (llmsched) [default: 2].
    #[arg(long)]
    pub prefill_max_retries: Option<u32>,

    /// Wait before the first prefill retry, doubled for each next one [default: 50ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub prefill_retry_backoff: Option<Duration>,

    /// Give up on a prefill hop after this long and prefill locally (0 = never) [default: 0].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub prefill_timeout: Option<Duration>,

    /// Allowed prefill hosts for --enable-ssrf-protection: IPs, CIDR ranges, DNS names.
    #[arg(long, value_delimiter = ',')]
    pub ssrf_allowlist: Vec<String>,

    /// File of allowed prefill hosts, one per line (# comments).
    #[arg(long)]
    pub ssrf_allowlist_file: Option<PathBuf>,

    /// Serve the sidecar's metrics on this port too (0 = only at /pd-sidecar/metrics on
    /// --port) [default: 0].
    #[arg(long)]
    pub metrics_port: Option<u16>,

    /// Largest request body on the P/D path, bytes [default: 67108864].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,

    /// Connect timeout to prefillers and the decoder [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// The reference's YAML configuration keys (unknown keys are refused, as by the reference).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct YamlConfig {
    port: Option<u16>,
    vllm_port: Option<u16>,
    data_parallel_size: Option<u16>,
    kv_connector: Option<String>,
    connector: Option<String>,
    ec_connector: Option<String>,
    enable_ssrf_protection: Option<bool>,
    enable_prefiller_sampling: Option<bool>,
    secure_proxy: Option<bool>,
    cert_path: Option<PathBuf>,
    enable_tls: Option<Vec<String>>,
    tls_insecure_skip_verify: Option<Vec<String>>,
    prefiller_use_tls: Option<bool>,
    decoder_use_tls: Option<bool>,
    prefiller_tls_insecure_skip_verify: Option<bool>,
    decoder_tls_insecure_skip_verify: Option<bool>,
    inference_pool: Option<String>,
    pool_group: Option<String>,
    max_idle_conns_per_host: Option<usize>,
    decode_chunk_size: Option<i64>,
}

/// Everything `run` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listening address of rank 0.
    pub listen: SocketAddr,
    /// Ranks (data parallelism).
    pub data_parallel_size: u16,
    /// Router settings of rank 0 (rank r's decoder port is + r).
    pub router: PdRouterConfig,
    /// Serve TLS.
    pub secure_proxy: bool,
    /// Certificates for TLS.
    pub cert_path: Option<PathBuf>,
    /// Dedicated metrics port.
    pub metrics_port: Option<u16>,
}

fn config(msg: impl Into<String>) -> SidecarError {
    SidecarError::Config(msg.into())
}

const STAGES: [&str; 3] = ["prefiller", "decoder", "encoder"];

impl Args {
    fn merge_yaml(&mut self) -> Result<(), SidecarError> {
        let text = match (&self.configuration, &self.configuration_file) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => std::fs::read_to_string(p).map_err(|e| {
                config(format!(
                    "failed to read sidecar configuration from {}: {e}",
                    p.display()
                ))
            })?,
            (None, None) => return Ok(()),
        };
        let y: YamlConfig = serde_norway::from_str(&text)
            .map_err(|e| config(format!("failed to unmarshal sidecar configuration: {e}")))?;
        macro_rules! fill {
            ($($f:ident),*) => {$( if self.$f.is_none() { self.$f = y.$f; } )*};
        }
        fill!(
            port,
            vllm_port,
            data_parallel_size,
            kv_connector,
            connector,
            ec_connector,
            enable_ssrf_protection,
            enable_prefiller_sampling,
            secure_proxy,
            cert_path,
            prefiller_use_tls,
            decoder_use_tls,
            prefiller_tls_insecure_skip_verify,
            decoder_tls_insecure_skip_verify,
            inference_pool,
            pool_group,
            max_idle_conns_per_host,
            decode_chunk_size
        );
        if self.enable_tls.is_empty() {
            self.enable_tls = y.enable_tls.unwrap_or_default();
        }
        if self.tls_insecure_skip_verify.is_empty() {
            self.tls_insecure_skip_verify = y.tls_insecure_skip_verify.unwrap_or_default();
        }
        Ok(())
    }

    /// Validates the flags (and YAML) into [`Settings`].
    pub fn resolve(mut self) -> Result<Settings, SidecarError> {
        self.merge_yaml()?;
        let kv = self
            .kv_connector
            .clone()
            .or(self.connector.clone())
            .unwrap_or_else(|| "nixlv2".into());
        match kv.as_str() {
            "nixlv2" => {}
            "shared-storage" | "sglang" => {
                return Err(config(format!(
                    "--kv-connector {kv} is a reference connector llmsched's sidecar does not implement; use nixlv2 (vLLM's NixlConnector)"
                )));
            }
            other => {
                return Err(config(format!(
                    "--kv-connector must be one of: nixlv2, shared-storage, sglang (got {other:?})"
                )));
            }
        }
        if let Some(ec) = &self.ec_connector
            && !ec.is_empty()
        {
            return Err(config(format!(
                "--ec-connector {ec}: encoder disaggregation (E/PD) is not supported by llmsched's sidecar"
            )));
        }
        if self.decode_chunk_size.unwrap_or(0) < 0 {
            return Err(config(
                "--decode-chunk-size must be a non-negative integer (0 disables chunked decode)",
            ));
        }
        if self.decode_chunk_size.unwrap_or(0) > 0 {
            return Err(config(
                "--decode-chunk-size > 0 (chunked decode) is not supported by llmsched's sidecar; use 0",
            ));
        }
        for (flag, stages) in [
            ("--enable-tls", &self.enable_tls),
            ("--tls-insecure-skip-verify", &self.tls_insecure_skip_verify),
        ] {
            if let Some(bad) = stages.iter().find(|s| !STAGES.contains(&s.as_str())) {
                return Err(config(format!(
                    "{flag} stages must be one of: prefiller, decoder, encoder (got {bad:?})"
                )));
            }
        }
        let stage = |list: &[String], s: &str, deprecated: Option<bool>| {
            list.iter().any(|x| x == s) || deprecated == Some(true)
        };
        let prefill_tls = stage(&self.enable_tls, "prefiller", self.prefiller_use_tls);
        let decoder_tls = stage(&self.enable_tls, "decoder", self.decoder_use_tls);
        if let Some(p) = &self.inference_pool {
            let parts: Vec<&str> = p.split('/').collect();
            if parts.len() > 2 || parts.iter().any(|x| x.is_empty()) {
                return Err(config(
                    "--inference-pool must be in format 'namespace/name' or 'name'",
                ));
            }
        }
        let allowlist = if self.enable_ssrf_protection == Some(true) {
            let mut entries = self.ssrf_allowlist.clone();
            if let Some(f) = &self.ssrf_allowlist_file {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    config(format!(
                        "cannot read --ssrf-allowlist-file {}: {e}",
                        f.display()
                    ))
                })?;
                entries.extend(text.lines().map(str::to_string));
            }
            let list = Allowlist::parse(entries.iter().map(String::as_str)).map_err(config)?;
            if list.is_empty() {
                let pool = self
                    .inference_pool
                    .clone()
                    .or(self.inference_pool_name.clone())
                    .map(|p| format!(" (InferencePool {p})"))
                    .unwrap_or_default();
                return Err(config(format!(
                    "--enable-ssrf-protection needs the allowed prefill hosts: --ssrf-allowlist or --ssrf-allowlist-file{pool}. The reference reads them from the InferencePool's pods through the Kubernetes API; llmsched's sidecar takes the list directly"
                )));
            }
            Some(list)
        } else {
            if !self.ssrf_allowlist.is_empty() || self.ssrf_allowlist_file.is_some() {
                return Err(config(
                    "--ssrf-allowlist / --ssrf-allowlist-file need --enable-ssrf-protection",
                ));
            }
            None
        };
        let dp = self.data_parallel_size.unwrap_or(1);
        if dp == 0 {
            return Err(config("--data-parallel-size must be at least 1"));
        }
        let port = self.port.unwrap_or(8000);
        let vllm_port = self.vllm_port.unwrap_or(8001);
        if u32::from(port) + u32::from(dp) - 1 > 65535
            || u32::from(vllm_port) + u32::from(dp) - 1 > 65535
        {
            return Err(config(
                "--port/--vllm-port + --data-parallel-size run past 65535",
            ));
        }
        let host = self.vllm_host.clone().unwrap_or_else(|| "localhost".into());
        let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{host}]")
        } else {
            host
        };
        let scheme = if decoder_tls { "https" } else { "http" };
        let mut router = PdRouterConfig::new(&format!("{scheme}://{host}:{vllm_port}"))?;
        router.prefill_tls = prefill_tls;
        router.prefill_insecure_skip_verify = stage(
            &self.tls_insecure_skip_verify,
            "prefiller",
            self.prefiller_tls_insecure_skip_verify,
        );
        router.decoder_insecure_skip_verify = stage(
            &self.tls_insecure_skip_verify,
            "decoder",
            self.decoder_tls_insecure_skip_verify,
        );
        if let Some(r) = self.prefill_max_retries {
            router.prefill_max_retries = r;
        }
        if let Some(b) = self.prefill_retry_backoff {
            router.prefill_retry_backoff = b;
        }
        router.prefill_timeout = self.prefill_timeout.filter(|t| !t.is_zero());
        router.enable_prefiller_sampling = self.enable_prefiller_sampling.unwrap_or(false);
        router.ssrf_allowlist = allowlist;
        if let Some(m) = self.max_body_bytes {
            if m == 0 {
                return Err(config("--max-body-bytes must be positive"));
            }
            router.max_body_bytes = m;
        }
        if let Some(t) = self.connect_timeout {
            router.connect_timeout = t;
        }
        if let Some(n) = self.max_idle_conns_per_host {
            router.max_idle_conns_per_host = n;
        }
        Ok(Settings {
            listen: SocketAddr::new(
                self.listen_address
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                port,
            ),
            data_parallel_size: dp,
            router,
            secure_proxy: self.secure_proxy.unwrap_or(true),
            cert_path: self.cert_path.clone(),
            metrics_port: self.metrics_port.filter(|p| *p != 0),
        })
    }
}

impl Settings {
    /// Rank `r`'s router settings (decoder port + r).
    pub fn rank(&self, r: u16) -> Result<PdRouterConfig, SidecarError> {
        let mut c = self.router.clone();
        if r > 0 {
            let d = &self.router.decoder;
            let port = d.authority.port_u16().unwrap_or(0) + r;
            c.decoder = Upstream::parse(&format!("{}://{}:{port}", d.scheme, d.authority.host()))?;
        }
        Ok(c)
    }
}

/// Runs the sidecar until Ctrl-C.
pub async fn run(args: Args) -> Result<(), SidecarError> {
    let s = args.resolve()?;
    let metrics = Arc::new(SidecarMetrics::new());
    let tls = if s.secure_proxy {
        Some(match &s.cert_path {
            Some(dir) => crate::tls::from_cert_dir(dir)?,
            None => crate::tls::self_signed()?,
        })
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for r in 0..s.data_parallel_size {
        let addr = SocketAddr::new(s.listen.ip(), s.listen.port() + r);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SidecarError::Bind { addr, source })?;
        let cfg = s.rank(r)?;
        tracing::info!(%addr, decoder = %format!("{}://{}", cfg.decoder.scheme, cfg.decoder.authority), tls = tls.is_some(), rank = r, "pd-sidecar listening");
        let router = Arc::new(PdRouter::new(cfg, metrics.clone())?);
        tasks.spawn(serve(listener, router, tls.clone(), shutdown.clone()));
    }
    if let Some(p) = s.metrics_port {
        let addr = SocketAddr::new(s.listen.ip(), p);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SidecarError::Bind { addr, source })?;
        tracing::info!(%addr, "pd-sidecar metrics at /metrics");
        tasks.spawn(serve_metrics(listener, metrics.clone(), shutdown.clone()));
    }
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    fn resolve(args: &[&str]) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(std::iter::once("pd-sidecar").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.a.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let s = resolve(&[]).unwrap();
        assert_eq!(s.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(s.router.decoder.authority.as_str(), "localhost:8001");
        assert_eq!(s.router.decoder.scheme.as_str(), "http");
        assert!(s.secure_proxy);
        assert!(!s.router.prefill_tls);
        assert!(s.router.ssrf_allowlist.is_none());
        assert_eq!(s.router.prefill_max_retries, 2);
        assert_eq!(s.data_parallel_size, 1);
    }

    #[test]
    fn reference_flags_parse() {
        let s = resolve(&[
            "--port=8000",
            "--vllm-port=8200",
            "--secure-proxy=false",
            "--connector",
            "nixlv2",
            "--enable-tls=prefiller,decoder",
            "--tls-insecure-skip-verify",
            "prefiller",
            "--enable-prefiller-sampling",
            "--data-parallel-size=2",
            "--prefill-timeout",
            "30s",
        ])
        .unwrap();
        assert!(!s.secure_proxy);
        assert!(s.router.prefill_tls && s.router.prefill_insecure_skip_verify);
        assert!(!s.router.decoder_insecure_skip_verify);
        assert_eq!(s.router.decoder.scheme.as_str(), "https");
        assert!(s.router.enable_prefiller_sampling);
        assert_eq!(s.router.prefill_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            s.rank(1).unwrap().decoder.authority.as_str(),
            "localhost:8201"
        );
        let s = resolve(&[
            "--prefiller-use-tls",
            "--decoder-tls-insecure-skip-verify=true",
        ])
        .unwrap();
        assert!(s.router.prefill_tls && s.router.decoder_insecure_skip_verify);
    }

    #[test]
    fn yaml_configuration_fills_what_flags_leave() {
        let s = resolve(&[
            "--configuration",
            "{port: 8085, vllm-port: 8203, secure-proxy: false, enable-tls: [prefiller]}",
            "--port",
            "9000",
        ])
        .unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.router.decoder.authority.port_u16(), Some(8203));
        assert!(!s.secure_proxy && s.router.prefill_tls);
        let e = resolve(&["--configuration", "{port: 1, bogus: 2}"]).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "vllm-port: 8300\n").unwrap();
        let s = resolve(&["--configuration-file", f.to_str().unwrap()]).unwrap();
        assert_eq!(s.router.decoder.authority.port_u16(), Some(8300));
        let e = resolve(&["--configuration-file", "/nonexistent.yaml"]).unwrap_err();
        assert!(e.contains("/nonexistent.yaml"), "{e}");
    }

    #[test]
    fn ssrf_protection_needs_a_list() {
        let e = resolve(&["--enable-ssrf-protection", "--inference-pool", "ns/pool"]).unwrap_err();
        assert!(
            e.contains("--ssrf-allowlist") && e.contains("ns/pool"),
            "{e}"
        );
        let s = resolve(&[
            "--enable-ssrf-protection",
            "--ssrf-allowlist",
            "10.0.0.0/8,prefill-0",
        ])
        .unwrap();
        let list = s.router.ssrf_allowlist.unwrap();
        assert!(list.allows("10.1.2.3") && list.allows("prefill-0") && !list.allows("11.0.0.1"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("allow");
        std::fs::write(&f, "# pods\n10.0.0.7\n").unwrap();
        let s = resolve(&[
            "--enable-ssrf-protection=true",
            "--ssrf-allowlist-file",
            f.to_str().unwrap(),
        ])
        .unwrap();
        assert!(s.router.ssrf_allowlist.unwrap().allows("10.0.0.7"));
        let e = resolve(&["--ssrf-allowlist", "10.0.0.1"]).unwrap_err();
        assert!(e.contains("--enable-ssrf-protection"), "{e}");
        let e = resolve(&["--enable-ssrf-protection", "--ssrf-allowlist", "x/y"]).unwrap_err();
        assert!(e.contains("x/y"), "{e}");
    }

    #[test]
    fn unsupported_or_bad_values_are_clear_errors() {
        for (args, want) in [
            (vec!["--kv-connector", "sglang"], "does not implement"),
            (vec!["--kv-connector", "lmcache"], "must be one of"),
            (vec!["--ec-connector", "ec-example"], "not supported"),
            (vec!["--decode-chunk-size", "256"], "not supported"),
            (vec!["--decode-chunk-size=-1"], "non-negative"),
            (vec!["--enable-tls", "router"], "prefiller, decoder"),
            (vec!["--inference-pool", "a/b/c"], "namespace/name"),
            (vec!["--data-parallel-size", "0"], "at least 1"),
            (
                vec!["--port", "65535", "--data-parallel-size", "2"],
                "65535",
            ),
            (vec!["--max-body-bytes", "0"], "positive"),
            (vec!["--prefill-timeout", "soon"], "soon"),
            (vec!["--port", "http"], "http"),
        ] {
            let e = resolve(&args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
