//! Replica state: what a plugin shares with the other replicas of the EPP.
//!
//! Several EPP replicas behind one gateway each see only the requests the gateway sends them.
//! The state that makes a routing decision good — which endpoint was just sent which prompt
//! blocks, which blocks are speculatively on their way to an endpoint, how much prefill work
//! each endpoint has pending — is made by the replica that routed the request. A plugin that
//! holds such state implements [`ReplicatedState`] (exposed through
//! [`crate::Plugin::as_replicated`]); a sync layer outside core (the `llmsched-ha` crate)
//! drains each replica's local changes, ships them to the peers and applies the peers'
//! changes through the same trait.
//!
//! The contract, which keeps the request path free of new locks and the state safe to lose:
//!
//! * **Recording is off until asked for** ([`ReplicatedState::start_recording`]). Once on, a
//!   local change is one push into a bounded lock-free queue ([`DeltaBuffer`]); when the queue
//!   is full the change is dropped and counted, never waited for.
//! * **Endpoints are resolved by the sync layer.** Local deltas name endpoints by this
//!   process's [`EndpointId`]; remote deltas arrive with the local [`Endpoint`] already
//!   resolved (by name), so ids never cross process boundaries.
//! * **Applying is idempotent and bounded.** Applying the same delta twice leaves the same
//!   state (a prefix index insert refreshes; a speculative entry's expiry only moves within
//!   its bound); remote deltas never grow a state beyond the bounds it has for local ones
//!   (capacities are the receiver's own, TTLs are capped).
//! * **Soft state.** Every delta may be lost; a replica converges again through later traffic
//!   and through [`ReplicatedState::snapshot`], which a peer applies like remote deltas.
//! * **Gauges are absolute.** Per-endpoint load figures ([`ReplicatedState::local_gauges`])
//!   are sent as current values, not increments, so a lost message costs nothing once the
//!   next one arrives; the sync layer sums the peers' values and hands the totals back with
//!   [`ReplicatedState::set_peer_gauges`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::endpoint::{Endpoint, EndpointId};

/// What a delta says about an endpoint and a list of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeltaOp {
    /// A request whose prompt has these blocks (chained hashes, prompt order) was routed to
    /// the endpoint: the approximate prefix index records them (an insert; refreshes blocks
    /// already held).
    Blocks,
    /// Speculative entries: the endpoint is about to compute these keys (a request was
    /// routed there). They count for at most the delta's `ttl`.
    Speculate,
    /// The speculation on these keys ended (the request's first token or end): unconfirmed
    /// entries expire within the delta's `ttl` (the grace period).
    SpeculateEnd,
}

impl DeltaOp {
    /// Stable wire number.
    pub fn as_u32(self) -> u32 {
        match self {
            DeltaOp::Blocks => 1,
            DeltaOp::Speculate => 2,
            DeltaOp::SpeculateEnd => 3,
        }
    }

    /// From the wire number.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(DeltaOp::Blocks),
            2 => Some(DeltaOp::Speculate),
            3 => Some(DeltaOp::SpeculateEnd),
            _ => None,
        }
    }
}

/// A change this replica made, as recorded on the request path.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDelta {
    /// What happened.
    pub op: DeltaOp,
    /// The endpoint, by this process's id.
    pub endpoint: EndpointId,
    /// Block hashes or keys, in prompt order.
    pub keys: Vec<u64>,
    /// Lifetime of speculative entries (0 for [`DeltaOp::Blocks`]).
    pub ttl: Duration,
    /// When it was recorded (sync lag is measured from here).
    pub at: Instant,
}

/// A peer's change, with the endpoint resolved to this process's endpoint.
#[derive(Debug, Clone, Copy)]
pub struct RemoteDelta<'a> {
    /// What happened.
    pub op: DeltaOp,
    /// The endpoint (resolved by name by the sync layer).
    pub endpoint: &'a Arc<Endpoint>,
    /// Block hashes or keys, in prompt order.
    pub keys: &'a [u64],
    /// Lifetime of speculative entries as the peer asked for; the receiver caps it.
    pub ttl: Duration,
}

/// Plugin state that the EPP's replicas share. See the module docs for the contract.
pub trait ReplicatedState: Send + Sync {
    /// What kind of state this is (`approx-prefix`, `precise-prefix`): with the plugin's
    /// instance name, it decides which peer state a delta belongs to.
    fn replica_kind(&self) -> &'static str;

    /// Starts recording local changes into a buffer of at most `capacity` deltas. Idempotent;
    /// until called, nothing is recorded.
    fn start_recording(&self, capacity: usize);

    /// Moves up to `max` recorded local deltas into `out`, oldest first; returns how many.
    fn drain_local(&self, out: &mut Vec<LocalDelta>, max: usize) -> usize;

