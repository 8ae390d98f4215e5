//! Prometheus metrics of the replica sync (`llmsched_ha_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

macro_rules! labelled {
    ($name:ident, $key:ident) => {
        /// Label set with one label.
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $name {
            /// The value.
            pub $key: &'static str,
        }
    };
}
labelled!(Direction, direction);
labelled!(Reason, reason);
labelled!(OriginLabel, origin);
labelled!(Outcome, outcome);
labelled!(PeerState, state);

/// The sync's metrics. Cheap to clone (shared counters).
#[derive(Debug, Clone)]
pub struct HaMetrics {
    /// `llmsched_ha_peers{state="configured"|"connected"}`.
    pub peers: Family<PeerState, Gauge>,
    /// `llmsched_ha_sync_messages_total{direction="sent"|"received"|"applied"}`.
    pub messages: Family<Direction, Counter>,
    /// `llmsched_ha_sync_bytes_total{direction="sent"|"received"}`.
    pub bytes: Family<Direction, Counter>,
    /// `llmsched_ha_sync_lag_seconds`: from a decision at a peer to its application here.
    pub lag: Histogram,
    /// `llmsched_ha_snapshot_bootstraps_total{outcome="warm"|"cold"}`.
    pub bootstraps: Family<Outcome, Counter>,
    /// `llmsched_ha_snapshot_resyncs_total`: snapshots pulled after missed batches.
    pub resyncs: Counter,
    /// `llmsched_ha_snapshots_served_total`.
    pub snapshots_served: Counter,
    /// `llmsched_ha_entries_total{origin="local"|"peer"|"snapshot"}`: keys recorded by this
    /// replica's own decisions, and applied from peers' batches and snapshots.
    pub entries: Family<OriginLabel, Counter>,
    /// `llmsched_ha_dropped_total{reason}`.
    pub dropped: Family<Reason, Counter>,
    /// `llmsched_ha_peer_errors_total{reason}`.
    pub peer_errors: Family<Reason, Counter>,
}

impl Default for HaMetrics {
    fn default() -> Self {
        Self {
            peers: Family::default(),
            messages: Family::default(),
            bytes: Family::default(),
            lag: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            bootstraps: Family::default(),
            resyncs: Counter::default(),
            snapshots_served: Counter::default(),
            entries: Family::default(),
            dropped: Family::default(),
            peer_errors: Family::default(),
        }
    }
}

impl HaMetrics {
    /// Metrics registered in `registry` (prefix `llmsched_ha`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("llmsched_ha");
        r.register(
            "peers",
            "Peer replicas: configured (or discovered) and connected",
            m.peers.clone(),
        );
        r.register(
            "sync_messages",
            "Sync batches sent to peers, received from peers and applied",
            m.messages.clone(),
        );
        r.register(
            "sync_bytes",
            "Sync bytes sent to peers and received from peers",
            m.bytes.clone(),
        );
        r.register(
            "sync_lag_seconds",
            "Time from a peer's routing decision to its application here (wall clocks)",
            m.lag.clone(),
        );
        r.register(
            "snapshot_bootstraps",
            "Start-up bootstraps: warm (from a peer's snapshot) or cold (no peer reachable)",
            m.bootstraps.clone(),
        );
        r.register(
            "snapshot_resyncs",
            "Snapshots pulled from a peer after batches from it were lost",
            m.resyncs.clone(),
        );
        r.register(
            "snapshots_served",
            "Snapshots sent to peers",
            m.snapshots_served.clone(),
        );
        r.register(
            "entries",
            "Index keys recorded by this replica's decisions (local) and learned from peers (peer, snapshot)",
            m.entries.clone(),
        );
        r.register("dropped", "Sync data dropped, by reason", m.dropped.clone());
        r.register(
            "peer_errors",
            "Failures talking to peers, by reason",
            m.peer_errors.clone(),
        );
        m
    }

    pub(crate) fn drop_n(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&Reason { reason }).inc_by(n);
        }
    }

    pub(crate) fn error(&self, reason: &'static str) {
        self.peer_errors.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn msg(&self, direction: &'static str, bytes: u64) {
        self.messages.get_or_create(&Direction { direction }).inc();
        if bytes > 0 {
            self.bytes
                .get_or_create(&Direction { direction })
                .inc_by(bytes);
        }
    }

    pub(crate) fn entries(&self, origin: &'static str, n: u64) {
        if n > 0 {
            self.entries
                .get_or_create(&OriginLabel { origin })
                .inc_by(n);
        }
    }
}
