//! Configuration of simulated replicas and clusters.
//!
//! [`ReplicaConfig`] starts from a [`Profile`](crate::profile::Profile) and every field can be
//! overridden; [`ClusterConfig`] says where the replicas listen and whether they publish KV
//! events.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use llmsched_kvevents::{ConnectMode, EncodeOptions};

use crate::error::SimError;
use crate::pd::{PdConfig, Role};
use crate::profile::{FrontendModel, StepTimeModel, profile, profile_names};

/// Which tokenizer turns prompts into token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerChoice {
    /// One token per whitespace-separated word (`llmsched_tokenizer::SimTokenizer`), exact for
    /// prompts built by the load generator.
    Sim {
        /// Vocabulary size.
        vocab_size: u32,
    },
    /// A Hugging Face `tokenizer.json` (file or directory holding one).
    HuggingFace(PathBuf),
}

/// LoRA settings (vLLM `--enable-lora`, `--max-loras`, `--max-cpu-loras`, `--lora-modules`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraConfig {
    /// Whether LoRA adapters can be used at all.
    pub enabled: bool,
    /// Maximum distinct adapters in one batch (vLLM `--max-loras`).
    pub max_loras: usize,
    /// Maximum adapters loaded at once; loading more is refused (vLLM `--max-cpu-loras`).
    pub max_cpu_loras: usize,
    /// Adapters loaded at start: `(name, path)`.
    pub modules: Vec<(String, String)>,
}

/// Failure injection for tests: a fraction of requests fail with one of `statuses`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FailureConfig {
    /// Probability in `[0, 1]` that a request fails.
    pub rate: f64,
    /// HTTP statuses to pick from (uniformly); 503 when empty.
    pub statuses: Vec<u16>,
}

/// Everything about one simulated vLLM server.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaConfig {
    /// The profile the values came from.
    pub profile: String,
    /// Served model name (`model` in requests, `model_name` label in metrics).
    pub model: String,
    /// KV-cache blocks.
    pub num_gpu_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Maximum running sequences.
    pub max_num_seqs: usize,
    /// Token budget per step.
    pub max_num_batched_tokens: usize,
    /// Maximum prompt + output tokens per request.
    pub max_model_len: usize,
    /// Requests waiting (accepted but not yet running) beyond which new ones get 429; 0 = no cap.
    pub max_waiting: usize,
    /// Step-time model.
    pub step: StepTimeModel,
    /// Frontend latency model.
    pub frontend: FrontendModel,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Tokenizer.
    pub tokenizer: TokenizerChoice,
    /// LoRA settings.
    pub lora: LoraConfig,
    /// Failure injection.
    pub failure: FailureConfig,
    /// Mean output length in tokens when requests do not set `ignore_eos` (geometric, per
    /// request deterministic); 0 means requests always run to `max_tokens`.
    pub eos_mean_tokens: u32,
    /// Report `usage.prompt_tokens_details.cached_tokens` (vLLM
    /// `--enable-prompt-tokens-details`; on by default here).
    pub prompt_tokens_details: bool,
    /// Seed for request ids and failure injection.
    pub seed: u64,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Prefill/decode disaggregation: role and NIXL connector ([`crate::pd`]).
    pub pd: PdConfig,
}

impl ReplicaConfig {
    /// The configuration of a built-in profile.
    pub fn from_profile(name: &str) -> Result<Self, SimError> {
        let p = profile(name).ok_or_else(|| SimError::UnknownProfile {
            name: name.to_string(),
            available: profile_names(),
        })?;
        Ok(Self {
            profile: p.name.to_string(),
            model: p.model.to_string(),
            num_gpu_blocks: p.num_gpu_blocks,
            block_size: p.block_size,
            max_num_seqs: p.max_num_seqs,
            max_num_batched_tokens: p.max_num_batched_tokens,
            max_model_len: p.max_model_len,
            max_waiting: 0,
            step: p.step,
            frontend: p.frontend,
            time_scale: 1.0,
            tokenizer: TokenizerChoice::Sim {
                vocab_size: llmsched_tokenizer::SimTokenizer::DEFAULT_VOCAB,
            },
            lora: LoraConfig {
                enabled: false,
                max_loras: 1,
                max_cpu_loras: 1,
                modules: Vec::new(),
            },
            failure: FailureConfig::default(),
            eos_mean_tokens: 0,
            prompt_tokens_details: true,
            seed: 0,
            max_body_bytes: 64 << 20,
            pd: PdConfig::for_profile(p.name),
        })
    }

