//! `llmsched sim`: command-line flags and the entry point the `llmsched` binary calls.
//!
//! ```text
//! llmsched sim --replicas 8 --address 127.0.0.1 --base-port 8000          # 8 replicas, one process
//! llmsched sim --replicas 4 --address 127.0.0.2 --ip-per-replica          # 127.0.0.2..5:8000
//! llmsched sim --addrs 127.0.0.2:8000,127.0.0.3:8000 --time-scale 10
//! llmsched sim --profile llama3.1-8b-h100 --kv-events-endpoint 'tcp://*:5557'
//! llmsched sim --role prefill --base-port 8100 --kv-side-channel-port 5600    # P/D prefill pool
//! llmsched sim --role decode --replicas 3 --base-port 8200                    # P/D decode pool
//! ```
//!
//! Every profile parameter can be overridden; unset flags keep the profile's value.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::Args as ClapArgs;
use llmsched_kvevents::{ConnectMode, EncodeOptions, Layout};

use crate::cluster::SimCluster;
use crate::config::{ClusterConfig, KvEventsConfig, ReplicaConfig, TokenizerChoice};
use crate::error::SimError;
use crate::pd::{LoadFailurePolicy, Role, link, link_names};
use crate::profile::{DEFAULT_PROFILE, PROFILES};

