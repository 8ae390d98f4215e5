//! The wire messages of `proto/ha.proto` (package `llmsched.ha.v1`), written by hand with
//! `prost`'s derive (no protoc at build time), and the codec that sends an already encoded
//! batch to several peers without encoding it again.

use bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};

/// Protocol version spoken (and required from peers).
pub const PROTOCOL: u32 = 1;

/// gRPC service name.
pub const SERVICE: &str = "llmsched.ha.v1.ReplicaSync";
/// `Hello` method path.
pub const HELLO_PATH: &str = "/llmsched.ha.v1.ReplicaSync/Hello";
/// `Push` method path.
pub const PUSH_PATH: &str = "/llmsched.ha.v1.ReplicaSync/Push";
/// `Snapshot` method path.
pub const SNAPSHOT_PATH: &str = "/llmsched.ha.v1.ReplicaSync/Snapshot";

/// A replica process.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Origin {
    /// The replica's name (`--ha-replica-id`, by default the pod name).
    #[prost(string, tag = "1")]
    pub replica_id: String,
    /// Random, drawn at start: a restart is a new incarnation.
    #[prost(fixed64, tag = "2")]
    pub incarnation: u64,
    /// The port its sync server listens on (a receiver dials back there to resync).
    #[prost(uint32, tag = "3")]
    pub sync_port: u32,
}

/// `Hello` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// The caller.
    #[prost(message, optional, tag = "1")]
    pub origin: Option<Origin>,
    /// The caller's protocol version.
    #[prost(uint32, tag = "2")]
    pub protocol: u32,
    /// The pool the caller routes.
    #[prost(string, tag = "3")]
    pub pool: String,
}

/// `Hello` response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloResponse {
    /// The callee.
    #[prost(message, optional, tag = "1")]
    pub origin: Option<Origin>,
    /// The callee's protocol version.
    #[prost(uint32, tag = "2")]
    pub protocol: u32,
    /// The pool the callee routes.
    #[prost(string, tag = "3")]
    pub pool: String,
}

/// A batch of changes (a pushed batch or a snapshot chunk).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SyncBatch {
    /// The sender.
    #[prost(message, optional, tag = "1")]
    pub origin: Option<Origin>,
    /// Batch sequence number (see the proto file).
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Sender's wall clock at sending, Unix milliseconds.
    #[prost(uint64, tag = "3")]
    pub sent_unix_ms: u64,
    /// When the oldest delta was recorded, Unix milliseconds (0: no delta).
    #[prost(uint64, tag = "4")]
    pub oldest_unix_ms: u64,
    /// Endpoint names, referred to by index.
    #[prost(string, repeated, tag = "5")]
    pub endpoints: Vec<String>,
    /// Per plugin state.
    #[prost(message, repeated, tag = "6")]
    pub states: Vec<StateDeltas>,
    /// The gauges (loads and every state's gauge values) are present and complete.
    #[prost(bool, tag = "7")]
    pub gauges: bool,
    /// In-flight requests and tokens per endpoint.
    #[prost(message, repeated, tag = "8")]
    pub loads: Vec<EndpointLoad>,
    /// Final snapshot chunk.
    #[prost(bool, tag = "9")]
    pub last: bool,
}

/// The changes of one plugin instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateDeltas {
    /// `ReplicatedState::replica_kind`.
    #[prost(string, tag = "1")]
    pub kind: String,
    /// The plugin's instance name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The deltas.
    #[prost(message, repeated, tag = "3")]
    pub deltas: Vec<Delta>,
    /// Gauge values (when the batch's `gauges` is set).
    #[prost(message, repeated, tag = "4")]
    pub gauge_values: Vec<Gauge>,
}

/// One delta.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Delta {
    /// `DeltaOp` wire number.
    #[prost(uint32, tag = "1")]
    pub op: u32,
    /// Index into the batch's endpoint names.
    #[prost(uint32, tag = "2")]
    pub endpoint: u32,
    /// Speculation lifetime or grace, milliseconds.
    #[prost(uint32, tag = "3")]
    pub ttl_ms: u32,
    /// Keys (packed fixed64).
    #[prost(fixed64, repeated, tag = "4")]
    pub keys: Vec<u64>,
}

/// A per-endpoint gauge value.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Gauge {
    /// Index into the batch's endpoint names.
    #[prost(uint32, tag = "1")]
    pub endpoint: u32,
    /// The value.
    #[prost(uint64, tag = "2")]
    pub value: u64,
}

/// In-flight load on an endpoint.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct EndpointLoad {
    /// Index into the batch's endpoint names.
    #[prost(uint32, tag = "1")]
    pub endpoint: u32,
    /// Requests in flight.
    #[prost(uint64, tag = "2")]
    pub requests: u64,
    /// Tokens in flight.
    #[prost(uint64, tag = "3")]
    pub tokens: u64,
}

/// `Push` response.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct PushSummary {
    /// Batches applied.
    #[prost(uint64, tag = "1")]
    pub batches: u64,
}

/// `Snapshot` request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotRequest {
    /// The caller.
    #[prost(message, optional, tag = "1")]
    pub origin: Option<Origin>,
    /// At most this many keys (the callee caps it further).
    #[prost(uint64, tag = "2")]
    pub max_keys: u64,
}

/// Client codec of `Push`: sends batches encoded once (shared by every peer's stream) and
/// decodes the summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedCodec;

/// Writes pre-encoded message bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct PreEncodedEncoder;

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = PushSummary;
    type Encoder = PreEncodedEncoder;
    type Decoder = <tonic_prost::ProstCodec<SyncBatch, PushSummary> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<SyncBatch, PushSummary>::raw_decoder(BufferSettings::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn batches_round_trip() {
        let b = SyncBatch {
            origin: Some(Origin {
                replica_id: "epp-0".into(),
                incarnation: 42,
                sync_port: 9004,
            }),
            seq: 7,
            sent_unix_ms: 1,
            oldest_unix_ms: 2,
            endpoints: vec!["vllm-0".into()],
            states: vec![StateDeltas {
                kind: "approx-prefix".into(),
                name: "prefix-cache-scorer".into(),
                deltas: vec![Delta {
                    op: 1,
                    endpoint: 0,
                    ttl_ms: 0,
                    keys: vec![1, u64::MAX],
                }],
                gauge_values: vec![Gauge {
                    endpoint: 0,
                    value: 9,
                }],
            }],
            gauges: true,
            loads: vec![EndpointLoad {
                endpoint: 0,
                requests: 3,
                tokens: 300,
            }],
            last: false,
        };
        let bytes = b.encode_to_vec();
        assert_eq!(SyncBatch::decode(bytes.as_slice()).unwrap(), b);
    }
}
