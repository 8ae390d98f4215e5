//! `llmsched envoy-config`: prints (or writes) an Envoy bootstrap for standalone deployment.
//!
//! ```text
//! llmsched envoy-config --mode epp --listen-port 8081 --epp 127.0.0.1:9002 > envoy.yaml
//! llmsched envoy-config --mode round-robin --endpoints 10.0.0.1:8000,10.0.0.2:8000 -o rr.yaml
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::ArgAction;

use crate::GatewayError;
use crate::bootstrap::{BootstrapConfig, EppTarget, Mode};

fn host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{port}' is not a port number"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("'{s}' is not host:port"));
    }
    Ok((host.to_string(), port))
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v = s.strip_suffix('s').unwrap_or(s);
    let f: f64 = v
        .parse()
        .map_err(|_| format!("'{s}' is not a duration in seconds (e.g. 10s, 0.5s)"))?;
    if !f.is_finite() || f <= 0.0 {
        return Err(format!("'{s}' must be positive"));
    }
    Ok(Duration::from_secs_f64(f))
}

/// `llmsched envoy-config` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// `epp`: ext_proc EPP + ORIGINAL_DST cluster; `round-robin`: a plain ROUND_ROBIN
    /// cluster over --endpoints (the baseline, no EPP).
    #[arg(long, value_enum, default_value = "epp")]
    pub mode: Mode,

    /// Address Envoy listens on for clients.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: IpAddr,

    /// Port Envoy listens on for clients.
    #[arg(long, default_value_t = 8081)]
    pub listen_port: u16,

    /// Envoy's admin interface (/ready, /stats, /clusters).
    #[arg(long, default_value = "127.0.0.1:19000")]
    pub admin: SocketAddr,

    /// The EPP's ext_proc address, host:port (IP or DNS name). Repeat it (or give a
    /// comma-separated list) for several EPP replicas (`llmsched epp --ha-mode=active-active`):
    /// Envoy spreads the ext_proc streams over the healthy ones and moves new requests off a
    /// replica as soon as its health check fails.
    #[arg(long, default_value = "127.0.0.1:9002", value_parser = host_port, value_delimiter = ',', action = ArgAction::Append)]
    pub epp: Vec<(String, u16)>,

    /// The EPP's gRPC health port (--grpc-health-port). Set it to the --epp port to check
    /// health on the ext_proc port itself (the EPP then needs --health-checking). With
    /// several --epp: one port for all, or one per --epp in the same order.
    #[arg(long, default_value = "9003", value_delimiter = ',', action = ArgAction::Append)]
    pub epp_health_port: Vec<u16>,

    /// The EPP serves TLS (its --secure-serving, default true); --epp-tls=false for an EPP
    /// run with --secure-serving=false.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub epp_tls: bool,

    /// Model servers for --mode round-robin: ip:port[,ip:port...].
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<SocketAddr>,

    /// Read a subset hint from the request header
    /// `x-gateway-destination-endpoint-subset: ip[:port],...` (a Lua filter turns it into
    /// the envoy.lb.subset_hint metadata the EPP reads).
    #[arg(long)]
    pub subset_hint_header: bool,

    /// Add `x-llmsched-upstream-host: <ip:port>` to responses (where Envoy sent the request).
    #[arg(long)]
    pub upstream_host_header: bool,

    /// Log every request to stdout.
    #[arg(long)]
    pub access_log: bool,

    /// Let requests through unprocessed when the EPP is unreachable (default: fail closed).
    #[arg(long)]
    pub failure_mode_allow: bool,

    /// Interval of Envoy's gRPC health checks of the EPP (default: 10 s with one EPP, as the
    /// reference; 1 s with several, so that a replica that drains or dies is left out within
    /// about a second).
    #[arg(long, value_parser = seconds)]
    pub health_check_interval: Option<Duration>,

    /// Per-connection buffer limit (flow-control watermark) in bytes.
    #[arg(long, default_value_t = 32 * 1024)]
    pub buffer_limit_bytes: u32,

    /// Write the bootstrap to this file instead of stdout.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

impl Args {
    /// The bootstrap settings these flags describe.
    pub fn bootstrap(&self) -> BootstrapConfig {
        let health = |i: usize| {
            self.epp_health_port
                .get(i)
                .or(self.epp_health_port.first())
                .copied()
                .unwrap_or(9003)
        };
        let targets: Vec<EppTarget> = self
            .epp
            .iter()
            .enumerate()
            .map(|(i, (host, port))| EppTarget {
                host: host.clone(),
                grpc_port: *port,
                health_port: health(i),
                tls: self.epp_tls,
            })
            .collect();
        let several = targets.len() > 1;
        let mut targets = targets.into_iter();
        BootstrapConfig {
            mode: self.mode,
            listen: SocketAddr::new(self.listen_address, self.listen_port),
            admin: self.admin,
            epp: targets.next().unwrap_or_default(),
            extra_epps: targets.collect(),
            endpoints: self.endpoints.clone(),
            subset_hint_header: self.subset_hint_header,
            upstream_host_header: self.upstream_host_header,
            access_log: self.access_log,
            failure_mode_allow: self.failure_mode_allow,
            health_check_interval: self.health_check_interval.unwrap_or(if several {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(10)
            }),
            buffer_limit_bytes: self.buffer_limit_bytes,
        }
    }
}