    /// Local deltas dropped so far because the buffer was full.
    fn dropped_local(&self) -> u64;

    /// Applies deltas received from a peer (or from a peer's snapshot); returns the number of
    /// keys applied. Off the request path.
    fn apply_remote(&self, deltas: &[RemoteDelta<'_>]) -> usize;

    /// The current state as deltas that recreate it when applied in order (at most about
    /// `max_keys` keys in all; the most valuable — most recently used — kept when cut).
    fn snapshot(&self, out: &mut Vec<LocalDelta>, max_keys: usize);

    /// This replica's per-endpoint gauge (e.g. prefill tokens routed and pending), as
    /// absolute values; endpoints at 0 may be left out.
    fn local_gauges(&self, _out: &mut Vec<(EndpointId, u64)>) {}

    /// The peers' gauges summed per endpoint; replaces the previous totals (endpoints not
    /// listed are 0).
    fn set_peer_gauges(&self, _totals: &[(EndpointId, u64)]) {}
}

/// A bounded lock-free queue of local deltas: pushing never blocks and never allocates
/// beyond the delta itself; when full, the delta is dropped and counted.
#[derive(Debug)]
pub struct DeltaBuffer {
    queue: ArrayQueue<LocalDelta>,
    dropped: AtomicU64,
}

impl DeltaBuffer {
    /// A buffer of `capacity` deltas (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `delta`; false (and counted) when the buffer is full.
    pub fn push(&self, delta: LocalDelta) -> bool {
        match self.queue.push(delta) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Moves up to `max` deltas into `out`, oldest first.
    pub fn drain(&self, out: &mut Vec<LocalDelta>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match self.queue.pop() {
                Some(d) => {
                    out.push(d);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Deltas waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Deltas dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A [`DeltaBuffer`] that exists only once recording started: what a plugin embeds.
#[derive(Debug, Default)]
pub struct Recorder {
    buffer: OnceLock<DeltaBuffer>,
}

impl Recorder {
    /// Not recording.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts recording with a buffer of `capacity` deltas (the first call decides).
    pub fn start(&self, capacity: usize) {
        let _ = self.buffer.get_or_init(|| DeltaBuffer::new(capacity));
    }

    /// True once recording started.
    #[inline]
    pub fn is_recording(&self) -> bool {
        self.buffer.get().is_some()
    }

    /// Records the delta `make` builds, when recording (`make` is not called otherwise).
    #[inline]
    pub fn record(&self, make: impl FnOnce() -> LocalDelta) {
        if let Some(b) = self.buffer.get() {
            b.push(make());
        }
    }

    /// See [`DeltaBuffer::drain`]; 0 when not recording.
    pub fn drain(&self, out: &mut Vec<LocalDelta>, max: usize) -> usize {
        self.buffer.get().map_or(0, |b| b.drain(out, max))
    }

    /// See [`DeltaBuffer::dropped`].
    pub fn dropped(&self) -> u64 {
        self.buffer.get().map_or(0, DeltaBuffer::dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(n: u64) -> LocalDelta {
        LocalDelta {
            op: DeltaOp::Blocks,
            endpoint: EndpointId(1),
            keys: vec![n],
            ttl: Duration::ZERO,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_full_buffer_drops_and_counts_and_drains_oldest_first() {
        let b = DeltaBuffer::new(3);
        for i in 0..5 {
            b.push(delta(i));
        }
        assert_eq!((b.len(), b.dropped()), (3, 2));
        let mut out = Vec::new();
        assert_eq!(b.drain(&mut out, 2), 2);
        assert_eq!(out[0].keys, vec![0]);
        assert_eq!(out[1].keys, vec![1]);
        assert_eq!(b.drain(&mut out, 10), 1);
        assert!(b.is_empty());
        assert!(b.push(delta(9)));
    }

    #[test]
    fn a_recorder_records_nothing_until_started() {
        let r = Recorder::new();
        let mut built = 0;
        r.record(|| {
            built += 1;
            delta(1)
        });
        assert_eq!(built, 0);
        assert!(!r.is_recording());
        r.start(2);
        r.start(100); // the first call decides
        for i in 0..3 {
            r.record(|| delta(i));
        }
        assert_eq!(r.dropped(), 1);
        let mut out = Vec::new();
        assert_eq!(r.drain(&mut out, 10), 2);
    }

    #[test]
    fn ops_round_trip_their_wire_numbers() {
        for op in [DeltaOp::Blocks, DeltaOp::Speculate, DeltaOp::SpeculateEnd] {
            assert_eq!(DeltaOp::from_u32(op.as_u32()), Some(op));
        }
        assert_eq!(DeltaOp::from_u32(0), None);
        assert_eq!(DeltaOp::from_u32(99), None);
    }
}