/// Flags of `llmsched sim`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Calibration profile (qwen3-32b-tp2-h100, llama3.1-8b-h100).
    #[arg(long, default_value = DEFAULT_PROFILE, env = "LLMSCHED_SIM_PROFILE")]
    pub profile: String,

    /// Number of replicas (each its own HTTP server and engine).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,

    /// IP address replicas listen on (the first one with --ip-per-replica).
    #[arg(long, default_value = "127.0.0.1")]
    pub address: IpAddr,

    /// Port of the first replica; the others use the next ports (0 = free ports).
    #[arg(long, default_value_t = 8000)]
    pub base_port: u16,

    /// Give replica i the address `address + i` (all on --base-port) instead of port + i.
    #[arg(long)]
    pub ip_per_replica: bool,

    /// Explicit replica addresses (ip:port, comma-separated); overrides the three flags above.
    #[arg(long, value_delimiter = ',')]
    pub addrs: Vec<SocketAddr>,

    /// Served model name [default: the profile's].
    #[arg(long)]
    pub model: Option<String>,

    /// KV-cache blocks per replica [default: the profile's].
    #[arg(long, conflicts_with = "kv_cache_tokens")]
    pub num_gpu_blocks: Option<usize>,

    /// KV-cache size in tokens per replica (alternative to --num-gpu-blocks).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,

    /// Tokens per KV block.
    #[arg(long)]
    pub block_size: Option<usize>,

    /// Maximum running sequences per replica.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,

    /// Token budget per engine step (chunked prefill).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,

    /// Maximum prompt + output tokens.
    #[arg(long)]
    pub max_model_len: Option<usize>,

    /// Waiting requests beyond which new requests get 429 (0 = unbounded, vLLM's behaviour).
    #[arg(long, default_value_t = 0)]
    pub max_waiting: usize,

    /// Step overhead t0, milliseconds.
    #[arg(long)]
    pub step_overhead_ms: Option<f64>,

    /// Prefill cost per prompt token, microseconds.
    #[arg(long)]
    pub prefill_us_per_token: Option<f64>,

    /// Prefill attention cost per (new token × context token) pair, nanoseconds.
    #[arg(long)]
    pub prefill_attn_ns_per_pair: Option<f64>,

    /// Decode cost per running sequence, microseconds.
    #[arg(long)]
    pub decode_us_per_seq: Option<f64>,

    /// Decode attention cost per KV token read, nanoseconds.
    #[arg(long)]
    pub decode_attn_ns_per_token: Option<f64>,

    /// Frontend latency per request, milliseconds.
    #[arg(long)]
    pub frontend_overhead_ms: Option<f64>,

    /// Frontend latency per prompt token, microseconds.
    #[arg(long)]
    pub frontend_us_per_token: Option<f64>,

    /// Run F× faster than real time; metrics stay in simulated seconds.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,

    /// Hugging Face tokenizer.json (file or directory) instead of the word-per-token tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// Vocabulary size of the word-per-token tokenizer.
    #[arg(long, default_value_t = llmsched_tokenizer::SimTokenizer::DEFAULT_VOCAB)]
    pub vocab_size: u32,

    /// Enable LoRA adapters.
    #[arg(long)]
    pub enable_lora: bool,

    /// Maximum distinct LoRA adapters in one batch.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,

    /// Maximum LoRA adapters loaded at once [default: max(--max-loras, number of --lora-modules)].
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,

    /// LoRA adapters to load at start, `name=path` (implies --enable-lora).
    #[arg(long, value_delimiter = ',')]
    pub lora_modules: Vec<String>,

    /// Fraction of generation requests that fail (failure injection).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,

    /// HTTP statuses injected failures use (comma-separated, default 503).
    #[arg(long, value_delimiter = ',')]
    pub failure_statuses: Vec<u16>,

    /// Mean output length of requests without ignore_eos (0 = always run to max_tokens).
    #[arg(long, default_value_t = 0)]
    pub eos_mean_tokens: u32,

    /// Do not report usage.prompt_tokens_details.cached_tokens.
    #[arg(long)]
    pub disable_prompt_tokens_details: bool,

    /// Seed for request ids and failure injection.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Publish KV-cache events on this ZMQ endpoint (e.g. tcp://*:5557 to bind, tcp://host:5557
    /// to connect). When binding, replica i uses port + i.
    #[arg(long)]
    pub kv_events_endpoint: Option<String>,

    /// bind, connect or auto (vLLM's heuristic: bind if the endpoint has `*`).
    #[arg(long, default_value = "auto")]
    pub kv_events_mode: ConnectMode,

    /// Replay ROUTER endpoint (replica i uses port + i).
    #[arg(long)]
    pub kv_events_replay_endpoint: Option<String>,

    /// Topic template; {ip}, {port} and {model} are replaced per replica.
    #[arg(long, default_value = "kv@{ip}:{port}@{model}")]
    pub kv_events_topic: String,

    /// Payload layout: array (vLLM ≤ 0.11), map (events as maps), map-batch (newest vLLM).
    #[arg(long, default_value = "array")]
    pub kv_events_encoding: Layout,

    /// Encode block hashes as 8-byte big-endian bytes instead of ints.
    #[arg(long)]
    pub kv_events_hash_bytes: bool,

    /// Event batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    pub kv_events_buffer_steps: usize,

    /// Sequence number of the first batch (vLLM 0, llm-d-inference-sim 1).
    #[arg(long, default_value_t = 0)]
    pub kv_events_first_seq: u64,

    /// P/D role: prefill, decode (both turn vLLM's NIXL KV connector on) or both (an
    /// aggregated replica without a connector: kv_transfer_params are ignored).
    #[arg(long, default_value = "both", env = "LLMSCHED_SIM_ROLE")]
    pub role: Role,

    /// Force the NIXL connector on (nixl) or off (none) whatever the role.
    #[arg(long, value_parser = ["nixl", "NixlConnector", "none"])]
    pub kv_connector: Option<String>,

    /// Host the NIXL side channel listens on and advertises as remote_host [default: the
    /// replica's IP].
    #[arg(long, env = "VLLM_NIXL_SIDE_CHANNEL_HOST")]
    pub kv_side_channel_host: Option<IpAddr>,

    /// Side-channel port of the first replica; replica i uses port + i (0 = free ports).
    #[arg(long, default_value_t = crate::pd::DEFAULT_SIDE_CHANNEL_PORT, env = "VLLM_NIXL_SIDE_CHANNEL_PORT")]
    pub kv_side_channel_port: u16,

    /// Seconds (simulated) a finished prefill holds its KV blocks for a decoder that does not
    /// read them.
    #[arg(long, default_value_t = crate::pd::DEFAULT_ABORT_TIMEOUT_S, env = "VLLM_NIXL_ABORT_REQUEST_TIMEOUT")]
    pub nixl_abort_request_timeout: f64,

    /// Interconnect between prefill and decode replicas (rdma-400g, rdma-200g, tcp,
    /// nvlink-h100).
    #[arg(long, default_value = "rdma-400g")]
    pub kv_transfer_link: String,

    /// Achieved KV transfer bandwidth per link (per GPU), GB/s [default: the link's].
    #[arg(long)]
    pub kv_transfer_gbytes_per_s: Option<f64>,

    /// Fixed cost per KV transfer, milliseconds [default: the link's].
    #[arg(long)]
    pub kv_transfer_latency_ms: Option<f64>,

    /// KV-cache bytes per token of the whole replica [default: from the profile's model].
    #[arg(long)]
    pub kv_bytes_per_token: Option<u64>,

    /// What a decode replica does when KV blocks cannot be read: fail (vLLM's default: the
    /// request ends with an error) or recompute (prefill the rest locally).
    #[arg(long, default_value = "fail")]
    pub kv_load_failure_policy: LoadFailurePolicy,
}

