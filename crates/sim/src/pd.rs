//! Prefill/decode disaggregation: vLLM's NIXL connector, simulated.
//!
//! In llm-d's P/D path a request is prefilled on one replica and decoded on another, and the
//! prompt's KV cache moves between them (vLLM's `NixlConnector`). The protocol is carried by
//! the request field `kv_transfer_params`:
//!
//! 1. **Prefill replica.** A request with `kv_transfer_params.do_remote_decode: true` runs as
//!    usual (prefix cache, chunked prefill) and produces one token (the routing sidecar sends
//!    it with `max_tokens: 1`). When it finishes *length-capped*, its blocks are **not** freed:
//!    they stay allocated (not evictable) for the decode replica to read, and the response
//!    carries `kv_transfer_params` = `{do_remote_prefill: true, do_remote_decode: false,
//!    remote_block_ids, remote_engine_id, remote_request_id, remote_host, remote_port,
//!    tp_size}` (field order as vLLM's `request_finished` builds it). The blocks are freed when
//!    the decoder reports it has read them, or after `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` (480 s
//!    by default, simulated seconds here) if nobody does. A request that finishes any other
//!    way (stop, abort) frees its blocks and returns `kv_transfer_params: null`, as vLLM does.
//! 2. **Decode replica.** A request with `do_remote_prefill: true` and the fields above looks
//!    up its local prefix cache first (vLLM's `get_num_new_matched_tokens` counts only what is
//!    *not* cached locally), allocates blocks for the whole prompt, and waits (counted as
//!    waiting, as vLLM's `WAITING_FOR_REMOTE_KVS`) while the blocks it lacks are read from the
//!    prefill replica. The read is a real exchange with the prefill replica's process over its
//!    *side channel* (`remote_host:remote_port`, see [`serve_side_channel`]): `POST
//!    /nixl/read` checks the blocks are still held and returns their ids, the decoder then
//!    pays the transfer time of the [`TransferModel`] on its simulated clock, and `POST
//!    /nixl/notify` tells the prefill replica to free them (NIXL's completion notification;
//!    the decoder does not wait for its answer). The prefill replica answers both while it
//!    computes a step, as vLLM's side-channel thread and NIXL's one-sided reads do not wait
//!    for the engine's scheduler.
//!    When the blocks arrive, the request's computed tokens jump to the prompt length minus
//!    one (vLLM recomputes the last prompt token to get logits), the transferred full blocks
//!    enter the decoder's prefix cache (KV events included), and decoding starts without
//!    recomputing the prompt.
//! 3. **Failed transfer** (blocks expired or unknown, prefill replica unreachable):
//!    `--kv-load-failure-policy fail` (vLLM's default) ends the request with finish reason
//!    `error` (HTTP 500, or an error frame in a stream); `recompute` prefills the missing
//!    part locally. Both are counted (`vllm:nixl_num_failed_transfers_total`, and
//!    `llmsched_sim_kv_transfer_recomputed_total` for the second).
//!
//! Usage reported by the decoder follows vLLM: `prompt_tokens` is the whole prompt and
//! `prompt_tokens_details.cached_tokens` counts everything not computed locally (local hits
//! plus transferred tokens, i.e. usually `prompt_tokens − 1`); llm-d's sidecar replaces it with
//! the prefill replica's `cached_tokens`.
//!
//! # Transfer time
//!
//! `t = latency + bytes / (links × per-link bandwidth)`, where bytes = blocks read × block
//! size × KV bytes per token (layers × KV heads × head dim × 2 (K and V) × dtype bytes, from
//! the model's architecture, [`KvGeometry`]) and `links` is the tensor-parallel size (each GPU
//! of a TP group moves its shard over its own NIC). The link presets ([`LINKS`]) are measured
//! figures where published; see the crate README for sources.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::clock::SimClock;
use crate::engine::{EngineCmd, EngineShared};

/// vLLM's default `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`: seconds a finished prefill keeps its
/// blocks for a decoder that never reads them.
pub const DEFAULT_ABORT_TIMEOUT_S: f64 = 480.0;

/// vLLM's default `VLLM_NIXL_SIDE_CHANNEL_PORT` (replica `i` of a process uses port + `i`, as
/// vLLM adds its data-parallel rank).
pub const DEFAULT_SIDE_CHANNEL_PORT: u16 = 5600;

