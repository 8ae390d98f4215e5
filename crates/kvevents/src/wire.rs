//! vLLM's KV-cache event wire format: typed events, a msgpack encoder for both of vLLM's
//! layouts, and a decoder that accepts everything vLLM (old and new) and llm-d's simulator emit.
//!
//! # What travels on the wire
//!
//! A ZMQ multipart message `[topic, seq, payload]`:
//! * `topic`: UTF-8 bytes, llm-d uses `kv@<ip>:<port>@<model>`;
//! * `seq`: the batch sequence number, 8 bytes big-endian unsigned (vLLM starts at 0);
//! * `payload`: one msgpack value, the [`EventBatch`].
//!
//! The batch is `[ts, events, data_parallel_rank]` (positional; `data_parallel_rank` may be
//! omitted) or, in the newest vLLM, a map `{ts, events, data_parallel_rank}`. Each event is
//! either a positional array whose first element is the tag (`"BlockStored"`, `"BlockRemoved"`,
//! `"AllBlocksCleared"`; vLLM's msgspec `array_like` structs, trailing default fields omitted)
//! or a map with the tag under key `"type"` (msgspec tagged structs, default fields omitted).
//!
//! Field order of `BlockStored`: `block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
//! kv_cache_spec_sliding_window`. `BlockRemoved`: `block_hashes, medium, group_idx`.
//!
//! Block hashes are msgpack ints (vLLM's default: the last 8 bytes of its digest, big-endian)
//! or bytes; the decoder maps bytes to a `u64` through their last 8 bytes, big-endian, so both
//! forms of the same digest decode to the same [`BlockHash`]. Negative ints (very old vLLM used
//! Python's `hash()`) are kept as their two's-complement bit pattern.
//!
//! The decoder never panics: every malformed input yields a [`WireError`].

use bytes::Bytes;
use rmpv::Value;

/// A block hash as the scheduler sees it (see the module docs for the bytes → u64 mapping).
pub type BlockHash = u64;

/// The storage tier vLLM reports for GPU-resident blocks.
pub const MEDIUM_GPU: &str = "GPU";

/// The sequence number of the replay socket's end-of-replay marker (all ones).
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// Maximum msgpack nesting accepted by the decoder (vLLM's payloads nest 5 levels deep).
const MAX_DEPTH: usize = 32;

/// Most msgpack values one payload may hold. Decoding builds a tree of about 32 bytes per
/// value, so without a cap a 16 MiB payload of one-byte values would take ~512 MiB. vLLM's
/// largest steps hold a few hundred thousand (one per token id); payloads of at most this
/// many bytes cannot exceed it and are not scanned.
pub const MAX_VALUES: usize = 1 << 20;

/// Errors raised while decoding a payload or a multipart message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// The bytes are not a single well-formed msgpack value.
    #[error("invalid msgpack: {0}")]
    Msgpack(String),
    /// Bytes remain after the first msgpack value.
    #[error("{0} trailing bytes after the msgpack value")]
    TrailingBytes(usize),
    /// The value is not an event batch.
    #[error("invalid event batch: {0}")]
    Batch(String),
    /// One event of the batch is malformed.
    #[error("invalid event #{index}: {reason}")]
    Event {
        /// Position of the event in the batch.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The ZMQ message does not have the `[topic, seq, payload]` shape.
    #[error("invalid multipart message: {0}")]
    Multipart(String),
}

/// Full blocks were written to the KV cache (and are now reusable as a prefix).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// Hashes of the stored blocks, in prefix order.
    pub block_hashes: Vec<BlockHash>,
    /// Hash of the block preceding the first stored one, `None` at the start of a sequence.
    pub parent_block_hash: Option<BlockHash>,
    /// Token ids of all stored blocks, concatenated (`block_hashes.len() * block_size`).
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// Deprecated integer LoRA id (vLLM keeps it for backward compatibility).
    pub lora_id: Option<i64>,
    /// Storage tier, `"GPU"` or `"CPU"`.
    pub medium: Option<String>,
    /// LoRA adapter name, part of the block key.
    pub lora_name: Option<String>,
    /// Extra keys used in each block's hash (one entry per block), e.g. LoRA name, cache salt.
    pub extra_keys: Option<Vec<Option<Vec<Value>>>>,
    /// KV-cache group index (hybrid models).
    pub group_idx: Option<i64>,
    /// Cache-spec kind of the group (newer vLLM).
    pub kv_cache_spec_kind: Option<String>,
    /// Sliding window of the group's cache spec (newer vLLM).
    pub kv_cache_spec_sliding_window: Option<i64>,
}

/// Blocks were evicted from the KV cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    /// Hashes of the removed blocks.
    pub block_hashes: Vec<BlockHash>,
    /// Storage tier they were removed from.
    pub medium: Option<String>,
    /// KV-cache group index (hybrid models).
    pub group_idx: Option<i64>,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Blocks stored.
    BlockStored(BlockStored),
    /// Blocks removed.
    BlockRemoved(BlockRemoved),
    /// The whole prefix cache was reset.
    AllBlocksCleared,
    /// An event type this decoder does not know (newer vLLM); consumers should skip it.
    Unknown {
        /// The event's tag.
        tag: String,
    },
}