/// Renders the bootstrap and prints it (or writes it to `--output`).
pub fn run(args: Args) -> Result<(), GatewayError> {
    if args.epp_health_port.len() > 1 && args.epp_health_port.len() != args.epp.len() {
        return Err(GatewayError::Config(format!(
            "--epp-health-port: {} ports for {} EPPs (give one for all, or one per --epp)",
            args.epp_health_port.len(),
            args.epp.len()
        )));
    }
    let yaml = args.bootstrap().render()?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, yaml).map_err(|e| GatewayError::io(path, e))?;
            tracing::info!(path = %path.display(), "Envoy bootstrap written");
        }
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(yaml.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| GatewayError::io(std::path::Path::new("stdout"), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(v: &[&str]) -> Result<Args, String> {
        let mut all = vec!["envoy-config"];
        all.extend_from_slice(v);
        Cli::try_parse_from(all)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_flags() {
        let a = parse(&[]).unwrap();
        let b = a.bootstrap();
        assert_eq!(b.mode, Mode::Epp);
        assert_eq!(b.listen.port(), 8081);
        assert_eq!(b.epp.host, "127.0.0.1");
        assert!(b.epp.tls);
        assert_eq!(b.health_check_interval, Duration::from_secs(10));
        assert!(b.extra_epps.is_empty());

        let a = parse(&[
            "--mode",
            "round-robin",
            "--endpoints",
            "127.0.0.2:8000,127.0.0.3:8000",
            "--listen-port",
            "0",
        ])
        .unwrap();
        assert_eq!(a.endpoints.len(), 2);
        assert!(a.bootstrap().render().unwrap().contains("ROUND_ROBIN"));

        let a = parse(&[
            "--epp",
            "epp.ns.svc:9002",
            "--epp-tls=false",
            "--health-check-interval",
            "0.5s",
        ])
        .unwrap();
        assert_eq!(a.epp, vec![("epp.ns.svc".to_string(), 9002)]);
        assert!(!a.epp_tls);
        assert_eq!(
            a.bootstrap().health_check_interval,
            Duration::from_millis(500)
        );

        // Several EPP replicas: listed in order, each with its health port; health checked
        // every second unless told otherwise.
        let a = parse(&[
            "--epp",
            "127.0.0.1:9002,127.0.0.1:9102",
            "--epp",
            "127.0.0.1:9202",
            "--epp-health-port",
            "9003,9103,9203",
        ])
        .unwrap();
        let b = a.bootstrap();
        assert_eq!((b.epp.grpc_port, b.epp.health_port), (9002, 9003));
        let extra: Vec<(u16, u16)> = b
            .extra_epps
            .iter()
            .map(|e| (e.grpc_port, e.health_port))
            .collect();
        assert_eq!(extra, vec![(9102, 9103), (9202, 9203)]);
        assert_eq!(b.health_check_interval, Duration::from_secs(1));
        let y = b.render().unwrap();
        for port in ["9002", "9102", "9202", "9003", "9103", "9203"] {
            assert!(
                y.contains(&format!("value: {port}")),
                "{port} missing:\n{y}"
            );
        }
        assert!(y.contains("outlier_detection"));
        let one_health = parse(&["--epp", "a:1,b:2", "--epp-health-port", "7"]).unwrap();
        assert!(
            one_health
                .bootstrap()
                .extra_epps
                .iter()
                .all(|e| e.health_port == 7)
        );
        let mismatch = parse(&["--epp", "a:1,b:2,c:3", "--epp-health-port", "7,8"]).unwrap();
        assert!(
            run(mismatch)
                .unwrap_err()
                .to_string()
                .contains("2 ports for 3 EPPs")
        );
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(parse(&["--epp", "nohost"]).is_err());
        assert!(parse(&["--epp", "h:0"]).is_err());
        assert!(parse(&["--health-check-interval", "-1s"]).is_err());
        assert!(parse(&["--mode", "magic"]).is_err());
        let rr = parse(&["--mode", "round-robin"]).unwrap();
        assert!(run(rr).is_err());
    }

    #[test]
    fn writes_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envoy.yaml");
        let mut a = parse(&[]).unwrap();
        a.output = Some(path.clone());
        run(a).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("FULL_DUPLEX_STREAMED")
        );
    }
}