/// The role a replica plays in a P/D deployment (`llmsched sim --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// A prefill replica (llm-d label `llm-d.ai/role: prefill`).
    Prefill,
    /// A decode replica (`llm-d.ai/role: decode`).
    Decode,
    /// An aggregated replica that does both (the default, as without P/D).
    #[default]
    Both,
}

impl Role {
    /// The spelling used by flags and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" | "prefill-decode" => Ok(Role::Both),
            other => Err(format!(
                "unknown role {other:?}; expected prefill, decode or both"
            )),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a decode replica does when the KV blocks cannot be read (vLLM's
/// `kv_transfer_config.kv_load_failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFailurePolicy {
    /// End the request with finish reason `error` (vLLM's default).
    #[default]
    Fail,
    /// Compute the missing prompt tokens locally.
    Recompute,
}

impl std::str::FromStr for LoadFailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fail" => Ok(Self::Fail),
            "recompute" => Ok(Self::Recompute),
            other => Err(format!(
                "unknown KV load failure policy {other:?}; expected fail or recompute"
            )),
        }
    }
}

/// A model's KV-cache shape: what one token of context weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Transformer layers.
    pub layers: u32,
    /// Key/value heads (GQA).
    pub kv_heads: u32,
    /// Dimensions per head.
    pub head_dim: u32,
    /// Bytes per KV element (2 for BF16/FP16).
    pub dtype_bytes: u32,
    /// Tensor-parallel size of a replica (GPUs, each with its own NIC).
    pub tp_size: u32,
}

impl KvGeometry {
    /// Bytes of KV cache per token for the whole replica: layers × KV heads × head dim × 2
    /// (K and V) × dtype bytes.
    pub fn bytes_per_token(&self) -> u64 {
        u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * 2
            * u64::from(self.dtype_bytes)
    }

    /// The geometry of a built-in profile's model (from each model's `config.json`).
    ///
    /// * Qwen3-32B: 64 layers, 8 KV heads, head dim 128, BF16 → 256 KiB per token; TP 2.
    /// * Llama-3.1-8B: 32 layers, 8 KV heads, head dim 128, BF16 → 128 KiB per token; TP 1.
    pub fn for_profile(profile: &str) -> Option<Self> {
        match profile {
            "qwen3-32b-tp2-h100" => Some(Self {
                layers: 64,
                kv_heads: 8,
                head_dim: 128,
                dtype_bytes: 2,
                tp_size: 2,
            }),
            "llama3.1-8b-h100" => Some(Self {
                layers: 32,
                kv_heads: 8,
                head_dim: 128,
                dtype_bytes: 2,
                tp_size: 1,
            }),
            _ => None,
        }
    }
}

/// A named interconnect between a prefill and a decode replica (`--kv-transfer-link`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferLink {
    /// Preset name.
    pub name: &'static str,
    /// Achieved bytes per second per link (one link per GPU of the TP group).
    pub bytes_per_s: f64,
    /// Fixed cost per transfer (post + completion notification), seconds.
    pub latency_s: f64,
    /// Where the number comes from.
    pub source: &'static str,
}

/// Built-in interconnects. The first is the default.
pub const LINKS: &[TransferLink] = &[
    TransferLink {
        name: "rdma-400g",
        bytes_per_s: 23.75e9,
        latency_s: 1e-3,
        source: "Mooncake Transfer Engine: 190 GB/s over 8×400 Gb/s RoCE NICs (23.75 GB/s per NIC)",
    },
    TransferLink {
        name: "rdma-200g",
        bytes_per_s: 21.75e9,
        latency_s: 1e-3,
        source: "Mooncake Transfer Engine: 87 GB/s over 4×200 Gb/s RoCE NICs (21.75 GB/s per NIC)",
    },
    TransferLink {
        name: "tcp",
        bytes_per_s: 9.0e9,
        latency_s: 2e-3,
        source: "Mooncake Transfer Engine over TCP: ~36 GB/s over 4 NICs (9 GB/s per NIC)",
    },
    TransferLink {
        name: "nvlink-h100",
        bytes_per_s: 112.5e9,
        latency_s: 0.5e-3,
        source: "H100 NVLink: 450 GB/s per direction per GPU (datasheet: 900 GB/s bidirectional) × 0.25, an assumption for many small 16-token-page transfers",
    },
];

/// Looks a link preset up by name.
pub fn link(name: &str) -> Option<&'static TransferLink> {
    LINKS.iter().find(|l| l.name == name)
}

/// Names of the link presets, comma-separated.
pub fn link_names() -> String {
    LINKS.iter().map(|l| l.name).collect::<Vec<_>>().join(", ")
}

