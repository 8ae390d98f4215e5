//! A small ZMTP 3.x implementation (ZeroMQ's wire protocol over TCP), covering exactly what
//! vLLM's KV events need, with hard limits on everything a peer controls.
//!
//! * Greeting: version 3.0 and 3.1 peers (libzmq 4.1 and later, pyzmq); the NULL security
//!   mechanism only. We announce 3.1.
//! * Sockets: [`PubSocket`] (bind and connect; filters by the subscribers' topic prefixes
//!   like libzmq, drops messages for a subscriber whose queue is full like libzmq's HWM),
//!   [`SubSocket`] (bind and connect; subscribes with SUBSCRIBE commands to 3.1 peers and
//!   `0x01`-prefixed messages to 3.0 peers), [`RouterSocket`] (bind) and [`DealerSocket`]
//!   (connect) for the replay protocol. Multipart messages, short and long frames, PING →
//!   PONG.
//! * Limits ([`Limits`]): frame size, message size, frames per message, command size,
//!   subscriptions per peer, handshake timeout, connections per bound socket, per-peer send
//!   queue and receive queue. A frame header is checked against the caps before a single byte
//!   is reserved for it, and buffers grow only with bytes actually received, so no peer can
//!   make us allocate by announcing a size.
//!
//! A peer that breaks the protocol or a limit gets its connection closed, a log line (the first
//! few per reason, then one in a thousand) and a count in [`TransportStats`] under an
//! [`ErrorReason`]; the socket keeps serving its other peers.

mod codec;
mod conn;
mod socket;

pub use codec::{
    Command, Decoded, Decoder, GREETING_LEN, PeerGreeting, encode_command, encode_message,
    encode_message_parts, greeting, parse_greeting,
};
pub use socket::{DealerSocket, PubSocket, RouterSocket, SubSocket};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Hard limits of a socket. The defaults fit vLLM's largest batches many times over.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame accepted. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Largest multipart message (sum of its frames) accepted. Default 16 MiB.
    pub max_message_bytes: usize,
    /// Most frames in one message. Default 64 (vLLM sends 3; a ROUTER adds 1-2).
    pub max_frames: usize,
    /// Largest command frame (READY, SUBSCRIBE, PING...). Default 64 KiB.
    pub max_command_bytes: usize,
    /// Distinct subscriptions a PUB keeps per subscriber. Default 1024.
    pub max_subscriptions: usize,
    /// Time a peer has to complete the greeting and READY exchange. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time a TCP connect may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Connections a bound socket accepts at once (handshaking or established); more are
    /// closed at once. Default 1024.
    pub max_connections: usize,
    /// Messages queued per peer for sending (libzmq's SNDHWM): a PUB drops beyond it, other
    /// sockets wait. Default 1000.
    pub send_queue: usize,
    /// Received messages queued in the socket before its connections stop reading (so TCP
    /// pushes back). Default 1000.
    pub recv_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_message_bytes: 16 << 20,
            max_frames: 64,
            max_command_bytes: 64 << 10,
            max_subscriptions: 1024,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 1024,
            send_queue: 1000,
            recv_queue: 1000,
        }
    }
}

/// Why a connection was refused or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// The first bytes are not a ZMTP 3.x greeting (or the greeting was cut short).
    BadGreeting,
    /// A ZMTP 1.0/2.0 peer.
    UnsupportedVersion,
    /// A security mechanism other than NULL.
    BadMechanism,
    /// The peer's socket type is unknown or cannot talk to ours.
    SocketType,
    /// The greeting and READY exchange did not finish in time.
    HandshakeTimeout,
    /// The peer sent an ERROR command, or closed the connection during the handshake.
    HandshakeFailed,
    /// A frame larger than [`Limits::max_frame_bytes`].
    FrameTooLarge,
    /// A message larger than [`Limits::max_message_bytes`].
    MessageTooLarge,
    /// A message of more than [`Limits::max_frames`] frames.
    TooManyFrames,
    /// A command larger than [`Limits::max_command_bytes`].
    CommandTooLarge,
    /// More than [`Limits::max_subscriptions`] subscriptions from one peer.
    TooManySubscriptions,
    /// Any other protocol violation (reserved flag bits, malformed command...).
    Protocol,
    /// A bound socket already had [`Limits::max_connections`] connections.
    ConnectionLimit,
}