impl KvEvent {
    /// The event's tag as it appears on the wire.
    pub fn tag(&self) -> &str {
        match self {
            KvEvent::BlockStored(_) => "BlockStored",
            KvEvent::BlockRemoved(_) => "BlockRemoved",
            KvEvent::AllBlocksCleared => "AllBlocksCleared",
            KvEvent::Unknown { tag } => tag,
        }
    }
}

/// The unit published per engine step: a timestamp and the step's events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// Unix time in seconds when the batch was produced.
    pub ts: f64,
    /// The events, in the order they happened.
    pub events: Vec<KvEvent>,
    /// Data-parallel rank of the publishing engine.
    pub data_parallel_rank: Option<i64>,
}

/// How events and batches are laid out in msgpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Positional arrays everywhere, events tagged by their first element (vLLM up to 0.11,
    /// msgspec `array_like=True`; what llm-d's KV-cache indexer was written against).
    #[default]
    Array,
    /// Events as maps tagged by key `"type"`, the batch still a positional array.
    Map,
    /// Events and the batch as maps (the newest vLLM, where no struct is `array_like`).
    MapBatch,
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "array" => Ok(Layout::Array),
            "map" => Ok(Layout::Map),
            "map-batch" | "map_batch" => Ok(Layout::MapBatch),
            other => Err(format!(
                "unknown KV-event encoding {other:?} (expected array, map or map-batch)"
            )),
        }
    }
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    /// Array or map layout.
    pub layout: Layout,
    /// Encode block hashes as 8-byte big-endian `bin` values instead of ints.
    pub hashes_as_bytes: bool,
}

/// Encodes `batch` as one msgpack value.
pub fn encode_batch(batch: &EventBatch, opts: EncodeOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + batch.events.len() * 64);
    encode_batch_into(batch, opts, &mut out);
    out
}

/// Appends the msgpack encoding of `batch` to `out`.
pub fn encode_batch_into(batch: &EventBatch, opts: EncodeOptions, out: &mut Vec<u8>) {
    let mut w = Writer { out };
    let batch_as_map = opts.layout == Layout::MapBatch;
    let n_fields = if batch.data_parallel_rank.is_some() {
        3
    } else {
        2
    };
    if batch_as_map {
        w.map_len(n_fields);
        w.str("ts");
        w.f64(batch.ts);
        w.str("events");
    } else {
        w.array_len(n_fields);
        w.f64(batch.ts);
    }
    w.array_len(batch.events.len());
    for ev in &batch.events {
        encode_event(&mut w, ev, opts);
    }
    if let Some(rank) = batch.data_parallel_rank {
        if batch_as_map {
            w.str("data_parallel_rank");
        }
        w.int(rank);
    }
}

fn encode_event(w: &mut Writer<'_>, ev: &KvEvent, opts: EncodeOptions) {
    let as_map = opts.layout != Layout::Array;
    match ev {
        KvEvent::BlockStored(b) => {
            // Fields after `lora_name` have defaults and are omitted when unset (trailing only
            // in the positional layout, individually in the map layout), like msgspec does.
            let optional = [
                b.extra_keys.is_some(),
                b.group_idx.is_some(),
                b.kv_cache_spec_kind.is_some(),
                b.kv_cache_spec_sliding_window.is_some(),
            ];
            if as_map {
                let n = 8 + optional.iter().filter(|x| **x).count();
                w.map_len(n);
                w.str("type");
                w.str("BlockStored");
                w.str("block_hashes");
                w.hashes(&b.block_hashes, opts.hashes_as_bytes);
                w.str("parent_block_hash");
                w.opt_hash(b.parent_block_hash, opts.hashes_as_bytes);
                w.str("token_ids");
                w.tokens(&b.token_ids);
                w.str("block_size");
                w.uint(u64::from(b.block_size));
                w.str("lora_id");
                w.opt_int(b.lora_id);
                w.str("medium");
                w.opt_str(b.medium.as_deref());
                w.str("lora_name");
                w.opt_str(b.lora_name.as_deref());
                if let Some(keys) = &b.extra_keys {
                    w.str("extra_keys");
                    w.extra_keys(keys);
                }
                if let Some(g) = b.group_idx {
                    w.str("group_idx");
                    w.int(g);
                }
                if let Some(k) = &b.kv_cache_spec_kind {
                    w.str("kv_cache_spec_kind");
                    w.str(k);
                }
                if let Some(s) = b.kv_cache_spec_sliding_window {
                    w.str("kv_cache_spec_sliding_window");
                    w.int(s);
                }
            } else {
                let trailing = optional.iter().rposition(|x| *x).map_or(0, |i| i + 1);
                w.array_len(8 + trailing);
                w.str("BlockStored");
                w.hashes(&b.block_hashes, opts.hashes_as_bytes);
                w.opt_hash(b.parent_block_hash, opts.hashes_as_bytes);
                w.tokens(&b.token_ids);
                w.uint(u64::from(b.block_size));
                w.opt_int(b.lora_id);
                w.opt_str(b.medium.as_deref());
                w.opt_str(b.lora_name.as_deref());
                if trailing > 0 {
                    match &b.extra_keys {
                        Some(keys) => w.extra_keys(keys),
                        None => w.nil(),
                    }
                }
                if trailing > 1 {
                    w.opt_int(b.group_idx);
                }
                if trailing > 2 {
                    w.opt_str(b.kv_cache_spec_kind.as_deref());
                }
                if trailing > 3 {
                    w.opt_int(b.kv_cache_spec_sliding_window);
                }
            }
        }
        KvEvent::BlockRemoved(b) => {
            if as_map {
                w.map_len(3 + usize::from(b.group_idx.is_some()));
                w.str("type");
                w.str("BlockRemoved");
                w.str("block_hashes");
                w.hashes(&b.block_hashes, opts.hashes_as_bytes);
                w.str("medium");
                w.opt_str(b.medium.as_deref());
                if let Some(g) = b.group_idx {
                    w.str("group_idx");
                    w.int(g);
                }
            } else {
                w.array_len(3 + usize::from(b.group_idx.is_some()));
                w.str("BlockRemoved");
                w.hashes(&b.block_hashes, opts.hashes_as_bytes);
                w.opt_str(b.medium.as_deref());
                if let Some(g) = b.group_idx {
                    w.int(g);
                }
            }
        }
        KvEvent::AllBlocksCleared => {
            if as_map {
                w.map_len(1);
                w.str("type");
            } else {
                w.array_len(1);
            }
            w.str("AllBlocksCleared");
        }
        KvEvent::Unknown { tag } => {
            if as_map {
                w.map_len(1);
                w.str("type");
            } else {
                w.array_len(1);
            }
            w.str(tag);
        }
    }
}

