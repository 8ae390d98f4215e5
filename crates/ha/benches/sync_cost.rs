//! Cost of the replica state sync per routed request.
//!
//! A routed request is what the director does with the approximate prefix scorer (the
//! state the sync shares most of): hash the prompt, score, record the decision. With the
//! sync on, the decision is also pushed into the lock-free delta buffer, and every collector
//! tick (10 ms in the EPP) drains the buffer, encodes one batch and offers it to each peer.
//! On the peers the batch is decoded and applied.
//!
//! * `route/sync_off` — routing alone (recording never started);
//! * `route/sync_on` — routing + recording + the collector's encode, amortized over a tick of
//!   `PER_TICK` requests (the sender's whole cost);
//! * `apply/per_request` — a peer decoding and applying that tick's batch, per request (each
//!   replica pays this once per request routed by each of its peers).
//!
//! Bytes per request (the encoded batch over `PER_TICK`) are printed once. Prompts are
//! about 2,000 tokens (8 KB) as in guide-mini-heavy, with 80 % shared prefixes.
//!
//! Run: `cargo bench -p llmsched-ha --bench sync_cost` (thread CPU time; `BENCH_CLOCK=wall`
//! for wall time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
use llmsched_core::plugin::Plugin;
use support::*;

/// Requests routed per collector tick (6,400 requests/s at the EPP's 10 ms tick).
const PER_TICK: usize = 64;

fn prompts() -> Vec<String> {
    // 16 system prompts of ~6.4 KB shared by many requests, each with a unique ~1.6 KB tail.
    (0..PER_TICK * 4)
        .map(|i| {
            let system = format!("system prompt {} ", i % 16).repeat(400);
            let tail = format!("user question {i} ").repeat(90);
            format!("{system}{tail}")
        })
        .collect()
}

struct Bench {
    /// The same scorer, never registered with a sync (recording off).
    off: Arc<dyn Plugin>,
    off_node: Node,
    on: Node,
    peer: Node,
    prompts: Vec<String>,
}

impl llmsched_benchkit::Suite for Bench {
    fn run<M: Measurement>(&self, c: &mut Criterion<M>) {
        let mut g = c.benchmark_group("route");
        g.throughput(Throughput::Elements(PER_TICK as u64));
        let mut i = 0usize;
        g.bench_function("sync_off", |b| {
            b.iter(|| {
                for _ in 0..PER_TICK {
                    self.off_node.route_with(
                        &self.off,
                        &self.prompts[i % self.prompts.len()],
                        i % 4,
                    );
                    i += 1;
                }
            })
        });
        g.bench_function("sync_on", |b| {
            b.iter(|| {
                for _ in 0..PER_TICK {
                    self.on.route(&self.prompts[i % self.prompts.len()], i % 4);
                    i += 1;
                }
                black_box(self.on.ha.collect_now());
            })
        });
        g.finish();

        // One tick's batch, as a peer receives it.
        for (k, p) in self.prompts.iter().take(PER_TICK).enumerate() {
            // Unique tails so the collector's refresh window does not skip them.
            self.on.route(&format!("{p} bench-apply {k}"), k % 4);
        }
        let batch = self.on.ha.collect_now().expect("a batch");
        eprintln!(
            "sync_cost: one tick of {PER_TICK} routed requests encodes to {} bytes ({} bytes per request, per peer)",
            batch.len(),
            batch.len() / PER_TICK
        );
        let mut g = c.benchmark_group("apply");
        g.throughput(Throughput::Elements(PER_TICK as u64));
        g.bench_function("per_request", |b| {
            b.iter(|| black_box(self.peer.ha.apply_encoded(&batch).unwrap()))
        });
        g.finish();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // The EPP's default prefix parameters (block size from the model, no auto-tuning).
    let params = serde_json::json!({"autoTune": false});
    let (off_node, on, peer) = rt.block_on(async {
        let mut nodes = Vec::new();
        for id in ["off", "on", "peer"] {
            let cfg = llmsched_ha::HaConfig {
                // The bench drives the collector itself.
                sync_interval: std::time::Duration::from_secs(3600),
                ..config(id)
            };
            nodes.push(Node::start_with(cfg, listener().await, vec![], params.clone()).await);
        }
        let peer = nodes.pop().unwrap();
        let on = nodes.pop().unwrap();
        let off = nodes.pop().unwrap();
        (off, on, peer)
    });
    let off = prefix_plugin_with(&off_node.endpoints, params);
    let bench = Bench {
        off,
        off_node,
        on,
        peer,
        prompts: prompts(),
    };
    llmsched_benchkit::run(Criterion::default(), &bench);
}