impl ErrorReason {
    /// Every reason, in a stable order.
    pub const ALL: [ErrorReason; 13] = [
        ErrorReason::BadGreeting,
        ErrorReason::UnsupportedVersion,
        ErrorReason::BadMechanism,
        ErrorReason::SocketType,
        ErrorReason::HandshakeTimeout,
        ErrorReason::HandshakeFailed,
        ErrorReason::FrameTooLarge,
        ErrorReason::MessageTooLarge,
        ErrorReason::TooManyFrames,
        ErrorReason::CommandTooLarge,
        ErrorReason::TooManySubscriptions,
        ErrorReason::Protocol,
        ErrorReason::ConnectionLimit,
    ];

    /// The metric label value (`reason="..."`).
    pub fn label(self) -> &'static str {
        match self {
            ErrorReason::BadGreeting => "bad_greeting",
            ErrorReason::UnsupportedVersion => "unsupported_version",
            ErrorReason::BadMechanism => "bad_mechanism",
            ErrorReason::SocketType => "socket_type",
            ErrorReason::HandshakeTimeout => "handshake_timeout",
            ErrorReason::HandshakeFailed => "handshake_failed",
            ErrorReason::FrameTooLarge => "frame_too_large",
            ErrorReason::MessageTooLarge => "message_too_large",
            ErrorReason::TooManyFrames => "too_many_frames",
            ErrorReason::CommandTooLarge => "command_too_large",
            ErrorReason::TooManySubscriptions => "too_many_subscriptions",
            ErrorReason::Protocol => "protocol",
            ErrorReason::ConnectionLimit => "connection_limit",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl std::fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A protocol violation or limit hit by a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct TransportError {
    /// The category (metric label).
    pub reason: ErrorReason,
    /// What exactly happened.
    pub detail: String,
}

impl TransportError {
    /// A new error.
    pub fn new(reason: ErrorReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Errors of socket operations.
#[derive(Debug, thiserror::Error)]
pub enum ZmqError {
    /// The endpoint is not `tcp://host:port`.
    #[error("invalid ZMQ endpoint {0:?} (expected tcp://host:port)")]
    Endpoint(String),
    /// Binding, resolving or connecting failed.
    #[error("{endpoint}: {source}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting took longer than [`Limits::connect_timeout`].
    #[error("{0}: connect timed out")]
    ConnectTimeout(String),
    /// The peer broke the protocol or a limit (the connection is closed).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The connection (or the socket) is closed.
    #[error("connection closed")]
    Closed,
    /// A ROUTER has no peer with this identity.
    #[error("no peer with this routing identity")]
    UnknownPeer,
    /// A message needs at least one frame (a ROUTER's: the identity and one more).
    #[error("empty message")]
    EmptyMessage,
}

/// Counters of a socket's (or several sockets') transport errors and drops.
#[derive(Debug, Default)]
pub struct TransportStats {
    errors: [AtomicU64; ErrorReason::ALL.len()],
    hwm_drops: AtomicU64,
    connections: AtomicU64,
}

impl TransportStats {
    /// Connections closed for `reason`.
    pub fn errors(&self, reason: ErrorReason) -> u64 {
        self.errors[reason.index()].load(Ordering::Relaxed)
    }

    /// All reasons with their counts (including zeros).
    pub fn error_counts(&self) -> Vec<(ErrorReason, u64)> {
        ErrorReason::ALL
            .iter()
            .map(|&r| (r, self.errors(r)))
            .collect()
    }

    /// Sum over all reasons.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Messages a PUB dropped because a subscriber's queue was full.
    pub fn hwm_drops(&self) -> u64 {
        self.hwm_drops.load(Ordering::Relaxed)
    }

    /// Connections that completed the handshake.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts `err` and logs it (the first 16 per reason, then one in a thousand).
    pub(crate) fn record(&self, err: &TransportError, peer: Option<SocketAddr>) {
        let n = self.errors[err.reason.index()].fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 16 || n.is_multiple_of(1000) {
            tracing::warn!(
                peer = %peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
                reason = err.reason.label(),
                error = %err.detail,
                count = n,
                "ZMQ connection closed: protocol error"
            );
        }
    }
}

/// ZMTP socket types we know (to check a peer's compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketType {
    /// PUB.
    Pub,
    /// XPUB.
    XPub,
    /// SUB.
    Sub,
    /// XSUB.
    XSub,
    /// ROUTER.
    Router,
    /// DEALER.
    Dealer,
    /// REQ.
    Req,
    /// REP.
    Rep,
    /// PUSH.
    Push,
    /// PULL.
    Pull,
    /// PAIR.
    Pair,
}

impl SocketType {
    /// The name in READY's `Socket-Type` property.
    pub fn name(self) -> &'static str {
        match self {
            SocketType::Pub => "PUB",
            SocketType::XPub => "XPUB",
            SocketType::Sub => "SUB",
            SocketType::XSub => "XSUB",
            SocketType::Router => "ROUTER",
            SocketType::Dealer => "DEALER",
            SocketType::Req => "REQ",
            SocketType::Rep => "REP",
            SocketType::Push => "PUSH",
            SocketType::Pull => "PULL",
            SocketType::Pair => "PAIR",
        }
    }

    /// Parses a `Socket-Type` value.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        [
            SocketType::Pub,
            SocketType::XPub,
            SocketType::Sub,
            SocketType::XSub,
            SocketType::Router,
            SocketType::Dealer,
            SocketType::Req,
            SocketType::Rep,
            SocketType::Push,
            SocketType::Pull,
            SocketType::Pair,
        ]
        .into_iter()
        .find(|t| t.name().as_bytes() == name)
    }