    /// Plays `role` in a P/D deployment: `prefill` and `decode` turn the NIXL connector on,
    /// `both` turns it off (today's behaviour).
    pub fn with_role(mut self, role: Role) -> Self {
        self.pd.role = role;
        self.pd.connector = role != Role::Both;
        self
    }

    /// Runs every duration `f` times faster.
    pub fn with_time_scale(mut self, f: f64) -> Self {
        self.time_scale = f;
        self
    }

    /// Serves the model under `name`.
    pub fn with_model(mut self, name: impl Into<String>) -> Self {
        self.model = name.into();
        self
    }

    /// Sizes the KV cache to `blocks` blocks.
    pub fn with_num_gpu_blocks(mut self, blocks: usize) -> Self {
        self.num_gpu_blocks = blocks;
        self
    }

    /// Sizes the KV cache to hold `tokens` tokens (rounded down to whole blocks).
    pub fn with_kv_cache_tokens(mut self, tokens: usize) -> Self {
        self.num_gpu_blocks = tokens / self.block_size.max(1);
        self
    }

    /// Sets the block size, keeping the KV capacity in tokens.
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        let tokens = self.num_gpu_blocks * self.block_size;
        self.block_size = block_size;
        self.num_gpu_blocks = tokens / block_size.max(1);
        self
    }

    /// Sets `max_num_seqs`.
    pub fn with_max_num_seqs(mut self, n: usize) -> Self {
        self.max_num_seqs = n;
        self
    }

    /// Sets `max_num_batched_tokens`.
    pub fn with_max_num_batched_tokens(mut self, n: usize) -> Self {
        self.max_num_batched_tokens = n;
        self
    }

    /// Sets `max_model_len`.
    pub fn with_max_model_len(mut self, n: usize) -> Self {
        self.max_model_len = n;
        self
    }

    /// Caps the waiting queue (429 beyond it).
    pub fn with_max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n;
        self
    }

    /// Enables LoRA with at most `max_loras` adapters per batch and `max_cpu_loras` loaded.
    pub fn with_lora(mut self, max_loras: usize, max_cpu_loras: usize) -> Self {
        self.lora.enabled = true;
        self.lora.max_loras = max_loras;
        self.lora.max_cpu_loras = max_cpu_loras;
        self
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), SimError> {
        let err = |m: String| Err(SimError::Config(m));
        if self.model.is_empty() {
            return err("the model name is empty".into());
        }
        if self.block_size == 0 || self.num_gpu_blocks == 0 {
            return err("block_size and num_gpu_blocks must be positive".into());
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 || self.max_model_len == 0 {
            return err(
                "max_num_seqs, max_num_batched_tokens and max_model_len must be positive".into(),
            );
        }
        if self.num_gpu_blocks * self.block_size < self.max_model_len {
            return err(format!(
                "the KV cache ({} blocks × {} = {} tokens) cannot hold one sequence of \
                 max_model_len = {} tokens; lower --max-model-len or enlarge the cache",
                self.num_gpu_blocks,
                self.block_size,
                self.num_gpu_blocks * self.block_size,
                self.max_model_len
            ));
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return err(format!(
                "time_scale must be a positive number, got {}",
                self.time_scale
            ));
        }
        let s = &self.step;
        let coeffs = [
            s.overhead_s,
            s.prefill_per_token_s,
            s.prefill_attn_per_pair_s,
            s.decode_per_seq_s,
            s.decode_attn_per_token_s,
            self.frontend.overhead_s,
            self.frontend.per_prompt_token_s,
        ];
        if coeffs.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return err("step-time and frontend coefficients must be finite and ≥ 0".into());
        }
        if s.overhead_s <= 0.0 {
            return err("the step overhead must be positive (a step cannot take no time)".into());
        }
        if !(0.0..=1.0).contains(&self.failure.rate) {
            return err(format!(
                "failure rate must be in [0, 1], got {}",
                self.failure.rate
            ));
        }
        if let Some(bad) = self
            .failure
            .statuses
            .iter()
            .find(|s| !(400..=599).contains(*s))
        {
            return err(format!("failure status {bad} is not a 4xx/5xx HTTP status"));
        }
        if self.lora.enabled && (self.lora.max_loras == 0 || self.lora.max_cpu_loras == 0) {
            return err("with LoRA enabled, max_loras and max_cpu_loras must be positive".into());
        }
        if self.lora.modules.len() > self.lora.max_cpu_loras {
            return err(format!(
                "{} LoRA modules given but max_cpu_loras is {}",
                self.lora.modules.len(),
                self.lora.max_cpu_loras
            ));
        }
        if let TokenizerChoice::Sim { vocab_size } = self.tokenizer
            && vocab_size == 0
        {
            return err("the vocabulary size must be positive".into());
        }
        self.pd.validate().map_err(SimError::Config)?;
        Ok(())
    }
}

