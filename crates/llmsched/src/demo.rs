//! `llmsched demo`: the seed guide's comparison in one command, on a laptop.
//!
//! 1. starts a simulated vLLM cluster (`guide-mini`'s four replicas by default: the
//!    `qwen3-32b-tp2-h100` profile with 164,000 KV tokens each),
//! 2. runs the workload through the built-in proxy routing **round robin** (the guide's
//!    "Kubernetes Service"),
//! 3. restarts the cluster cold and runs the same workload through the built-in proxy routing
//!    with **llmsched's scheduler** (default EndpointPickerConfig, or `--config-file`),
//! 4. prints the guide's side-by-side table and writes both result folders, the table
//!    (`comparison.md`) and a plot (`ttft-throughput.svg`) into one output folder.
//!
//! Both runs use the same proxy code and the same seeded prompts and arrivals, so the only
//! difference is the routing decision.
//!
//! `llmsched demo --pd` compares prefill/decode disaggregation with aggregated serving on the
//! same simulated GPUs instead: the same replicas once aggregated (llmsched's default
//! config), once split into `--pd-prefill` prefill replicas (`sim --role prefill`) and the
//! rest decode replicas (`--role decode`), routed by `config/epp/pd-sim-epp-config.yaml`
//! through the built-in proxy, which runs the pd-sidecar's prefill/decode hops in process (no
//! sidecar processes). The default workload is `config/workloads/pd-long.yaml` (embedded). `--time-scale F` runs the simulator and the load F×
//! faster than real time; every reported number stays in simulated seconds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use llmsched_bench::cli::stage_table;
use llmsched_bench::progress::terminal_progress;
use llmsched_bench::{BenchConfig, Comparison, PlotSeries, RunOptions, RunResult};
use llmsched_sim::pd::Role;
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use tokio_util::sync::CancellationToken;

/// The embedded default workload (`config/workloads/guide-mini.yaml`).
pub const GUIDE_MINI: &str = include_str!("../../../config/workloads/guide-mini.yaml");

/// KV-cache tokens per replica `guide-mini` is sized for (see the workload's header).
pub const GUIDE_MINI_KV_TOKENS: usize = 164_000;

/// The embedded P/D workload (`config/workloads/pd-long.yaml`).
pub const PD_LONG: &str = include_str!("../../../config/workloads/pd-long.yaml");

/// The embedded P/D configuration (`config/epp/pd-sim-epp-config.yaml`).
pub const PD_SIM_CONFIG: &str = include_str!("../../../config/epp/pd-sim-epp-config.yaml");

/// Flags of `llmsched demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// inference-perf workload [default: the embedded guide-mini].
    #[arg(long, value_name = "FILE")]
    pub workload: Option<PathBuf>,

    /// Simulated replicas.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,

    /// EndpointPickerConfig for the llmsched run [default: the EPP's built-in default:
    /// queue 2, kv-cache-utilization 2, prefix-cache 3].
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Routing of the comparison run.
    #[arg(long, default_value = "round-robin", value_parser = ["round-robin", "random"])]
    pub baseline: String,

    /// Simulator calibration profile.
    #[arg(long, default_value = "qwen3-32b-tp2-h100")]
    pub profile: String,

    /// KV-cache size per replica, tokens [default: 164000 for the embedded workload, else
    /// the profile's].
    #[arg(long, value_name = "TOKENS")]
    pub kv_cache_tokens: Option<usize>,

    /// Run the simulator and the load F× faster than real time (reported numbers stay in
    /// simulated seconds). The default fits both runs of guide-mini in under 3 minutes.
    #[arg(long, default_value_t = 2.5, value_name = "F")]
    pub time_scale: f64,

    /// Port of the built-in proxy the load goes through (0 = any free port).
    #[arg(long, default_value_t = 8080)]
    pub proxy_port: u16,

    /// Port of the first simulated replica; the others use the next ports (0 = free ports).
    #[arg(long, default_value_t = 8000)]
    pub sim_base_port: u16,

    /// Result folder [default: demo-YYYYMMDD-HHMMSS].
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Seed for prompts and arrivals (both runs use the same).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Do not draw progress bars (they are also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// Compare prefill/decode disaggregation with aggregated serving on the same replicas
    /// (default workload: the embedded pd-long; `--config-file` replaces the P/D leg's
    /// configuration, the embedded pd-sim-epp-config.yaml).
    #[arg(long)]
    pub pd: bool,

    /// With `--pd`: how many of the replicas prefill (the others decode).
    #[arg(long, default_value_t = 1, requires = "pd")]
    pub pd_prefill: usize,
}