/// How long moving KV blocks takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferModel {
    /// KV bytes per token of the whole replica.
    pub bytes_per_token: u64,
    /// Parallel links (the TP size).
    pub links: u32,
    /// Achieved bytes per second per link.
    pub link_bytes_per_s: f64,
    /// Fixed cost per transfer, seconds.
    pub latency_s: f64,
}

impl TransferModel {
    /// Simulated seconds to move `bytes`.
    pub fn seconds(&self, bytes: u64) -> f64 {
        let bw = self.link_bytes_per_s * f64::from(self.links.max(1));
        self.latency_s + bytes as f64 / bw.max(1.0)
    }

    /// Bytes of one KV block of `block_size` tokens.
    pub fn block_bytes(&self, block_size: usize) -> u64 {
        self.bytes_per_token * block_size as u64
    }
}

/// P/D settings of a replica.
#[derive(Debug, Clone, PartialEq)]
pub struct PdConfig {
    /// The replica's role.
    pub role: Role,
    /// Whether the NIXL connector is on (`kv_transfer_params` honoured). Off for `both`
    /// unless asked for: then `kv_transfer_params` are ignored, as by vLLM without
    /// `--kv-transfer-config`.
    pub connector: bool,
    /// Host advertised as `remote_host` (the replica's IP when unset).
    pub side_channel_host: Option<IpAddr>,
    /// Side-channel port of the first replica (replica `i` uses port + `i`; 0 = free ports).
    pub side_channel_port: u16,
    /// Seconds (simulated) a finished prefill holds its blocks for a decoder.
    pub abort_timeout_s: f64,
    /// Transfer time model (as the decoder pays it).
    pub transfer: TransferModel,
    /// What a decoder does when a transfer fails.
    pub failure_policy: LoadFailurePolicy,
}

impl PdConfig {
    /// No connector (role `both`), with the profile's geometry and the default link.
    pub fn for_profile(profile: &str) -> Self {
        let g = KvGeometry::for_profile(profile).unwrap_or(KvGeometry {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2,
            tp_size: 1,
        });
        let l = LINKS[0];
        Self {
            role: Role::Both,
            connector: false,
            side_channel_host: None,
            side_channel_port: DEFAULT_SIDE_CHANNEL_PORT,
            abort_timeout_s: DEFAULT_ABORT_TIMEOUT_S,
            transfer: TransferModel {
                bytes_per_token: g.bytes_per_token(),
                links: g.tp_size,
                link_bytes_per_s: l.bytes_per_s,
                latency_s: l.latency_s,
            },
            failure_policy: LoadFailurePolicy::Fail,
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.abort_timeout_s.is_finite() && self.abort_timeout_s > 0.0) {
            return Err(format!(
                "the NIXL abort timeout must be a positive number of seconds, got {}",
                self.abort_timeout_s
            ));
        }
        let t = &self.transfer;
        if !(t.link_bytes_per_s.is_finite() && t.link_bytes_per_s > 0.0) {
            return Err("the KV transfer bandwidth must be positive".into());
        }
        if !(t.latency_s.is_finite() && t.latency_s >= 0.0) {
            return Err("the KV transfer latency must be ≥ 0".into());
        }
        if t.bytes_per_token == 0 || t.links == 0 {
            return Err("KV bytes per token and the number of links must be positive".into());
        }
        Ok(())
    }
}

/// Where a decoder reads a prefilled request's blocks (parsed from `kv_transfer_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePrefill {
    /// Block ids on the prefill replica.
    pub block_ids: Vec<u64>,
    /// The prefill replica's engine id.
    pub engine_id: String,
    /// The request's id on the prefill replica.
    pub request_id: String,
    /// Side-channel host.
    pub host: String,
    /// Side-channel port.
    pub port: u16,
}