/// Publishing KV-cache events over ZMQ.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsConfig {
    /// PUB endpoint. When binding, replica `i` uses the endpoint's port + `i` (port 0 stays 0:
    /// each replica gets a free port). When connecting, all replicas dial the same endpoint.
    pub endpoint: String,
    /// Bind or connect (`Auto` = vLLM's heuristic).
    pub mode: ConnectMode,
    /// Replay ROUTER endpoint (port + `i` per replica, like `endpoint`).
    pub replay_endpoint: Option<String>,
    /// Topic template; `{ip}`, `{port}` and `{model}` are replaced per replica.
    pub topic: String,
    /// Payload encoding.
    pub encode: EncodeOptions,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// First sequence number (vLLM 0, llm-d's simulator 1).
    pub first_seq: u64,
}

impl KvEventsConfig {
    /// llm-d's conventions: topic `kv@<ip>:<port>@<model>`, positional encoding, seq from 0.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            mode: ConnectMode::Auto,
            replay_endpoint: None,
            topic: "kv@{ip}:{port}@{model}".into(),
            encode: EncodeOptions::default(),
            buffer_steps: 10_000,
            first_seq: 0,
        }
    }

    /// The topic for a replica serving `model` at `addr`.
    pub fn topic_for(&self, addr: SocketAddr, model: &str) -> String {
        self.topic
            .replace("{ip}", &addr.ip().to_string())
            .replace("{port}", &addr.port().to_string())
            .replace("{model}", model)
    }

    /// `endpoint` with its port shifted by `offset` (for replica `offset`), unless the port is 0.
    pub fn offset_endpoint(endpoint: &str, offset: usize) -> Result<String, SimError> {
        let Some((base, port)) = endpoint.rsplit_once(':') else {
            return Err(SimError::Config(format!(
                "KV-event endpoint {endpoint:?} has no port"
            )));
        };
        let port: u32 = port.parse().map_err(|_| {
            SimError::Config(format!(
                "KV-event endpoint {endpoint:?} has an invalid port"
            ))
        })?;
        if port == 0 {
            return Ok(endpoint.to_string());
        }
        let shifted = port + offset as u32;
        if shifted > u32::from(u16::MAX) {
            return Err(SimError::Config(format!(
                "KV-event endpoint {endpoint:?} + {offset} runs past port 65535"
            )));
        }
        Ok(format!("{base}:{shifted}"))
    }
}

/// Where the replicas of a cluster listen.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// One HTTP address per replica (port 0 = pick a free port).
    pub addrs: Vec<SocketAddr>,
    /// Configuration shared by all replicas.
    pub replica: ReplicaConfig,
    /// KV-event publishing, if any.
    pub kv_events: Option<KvEventsConfig>,
}

impl ClusterConfig {
    /// Replicas at the given addresses.
    pub fn new(addrs: Vec<SocketAddr>, replica: ReplicaConfig) -> Self {
        Self {
            addrs,
            replica,
            kv_events: None,
        }
    }