    /// Whether a socket of this type may talk to `peer` (ZMTP's compatibility table).
    pub fn accepts(self, peer: SocketType) -> bool {
        use SocketType::*;
        match self {
            Pub | XPub => matches!(peer, Sub | XSub),
            Sub | XSub => matches!(peer, Pub | XPub),
            Router => matches!(peer, Dealer | Req | Router),
            Dealer => matches!(peer, Rep | Dealer | Router),
            Req => matches!(peer, Rep | Router),
            Rep => matches!(peer, Req | Dealer),
            Push => peer == Pull,
            Pull => peer == Push,
            Pair => peer == Pair,
        }
    }
}

/// `tcp://host:port` → (`host`, `port`); `*` is every IPv4 interface, `[v6]` brackets are
/// removed.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), ZmqError> {
    let bad = || ZmqError::Endpoint(endpoint.to_string());
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = match host {
        "*" => "0.0.0.0",
        h if h.starts_with('[') && h.ends_with(']') => &h[1..h.len() - 1],
        h => h,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// The `tcp://` endpoint of a socket address.
pub fn endpoint_of(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("tcp://*:5557").unwrap(),
            ("0.0.0.0".into(), 5557)
        );
        assert_eq!(
            parse_endpoint("tcp://[::1]:80").unwrap(),
            ("::1".into(), 80)
        );
        assert_eq!(
            parse_endpoint("tcp://epp.ns.svc:5557").unwrap(),
            ("epp.ns.svc".into(), 5557)
        );
        for bad in [
            "ipc:///tmp/x",
            "tcp://host",
            "tcp://:1",
            "tcp://h:99999",
            "localhost:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(
            endpoint_of("[::1]:5".parse().unwrap()),
            "tcp://[::1]:5".to_string()
        );
    }

    #[test]
    fn compatibility_table() {
        assert!(SocketType::Pub.accepts(SocketType::Sub));
        assert!(SocketType::Sub.accepts(SocketType::XPub));
        assert!(!SocketType::Sub.accepts(SocketType::Sub));
        assert!(SocketType::Router.accepts(SocketType::Dealer));
        assert!(!SocketType::Router.accepts(SocketType::Pub));
        assert!(SocketType::Dealer.accepts(SocketType::Router));
        for t in ["PUB", "SUB", "ROUTER", "DEALER", "XPUB"] {
            assert_eq!(SocketType::from_name(t.as_bytes()).unwrap().name(), t);
        }
        assert_eq!(SocketType::from_name(b"pub"), None);
    }

    #[test]
    fn reasons_have_distinct_labels() {
        let mut labels: Vec<_> = ErrorReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ErrorReason::ALL.len());
        let s = TransportStats::default();
        s.record(&TransportError::new(ErrorReason::Protocol, "x"), None);
        assert_eq!(s.errors(ErrorReason::Protocol), 1);
        assert_eq!(s.total_errors(), 1);
    }
}