/// A minimal msgpack writer producing the smallest encodings, like msgspec.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn nil(&mut self) {
        self.out.push(0xc0);
    }

    fn bool(&mut self, v: bool) {
        self.out.push(if v { 0xc3 } else { 0xc2 });
    }

    fn uint(&mut self, v: u64) {
        if v < 128 {
            self.out.push(v as u8);
        } else if let Ok(v) = u8::try_from(v) {
            self.out.extend_from_slice(&[0xcc, v]);
        } else if let Ok(v) = u16::try_from(v) {
            self.out.push(0xcd);
            self.out.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(v) {
            self.out.push(0xce);
            self.out.extend_from_slice(&v.to_be_bytes());
        } else {
            self.out.push(0xcf);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn int(&mut self, v: i64) {
        if let Ok(u) = u64::try_from(v) {
            self.uint(u);
        } else if v >= -32 {
            // Negative fixint: the low byte of the two's complement.
            self.out.push(v.to_be_bytes()[7]);
        } else if let Ok(v) = i8::try_from(v) {
            self.out.extend_from_slice(&[0xd0, v.to_be_bytes()[0]]);
        } else if let Ok(v) = i16::try_from(v) {
            self.out.push(0xd1);
            self.out.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.out.push(0xd2);
            self.out.extend_from_slice(&v.to_be_bytes());
        } else {
            self.out.push(0xd3);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn f64(&mut self, v: f64) {
        self.out.push(0xcb);
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn f32(&mut self, v: f32) {
        self.out.push(0xca);
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn len_prefixed(
        &mut self,
        len: usize,
        fix: Option<(u8, usize)>,
        m8: Option<u8>,
        m16: u8,
        m32: u8,
    ) {
        match fix {
            Some((base, limit)) if len < limit => self.out.push(base | len as u8),
            _ => {
                if let (Some(m8), Ok(l)) = (m8, u8::try_from(len)) {
                    self.out.extend_from_slice(&[m8, l]);
                } else if let Ok(l) = u16::try_from(len) {
                    self.out.push(m16);
                    self.out.extend_from_slice(&l.to_be_bytes());
                } else {
                    // Lengths beyond u32 cannot be represented in msgpack; payloads here are
                    // far smaller (bounded by KV-cache size), so saturate rather than panic.
                    let l = u32::try_from(len).unwrap_or(u32::MAX);
                    self.out.push(m32);
                    self.out.extend_from_slice(&l.to_be_bytes());
                }
            }
        }
    }

    fn str(&mut self, s: &str) {
        self.len_prefixed(s.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        self.len_prefixed(b.len(), None, Some(0xc4), 0xc5, 0xc6);
        self.out.extend_from_slice(b);
    }

    fn array_len(&mut self, len: usize) {
        self.len_prefixed(len, Some((0x90, 16)), None, 0xdc, 0xdd);
    }

    fn map_len(&mut self, len: usize) {
        self.len_prefixed(len, Some((0x80, 16)), None, 0xde, 0xdf);
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.int(v),
            None => self.nil(),
        }
    }

    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.str(v),
            None => self.nil(),
        }
    }

    fn hash(&mut self, h: BlockHash, as_bytes: bool) {
        if as_bytes {
            self.bin(&h.to_be_bytes());
        } else {
            self.uint(h);
        }
    }

    fn opt_hash(&mut self, h: Option<BlockHash>, as_bytes: bool) {
        match h {
            Some(h) => self.hash(h, as_bytes),
            None => self.nil(),
        }
    }

    fn hashes(&mut self, hs: &[BlockHash], as_bytes: bool) {
        self.array_len(hs.len());
        for &h in hs {
            self.hash(h, as_bytes);
        }
    }

    fn tokens(&mut self, ts: &[u32]) {
        self.array_len(ts.len());
        for &t in ts {
            self.uint(u64::from(t));
        }
    }

    fn extra_keys(&mut self, keys: &[Option<Vec<Value>>]) {
        self.array_len(keys.len());
        for k in keys {
            match k {
                Some(vals) => {
                    self.array_len(vals.len());
                    for v in vals {
                        self.value(v);
                    }
                }
                None => self.nil(),
            }
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Nil => self.nil(),
            Value::Boolean(b) => self.bool(*b),
            Value::Integer(i) => {
                if let Some(u) = i.as_u64() {
                    self.uint(u);
                } else if let Some(i) = i.as_i64() {
                    self.int(i);
                } else {
                    self.nil();
                }
            }
            Value::F32(f) => self.f32(*f),
            Value::F64(f) => self.f64(*f),
            Value::String(s) => {
                let bytes = s.as_bytes();
                self.len_prefixed(bytes.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb);
                self.out.extend_from_slice(bytes);
            }
            Value::Binary(b) => self.bin(b),
            Value::Array(a) => {
                self.array_len(a.len());
                for x in a {
                    self.value(x);
                }
            }
            Value::Map(m) => {
                self.map_len(m.len());
                for (k, x) in m {
                    self.value(k);
                    self.value(x);
                }
            }
            Value::Ext(ty, data) => {
                let fixed = match data.len() {
                    1 => Some(0xd4),
                    2 => Some(0xd5),
                    4 => Some(0xd6),
                    8 => Some(0xd7),
                    16 => Some(0xd8),
                    _ => None,
                };
                match fixed {
                    Some(m) => self.out.push(m),
                    None => self.len_prefixed(data.len(), None, Some(0xc7), 0xc8, 0xc9),
                }
                self.out.push(ty.to_be_bytes()[0]);
                self.out.extend_from_slice(data);
            }
        }
    }
}

/// Decodes one msgpack payload into an [`EventBatch`].
///
/// Payloads of more than [`MAX_VALUES`] bytes are first scanned (without allocating) and
/// rejected if they hold more than [`MAX_VALUES`] values.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, WireError> {
    if payload.len() > MAX_VALUES {
        check_value_count(payload, MAX_VALUES)?;
    }
    let mut rd = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| WireError::Msgpack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(WireError::TrailingBytes(rd.len()));
    }
    batch_from_value(&value)
}

/// Counts the msgpack values in `bytes` (containers count their elements too) without
/// allocating; fails once there are more than `cap`. Malformed or truncated input stops the
/// count early (the decoder reports it).
fn check_value_count(bytes: &[u8], cap: usize) -> Result<(), WireError> {
    let be = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at + n)?;
        Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    };
    let mut pending: u64 = 1;
    let mut values: usize = 0;
    let mut pos: usize = 0;
    while pending > 0 {
        let Some(&m) = bytes.get(pos) else {
            return Ok(());
        };
        pending -= 1;
        values += 1;
        if values > cap {
            return Err(WireError::Msgpack(format!(
                "payload holds more than {cap} values"
            )));
        }
        pos += 1;
        // (extra elements to read, bytes to skip)
        let (elements, skip): (u64, Option<u64>) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, Some(0)),
            0x80..=0x8f => (2 * u64::from(m & 0x0f), Some(0)),
            0x90..=0x9f => (u64::from(m & 0x0f), Some(0)),
            0xa0..=0xbf => (0, Some(u64::from(m & 0x1f))),
            0xc4 | 0xd9 => (0, be(pos, 1).map(|l| 1 + l)),
            0xc5 | 0xda => (0, be(pos, 2).map(|l| 2 + l)),
            0xc6 | 0xdb => (0, be(pos, 4).map(|l| 4 + l)),
            0xc7 => (0, be(pos, 1).map(|l| 2 + l)),
            0xc8 => (0, be(pos, 2).map(|l| 3 + l)),
            0xc9 => (0, be(pos, 4).map(|l| 5 + l)),
            0xca => (0, Some(4)),
            0xcb => (0, Some(8)),
            0xcc | 0xd0 => (0, Some(1)),
            0xcd | 0xd1 => (0, Some(2)),
            0xce | 0xd2 => (0, Some(4)),
            0xcf | 0xd3 => (0, Some(8)),
            0xd4 => (0, Some(2)),
            0xd5 => (0, Some(3)),
            0xd6 => (0, Some(5)),
            0xd7 => (0, Some(9)),
            0xd8 => (0, Some(17)),
            0xdc => (be(pos, 2).unwrap_or(0), Some(2)),
            0xdd => (be(pos, 4).unwrap_or(0), Some(4)),
            0xde => (2 * be(pos, 2).unwrap_or(0), Some(2)),
            0xdf => (2 * be(pos, 4).unwrap_or(0), Some(4)),
            // 0xc1 (never used): the decoder rejects it.
            _ => return Ok(()),
        };
        let Some(skip) = skip.and_then(|k| usize::try_from(k).ok()) else {
            return Ok(());
        };
        pos = pos.saturating_add(skip);
        pending += elements;
    }
    Ok(())
}