    /// `replicas` replicas on `ip`, ports `base_port`, `base_port + 1`, … (all 0 if
    /// `base_port` is 0).
    pub fn sequential_ports(
        replicas: usize,
        ip: IpAddr,
        base_port: u16,
        replica: ReplicaConfig,
    ) -> Result<Self, SimError> {
        let addrs = (0..replicas)
            .map(|i| {
                if base_port == 0 {
                    return Ok(SocketAddr::new(ip, 0));
                }
                u16::try_from(usize::from(base_port) + i)
                    .map(|p| SocketAddr::new(ip, p))
                    .map_err(|_| SimError::Config(format!("port {base_port} + {i} overflows")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::new(addrs, replica))
    }

    /// `replicas` replicas on consecutive IPv4 addresses from `first_ip` (e.g. 127.0.0.2,
    /// 127.0.0.3, …; all of 127/8 reaches loopback on Linux), all on `port`.
    pub fn distinct_ips(
        replicas: usize,
        first_ip: Ipv4Addr,
        port: u16,
        replica: ReplicaConfig,
    ) -> Result<Self, SimError> {
        let base = u32::from(first_ip);
        let addrs = (0..replicas)
            .map(|i| {
                u32::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .map(|ip| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
                    .ok_or_else(|| SimError::Config(format!("{first_ip} + {i} overflows")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::new(addrs, replica))
    }

    /// Publishes KV events.
    pub fn with_kv_events(mut self, kv: KvEventsConfig) -> Self {
        self.kv_events = Some(kv);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_load_and_validate() {
        let c = ReplicaConfig::from_profile("qwen3-32b-tp2-h100").unwrap();
        assert_eq!(c.model, "Qwen/Qwen3-32B");
        assert_eq!(c.num_gpu_blocks * c.block_size, 307_328);
        c.validate().unwrap();
        let err = ReplicaConfig::from_profile("gpt-5").unwrap_err();
        assert!(err.to_string().contains("qwen3-32b-tp2-h100"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let base = ReplicaConfig::from_profile("qwen3-32b-tp2-h100").unwrap();
        let too_small = base.clone().with_kv_cache_tokens(1000);
        assert!(
            too_small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_model_len")
        );
        assert!(base.clone().with_time_scale(0.0).validate().is_err());
        assert!(base.clone().with_time_scale(f64::NAN).validate().is_err());
        let mut f = base.clone();
        f.failure.rate = 1.5;
        assert!(f.validate().is_err());
        let mut s = base.clone();
        s.failure.statuses = vec![200];
        assert!(s.validate().is_err());
        let mut l = base.with_lora(0, 1);
        l.lora.max_loras = 0;
        assert!(l.validate().is_err());
    }

    #[test]
    fn kv_capacity_setters() {
        let c = ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
            .unwrap()
            .with_kv_cache_tokens(164_000);
        assert_eq!(c.num_gpu_blocks, 10_250);
        let c = c.with_block_size(32);
        assert_eq!(c.num_gpu_blocks, 5_125);
    }

    #[test]
    fn cluster_addresses() {
        let r = ReplicaConfig::from_profile("qwen3-32b-tp2-h100").unwrap();
        let c = ClusterConfig::sequential_ports(3, "127.0.0.1".parse().unwrap(), 8000, r.clone())
            .unwrap();
        let ports: Vec<u16> = c.addrs.iter().map(|a| a.port()).collect();
        assert_eq!(ports, vec![8000, 8001, 8002]);
        let c = ClusterConfig::distinct_ips(2, Ipv4Addr::new(127, 0, 0, 2), 0, r).unwrap();
        assert_eq!(c.addrs[1].ip().to_string(), "127.0.0.3");
    }

    #[test]
    fn kv_event_endpoints_and_topics() {
        assert_eq!(
            KvEventsConfig::offset_endpoint("tcp://*:5557", 2).unwrap(),
            "tcp://*:5559"
        );
        assert_eq!(
            KvEventsConfig::offset_endpoint("tcp://127.0.0.1:0", 5).unwrap(),
            "tcp://127.0.0.1:0"
        );
        assert!(KvEventsConfig::offset_endpoint("tcp://x", 1).is_err());
        let k = KvEventsConfig::new("tcp://*:5557");
        assert_eq!(
            k.topic_for("127.0.0.2:8000".parse().unwrap(), "Qwen/Qwen3-32B"),
            "kv@127.0.0.2:8000@Qwen/Qwen3-32B"
        );
    }
}