impl RemotePrefill {
    /// `host:port` of the side channel (IPv6 hosts bracketed).
    pub fn side_channel(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What a request's `kv_transfer_params` ask of this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvIntent {
    /// Nothing (absent, null, or neither flag set).
    None,
    /// Prefill here and hold the blocks for a remote decoder.
    RemoteDecode,
    /// Read the prompt's blocks from a remote prefill replica.
    RemotePrefill(RemotePrefill),
    /// `do_remote_prefill` without usable remote fields: vLLM logs "Got invalid
    /// KVTransferParams" and serves the request without a transfer.
    Invalid(String),
}

/// Reads `kv_transfer_params` the way vLLM's NIXL connector does (`params.get(...)`
/// truthiness; the remote fields must all be present for a transfer). `Err` only when the
/// field is not an object.
pub fn parse_kv_params(v: Option<&Value>) -> Result<KvIntent, String> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(KvIntent::None),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(format!(
                "kv_transfer_params must be an object or null, got {}",
                match other {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Array(_) => "an array",
                    _ => "something else",
                }
            ));
        }
    };
    let truthy = |k: &str| match obj.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    };
    if truthy("do_remote_decode") {
        return Ok(KvIntent::RemoteDecode);
    }
    if !truthy("do_remote_prefill") {
        return Ok(KvIntent::None);
    }
    let invalid = |why: &str| Ok(KvIntent::Invalid(why.to_string()));
    let Some(ids) = obj.get("remote_block_ids").and_then(Value::as_array) else {
        return invalid("remote_block_ids is missing or not a list");
    };
    if ids.is_empty() {
        return invalid("remote_block_ids is empty");
    }
    let Some(block_ids) = ids.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>() else {
        return invalid("remote_block_ids must be non-negative integers");
    };
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(engine_id), Some(request_id), Some(host)) = (
        text("remote_engine_id"),
        text("remote_request_id"),
        text("remote_host"),
    ) else {
        return invalid("remote_engine_id, remote_request_id and remote_host must be strings");
    };
    let port = match obj.get("remote_port") {
        Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Some(Value::String(s)) => s.parse::<u16>().ok(),
        _ => None,
    };
    let Some(port) = port.filter(|p| *p != 0) else {
        return invalid("remote_port must be a port number");
    };
    Ok(KvIntent::RemotePrefill(RemotePrefill {
        block_ids,
        engine_id,
        request_id,
        host,
        port,
    }))
}

/// The `kv_transfer_params` a prefill replica returns (vLLM's field order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransferParams {
    /// Always `true`: the decoder must read the prompt's KV remotely.
    pub do_remote_prefill: bool,
    /// Always `false`.
    pub do_remote_decode: bool,
    /// The held blocks.
    pub remote_block_ids: Vec<u64>,
    /// This replica's engine id.
    pub remote_engine_id: String,
    /// The request's id here (key of the held blocks).
    pub remote_request_id: String,
    /// Side-channel host.
    pub remote_host: String,
    /// Side-channel port.
    pub remote_port: u16,
    /// Tensor-parallel size.
    pub tp_size: u32,
}

/// A finished prefill's blocks kept for a remote decoder.
#[derive(Debug)]
pub struct Held {
    /// Block ids (allocated, not evictable).
    pub blocks: Vec<u32>,
    /// Simulated time after which they are freed anyway.
    pub expires_at: f64,
}

/// Answer of the engine to a side-channel read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadReply {
    /// The blocks are held: their ids (the last `num_blocks` of the request's) and the bytes
    /// of one block.
    Ok {
        /// Block ids read.
        block_ids: Vec<u64>,
        /// Bytes per block.
        block_bytes: u64,
    },
    /// No such request is held (never existed, already read, or expired).
    Unknown,
    /// The request exists but under another engine id.
    WrongEngine,
}

/// Outcome of a pull, sent back to the decoder's engine.
#[derive(Debug, Clone, PartialEq)]
pub struct XferDone {
    /// Engine slot of the request.
    pub slot: usize,
    /// Engine-wide request id (slots are reused).
    pub id: u64,
    /// What happened.
    pub result: Result<XferStats, String>,
}

/// A successful transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XferStats {
    /// Blocks read.
    pub blocks: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// Simulated seconds the transfer took.
    pub seconds: f64,
    /// Simulated seconds to post it (the fixed latency).
    pub post_seconds: f64,
    /// NIXL descriptors (one per block, layer and K/V region).
    pub descriptors: u64,
}

/// P/D counters of a replica (rendered by [`crate::metrics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PdMetrics {
    /// vLLM `vllm:nixl_xfer_time_seconds`.
    pub xfer_time: crate::metrics::Histogram,
    /// vLLM `vllm:nixl_post_time_seconds`.
    pub post_time: crate::metrics::Histogram,
    /// vLLM `vllm:nixl_bytes_transferred`.
    pub bytes: crate::metrics::Histogram,
    /// vLLM `vllm:nixl_num_descriptors`.
    pub descriptors: crate::metrics::Histogram,
    /// vLLM `vllm:nixl_num_failed_transfers`.
    pub failed_transfers: u64,
    /// vLLM `vllm:nixl_num_failed_notifications`.
    pub failed_notifications: u64,
    /// vLLM `vllm:external_prefix_cache_queries` (tokens).
    pub external_queries: u64,
    /// vLLM `vllm:external_prefix_cache_hits` (tokens).
    pub external_hits: u64,
    /// Requests whose blocks are held for a remote decoder now.
    pub held_requests: usize,
    /// Blocks held for remote decoders now.
    pub held_blocks: usize,
    /// Held requests whose blocks a decoder read (and freed).
    pub served: u64,
    /// Held requests freed by the abort timeout.
    pub expired: u64,
    /// Decoder requests whose failed transfer was recomputed locally.
    pub recomputed: u64,
    /// Decoder requests that ended with an error after a failed transfer.
    pub errored: u64,
}

