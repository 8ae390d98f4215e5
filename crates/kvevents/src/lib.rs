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
//! * [`zmtp`]: our own ZMTP 3.x transport (ZeroMQ's wire protocol: PUB, SUB, ROUTER, DEALER
//!   over TCP, NULL security), interoperable with libzmq/pyzmq, with hard limits on frame and
//!   message sizes, frames per message, handshake time and queues; a hostile peer is a
//!   counted error that closes its connection, never an abort or a peer-sized allocation.
//!
//! * [`subscriber`]: ZMQ SUB sockets (bound centrally or dialling each endpoint) with
//!   per-source ordered processing, sequence-gap detection and replay, restart detection and
//!   reconnection, handing decoded batches to an [`EventSink`].

pub mod publisher;
pub mod subscriber;
pub mod wire;
pub mod zmtp;

pub use publisher::{ConnectMode, KvEventPublisher, PublisherConfig, PublisherError};
pub use subscriber::{
    EventSink, KvEventSubscriber, Source, SubscriberConfig, SubscriberError, SubscriberStats,
};
pub use wire::{
    BlockHash, BlockRemoved, BlockStored, EncodeOptions, EventBatch, KvEvent, Layout, MEDIUM_GPU,
    REPLAY_END_SEQ, WireError, WireMessage, decode_batch, encode_batch,
};