fn batch_from_value(value: &Value) -> Result<EventBatch, WireError> {
    let (ts, events, rank) = match value {
        Value::Array(items) => {
            if items.len() < 2 {
                return Err(WireError::Batch(format!(
                    "expected [ts, events, data_parallel_rank], got an array of {}",
                    items.len()
                )));
            }
            (&items[0], &items[1], items.get(2))
        }
        Value::Map(entries) => {
            let get = |key: &str| {
                entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(key))
                    .map(|(_, v)| v)
            };
            let ts = get("ts").ok_or_else(|| WireError::Batch("map without `ts`".into()))?;
            let events =
                get("events").ok_or_else(|| WireError::Batch("map without `events`".into()))?;
            (ts, events, get("data_parallel_rank"))
        }
        other => {
            return Err(WireError::Batch(format!(
                "expected an array or a map, got {}",
                kind(other)
            )));
        }
    };
    let ts = match ts {
        Value::F64(f) => *f,
        Value::F32(f) => f64::from(*f),
        Value::Integer(i) => i.as_f64().unwrap_or(0.0),
        other => return Err(WireError::Batch(format!("`ts` is {}", kind(other)))),
    };
    let data_parallel_rank = match rank {
        None | Some(Value::Nil) => None,
        Some(v) => {
            Some(as_i64(v).map_err(|e| WireError::Batch(format!("`data_parallel_rank`: {e}")))?)
        }
    };
    let Value::Array(raw_events) = events else {
        return Err(WireError::Batch(format!("`events` is {}", kind(events))));
    };
    let mut out = Vec::with_capacity(raw_events.len());
    for (index, ev) in raw_events.iter().enumerate() {
        out.push(event_from_value(ev).map_err(|reason| WireError::Event { index, reason })?);
    }
    Ok(EventBatch {
        ts,
        events: out,
        data_parallel_rank,
    })
}

