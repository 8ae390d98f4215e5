//! The EPP's overhead, measured with real processes: a simulated replica answering as fast as
//! it can (`llmsched sim`, free step times, `max_tokens` 1), the EPP with its built-in proxy
//! (`llmsched epp`), Envoy in front of the EPP and Envoy with a plain round-robin cluster.
//! The same closed-loop load goes
//!
//! * straight to the replica (`direct`, the baseline of every difference),
//! * through the built-in proxy (`proxy`),
//! * through Envoy + EPP (`envoy+epp`, ext_proc over TLS as deployed by default),
//! * through Envoy round robin (`envoy-rr`, no EPP),
//!
//! at several concurrencies and prompt sizes, interleaved so they see the same machine. It
//! reports latency p50/p99 and the difference to `direct` measured in the same run, the CPU
//! the EPP process spent per request (from `/proc/<pid>/stat`) and Envoy's, then a
//! throughput run through Envoy + EPP giving scheduling decisions per second per EPP core
//! (requests ÷ EPP CPU seconds).
//!
//! Run it with `scripts/bench-overhead.sh` (which builds the release binaries); flags:
//! `--help`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode, find_envoy};

#[derive(Parser, Debug)]
#[command(
    name = "overhead",
    about = "Latency and CPU the EPP adds, direct vs proxy vs Envoy"
)]
struct Args {
    /// The release `llmsched` binary.
    #[arg(long)]
    llmsched_bin: PathBuf,
    /// The Envoy binary (default: $LLMSCHED_ENVOY_BIN or scripts/install-tools.sh).
    #[arg(long)]
    envoy_bin: Option<PathBuf>,
    /// Concurrencies of the latency runs.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Prompt sizes of the latency runs, in KB (1000 bytes).
    #[arg(long, value_delimiter = ',', default_value = "30,220")]
    prompt_kb: Vec<usize>,
    /// Measured seconds per variant and setting (after a warm-up of a quarter of that).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrency of the throughput run through Envoy + EPP.
    #[arg(long, default_value_t = 64)]
    throughput_concurrency: usize,
    /// Prompt sizes of the throughput run, in KB.
    #[arg(long, value_delimiter = ',', default_value = "1,30")]
    throughput_prompt_kb: Vec<usize>,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 10.0)]
    throughput_seconds: f64,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 1)]
    envoy_concurrency: usize,
    /// ext_proc over TLS (the EPP's default) or plaintext.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    epp_tls: bool,
    /// Write the markdown report here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A child process killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, bin: &Path, args: &[String], log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", bin.display()));
        Proc { name, child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check(&mut self, log: &Path) {
        if let Ok(Some(s)) = self.child.try_wait() {
            panic!(
                "{} exited ({s}):\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: [u8; 4]) -> u16 {
    std::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU seconds (user + system, all threads) of a process so far.
fn cpu_seconds(pid: u32, ticks_per_s: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at state.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / ticks_per_s
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(c)
}

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A completions body of about `bytes` bytes whose prompt starts with a unique number (no
/// two requests share a prefix: the prefix index inserts every block, the worst case).
fn body(filler: &str, n: u64) -> Bytes {
    Bytes::from(format!(
        "{{\"model\":\"{MODEL}\",\"prompt\":\"{n:012} {filler}\",\"max_tokens\":1,\"ignore_eos\":true}}"
    ))
}

fn filler(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("w{} ", x % 50_000));
    }
    s.truncate(bytes);
    s
}

async fn post(c: &HttpClient, url: &str, body: Bytes) -> Result<u16, String> {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

#[derive(Debug, Clone, Default)]
struct Run {
    latencies_us: Vec<u64>,
    errors: u64,
    wall_s: f64,
    epp_cpu_s: f64,
    envoy_cpu_s: f64,
}

impl Run {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
    fn n(&self) -> f64 {
        self.latencies_us.len() as f64
    }
    fn rps(&self) -> f64 {
        self.n() / self.wall_s
    }
}

struct Measure {
    client: HttpClient,
    ticks: f64,
    epp_pid: u32,
    counter: Arc<AtomicU64>,
}

impl Measure {
    /// Closed loop: `conc` workers send back to back for `warmup` then `secs`.
    async fn run(
        &self,
        url: &str,
        filler: &Arc<String>,
        conc: usize,
        secs: f64,
        envoy: Option<u32>,
    ) -> Run {
        let warmup = Duration::from_secs_f64((secs / 4.0).max(0.5));
        let measure = Duration::from_secs_f64(secs);
        let recording = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..conc {
            let (c, url, filler) = (self.client.clone(), url.to_string(), filler.clone());
            let (recording, stop, counter) =
                (recording.clone(), stop.clone(), self.counter.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let b = body(&filler, counter.fetch_add(1, Ordering::Relaxed));
                    let t0 = Instant::now();
                    let r = post(&c, &url, b).await;
                    let us = t0.elapsed().as_micros() as u64;
                    if !recording.load(Ordering::Relaxed) {
                        continue;
                    }
                    match r {
                        Ok(200) => lat.push(us),
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
        tokio::time::sleep(warmup).await;
        let epp0 = cpu_seconds(self.epp_pid, self.ticks);
        let envoy0 = envoy.map(|p| cpu_seconds(p, self.ticks)).unwrap_or(0.0);
        let t0 = Instant::now();
        recording.store(true, Ordering::Relaxed);
        tokio::time::sleep(measure).await;
        recording.store(false, Ordering::Relaxed);
        let wall_s = t0.elapsed().as_secs_f64();
        let epp_cpu_s = cpu_seconds(self.epp_pid, self.ticks) - epp0;
        let envoy_cpu_s = envoy.map(|p| cpu_seconds(p, self.ticks)).unwrap_or(0.0) - envoy0;
        stop.store(true, Ordering::Relaxed);
        let mut run = Run {
            wall_s,
            epp_cpu_s,
            envoy_cpu_s,
            ..Run::default()
        };
        for t in tasks {
            let (lat, errors) = t.await.unwrap();
            run.latencies_us.extend(lat);
            run.errors += errors;
        }
        run.latencies_us.sort_unstable();
        run
    }
}

async fn wait_ok(url: &str, body: Bytes, what: &str) {
    let c = http_client();
    let start = Instant::now();
    loop {
        if let Ok(200) = post(&c, url, body.clone()).await {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let envoy_bin = args
        .envoy_bin
        .clone()
        .unwrap_or_else(|| find_envoy(&repo).expect("Envoy"));
    let dir = tempfile::tempdir().unwrap();
    let ticks = clock_ticks();

    // One replica with free step times: latency is HTTP, tokenization and the hops. Its KV
    // cache keeps the profile's size (29,205 blocks, an 8B model on one H100): the EPP sizes
    // its prefix index from it, so after a few seconds of unique prompts the index is full and
    // evicting, which is the steady state a long-running EPP lives in (an oversized cache would
    // measure the index growing instead).
    let sim_addr = SocketAddr::from(([127, 0, 0, 2], free_port([127, 0, 0, 2])));
    let sim_log = dir.path().join("sim.log");
    let mut sim = Proc::spawn(
        "llmsched sim",
        &args.llmsched_bin,
        &[
            "sim",
            "--profile=llama3.1-8b-h100",
            &format!("--addrs={sim_addr}"),
            "--step-overhead-ms=0.001",
            "--prefill-us-per-token=0",
            "--prefill-attn-ns-per-pair=0",
            "--decode-us-per-seq=0",
            "--decode-attn-ns-per-token=0",
            "--frontend-overhead-ms=0",
            "--frontend-us-per-token=0",
            "--max-model-len=400000",
            "--max-num-batched-tokens=1000000",
        ]
        .map(String::from),
        &sim_log,
    );
    let direct = format!("http://{sim_addr}/v1/completions");
    let probe = body("hello", 0);
    wait_ok(&direct, probe.clone(), "the simulator").await;
    sim.check(&sim_log);

    // The EPP with its proxy.
    let [grpc, health, metrics, proxy] = [0; 4].map(|_| free_port([127, 0, 0, 1]));
    let epp_log = dir.path().join("epp.log");
    let mut epp = Proc::spawn(
        "llmsched epp",
        &args.llmsched_bin,
        &[
            "epp".to_string(),
            "--bind-address=127.0.0.1".into(),
            format!("--endpoints={sim_addr}"),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={health}"),
            format!("--metrics-port={metrics}"),
            format!("--proxy-port={proxy}"),
            format!("--secure-serving={}", args.epp_tls),
        ],
        &epp_log,
    );
    let proxy_url = format!("http://127.0.0.1:{proxy}/v1/completions");
    wait_ok(&proxy_url, probe.clone(), "the EPP's proxy").await;
    epp.check(&epp_log);

    let mut opts = EnvoyOptions::new(envoy_bin);
    opts.concurrency = args.envoy_concurrency;
    let envoy_epp = Envoy::start(
        &BootstrapConfig {
            mode: Mode::Epp,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            epp: EppTarget {
                host: "127.0.0.1".into(),
                grpc_port: grpc,
                health_port: health,
                tls: args.epp_tls,
            },
            ..BootstrapConfig::default()
        },
        &opts,
    )
    .await
    .expect("Envoy (epp) starts");
    let envoy_rr = Envoy::start(
        &BootstrapConfig {
            mode: Mode::RoundRobin,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            endpoints: vec![sim_addr],
            ..BootstrapConfig::default()
        },
        &opts,
    )
    .await
    .expect("Envoy (round robin) starts");
    let envoy_epp_url = format!("{}/v1/completions", envoy_epp.url());
    let envoy_rr_url = format!("{}/v1/completions", envoy_rr.url());
    wait_ok(&envoy_epp_url, probe.clone(), "Envoy + EPP").await;
    wait_ok(&envoy_rr_url, probe.clone(), "Envoy round robin").await;

    let m = Measure {
        client: http_client(),
        ticks,
        epp_pid: epp.pid(),
        counter: Arc::new(AtomicU64::new(1)),
    };

    // The EPP's background CPU (metrics scraping every 50 ms), for reference.
    let idle0 = cpu_seconds(epp.pid(), ticks);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_pct = (cpu_seconds(epp.pid(), ticks) - idle0) / 3.0 * 100.0;

    let variants: [(&str, &str, Option<u32>); 4] = [
        ("direct", &direct, None),
        ("proxy", &proxy_url, None),
        ("envoy+epp", &envoy_epp_url, Some(envoy_epp.pid())),
        ("envoy-rr", &envoy_rr_url, Some(envoy_rr.pid())),
    ];
    let mut report = String::new();
    report.push_str(&format!(
        "Machine: {}. Envoy {} worker(s); ext_proc over {}; one simulated replica with free step \
         times, `max_tokens` 1, non-streaming `/v1/completions`, unique prompt prefixes; \
         {}s measured per cell after a warm-up. EPP idle CPU (metrics scraping): {:.1}% of a core.\n\n",
        machine(),
        args.envoy_concurrency,
        if args.epp_tls { "TLS" } else { "plaintext" },
        args.seconds,
        idle_pct
    ));
    report.push_str("| prompt | conc | path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | EPP CPU µs/req | Envoy CPU µs/req | errors |\n");
    report.push_str(
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for &kb in &args.prompt_kb {
        let fill = Arc::new(filler(kb * 1000));
        for &conc in &args.concurrency {
            let mut results: BTreeMap<&str, Run> = BTreeMap::new();
            for (name, url, envoy) in &variants {
                eprintln!("latency: {kb} KB, concurrency {conc}, {name} …");
                let r = m.run(url, &fill, conc, args.seconds, *envoy).await;
                results.insert(name, r);
            }
            let base = results["direct"].clone();
            for (name, _, _) in &variants {
                let r = &results[name];
                let epp_cpu = if matches!(*name, "proxy" | "envoy+epp") {
                    format!("{:.0}", r.epp_cpu_s / r.n() * 1e6)
                } else {
                    "–".into()
                };
                let envoy_cpu = if name.starts_with("envoy") {
                    format!("{:.0}", r.envoy_cpu_s / r.n() * 1e6)
                } else {
                    "–".into()
                };
                let added = |v: f64| {
                    if *name == "direct" {
                        "–".to_string()
                    } else {
                        format!("{v:+.2}")
                    }
                };
                report.push_str(&format!(
                    "| {kb} KB | {conc} | {name} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} |\n",
                    r.rps(),
                    r.pct(0.5),
                    r.pct(0.99),
                    added(r.pct(0.5) - base.pct(0.5)),
                    added(r.pct(0.99) - base.pct(0.99)),
                    epp_cpu,
                    envoy_cpu,
                    r.errors
                ));
            }
        }
    }

    report.push_str("\nThroughput through Envoy + EPP (scheduling decisions per second per EPP core = requests ÷ EPP CPU seconds):\n\n");
    report.push_str("| prompt | conc | req/s | EPP cores busy | EPP CPU µs/req | decisions/s per EPP core | Envoy CPU µs/req | p50 ms | errors |\n");
    report.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for &kb in &args.throughput_prompt_kb {
        let fill = Arc::new(filler(kb * 1000));
        eprintln!(
            "throughput: {kb} KB, concurrency {} …",
            args.throughput_concurrency
        );
        let r = m
            .run(
                &envoy_epp_url,
                &fill,
                args.throughput_concurrency,
                args.throughput_seconds,
                Some(envoy_epp.pid()),
            )
            .await;
        report.push_str(&format!(
            "| {kb} KB | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {} |\n",
            args.throughput_concurrency,
            r.rps(),
            r.epp_cpu_s / r.wall_s,
            r.epp_cpu_s / r.n() * 1e6,
            r.n() / r.epp_cpu_s,
            r.envoy_cpu_s / r.n() * 1e6,
            r.pct(0.5),
            r.errors
        ));
    }
    sim.check(&sim_log);
    epp.check(&epp_log);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).unwrap();
    }
    drop(envoy_epp);
    drop(envoy_rr);
}