/// `vllm:nixl_xfer_time_seconds` buckets (vLLM's list without its first entry).
pub const XFER_TIME_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];
/// `vllm:nixl_post_time_seconds` buckets.
pub const POST_TIME_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];
/// `vllm:nixl_num_descriptors` buckets.
pub const DESCRIPTOR_BUCKETS: &[f64] = &[
    10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 400.0, 1000.0, 2000.0, 4000.0, 10000.0, 20000.0,
    50000.0,
];

/// `vllm:nixl_bytes_transferred` buckets: 2 KiB to 8 GiB, ×4 apart.
pub fn bytes_buckets() -> Vec<f64> {
    (1..25).step_by(2).map(|i| 2f64.powi(10 + i)).collect()
}

impl Default for PdMetrics {
    fn default() -> Self {
        use crate::metrics::Histogram;
        Self {
            xfer_time: Histogram::new(XFER_TIME_BUCKETS),
            post_time: Histogram::new(POST_TIME_BUCKETS),
            bytes: Histogram::new(&bytes_buckets()),
            descriptors: Histogram::new(DESCRIPTOR_BUCKETS),
            failed_transfers: 0,
            failed_notifications: 0,
            external_queries: 0,
            external_hits: 0,
            held_requests: 0,
            held_blocks: 0,
            served: 0,
            expired: 0,
            recomputed: 0,
            errored: 0,
        }
    }
}

/// A stable engine id for the replica at `addr` (vLLM generates a UUID per engine).
pub fn engine_id(addr: SocketAddr, model: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{addr}|{model}").as_bytes());
    let b = h.to_be_bytes();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

/// Everything a decoder's engine needs to pull blocks: a HTTP client, the runtime to run
/// pulls on (not the engine's own thread), the clock and the transfer model.
#[derive(Clone)]
pub struct Puller {
    client: Client<HttpConnector, Full<Bytes>>,
    io: tokio::runtime::Handle,
    clock: SimClock,
    model: TransferModel,
    layers: u64,
    done: mpsc::UnboundedSender<XferDone>,
    /// The decoder engine's metrics (failed notifications are counted after the request
    /// has moved on).
    shared: Arc<EngineShared>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller")
            .field("model", &self.model)
            .finish()
    }
}

/// Wall-clock limit of one side-channel call.
const SIDE_CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct ReadRequest {
    remote_request_id: String,
    remote_engine_id: String,
    num_blocks: usize,
}

#[derive(Serialize, Deserialize)]
struct ReadResponse {
    block_ids: Vec<u64>,
    block_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct NotifyRequest {
    remote_request_id: String,
}

impl Puller {
    /// A puller whose pulls run on `io` and report to `done`; failed completion
    /// notifications are counted in `shared`'s metrics.
    pub fn new(
        io: tokio::runtime::Handle,
        clock: SimClock,
        model: TransferModel,
        layers: u32,
        done: mpsc::UnboundedSender<XferDone>,
        shared: Arc<EngineShared>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            io,
            clock,
            model,
            layers: u64::from(layers.max(1)),
            done,
            shared,
        }
    }

    /// Reads the last `num_blocks` blocks of `remote`, reports to the engine as soon as the
    /// data is in place, then sends the completion notification. As NIXL's: the decoder does
    /// not wait for the prefill replica to acknowledge it (a one-sided READ completes on the
    /// reader; the notification only lets the prefill side free its blocks).
    pub fn spawn_pull(&self, slot: usize, id: u64, remote: RemotePrefill, num_blocks: usize) {
        let this = self.clone();
        self.io.spawn(async move {
            let result = this.pull(&remote, num_blocks).await;
            let read = result.is_ok();
            let _ = this.done.send(XferDone { slot, id, result });
            if read && let Err(e) = this.notify(&remote).await {
                tracing::warn!(error = %e, "NIXL completion notification failed");
                this.shared.metrics.lock().pd.failed_notifications += 1;
            }
        });
    }