/// Field access that works the same for the positional and the map layouts.
enum Fields<'a> {
    Positional(&'a [Value]),
    Named(&'a [(Value, Value)]),
}

impl<'a> Fields<'a> {
    /// The field at position `pos` (counted after the tag) or named `name`; `None` if absent.
    fn get(&self, pos: usize, name: &str) -> Option<&'a Value> {
        match self {
            Fields::Positional(items) => items.get(pos),
            Fields::Named(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v),
        }
    }

    fn required(&self, pos: usize, name: &str) -> Result<&'a Value, String> {
        self.get(pos, name)
            .ok_or_else(|| format!("missing field `{name}`"))
    }
}

fn event_from_value(value: &Value) -> Result<KvEvent, String> {
    let (tag, fields) = match value {
        Value::Array(items) => {
            let Some(first) = items.first() else {
                return Err("empty event array".into());
            };
            let tag = first
                .as_str()
                .ok_or_else(|| format!("event tag is {}, expected a string", kind(first)))?;
            (tag, Fields::Positional(&items[1..]))
        }
        Value::Map(entries) => {
            let tag = entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .map(|(_, v)| v)
                .ok_or("event map without `type`")?;
            let tag = tag
                .as_str()
                .ok_or_else(|| format!("event `type` is {}, expected a string", kind(tag)))?;
            (tag, Fields::Named(entries))
        }
        other => {
            return Err(format!(
                "event is {}, expected an array or a map",
                kind(other)
            ));
        }
    };
    match tag {
        "BlockStored" => {
            let block_hashes = hash_list(fields.required(0, "block_hashes")?)
                .map_err(|e| format!("`block_hashes`: {e}"))?;
            let parent_block_hash = match fields.get(1, "parent_block_hash") {
                None | Some(Value::Nil) => None,
                Some(v) => Some(as_hash(v).map_err(|e| format!("`parent_block_hash`: {e}"))?),
            };
            let token_ids = token_list(fields.required(2, "token_ids")?)
                .map_err(|e| format!("`token_ids`: {e}"))?;
            let block_size = as_i64(fields.required(3, "block_size")?)
                .and_then(|v| u32::try_from(v).map_err(|_| format!("{v} is out of range")))
                .map_err(|e| format!("`block_size`: {e}"))?;
            Ok(KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id: opt_i64(fields.get(4, "lora_id"))
                    .map_err(|e| format!("`lora_id`: {e}"))?,
                medium: opt_string(fields.get(5, "medium"))
                    .map_err(|e| format!("`medium`: {e}"))?,
                lora_name: opt_string(fields.get(6, "lora_name"))
                    .map_err(|e| format!("`lora_name`: {e}"))?,
                extra_keys: extra_keys(fields.get(7, "extra_keys"))
                    .map_err(|e| format!("`extra_keys`: {e}"))?,
                group_idx: opt_i64(fields.get(8, "group_idx"))
                    .map_err(|e| format!("`group_idx`: {e}"))?,
                kv_cache_spec_kind: opt_string(fields.get(9, "kv_cache_spec_kind"))
                    .map_err(|e| format!("`kv_cache_spec_kind`: {e}"))?,
                kv_cache_spec_sliding_window: opt_i64(
                    fields.get(10, "kv_cache_spec_sliding_window"),
                )
                .map_err(|e| format!("`kv_cache_spec_sliding_window`: {e}"))?,
            }))
        }
        "BlockRemoved" => Ok(KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: hash_list(fields.required(0, "block_hashes")?)
                .map_err(|e| format!("`block_hashes`: {e}"))?,
            medium: opt_string(fields.get(1, "medium")).map_err(|e| format!("`medium`: {e}"))?,
            group_idx: opt_i64(fields.get(2, "group_idx"))
                .map_err(|e| format!("`group_idx`: {e}"))?,
        })),
        "AllBlocksCleared" => Ok(KvEvent::AllBlocksCleared),
        other => Ok(KvEvent::Unknown {
            tag: other.to_string(),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

fn as_i64(v: &Value) -> Result<i64, String> {
    match v {
        Value::Integer(i) => i
            .as_i64()
            .ok_or_else(|| format!("{i} does not fit a signed 64-bit integer")),
        other => Err(format!("expected an integer, got {}", kind(other))),
    }
}

fn opt_i64(v: Option<&Value>) -> Result<Option<i64>, String> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => as_i64(v).map(Some),
    }
}

