//! vLLM's KV-cache events, shared by the simulator (publisher side) and the scheduler
//! (subscriber side).
//!
//! * [`wire`]: the event types and their msgpack encoding, in both of vLLM's layouts
//!   (positional arrays tagged by their first element, and maps tagged by `"type"`), plus a
//!   decoder that accepts either, int or bytes hashes, missing trailing optional fields and
//!   map-form batches, and reports malformed input as a typed [`WireError`] without panicking.
//! * [`publisher`]: a ZMQ PUB publisher (`[topic, seq, payload]` messages) with vLLM's replay
//!   ROUTER socket.
//!
//! The subscriber side (SUB sockets, ingestion into an index) lives in its own module, added
//! separately; it only needs [`wire`].

pub mod publisher;
pub mod wire;

pub use publisher::{ConnectMode, KvEventPublisher, PublisherConfig, PublisherError};
pub use wire::{
    BlockHash, BlockRemoved, BlockStored, EncodeOptions, EventBatch, KvEvent, Layout, MEDIUM_GPU,
    REPLAY_END_SEQ, WireError, WireMessage, decode_batch, encode_batch,
};