struct Setup {
    workload: BenchConfig,
    workload_name: String,
    replica: ReplicaConfig,
    output: PathBuf,
}

impl Args {
    fn setup(&self) -> anyhow::Result<Setup> {
        if self.replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        if self.pd && (self.pd_prefill == 0 || self.pd_prefill >= self.replicas) {
            bail!(
                "--pd-prefill must be between 1 and --replicas - 1 (got {} of {} replicas): P/D needs both prefill and decode replicas",
                self.pd_prefill,
                self.replicas
            );
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            bail!(
                "--time-scale must be a positive number, got {}",
                self.time_scale
            );
        }
        let (workload, workload_name, default_kv) = match &self.workload {
            Some(path) => (
                BenchConfig::from_file(path)?,
                path.display().to_string(),
                None,
            ),
            None if self.pd => (
                BenchConfig::from_yaml_str(PD_LONG, Some("pd-long.yaml"))
                    .context("the embedded pd-long workload does not parse")?,
                "pd-long (embedded)".to_owned(),
                None,
            ),
            None => (
                BenchConfig::from_yaml_str(GUIDE_MINI, Some("guide-mini.yaml"))
                    .context("the embedded guide-mini workload does not parse")?,
                "guide-mini (embedded)".to_owned(),
                Some(GUIDE_MINI_KV_TOKENS),
            ),
        };
        let mut replica = ReplicaConfig::from_profile(&self.profile)?;
        if let Some(tokens) = self.kv_cache_tokens.or(default_kv) {
            replica = replica.with_kv_cache_tokens(tokens);
        }
        if let Some(model) = workload
            .server
            .as_ref()
            .and_then(|s| s.model_name.as_deref())
        {
            replica = replica.with_model(model);
        }
        replica = replica.with_time_scale(self.time_scale);
        replica.validate()?;
        let output = self
            .output
            .clone()
            .unwrap_or_else(|| llmsched_bench::cli::timestamped_dir("demo"));
        Ok(Setup {
            workload,
            workload_name,
            replica,
            output,
        })
    }
}

/// One leg of the demo: which routing the proxy uses.
struct Leg<'a> {
    label: &'a str,
    baseline: Option<&'a str>,
    /// P/D: this many prefill replicas, the others decode.
    pd_prefill: Option<usize>,
}

/// Runs the demo; Ctrl-C stops it cleanly (partial results are still written).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let setup = args.setup()?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    let signal_task = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: stopping the load, the proxy and the simulator");
            on_signal.cancel();
        }
    });
    let outcome = run_with(&args, &setup, &cancel).await;
    signal_task.abort();
    outcome
}