fn opt_string(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => s
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| "string is not valid UTF-8".to_string()),
        Some(other) => Err(format!("expected a string, got {}", kind(other))),
    }
}

/// Maps a wire hash (int or bytes) to a [`BlockHash`].
fn as_hash(v: &Value) -> Result<BlockHash, String> {
    match v {
        Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Ok(u)
            } else if let Some(s) = i.as_i64() {
                Ok(u64::from_ne_bytes(s.to_ne_bytes()))
            } else {
                Err(format!("integer {i} is not a 64-bit hash"))
            }
        }
        Value::Binary(b) => Ok(hash_from_bytes(b)),
        other => Err(format!("expected an integer or bytes, got {}", kind(other))),
    }
}

/// The last 8 bytes of `b`, big-endian (left-padded with zeros when shorter).
pub fn hash_from_bytes(b: &[u8]) -> BlockHash {
    let tail = &b[b.len().saturating_sub(8)..];
    let mut buf = [0u8; 8];
    buf[8 - tail.len()..].copy_from_slice(tail);
    u64::from_be_bytes(buf)
}

fn hash_list(v: &Value) -> Result<Vec<BlockHash>, String> {
    let Value::Array(items) = v else {
        return Err(format!("expected an array, got {}", kind(v)));
    };
    items.iter().map(as_hash).collect()
}

fn token_list(v: &Value) -> Result<Vec<u32>, String> {
    let Value::Array(items) = v else {
        return Err(format!("expected an array, got {}", kind(v)));
    };
    items
        .iter()
        .map(|t| match t {
            Value::Integer(i) => i
                .as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| format!("token id {i} is out of range")),
            other => Err(format!("token id is {}", kind(other))),
        })
        .collect()
}

fn extra_keys(v: Option<&Value>) -> Result<Option<Vec<Option<Vec<Value>>>>, String> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::Nil => Ok(None),
                Value::Array(keys) => Ok(Some(keys.clone())),
                other => Err(format!(
                    "entry is {}, expected an array or nil",
                    kind(other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!("expected an array, got {}", kind(other))),
    }
}

/// Encodes a sequence number as vLLM does: 8 bytes, big-endian.
pub fn encode_seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Decodes an 8-byte big-endian sequence number.
pub fn decode_seq(frame: &[u8]) -> Result<u64, WireError> {
    let arr: [u8; 8] = frame.try_into().map_err(|_| {
        WireError::Multipart(format!(
            "sequence frame has {} bytes, expected 8",
            frame.len()
        ))
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// One published message: `[topic, seq, payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    /// The topic frame.
    pub topic: Bytes,
    /// The batch sequence number.
    pub seq: u64,
    /// The msgpack payload (empty for the replay end marker).
    pub payload: Bytes,
}

impl WireMessage {
    /// The three frames, ready to send.
    pub fn to_frames(&self) -> Vec<Bytes> {
        vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&encode_seq(self.seq)),
            self.payload.clone(),
        ]
    }

    /// Parses the frames of a PUB message: exactly `[topic, seq, payload]`.
    pub fn from_frames(frames: &[Bytes]) -> Result<Self, WireError> {
        match frames {
            [topic, seq, payload] => Ok(WireMessage {
                topic: topic.clone(),
                seq: decode_seq(seq)?,
                payload: payload.clone(),
            }),
            other => Err(WireError::Multipart(format!(
                "expected 3 frames [topic, seq, payload], got {}",
                other.len()
            ))),
        }
    }

    /// Decodes the payload.
    pub fn batch(&self) -> Result<EventBatch, WireError> {
        decode_batch(&self.payload)
    }

    /// Whether this is the replay socket's end-of-replay marker.
    pub fn is_replay_end(&self) -> bool {
        self.seq == REPLAY_END_SEQ && self.payload.is_empty()
    }
}