    /// Tells the prefill replica to free `remote`'s blocks without reading them (a request
    /// aborted before its transfer started; vLLM sends the same notification).
    pub fn spawn_release(&self, remote: RemotePrefill) {
        let this = self.clone();
        self.io.spawn(async move {
            if let Err(e) = this.notify(&remote).await {
                tracing::debug!(error = %e, side_channel = %remote.side_channel(), "release notification failed");
            }
        });
    }

    async fn call<T: Serialize>(
        &self,
        remote: &RemotePrefill,
        path: &str,
        body: &T,
    ) -> Result<(StatusCode, Bytes), String> {
        let uri = format!("http://{}{path}", remote.side_channel());
        let req = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).map_err(|e| e.to_string())?,
            )))
            .map_err(|e| format!("bad side-channel address {uri}: {e}"))?;
        let fut = async {
            let resp =
                self.client.request(req).await.map_err(|e| {
                    format!("side channel {} unreachable: {e}", remote.side_channel())
                })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("side channel {}: {e}", remote.side_channel()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(SIDE_CHANNEL_TIMEOUT, fut)
            .await
            .map_err(|_| format!("side channel {} timed out", remote.side_channel()))?
    }

    async fn notify(&self, remote: &RemotePrefill) -> Result<(), String> {
        let (status, body) = self
            .call(
                remote,
                "/nixl/notify",
                &NotifyRequest {
                    remote_request_id: remote.request_id.clone(),
                },
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "notify {} answered {status}: {}",
                remote.request_id,
                String::from_utf8_lossy(&body)
            ))
        }
    }

    /// One transfer: read the block ids, then pay the transfer time (the notification is
    /// [`Self::spawn_pull`]'s).
    pub async fn pull(
        &self,
        remote: &RemotePrefill,
        num_blocks: usize,
    ) -> Result<XferStats, String> {
        let (status, body) = self
            .call(
                remote,
                "/nixl/read",
                &ReadRequest {
                    remote_request_id: remote.request_id.clone(),
                    remote_engine_id: remote.engine_id.clone(),
                    num_blocks,
                },
            )
            .await?;
        if !status.is_success() {
            return Err(format!(
                "read of {} from {} failed with {status}: {}",
                remote.request_id,
                remote.side_channel(),
                String::from_utf8_lossy(&body)
            ));
        }
        let read: ReadResponse = serde_json::from_slice(&body)
            .map_err(|e| format!("bad read answer from {}: {e}", remote.side_channel()))?;
        let blocks = read.block_ids.len();
        let bytes = read.block_bytes * blocks as u64;
        let seconds = self.model.seconds(bytes);
        tokio::time::sleep(self.clock.wall_duration(seconds)).await;
        Ok(XferStats {
            blocks,
            bytes,
            seconds,
            post_seconds: self.model.latency_s,
            descriptors: blocks as u64 * 2 * self.layers,
        })
    }
}

/// Largest side-channel request body.
const SIDE_CHANNEL_MAX_BODY: usize = 1 << 20;