/// The demo with an explicit cancellation token.
async fn run_with(args: &Args, setup: &Setup, cancel: &CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&setup.output)
        .with_context(|| format!("cannot create the output folder {}", setup.output.display()))?;
    let r = &setup.replica;
    println!(
        "llmsched demo: {} on {} simulated replicas ({}, {} KV tokens each, {}× real time)",
        setup.workload_name,
        args.replicas,
        args.profile,
        r.num_gpu_blocks * r.block_size,
        args.time_scale,
    );
    println!("results go to {}\n", setup.output.display());

    let pd_label = format!(
        "{}p{}d",
        args.pd_prefill,
        args.replicas.saturating_sub(args.pd_prefill)
    );
    let legs = if args.pd {
        [
            Leg {
                label: "aggregated",
                baseline: None,
                pd_prefill: None,
            },
            Leg {
                label: &pd_label,
                baseline: None,
                pd_prefill: Some(args.pd_prefill),
            },
        ]
    } else {
        [
            Leg {
                label: args.baseline.as_str(),
                baseline: Some(args.baseline.as_str()),
                pd_prefill: None,
            },
            Leg {
                label: "llmsched",
                baseline: None,
                pd_prefill: None,
            },
        ]
    };
    let mut results: Vec<RunResult> = Vec::new();
    for (i, leg) in legs.iter().enumerate() {
        println!(
            "[{}/{}] {}: starting a cold cluster",
            i + 1,
            legs.len(),
            leg.label
        );
        let result = run_leg(args, setup, leg, cancel).await?;
        let dir = setup.output.join(leg.label);
        result
            .write_to_dir(&dir)
            .with_context(|| format!("cannot write results to {}", dir.display()))?;
        println!("{}", stage_table(&result));
        let interrupted = result.interrupted;
        results.push(result);
        if interrupted || cancel.is_cancelled() {
            println!(
                "interrupted; partial results are in {}",
                setup.output.display()
            );
            bail!("interrupted");
        }
    }

    let (a, b) = (&results[0], &results[1]);
    let table = Comparison::new(&a.label, &a.summary, &b.label, &b.summary);
    println!("{}", table.to_text());
    let md = setup.output.join("comparison.md");
    std::fs::write(&md, table.to_markdown())
        .with_context(|| format!("cannot write {}", md.display()))?;
    let series: Vec<PlotSeries> = results
        .iter()
        .map(|r| {
            PlotSeries::from_stages(&r.label, r.stages.iter().map(|s| (s.stage_id, &s.summary)))
        })
        .collect();
    let svg = setup.output.join("ttft-throughput.svg");
    llmsched_bench::plot::write_svg(&series, &svg)?;
    print_headline(a, b);
    if args.pd {
        print_itl(a, b);
    }
    println!(
        "\nwrote {}/{{{},{}}}/, comparison.md and ttft-throughput.svg in {:.0} s",
        setup.output.display(),
        a.label,
        b.label,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Inter-token latency p90 and p99 of both runs (what P/D is for).
fn print_itl(a: &RunResult, b: &RunResult) {
    let pct = |r: &RunResult, p: f64| {
        r.summary
            .successes
            .latency
            .inter_token_latency
            .as_ref()
            .and_then(|s| s.percentiles.iter().find(|(q, _)| *q == p).map(|(_, v)| *v))
    };
    for p in [90.0, 99.0] {
        if let (Some(x), Some(y)) = (pct(a, p), pct(b, p)) {
            println!(
                "inter-token latency p{p:.0}: {} {:.1} ms vs {} {:.1} ms",
                a.label,
                x * 1e3,
                b.label,
                y * 1e3
            );
        }
    }
}

fn print_headline(a: &RunResult, b: &RunResult) {
    let ttft = |r: &RunResult| {
        r.summary
            .successes
            .latency
            .time_to_first_token
            .as_ref()
            .map(|t| t.mean)
    };
    let rps = |r: &RunResult| r.summary.successes.throughput.requests_per_sec;
    if let (Some(ta), Some(tb)) = (ttft(a), ttft(b))
        && tb > 0.0
    {
        println!(
            "mean TTFT: {} {:.3} s vs {} {:.3} s ({:.1}× {})",
            a.label,
            ta,
            b.label,
            tb,
            if tb <= ta { ta / tb } else { tb / ta },
            if tb <= ta { "lower" } else { "higher" }
        );
    }
    if rps(a) > 0.0 {
        println!(
            "request throughput: {} {:.2} req/s vs {} {:.2} req/s ({:.2}×)",
            a.label,
            rps(a),
            b.label,
            rps(b),
            rps(b) / rps(a)
        );
    }
}

/// Starts a cold cluster and the proxy, runs the workload, stops both.
async fn run_leg(
    args: &Args,
    setup: &Setup,
    leg: &Leg<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<RunResult> {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let start = |n: usize, base: u16, replica: ReplicaConfig| async move {
        let cfg = ClusterConfig::sequential_ports(n, lo, base, replica)?;
        SimCluster::start(cfg).await.with_context(|| {
            format!(
                "cannot start the simulated replicas on 127.0.0.1:{base}+ (--sim-base-port; 0 picks free ports)"
            )
        })
    };
    let Some(n_prefill) = leg.pd_prefill else {
        let cluster = start(args.replicas, args.sim_base_port, setup.replica.clone()).await?;
        let addrs = cluster.addrs();
        let outcome = run_leg_on(args, setup, leg, cancel, &Fleet::Aggregated(&addrs)).await;
        cluster.shutdown().await;
        return outcome;
    };
    // P/D: prefill replicas first, decode replicas on the following ports; side channels on
    // free ports.
    let role = |r: Role| {
        let mut c = setup.replica.clone().with_role(r);
        c.pd.side_channel_port = 0;
        c
    };
    let prefill = start(n_prefill, args.sim_base_port, role(Role::Prefill)).await?;
    let decode_base = if args.sim_base_port == 0 {
        0
    } else {
        u16::try_from(usize::from(args.sim_base_port) + n_prefill)
            .context("--sim-base-port too high for the replicas")?
    };
    let decode = match start(args.replicas - n_prefill, decode_base, role(Role::Decode)).await {
        Ok(d) => d,
        Err(e) => {
            prefill.shutdown().await;
            return Err(e);
        }
    };
    let (prefill_addrs, decode_addrs) = (prefill.addrs(), decode.addrs());
    let fleet = Fleet::Pd {
        prefill: &prefill_addrs,
        decode: &decode_addrs,
    };
    let outcome = run_leg_on(args, setup, leg, cancel, &fleet).await;
    // What the P/D path did, from the replicas' own counters.
    let computed = |c: &SimCluster| -> u64 {
        c.replicas()
            .iter()
            .map(|r| {
                let m = r.metrics().pd;
                m.served + m.expired + m.held_requests as u64
            })
            .sum()
    };
    let transfers: u64 = decode
        .replicas()
        .iter()
        .map(|r| r.metrics().pd.xfer_time.count())
        .sum();
    println!(
        "{}: {} prompts prefilled on the prefill replica(s) for a remote decode, {} KV transfers into the decode replicas",
        leg.label,
        computed(&prefill),
        transfers
    );
    prefill.shutdown().await;
    decode.shutdown().await;
    outcome
}

/// The replicas of a leg.
enum Fleet<'a> {
    /// Aggregated replicas.
    Aggregated(&'a [SocketAddr]),
    /// Prefill and decode replicas.
    Pd {
        prefill: &'a [SocketAddr],
        decode: &'a [SocketAddr],
    },
}

async fn run_leg_on(
    args: &Args,
    setup: &Setup,
    leg: &Leg<'_>,
    cancel: &CancellationToken,
    fleet: &Fleet<'_>,
) -> anyhow::Result<RunResult> {
    let epp = llmsched_epp::start(epp_args(args, setup, leg, fleet)?)
        .await
        .map_err(anyhow::Error::from)
        .context("cannot start llmsched's proxy")?;
    let proxy = epp
        .proxy_addr
        .context("the EPP started without its proxy")?;
    let mut workload = setup.workload.clone();
    workload.set_base_url(format!("http://{proxy}"));
    let opts = RunOptions {
        label: leg.label.to_owned(),
        time_scale: args.time_scale,
        seed: Some(args.seed),
        progress: if args.no_progress {
            None
        } else {
            terminal_progress()
        },
        cancel: Some(cancel.clone()),
        ..RunOptions::default()
    };
    let outcome = llmsched_bench::run(workload, opts).await;
    epp.shutdown().await;
    Ok(outcome?)
}

/// The `llmsched epp` flags of one leg: plaintext, every port but the proxy's picked free,
/// metrics refreshed every 50 ms of simulated time.
fn epp_args(
    args: &Args,
    setup: &Setup,
    leg: &Leg<'_>,
    fleet: &Fleet<'_>,
) -> anyhow::Result<llmsched_epp::Args> {
    let refresh_ms = (50.0 / args.time_scale).max(5.0);
    let mut flags = vec![
        "epp".to_owned(),
        "--secure-serving=false".to_owned(),
        "--bind-address=127.0.0.1".to_owned(),
        "--grpc-port=0".to_owned(),
        "--grpc-health-port=0".to_owned(),
        "--metrics-port=0".to_owned(),
        format!("--proxy-port={}", args.proxy_port),
        format!("--refresh-metrics-interval={refresh_ms:.0}ms"),
    ];
    match fleet {
        Fleet::Aggregated(replicas) => {
            let endpoints: Vec<String> = replicas.iter().map(ToString::to_string).collect();
            flags.push(format!("--endpoints={}", endpoints.join(",")));
        }
        Fleet::Pd { prefill, decode } => {
            // Roles are endpoint labels, which only an endpoints file carries.
            let mut file = String::from("endpoints:\n");
            for (role, addrs) in [("prefill", prefill), ("decode", decode)] {
                for (i, a) in addrs.iter().enumerate() {
                    file.push_str(&format!(
                        "- {{name: {role}-{i}, address: {}, port: {}, labels: {{llm-d.ai/role: {role}}}}}\n",
                        a.ip(),
                        a.port()
                    ));
                }
            }
            let path = setup.output.join(format!("{}-endpoints.yaml", leg.label));
            std::fs::write(&path, file)
                .with_context(|| format!("cannot write {}", path.display()))?;
            flags.push(format!("--endpoints-file={}", path.display()));
            match &args.config_file {
                Some(c) => flags.push(format!("--config-file={}", c.display())),
                None => flags.push(format!("--config-text={PD_SIM_CONFIG}")),
            }
        }
    }
    if let Some(b) = leg.baseline {
        flags.push(format!("--baseline={b}"));
    } else if !args.pd
        && let Some(c) = &args.config_file
    {
        flags.push(format!("--config-file={}", c.display()));
    }
    llmsched_epp::Args::try_parse_from(flags).context("internal: demo built invalid EPP flags")
}