impl Args {
    /// The cluster configuration these flags describe.
    pub fn cluster_config(&self) -> Result<ClusterConfig, SimError> {
        let mut r = ReplicaConfig::from_profile(&self.profile)?;
        if let Some(m) = &self.model {
            r.model = m.clone();
        }
        if let Some(bs) = self.block_size {
            r = r.with_block_size(bs);
        }
        if let Some(n) = self.num_gpu_blocks {
            r.num_gpu_blocks = n;
        }
        if let Some(t) = self.kv_cache_tokens {
            r = r.with_kv_cache_tokens(t);
        }
        if let Some(n) = self.max_num_seqs {
            r.max_num_seqs = n;
        }
        if let Some(n) = self.max_num_batched_tokens {
            r.max_num_batched_tokens = n;
        }
        if let Some(n) = self.max_model_len {
            r.max_model_len = n;
        }
        r.max_waiting = self.max_waiting;
        let set = |v: Option<f64>, scale: f64, slot: &mut f64| {
            if let Some(v) = v {
                *slot = v * scale;
            }
        };
        set(self.step_overhead_ms, 1e-3, &mut r.step.overhead_s);
        set(
            self.prefill_us_per_token,
            1e-6,
            &mut r.step.prefill_per_token_s,
        );
        set(
            self.prefill_attn_ns_per_pair,
            1e-9,
            &mut r.step.prefill_attn_per_pair_s,
        );
        set(self.decode_us_per_seq, 1e-6, &mut r.step.decode_per_seq_s);
        set(
            self.decode_attn_ns_per_token,
            1e-9,
            &mut r.step.decode_attn_per_token_s,
        );
        set(self.frontend_overhead_ms, 1e-3, &mut r.frontend.overhead_s);
        set(
            self.frontend_us_per_token,
            1e-6,
            &mut r.frontend.per_prompt_token_s,
        );
        r.time_scale = self.time_scale;
        r.tokenizer = match &self.tokenizer {
            Some(p) => TokenizerChoice::HuggingFace(p.clone()),
            None => TokenizerChoice::Sim {
                vocab_size: self.vocab_size,
            },
        };
        let modules = self
            .lora_modules
            .iter()
            .map(|m| match m.split_once('=') {
                Some((n, p)) if !n.is_empty() => Ok((n.to_string(), p.to_string())),
                _ => Err(SimError::Config(format!(
                    "--lora-modules expects name=path, got {m:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        r.lora.enabled = self.enable_lora || !modules.is_empty();
        r.lora.max_loras = self.max_loras;
        r.lora.max_cpu_loras = self
            .max_cpu_loras
            .unwrap_or(self.max_loras.max(modules.len()));
        r.lora.modules = modules;
        r.failure.rate = self.failure_rate;
        r.failure.statuses = self.failure_statuses.clone();
        r.eos_mean_tokens = self.eos_mean_tokens;
        r.prompt_tokens_details = !self.disable_prompt_tokens_details;
        r.seed = self.seed;
        r = r.with_role(self.role);
        match self.kv_connector.as_deref() {
            Some("nixl" | "NixlConnector") => r.pd.connector = true,
            Some(_) => r.pd.connector = false,
            None => {}
        }
        r.pd.side_channel_host = self.kv_side_channel_host;
        r.pd.side_channel_port = self.kv_side_channel_port;
        r.pd.abort_timeout_s = self.nixl_abort_request_timeout;
        let l = link(&self.kv_transfer_link).ok_or_else(|| {
            SimError::Config(format!(
                "unknown --kv-transfer-link {:?}; available: {}",
                self.kv_transfer_link,
                link_names()
            ))
        })?;
        r.pd.transfer.link_bytes_per_s = self
            .kv_transfer_gbytes_per_s
            .map_or(l.bytes_per_s, |g| g * 1e9);
        r.pd.transfer.latency_s = self
            .kv_transfer_latency_ms
            .map_or(l.latency_s, |ms| ms * 1e-3);
        if let Some(b) = self.kv_bytes_per_token {
            r.pd.transfer.bytes_per_token = b;
        }
        r.pd.failure_policy = self.kv_load_failure_policy;
        r.validate()?;

        if self.replicas == 0 && self.addrs.is_empty() {
            return Err(SimError::Config("--replicas must be at least 1".into()));
        }
        let mut cluster = if !self.addrs.is_empty() {
            ClusterConfig::new(self.addrs.clone(), r)
        } else if self.ip_per_replica {
            let IpAddr::V4(first) = self.address else {
                return Err(SimError::Config(
                    "--ip-per-replica needs an IPv4 --address".into(),
                ));
            };
            ClusterConfig::distinct_ips(self.replicas, first, self.base_port, r)?
        } else {
            ClusterConfig::sequential_ports(self.replicas, self.address, self.base_port, r)?
        };
        if let Some(ep) = &self.kv_events_endpoint {
            let mut k = KvEventsConfig::new(ep.clone());
            k.mode = self.kv_events_mode;
            k.replay_endpoint = self.kv_events_replay_endpoint.clone();
            k.topic = self.kv_events_topic.clone();
            k.encode = EncodeOptions {
                layout: self.kv_events_encoding,
                hashes_as_bytes: self.kv_events_hash_bytes,
            };
            k.buffer_steps = self.kv_events_buffer_steps;
            k.first_seq = self.kv_events_first_seq;
            cluster = cluster.with_kv_events(k);
        } else if self.kv_events_replay_endpoint.is_some() {
            return Err(SimError::Config(
                "--kv-events-replay-endpoint needs --kv-events-endpoint".into(),
            ));
        }
        Ok(cluster)
    }
}

/// Runs the simulator until Ctrl-C.
pub async fn run(args: Args) -> Result<(), SimError> {
    let cfg = args.cluster_config()?;
    let profile = PROFILES
        .iter()
        .find(|p| p.name == cfg.replica.profile)
        .map_or("", |p| p.summary);
    let cluster = SimCluster::start(cfg).await?;
    tracing::info!(
        replicas = cluster.replicas().len(),
        profile = %args.profile,
        time_scale = args.time_scale,
        "{profile}"
    );
    for r in cluster.replicas() {
        tracing::info!(
            url = %r.url(),
            kv_events = r.kv_events_endpoint().unwrap_or("-"),
            topic = r.kv_events_topic().unwrap_or("-"),
            "replica ready"
        );
    }
    tokio::signal::ctrl_c().await?;
    tracing::info!("shutting down");
    cluster.shutdown().await;
    Ok(())
}

/// Addresses `replicas` replicas would get from `address`/`base_port` flags (for docs/tests).
pub fn default_addrs(replicas: usize, base_port: u16) -> Vec<SocketAddr> {
    (0..replicas)
        .map(|i| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                base_port.saturating_add(u16::try_from(i).unwrap_or(u16::MAX)),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        sim: Args,
    }

    fn parse(args: &[&str]) -> Result<ClusterConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.sim.cluster_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_32b_profile_on_port_8000() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.addrs, default_addrs(1, 8000));
        assert_eq!(c.replica.model, "Qwen/Qwen3-32B");
        assert!(c.kv_events.is_none());
    }

    #[test]
    fn overrides_apply() {
        let c = parse(&[
            "--replicas",
            "3",
            "--address",
            "127.0.0.2",
            "--ip-per-replica",
            "--base-port",
            "9000",
            "--kv-cache-tokens",
            "164000",
            "--max-num-seqs",
            "8",
            "--step-overhead-ms",
            "20",
            "--time-scale",
            "10",
            "--lora-modules",
            "a=/x,b=/y",
            "--kv-events-endpoint",
            "tcp://*:5557",
            "--kv-events-encoding",
            "map",
        ])
        .unwrap();
        assert_eq!(c.addrs[2], "127.0.0.4:9000".parse().unwrap());
        assert_eq!(c.replica.num_gpu_blocks, 10_250);
        assert_eq!(c.replica.max_num_seqs, 8);
        assert_eq!(c.replica.step.overhead_s, 0.02);
        assert_eq!(c.replica.time_scale, 10.0);
        assert!(c.replica.lora.enabled);
        assert_eq!(c.replica.lora.max_cpu_loras, 2);
        assert_eq!(c.kv_events.unwrap().encode.layout, Layout::Map);
    }

    #[test]
    fn bad_flags_are_clear_errors() {
        assert!(
            parse(&["--profile", "nope"])
                .unwrap_err()
                .contains("available profiles")
        );
        assert!(
            parse(&["--lora-modules", "x"])
                .unwrap_err()
                .contains("name=path")
        );
        assert!(
            parse(&["--time-scale", "0"])
                .unwrap_err()
                .contains("time_scale")
        );
        assert!(
            parse(&["--kv-events-encoding", "yaml"])
                .unwrap_err()
                .contains("yaml")
        );
        assert!(
            parse(&["--kv-events-replay-endpoint", "tcp://*:1"])
                .unwrap_err()
                .contains("--kv-events-endpoint")
        );
        assert!(
            parse(&["--role", "router"])
                .unwrap_err()
                .contains("prefill, decode or both")
        );
        assert!(
            parse(&["--role", "decode", "--kv-transfer-link", "carrier-pigeon"])
                .unwrap_err()
                .contains("rdma-400g")
        );
        assert!(
            parse(&["--role", "decode", "--kv-transfer-gbytes-per-s", "0"])
                .unwrap_err()
                .contains("bandwidth")
        );
        assert!(
            parse(&["--nixl-abort-request-timeout", "0"])
                .unwrap_err()
                .contains("abort timeout")
        );
        assert!(
            parse(&["--kv-load-failure-policy", "retry"])
                .unwrap_err()
                .contains("fail or recompute")
        );
    }

    #[test]
    fn roles_turn_the_connector_on() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.replica.pd.role, Role::Both);
        assert!(!c.replica.pd.connector);
        let c = parse(&[
            "--role",
            "prefill",
            "--kv-side-channel-port",
            "0",
            "--nixl-abort-request-timeout",
            "30",
            "--kv-transfer-link",
            "rdma-200g",
            "--kv-transfer-latency-ms",
            "2",
            "--kv-load-failure-policy",
            "recompute",
        ])
        .unwrap();
        let pd = &c.replica.pd;
        assert_eq!(pd.role, Role::Prefill);
        assert!(pd.connector);
        assert_eq!(pd.side_channel_port, 0);
        assert_eq!(pd.abort_timeout_s, 30.0);
        assert_eq!(pd.transfer.link_bytes_per_s, 21.75e9);
        assert_eq!(pd.transfer.latency_s, 0.002);
        assert_eq!(pd.transfer.bytes_per_token, 256 * 1024);
        assert_eq!(pd.transfer.links, 2);
        assert_eq!(pd.failure_policy, LoadFailurePolicy::Recompute);
        let c = parse(&["--role", "decode", "--kv-connector", "none"]).unwrap();
        assert!(!c.replica.pd.connector);
        let c = parse(&["--kv-connector", "nixl", "--kv-bytes-per-token", "1000"]).unwrap();
        assert!(c.replica.pd.connector);
        assert_eq!(c.replica.pd.transfer.bytes_per_token, 1000);
    }
}