fn json_reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn side_channel_handle(
    engine: mpsc::UnboundedSender<EngineCmd>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let err =
        |status: StatusCode, msg: String| json_reply(status, &serde_json::json!({ "error": msg }));
    let path = req.uri().path().to_string();
    if req.method() != Method::POST || !matches!(path.as_str(), "/nixl/read" | "/nixl/notify") {
        return Ok(err(
            StatusCode::NOT_FOUND,
            format!("no side-channel route {} {path}", req.method()),
        ));
    }
    let body = match Limited::new(req.into_body(), SIDE_CHANNEL_MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(err(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {e}"),
            ));
        }
    };
    let engine_gone = || err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped".into());
    if path == "/nixl/read" {
        let r: ReadRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return Ok(err(
                    StatusCode::BAD_REQUEST,
                    format!("bad read request: {e}"),
                ));
            }
        };
        let (tx, rx) = oneshot::channel();
        if engine
            .send(EngineCmd::NixlRead {
                request_id: r.remote_request_id.clone(),
                engine_id: r.remote_engine_id,
                num_blocks: r.num_blocks,
                reply: tx,
            })
            .is_err()
        {
            return Ok(engine_gone());
        }
        return Ok(match rx.await {
            Ok(ReadReply::Ok {
                block_ids,
                block_bytes,
            }) => json_reply(
                StatusCode::OK,
                &serde_json::json!({"block_ids": block_ids, "block_bytes": block_bytes}),
            ),
            Ok(ReadReply::Unknown) => err(
                StatusCode::NOT_FOUND,
                format!(
                    "no blocks held for request {} (never prefilled here, already read, or freed by the abort timeout)",
                    r.remote_request_id
                ),
            ),
            Ok(ReadReply::WrongEngine) => err(
                StatusCode::CONFLICT,
                format!(
                    "request {} is held by another engine id",
                    r.remote_request_id
                ),
            ),
            Err(_) => engine_gone(),
        });
    }
    let r: NotifyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Ok(err(
                StatusCode::BAD_REQUEST,
                format!("bad notify request: {e}"),
            ));
        }
    };
    let (tx, rx) = oneshot::channel();
    if engine
        .send(EngineCmd::NixlNotify {
            request_id: r.remote_request_id.clone(),
            reply: tx,
        })
        .is_err()
    {
        return Ok(engine_gone());
    }
    Ok(match rx.await {
        Ok(Some(freed)) => json_reply(
            StatusCode::OK,
            &serde_json::json!({ "freed_blocks": freed }),
        ),
        Ok(None) => err(
            StatusCode::NOT_FOUND,
            format!("no blocks held for request {}", r.remote_request_id),
        ),
        Err(_) => engine_gone(),
    })
}