/// Parses a reply from the replay ROUTER as received by a DEALER: `[empty, seq, payload]`
/// (a leading empty delimiter frame is optional).
pub fn parse_replay_reply(frames: &[Bytes]) -> Result<(u64, Bytes), WireError> {
    let frames = match frames.first() {
        Some(f) if f.is_empty() && frames.len() == 3 => &frames[1..],
        _ => frames,
    };
    match frames {
        [seq, payload] => Ok((decode_seq(seq)?, payload.clone())),
        other => Err(WireError::Multipart(format!(
            "expected [seq, payload] replay frames, got {}",
            other.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> BlockStored {
        BlockStored {
            block_hashes: vec![1, u64::MAX - 3, 0x8000_0000_0000_0000],
            parent_block_hash: Some(42),
            token_ids: (0..48).collect(),
            block_size: 16,
            lora_id: None,
            medium: Some(MEDIUM_GPU.into()),
            lora_name: Some("sql-lora".into()),
            ..Default::default()
        }
    }

    fn sample() -> EventBatch {
        EventBatch {
            ts: 1_700_000_000.25,
            events: vec![
                KvEvent::BlockStored(stored()),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![7, 8],
                    medium: Some(MEDIUM_GPU.into()),
                    group_idx: None,
                }),
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        }
    }

    #[test]
    fn every_layout_round_trips() {
        for layout in [Layout::Array, Layout::Map, Layout::MapBatch] {
            for hashes_as_bytes in [false, true] {
                let opts = EncodeOptions {
                    layout,
                    hashes_as_bytes,
                };
                let bytes = encode_batch(&sample(), opts);
                assert_eq!(decode_batch(&bytes).unwrap(), sample(), "{opts:?}");
            }
        }
    }

    #[test]
    fn optional_trailing_fields_round_trip() {
        let mut b = stored();
        b.group_idx = Some(2);
        b.extra_keys = Some(vec![Some(vec![Value::from("salt")]), None, None]);
        b.kv_cache_spec_sliding_window = Some(4096);
        let batch = EventBatch {
            ts: 1.0,
            events: vec![KvEvent::BlockStored(b)],
            data_parallel_rank: None,
        };
        for layout in [Layout::Array, Layout::Map, Layout::MapBatch] {
            let opts = EncodeOptions {
                layout,
                hashes_as_bytes: false,
            };
            assert_eq!(decode_batch(&encode_batch(&batch, opts)).unwrap(), batch);
        }
    }

    #[test]
    fn positional_layout_matches_msgspec_shape() {
        // Decode with rmpv directly to check positions independently of our decoder.
        let bytes = encode_batch(&sample(), EncodeOptions::default());
        let v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
        let batch = v.as_array().unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0].as_f64(), Some(1_700_000_000.25));
        assert_eq!(batch[2].as_i64(), Some(0));
        let ev = batch[1].as_array().unwrap()[0].as_array().unwrap();
        assert_eq!(ev.len(), 8, "trailing default fields are omitted");
        assert_eq!(ev[0].as_str(), Some("BlockStored"));
        assert_eq!(ev[1].as_array().unwrap()[1].as_u64(), Some(u64::MAX - 3));
        assert_eq!(ev[2].as_u64(), Some(42));
        assert_eq!(ev[4].as_u64(), Some(16));
        assert!(ev[5].is_nil());
        assert_eq!(ev[6].as_str(), Some("GPU"));
        assert_eq!(ev[7].as_str(), Some("sql-lora"));
        let cleared = batch[1].as_array().unwrap()[2].as_array().unwrap();
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].as_str(), Some("AllBlocksCleared"));
    }

    #[test]
    fn map_layout_puts_the_tag_first_and_omits_unset_defaults() {
        let bytes = encode_batch(
            &sample(),
            EncodeOptions {
                layout: Layout::MapBatch,
                hashes_as_bytes: false,
            },
        );
        let v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
        let batch = v.as_map().unwrap();
        assert_eq!(batch[0].0.as_str(), Some("ts"));
        let events = batch[1].1.as_array().unwrap();
        let ev = events[0].as_map().unwrap();
        assert_eq!(ev[0].0.as_str(), Some("type"));
        assert_eq!(ev[0].1.as_str(), Some("BlockStored"));
        let keys: Vec<_> = ev.iter().map(|(k, _)| k.as_str().unwrap()).collect();
        assert!(!keys.contains(&"extra_keys") && !keys.contains(&"group_idx"));
        assert!(
            keys.contains(&"lora_id"),
            "fields without defaults are always present"
        );
    }

    #[test]
    fn bytes_hashes_map_through_their_last_eight_bytes() {
        let mut digest = vec![0xAAu8; 24];
        digest.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(hash_from_bytes(&digest), 0x0102_0304_0506_0708);
        assert_eq!(hash_from_bytes(&[1, 2]), 0x0102);
        assert_eq!(hash_from_bytes(&[]), 0);
        // A hand-built positional event with a 32-byte hash and a negative-int parent.
        let ev = Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(vec![Value::Binary(digest)]),
            Value::from(-1i64),
            Value::Array((0..16).map(Value::from).collect()),
            Value::from(16),
        ]);
        let batch = Value::Array(vec![Value::F64(1.0), Value::Array(vec![ev])]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &batch).unwrap();
        let decoded = decode_batch(&buf).unwrap();
        let KvEvent::BlockStored(b) = &decoded.events[0] else {
            panic!("expected BlockStored");
        };
        assert_eq!(b.block_hashes, vec![0x0102_0304_0506_0708]);
        assert_eq!(b.parent_block_hash, Some(u64::MAX));
        assert_eq!(b.lora_id, None, "missing trailing fields default to None");
        assert_eq!(b.medium, None);
        assert_eq!(decoded.data_parallel_rank, None);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(matches!(decode_batch(&[]), Err(WireError::Msgpack(_))));
        // 0xc1 is msgpack's reserved marker.
        assert!(decode_batch(&[0xc1]).is_err());
        // A string instead of a batch.
        assert!(matches!(
            decode_batch(&[0xa1, b'x']),
            Err(WireError::Batch(_))
        ));
        // Valid batch followed by junk.
        let mut bytes = encode_batch(&sample(), EncodeOptions::default());
        bytes.push(0x00);
        assert_eq!(decode_batch(&bytes), Err(WireError::TrailingBytes(1)));
        // Truncated payload.
        let bytes = encode_batch(&sample(), EncodeOptions::default());
        assert!(decode_batch(&bytes[..bytes.len() / 2]).is_err());
        // An array claiming 2^32-1 elements with no data must not allocate or panic.
        assert!(decode_batch(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Wrong field types.
        let bad = Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec![
                Value::from("BlockStored"),
                Value::from("not a list"),
            ])]),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &bad).unwrap();
        match decode_batch(&buf) {
            Err(WireError::Event { index: 0, reason }) => {
                assert!(reason.contains("block_hashes"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        // Every prefix of a valid payload is rejected without panicking.
        let bytes = encode_batch(&sample(), EncodeOptions::default());
        for n in 0..bytes.len() {
            assert!(decode_batch(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn payloads_with_too_many_values_are_rejected_before_decoding() {
        // An array announcing 2^32-1 elements followed by MAX_VALUES + 1 nils (~1 MiB): it
        // would decode to ~32 MiB of values; rejected by the scan instead.
        let mut bytes = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
        bytes.resize(5 + MAX_VALUES + 1, 0xc0);
        match decode_batch(&bytes) {
            Err(WireError::Msgpack(m)) => assert!(m.contains("more than"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        // The count follows msgpack's structure: a large payload of few values passes it
        // (one big bin value: 2 values), and then fails only as a non-batch.
        let mut big = vec![0x92, 0xcb];
        big.extend_from_slice(&1.0f64.to_be_bytes());
        big.push(0xc6);
        big.extend_from_slice(&((MAX_VALUES as u32) + 10).to_be_bytes());
        big.resize(big.len() + MAX_VALUES + 10, 0);
        assert!(check_value_count(&big, 10).is_ok());
        assert!(matches!(decode_batch(&big), Err(WireError::Batch(_))));
        // Counting agrees with real payloads.
        let payload = encode_batch(&sample(), EncodeOptions::default());
        let n = {
            let mut cap = 0;
            while check_value_count(&payload, cap).is_err() {
                cap += 1;
            }
            cap
        };
        // [ts, [ev1, ev2, ev3], rank]: 1 + 1 + 1 + (1 + 8 + 3 hashes + 48 tokens)
        // + (1 + 1 + 2 + 1) + (1 + 1) + 1 values.
        assert_eq!(n, 1 + 1 + 1 + (1 + 8 + 3 + 48) + (1 + 3 + 2) + (1 + 1) + 1);
    }

    proptest::proptest! {
        #[test]
        fn value_count_never_panics_and_bounds_by_length(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            cap in 0usize..64,
        ) {
            let _ = check_value_count(&bytes, cap);
            // Every value takes at least one byte.
            proptest::prop_assert!(check_value_count(&bytes, bytes.len()).is_ok());
        }
    }

    #[test]
    fn unknown_event_types_are_kept_not_fatal() {
        let batch = Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Map(vec![(
                Value::from("type"),
                Value::from("BlockOffloaded"),
            )])]),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &batch).unwrap();
        let decoded = decode_batch(&buf).unwrap();
        assert_eq!(
            decoded.events,
            vec![KvEvent::Unknown {
                tag: "BlockOffloaded".into()
            }]
        );
    }

    #[test]
    fn multipart_frames() {
        let payload = Bytes::from(encode_batch(&sample(), EncodeOptions::default()));
        let msg = WireMessage {
            topic: Bytes::from_static(b"kv@127.0.0.1:8000@m"),
            seq: 258,
            payload,
        };
        let frames = msg.to_frames();
        assert_eq!(&frames[1][..], &[0, 0, 0, 0, 0, 0, 1, 2]);
        let back = WireMessage::from_frames(&frames).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.batch().unwrap(), sample());
        assert!(WireMessage::from_frames(&frames[..2]).is_err());
        let bad_seq = vec![
            frames[0].clone(),
            Bytes::from_static(b"123"),
            frames[2].clone(),
        ];
        assert!(matches!(
            WireMessage::from_frames(&bad_seq),
            Err(WireError::Multipart(_))
        ));
        let end = WireMessage {
            topic: Bytes::new(),
            seq: REPLAY_END_SEQ,
            payload: Bytes::new(),
        };
        assert!(end.is_replay_end());
        let (seq, payload) = parse_replay_reply(&[
            Bytes::new(),
            Bytes::copy_from_slice(&encode_seq(REPLAY_END_SEQ)),
            Bytes::new(),
        ])
        .unwrap();
        assert_eq!(seq, u64::MAX);
        assert!(payload.is_empty());
    }

    #[test]
    fn integers_use_the_smallest_encoding() {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out };
        for v in [
            0i64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            -1,
            -32,
            -33,
            -129,
            i64::MIN,
        ] {
            w.int(v);
        }
        w.uint(u64::MAX);
        let mut rd = &out[..];
        for v in [
            0i64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            -1,
            -32,
            -33,
            -129,
            i64::MIN,
        ] {
            assert_eq!(rmpv::decode::read_value(&mut rd).unwrap().as_i64(), Some(v));
        }
        assert_eq!(
            rmpv::decode::read_value(&mut rd).unwrap().as_u64(),
            Some(u64::MAX)
        );
        assert_eq!(out[0], 0x00);
        assert_eq!(out[1], 0x7f);
        assert_eq!(out[2], 0xcc);
    }
}