/// Serves a prefill replica's simulated NIXL side channel until `shutdown` flips:
/// `POST /nixl/read {remote_request_id, remote_engine_id, num_blocks}` →
/// `{block_ids, block_bytes}` (404 when nothing is held under that id, 409 for another
/// engine id); `POST /nixl/notify {remote_request_id}` → `{freed_blocks}` (404 when unknown).
pub async fn serve_side_channel(
    listener: TcpListener,
    engine: mpsc::UnboundedSender<EngineCmd>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let engine = engine.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| side_channel_handle(engine.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// The held blocks of a prefill replica, keyed by `remote_request_id`.
#[derive(Debug, Default)]
pub struct HeldBlocks {
    map: HashMap<String, Held>,
    blocks: usize,
}

impl HeldBlocks {
    /// Holds `blocks` under `id` until `expires_at`.
    pub fn insert(&mut self, id: String, blocks: Vec<u32>, expires_at: f64) {
        self.blocks += blocks.len();
        if let Some(old) = self.map.insert(id, Held { blocks, expires_at }) {
            self.blocks -= old.blocks.len();
        }
    }

    /// The held entry for `id`.
    pub fn get(&self, id: &str) -> Option<&Held> {
        self.map.get(id)
    }

    /// Stops holding `id`, returning its blocks.
    pub fn remove(&mut self, id: &str) -> Option<Vec<u32>> {
        let h = self.map.remove(id)?;
        self.blocks -= h.blocks.len();
        Some(h.blocks)
    }

    /// Removes every entry expired at `now`, returning their blocks.
    pub fn expire(&mut self, now: f64) -> Vec<Vec<u32>> {
        if self.map.is_empty() {
            return Vec::new();
        }
        let ids: Vec<String> = self
            .map
            .iter()
            .filter(|(_, h)| h.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Earliest expiry, if anything is held.
    pub fn next_expiry(&self) -> Option<f64> {
        self.map.values().map(|h| h.expires_at).reduce(f64::min)
    }

    /// Requests held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Every held entry's blocks (for shutdown).
    pub fn drain(&mut self) -> Vec<Vec<u32>> {
        self.blocks = 0;
        self.map.drain().map(|(_, h)| h.blocks).collect()
    }
}

/// The connector state of one replica's engine.
#[derive(Debug)]
pub struct EnginePd {
    /// Settings.
    pub cfg: PdConfig,
    /// This engine's id.
    pub engine_id: String,
    /// `remote_host` advertised.
    pub side_host: String,
    /// `remote_port` advertised.
    pub side_port: u16,
    /// Blocks held for remote decoders.
    pub held: HeldBlocks,
    /// Pulls.
    pub puller: Puller,
    /// Completed pulls.
    pub done_rx: mpsc::UnboundedReceiver<XferDone>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_geometry_matches_the_models() {
        let q = KvGeometry::for_profile("qwen3-32b-tp2-h100").unwrap();
        assert_eq!(q.bytes_per_token(), 256 * 1024);
        let l = KvGeometry::for_profile("llama3.1-8b-h100").unwrap();
        assert_eq!(l.bytes_per_token(), 128 * 1024);
        assert!(KvGeometry::for_profile("x").is_none());
    }

    #[test]
    fn transfer_time_is_latency_plus_bytes_over_aggregate_bandwidth() {
        let m = TransferModel {
            bytes_per_token: 1000,
            links: 2,
            link_bytes_per_s: 1e6,
            latency_s: 0.5,
        };
        assert_eq!(m.seconds(0), 0.5);
        assert_eq!(m.seconds(2_000_000), 1.5);
        assert_eq!(m.block_bytes(16), 16_000);
    }

    #[test]
    fn kv_params_are_read_like_vllm() {
        use serde_json::json;
        let p = |v: Value| parse_kv_params(Some(&v));
        assert_eq!(parse_kv_params(None).unwrap(), KvIntent::None);
        assert_eq!(p(Value::Null).unwrap(), KvIntent::None);
        assert_eq!(
            p(json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null}))
                .unwrap(),
            KvIntent::RemoteDecode
        );
        assert_eq!(
            p(json!({"do_remote_prefill": false})).unwrap(),
            KvIntent::None
        );
        let ok = p(json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [3, 4], "remote_engine_id": "e", "remote_request_id": "r",
            "remote_host": "127.0.0.2", "remote_port": 5600, "tp_size": 2}))
        .unwrap();
        assert_eq!(
            ok,
            KvIntent::RemotePrefill(RemotePrefill {
                block_ids: vec![3, 4],
                engine_id: "e".into(),
                request_id: "r".into(),
                host: "127.0.0.2".into(),
                port: 5600,
            })
        );
        for bad in [
            json!({"do_remote_prefill": true}),
            json!({"do_remote_prefill": true, "remote_block_ids": [], "remote_engine_id": "e",
                "remote_request_id": "r", "remote_host": "h", "remote_port": 1}),
            json!({"do_remote_prefill": true, "remote_block_ids": [-1], "remote_engine_id": "e",
                "remote_request_id": "r", "remote_host": "h", "remote_port": 1}),
            json!({"do_remote_prefill": true, "remote_block_ids": [1], "remote_engine_id": "e",
                "remote_request_id": "r", "remote_host": "h", "remote_port": 70000}),
            json!({"do_remote_prefill": true, "remote_block_ids": [1], "remote_engine_id": 5,
                "remote_request_id": "r", "remote_host": "h", "remote_port": 1}),
        ] {
            assert!(
                matches!(p(bad.clone()).unwrap(), KvIntent::Invalid(_)),
                "{bad}"
            );
        }
        assert!(p(json!("yes")).unwrap_err().contains("object"));
        assert!(p(json!([1])).unwrap_err().contains("array"));
    }

    #[test]
    fn side_channel_addresses_bracket_ipv6() {
        let mut r = RemotePrefill {
            block_ids: vec![1],
            engine_id: "e".into(),
            request_id: "r".into(),
            host: "::1".into(),
            port: 7,
        };
        assert_eq!(r.side_channel(), "[::1]:7");
        r.host = "10.0.0.1".into();
        assert_eq!(r.side_channel(), "10.0.0.1:7");
    }

    #[test]
    fn held_blocks_count_and_expire() {
        let mut h = HeldBlocks::default();
        h.insert("a".into(), vec![1, 2, 3], 10.0);
        h.insert("b".into(), vec![4], 5.0);
        assert_eq!((h.len(), h.blocks()), (2, 4));
        assert_eq!(h.next_expiry(), Some(5.0));
        assert!(h.expire(4.9).is_empty());
        assert_eq!(h.expire(5.0), vec![vec![4]]);
        assert_eq!(h.remove("a"), Some(vec![1, 2, 3]));
        assert_eq!(h.remove("a"), None);
        assert!(h.is_empty());
        assert_eq!(h.blocks(), 0);
    }

    #[test]
    fn engine_ids_look_like_uuids_and_are_stable() {
        let a = engine_id("127.0.0.1:1".parse().unwrap(), "m");
        assert_eq!(a, engine_id("127.0.0.1:1".parse().unwrap(), "m"));
        assert_ne!(a, engine_id("127.0.0.1:2".parse().unwrap(), "m"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn bytes_buckets_span_2k_to_8g() {
        let b = bytes_buckets();
        assert_eq!(b.first(), Some(&2048.0));
        assert_eq!(b.last(), Some(&(8.0 * 1024.0 * 1024.0 * 1024.0)));
        assert_eq!(b.len(), 12);
    }
}
