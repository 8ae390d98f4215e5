//! One replica's engine: vLLM v1's scheduler and a discrete step loop on the simulated clock.
//!
//! Each iteration of [`Engine::run`]:
//! 1. takes the requests that arrived (they join the FIFO waiting queue);
//! 2. schedules a step like vLLM v1 (`Scheduler.schedule`, FCFS, chunked prefill always on):
//!    * running requests first, in admission order: each gets the tokens it still has to
//!      compute (1 when decoding, the rest of its prompt when prefilling), capped by the step's
//!      token budget `max_num_batched_tokens`. If the KV cache has no room for them, the most
//!      recently admitted running request is preempted (its blocks freed, its progress reset;
//!      it goes back to the head of the waiting queue and is recomputed later), until the
//!      request fits or is itself the one preempted;
//!    * then, if nothing was preempted, waiting requests in FIFO order while fewer than
//!      `max_num_seqs` run and budget remains: each reuses the longest cached prefix of its full
//!      blocks (at most `tokens - 1` tokens, so at least one is computed), and gets a chunk of
//!      the rest. A request whose LoRA adapter would exceed `max_loras` distinct adapters in the
//!      batch is skipped for this step; admission stops at the first request the cache cannot
//!      hold;
//! 3. computes the step's duration with the [`StepTimeModel`](crate::profile::StepTimeModel)
//!    and sleeps until the step's end on the simulated clock: one timer per replica per step;
//! 4. applies the step: computed tokens advance, newly full blocks enter the prefix cache
//!    (`BlockStored`), and every request whose known tokens are all computed samples one
//!    token, which is streamed to its client. The request finishes at `max_tokens` (`length`)
//!    or at its end-of-sequence position (`stop`), releasing its blocks.
//!
//! With the NIXL connector on ([`crate::pd`]), a request that prefilled for a remote decoder
//! keeps its blocks after finishing (held until read or expired), and a request whose prompt
//! was prefilled remotely allocates its blocks, waits while they are read from the prefill
//! replica (counted as waiting, not scheduled), and then joins the queue with its prompt
//! computed but for its last token.
//!
//! Time is virtual: step `k + 1` starts exactly when step `k` ended in simulated seconds, so
//! timer jitter does not accumulate. If the process falls more than 50 ms (wall) behind the
//! simulated clock, the engine re-synchronises and counts it; per-step lag is exported as
//! `llmsched_sim_step_lag_seconds`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use llmsched_kvevents::{EventBatch, KvEventPublisher};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::SimClock;
use crate::config::ReplicaConfig;
use crate::kvcache::{EventLora, KvCache, block_hash, root_hash};
use crate::metrics::Metrics;
use crate::pd::{
    EnginePd, KvTransferParams, LoadFailurePolicy, ReadReply, RemotePrefill, XferDone,
};
use crate::profile::StepShape;

/// Wall-clock lag beyond which the engine gives up catching up and re-synchronises.
const RESYNC_LAG: Duration = Duration::from_millis(50);

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence (only when the request does not set `ignore_eos`).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The client went away.
    Abort,
    /// The request failed (its remote KV could not be loaded, with
    /// `--kv-load-failure-policy fail`).
    Error,
}

impl FinishReason {
    /// vLLM's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// The end of a request, sent after its last token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache when the request was first scheduled.
    pub cached_tokens: usize,
}

/// What the engine sends to a request's HTTP handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// One generated token id.
    Token(u32),
    /// The last generated token id, and why the request ended.
    Last(u32, Finish),
    /// The request ended without a final token (aborted).
    Done(Finish),
}

/// A LoRA adapter as the engine sees it.
#[derive(Debug, Clone)]
pub struct LoraRef {
    /// vLLM's integer id (1-based, in load order).
    pub id: i64,
    /// Adapter name.
    pub name: Arc<str>,
}

/// What a request asks of the KV connector.
#[derive(Debug, Default)]
pub enum KvRequest {
    /// Nothing: an ordinary request.
    #[default]
    None,
    /// Prefill for a remote decoder: when the request finishes length-capped its blocks are
    /// held, and their `kv_transfer_params` go to this channel (`None` when not held).
    RemoteDecode(oneshot::Sender<Option<KvTransferParams>>),
    /// The prompt was prefilled remotely: read its blocks from there.
    RemotePrefill(RemotePrefill),
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct NewRequest {
    /// Engine-wide unique id.
    pub id: u64,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Number of output tokens after which the request stops with `stop`, if any.
    pub eos_at: Option<usize>,
    /// Adapter, if the request targets one.
    pub lora: Option<LoraRef>,
    /// `cache_salt` key (0 = none), folded into the first block's hash.
    pub salt: u64,
    /// Simulated time the request reached the server.
    pub arrival: f64,
    /// Seed of the generated tokens.
    pub seed: u64,
    /// Where tokens go.
    pub tx: mpsc::UnboundedSender<Emit>,
    /// P/D disaggregation role of this request.
    pub kv: KvRequest,
}

/// A view of the KV cache, for tests and debugging.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSnapshot {
    /// Hashes of all cached blocks, sorted.
    pub cached_block_hashes: Vec<u64>,
    /// Fraction of blocks in use.
    pub usage: f64,
    /// Running requests.
    pub running: usize,
    /// Waiting requests.
    pub waiting: usize,
}

/// Commands from the HTTP side.
#[derive(Debug)]
pub enum EngineCmd {
    /// A new request.
    Add(Box<NewRequest>),
    /// Forget all cached prefixes.
    ResetPrefixCache,
    /// Report the cache contents.
    Snapshot(oneshot::Sender<CacheSnapshot>),
    /// Side channel: a decoder wants to read a held request's last `num_blocks` blocks.
    NixlRead {
        /// `remote_request_id`.
        request_id: String,
        /// `remote_engine_id` the decoder was given.
        engine_id: String,
        /// Blocks the decoder lacks.
        num_blocks: usize,
        /// The answer.
        reply: oneshot::Sender<ReadReply>,
    },
    /// Side channel: the decoder has the blocks (or gives up on them): free them. The reply
    /// is the number of blocks freed, `None` if nothing was held under that id.
    NixlNotify {
        /// `remote_request_id`.
        request_id: String,
        /// The answer.
        reply: oneshot::Sender<Option<usize>>,
    },
}

/// State shared between the engine task and the HTTP handlers.
#[derive(Debug, Default)]
pub struct EngineShared {
    /// Requests accepted and not yet running (sent, waiting or preempted).
    pub queued: AtomicUsize,
    /// Prometheus state.
    pub metrics: Mutex<Metrics>,
}

#[derive(Debug)]
struct Seq {
    id: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    eos_at: Option<usize>,
    lora: Option<LoraRef>,
    extra: u64,
    salt: u64,
    seed: u64,
    hashes: Vec<u64>,
    blocks: Vec<u32>,
    num_computed: usize,
    committed: usize,
    cached_tokens: Option<usize>,
    arrival: f64,
    first_scheduled: Option<f64>,
    first_token: Option<f64>,
    last_token: f64,
    tx: mpsc::UnboundedSender<Emit>,
    /// Counted in `lora_running`.
    lora_held: bool,
    /// Prefill for a remote decoder: where the `kv_transfer_params` go.
    kv_reply: Option<oneshot::Sender<Option<KvTransferParams>>>,
    /// Prefilled remotely and not yet read.
    remote: Option<RemotePrefill>,
    /// Prompt tokens that arrived by transfer.
    external_tokens: usize,
}

impl Seq {
    fn outputs(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Makes sure the hashes of the first `n` full blocks are known.
    fn ensure_hashes(&mut self, n: usize, root: u64, bs: usize, scratch: &mut Vec<u8>) {
        let n = n.min(self.tokens.len() / bs);
        while self.hashes.len() < n {
            let i = self.hashes.len();
            let parent = if i == 0 { root } else { self.hashes[i - 1] };
            let extra = if i == 0 {
                self.extra ^ self.salt
            } else {
                self.extra
            };
            let h = block_hash(parent, extra, &self.tokens[i * bs..(i + 1) * bs], scratch);
            self.hashes.push(h);
        }
    }
}

/// Deterministic output token `idx` of a request with `seed` (splitmix64).
pub fn output_token(seed: u64, idx: usize, vocab: u32) -> u32 {
    let mut z = seed.wrapping_add((idx as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % u64::from(vocab.max(1))) as u32
}

/// One replica's engine (owned by its task).
pub struct Engine {
    cfg: Arc<ReplicaConfig>,
    clock: SimClock,
    kv: KvCache,
    root: u64,
    vocab: u32,
    seqs: Vec<Option<Seq>>,
    free_slots: Vec<usize>,
    running: Vec<usize>,
    waiting: VecDeque<usize>,
    scheduled: Vec<(usize, usize)>,
    lora_running: HashMap<i64, (Arc<str>, usize)>,
    rx: mpsc::UnboundedReceiver<EngineCmd>,
    shared: Arc<EngineShared>,
    publisher: Option<KvEventPublisher>,
    scratch: Vec<u8>,
    pd: Option<EnginePd>,
    /// Requests whose blocks are being read from a prefill replica.
    recving: usize,
    /// Commands that arrived during a step and wait for its end.
    deferred: Vec<EngineCmd>,
}

/// The next completed pull, or never without a connector.
async fn recv_done(pd: &mut Option<EnginePd>) -> Option<XferDone> {
    match pd {
        Some(p) => p.done_rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

impl Engine {
    /// An engine for `cfg`, fed by `rx`, publishing KV events through `publisher` if given,
    /// with the NIXL connector `pd` if given.
    pub fn new(
        cfg: Arc<ReplicaConfig>,
        clock: SimClock,
        vocab: u32,
        rx: mpsc::UnboundedReceiver<EngineCmd>,
        shared: Arc<EngineShared>,
        publisher: Option<KvEventPublisher>,
        pd: Option<EnginePd>,
    ) -> Self {
        Self {
            kv: KvCache::new(cfg.num_gpu_blocks, cfg.block_size, publisher.is_some()),
            root: root_hash(&cfg.model),
            vocab,
            cfg,
            clock,
            seqs: Vec::new(),
            free_slots: Vec::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            scheduled: Vec::new(),
            lora_running: HashMap::new(),
            rx,
            shared,
            publisher,
            scratch: Vec::new(),
            pd,
            recving: 0,
            deferred: Vec::new(),
        }
    }

    /// Runs until `shutdown` flips or every command sender is gone; pending requests are
    /// aborted on exit.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut step_start = self.clock.now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            for cmd in std::mem::take(&mut self.deferred) {
                self.handle(cmd);
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.shutdown().await;
                        return;
                    }
                }
            }
            while let Some(done) = self.pd.as_mut().and_then(|p| p.done_rx.try_recv().ok()) {
                self.on_xfer_done(done);
            }
            self.expire_held();
            if self.running.is_empty() && self.waiting.is_empty() {
                self.update_gauges();
                self.flush_events();
                let expiry = self.next_expiry_wall();
                tokio::select! {
                    cmd = self.rx.recv() => match cmd {
                        Some(cmd) => self.handle(cmd),
                        None => break,
                    },
                    done = recv_done(&mut self.pd) => if let Some(d) = done {
                        self.on_xfer_done(d);
                    },
                    _ = sleep_until_opt(expiry) => {}
                    _ = shutdown.changed() => break,
                }
                step_start = step_start.max(self.clock.now());
                continue;
            }

            let shape = self.schedule(step_start);
            if self.scheduled.is_empty() {
                // Nothing can run (e.g. every waiting request is held back): wait for news.
                self.update_gauges();
                self.flush_events();
                tokio::select! {
                    cmd = self.rx.recv() => match cmd {
                        Some(cmd) => self.handle(cmd),
                        None => break,
                    },
                    done = recv_done(&mut self.pd) => if let Some(d) = done {
                        self.on_xfer_done(d);
                    },
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                    _ = shutdown.changed() => break,
                }
                step_start = step_start.max(self.clock.now());
                continue;
            }

            // The scheduler's view (running, waiting, KV usage) as of this step, visible to
            // scrapes while the step runs.
            self.update_gauges();
            let end = step_start + self.cfg.step.step_time(&shape);
            let target = self.clock.wall_at(end);
            if target > Instant::now() + Duration::from_micros(200) {
                // While the GPU computes the step, the engine's other threads keep answering:
                // commands are handled as they arrive (a NIXL read or completion notification
                // from a decoder must not wait for this replica's step to end, as vLLM's
                // side channel and NIXL's one-sided reads do not; new requests join the
                // waiting queue, scheduled at the next step as before).
                let sleep = tokio::time::sleep_until(target.into());
                tokio::pin!(sleep);
                let mut closed = false;
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = self.rx.recv(), if !closed => match cmd {
                            Some(cmd) => self.handle_mid_step(cmd),
                            None => closed = true,
                        },
                        _ = shutdown.changed() => break,
                    }
                }
                if *shutdown.borrow() {
                    break;
                }
            } else {
                tokio::task::yield_now().await;
            }
            let lag = Instant::now().saturating_duration_since(target);
            self.complete_step(end, &shape, lag);
            step_start = end;
            if lag > RESYNC_LAG {
                step_start = self.clock.now();
                self.shared.metrics.lock().resyncs += 1;
            }
        }
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        let now = self.clock.now();
        let slots: Vec<usize> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for slot in slots {
            self.finish(slot, FinishReason::Abort, now, false);
        }
        if let Some(pd) = self.pd.as_mut() {
            for blocks in pd.held.drain() {
                self.kv.free(&blocks);
            }
        }
        self.flush_events();
        if let Some(p) = self.publisher.take() {
            p.shutdown().await;
        }
    }

    /// A command arriving during a step: everything but a prefix-cache reset (which would
    /// touch blocks the running step is filling) is handled at once.
    fn handle_mid_step(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::ResetPrefixCache => self.deferred.push(cmd),
            cmd => self.handle(cmd),
        }
    }

    fn handle(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Add(req) => self.add(*req),
            EngineCmd::ResetPrefixCache => {
                // Blocks in use stay allocated to their requests but are no longer reusable
                // prefixes; blocks filled from now on are registered as usual.
                self.kv.reset();
                self.flush_events();
            }
            EngineCmd::Snapshot(tx) => {
                let _ = tx.send(CacheSnapshot {
                    cached_block_hashes: self.kv.cached_hashes(),
                    usage: self.kv.usage(),
                    running: self.running.len(),
                    waiting: self.waiting.len() + self.recving,
                });
            }
            EngineCmd::NixlRead {
                request_id,
                engine_id,
                num_blocks,
                reply,
            } => {
                let bs = self.cfg.block_size;
                let answer = match self.pd.as_ref() {
                    None => ReadReply::Unknown,
                    Some(pd) => match pd.held.get(&request_id) {
                        None => ReadReply::Unknown,
                        Some(_) if engine_id != pd.engine_id => ReadReply::WrongEngine,
                        Some(h) => {
                            let k = num_blocks.min(h.blocks.len());
                            ReadReply::Ok {
                                block_ids: h.blocks[h.blocks.len() - k..]
                                    .iter()
                                    .map(|&b| u64::from(b))
                                    .collect(),
                                block_bytes: pd.cfg.transfer.block_bytes(bs),
                            }
                        }
                    },
                };
                let _ = reply.send(answer);
            }
            EngineCmd::NixlNotify { request_id, reply } => {
                let freed = self.pd.as_mut().and_then(|pd| pd.held.remove(&request_id));
                if let Some(blocks) = &freed {
                    self.kv.free(blocks);
                    self.shared.metrics.lock().pd.served += 1;
                }
                let _ = reply.send(freed.map(|b| b.len()));
                self.update_gauges();
                self.flush_events();
            }
        }
    }

    /// Frees the held blocks whose abort timeout passed (vLLM's
    /// `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`).
    fn expire_held(&mut self) {
        let Some(pd) = self.pd.as_mut() else {
            return;
        };
        if pd.held.is_empty() {
            return;
        }
        let expired = pd.held.expire(self.clock.now());
        if expired.is_empty() {
            return;
        }
        for blocks in &expired {
            self.kv.free(blocks);
        }
        tracing::warn!(
            requests = expired.len(),
            "NIXL: freeing prefilled blocks no decoder read within the abort timeout"
        );
        self.shared.metrics.lock().pd.expired += expired.len() as u64;
        self.update_gauges();
    }

    /// Wall instant of the next held-block expiry.
    fn next_expiry_wall(&self) -> Option<Instant> {
        let at = self.pd.as_ref()?.held.next_expiry()?;
        Some(self.clock.wall_at(at))
    }

    /// A pull finished: the request joins the queue with its KV in place (or, after a
    /// failure, errors out or recomputes per the policy).
    fn on_xfer_done(&mut self, d: XferDone) {
        let now = self.clock.now();
        let Some(policy) = self.pd.as_ref().map(|p| p.cfg.failure_policy) else {
            return;
        };
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(d.slot).and_then(Option::as_mut) else {
            return;
        };
        if seq.id != d.id {
            return;
        }
        self.recving = self.recving.saturating_sub(1);
        match d.result {
            Ok(st) => {
                {
                    let mut m = self.shared.metrics.lock();
                    m.pd.xfer_time.observe(st.seconds);
                    m.pd.post_time.observe(st.post_seconds);
                    m.pd.bytes.observe(st.bytes as f64);
                    m.pd.descriptors.observe(st.descriptors as f64);
                }
                // vLLM: computed = all the request's blocks' tokens, capped at the prompt,
                // minus the last token (recomputed to sample the first output token).
                let len = seq.tokens.len();
                let mut computed = (seq.blocks.len() * bs).min(len);
                if computed == len {
                    computed -= 1;
                }
                seq.external_tokens = computed.saturating_sub(seq.num_computed);
                seq.num_computed = computed;
                let full = computed / bs;
                if full > seq.committed {
                    seq.ensure_hashes(full, self.root, bs, &mut self.scratch);
                    let lora = seq.lora.as_ref().map(|l| EventLora {
                        id: l.id,
                        name: &l.name,
                    });
                    self.kv.commit(
                        &seq.blocks,
                        &seq.hashes,
                        seq.committed,
                        full,
                        &seq.tokens,
                        lora,
                    );
                    seq.committed = full;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, ?policy, "NIXL: KV transfer failed");
                let mut m = self.shared.metrics.lock();
                m.pd.failed_transfers += 1;
                match policy {
                    LoadFailurePolicy::Fail => {
                        m.pd.errored += 1;
                        drop(m);
                        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                        self.finish(d.slot, FinishReason::Error, now, false);
                        self.update_gauges();
                        self.flush_events();
                        return;
                    }
                    // The blocks stay allocated; the prompt past the local hits is computed here.
                    LoadFailurePolicy::Recompute => m.pd.recomputed += 1,
                }
            }
        }
        if seq.tx.is_closed() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.finish(d.slot, FinishReason::Abort, now, false);
        } else {
            self.waiting.push_front(d.slot);
        }
        self.update_gauges();
        self.flush_events();
    }

    fn add(&mut self, req: NewRequest) {
        let extra = crate::kvcache::lora_key(req.lora.as_ref().map(|l| &*l.name));
        let (kv_reply, remote) = match req.kv {
            KvRequest::None => (None, None),
            KvRequest::RemoteDecode(tx) => (Some(tx), None),
            KvRequest::RemotePrefill(r) => (None, Some(r)),
        };
        let seq = Seq {
            id: req.id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            max_tokens: req.max_tokens,
            eos_at: req.eos_at,
            lora: req.lora,
            extra,
            salt: req.salt,
            seed: req.seed,
            hashes: Vec::new(),
            blocks: Vec::new(),
            num_computed: 0,
            committed: 0,
            cached_tokens: None,
            arrival: req.arrival,
            first_scheduled: None,
            first_token: None,
            last_token: req.arrival,
            tx: req.tx,
            lora_held: false,
            kv_reply,
            remote,
            external_tokens: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.seqs[s] = Some(seq);
                s
            }
            None => {
                self.seqs.push(Some(seq));
                self.seqs.len() - 1
            }
        };
        self.waiting.push_back(slot);
    }

    /// Builds the step's batch into `self.scheduled` and returns its shape.
    fn schedule(&mut self, now: f64) -> StepShape {
        self.scheduled.clear();
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut shape = StepShape::default();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let slot = self.running[i];
            let Some(seq) = self.seqs[slot].as_mut() else {
                self.running.remove(i);
                continue;
            };
            let n = (seq.tokens.len() - seq.num_computed).min(budget);
            let need = (seq.num_computed + n)
                .div_ceil(bs)
                .saturating_sub(seq.blocks.len());
            if self.kv.allocate(&mut seq.blocks, &[], need) {
                Self::account(&mut shape, seq, n);
                self.scheduled.push((slot, n));
                budget -= n;
                i += 1;
                continue;
            }
            // No room: preempt the newest running request and retry this one.
            preempted = true;
            let Some(victim) = self.running.pop() else {
                break;
            };
            self.preempt(victim);
            if victim == slot {
                break;
            }
        }

        if !preempted {
            let mut skipped: Vec<usize> = Vec::new();
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&slot) = self.waiting.front() else {
                    break;
                };
                let Some(seq) = self.seqs[slot].as_mut() else {
                    self.waiting.pop_front();
                    continue;
                };
                if seq.tx.is_closed() {
                    self.waiting.pop_front();
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    self.finish(slot, FinishReason::Abort, now, false);
                    continue;
                }
                if let Some(l) = &seq.lora
                    && !self.lora_running.contains_key(&l.id)
                    && self.lora_running.len() >= self.cfg.lora.max_loras
                {
                    self.waiting.pop_front();
                    skipped.push(slot);
                    continue;
                }
                if !seq.blocks.is_empty() {
                    // Its KV was read from a prefill replica (or the read failed and the rest
                    // is recomputed): the blocks are in place, it only needs scheduling.
                    let n = (seq.tokens.len() - seq.num_computed).min(budget);
                    self.waiting.pop_front();
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    if seq.cached_tokens.is_none() {
                        seq.cached_tokens = Some(seq.num_computed);
                        seq.first_scheduled = Some(now);
                    }
                    if let Some(l) = &seq.lora {
                        self.lora_running
                            .entry(l.id)
                            .or_insert_with(|| (l.name.clone(), 0))
                            .1 += 1;
                        seq.lora_held = true;
                    }
                    Self::account(&mut shape, seq, n);
                    self.running.push(slot);
                    self.scheduled.push((slot, n));
                    budget -= n;
                    continue;
                }
                if let Some(pd) = self.pd.as_ref()
                    && seq.remote.is_some()
                {
                    // Remote prefill (vLLM's NIXL connector): local prefix hits first, then
                    // blocks for the whole prompt; the rest is read from the prefill replica
                    // while the request waits outside the batch.
                    let num_tokens = seq.tokens.len();
                    let max_hit_blocks = (num_tokens - 1) / bs;
                    seq.ensure_hashes(max_hit_blocks, self.root, bs, &mut self.scratch);
                    let hit_blocks = self.kv.longest_prefix(&seq.hashes[..max_hit_blocks]);
                    let new_blocks = num_tokens.div_ceil(bs) - hit_blocks;
                    if !self
                        .kv
                        .allocate(&mut seq.blocks, &seq.hashes[..hit_blocks], new_blocks)
                    {
                        break;
                    }
                    self.waiting.pop_front();
                    let hit_tokens = hit_blocks * bs;
                    seq.num_computed = hit_tokens;
                    seq.committed = hit_blocks;
                    {
                        let mut m = self.shared.metrics.lock();
                        m.prefix_queries += num_tokens as u64;
                        m.prefix_hits += hit_tokens as u64;
                        m.pd.external_queries += num_tokens as u64;
                        m.pd.external_hits += (num_tokens - hit_tokens) as u64;
                    }
                    if let Some(remote) = seq.remote.take() {
                        self.recving += 1;
                        pd.puller.spawn_pull(slot, seq.id, remote, new_blocks);
                    }
                    continue;
                }
                let num_tokens = seq.tokens.len();
                let max_hit_blocks = (num_tokens - 1) / bs;
                seq.ensure_hashes(max_hit_blocks, self.root, bs, &mut self.scratch);
                let hit_blocks = self.kv.longest_prefix(&seq.hashes[..max_hit_blocks]);
                let hit_tokens = hit_blocks * bs;
                let n = (num_tokens - hit_tokens).min(budget);
                let new_blocks = (hit_tokens + n).div_ceil(bs) - hit_blocks;
                if !self
                    .kv
                    .allocate(&mut seq.blocks, &seq.hashes[..hit_blocks], new_blocks)
                {
                    break;
                }
                self.waiting.pop_front();
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                seq.num_computed = hit_tokens;
                seq.committed = hit_blocks;
                if seq.cached_tokens.is_none() {
                    seq.cached_tokens = Some(hit_tokens);
                    seq.first_scheduled = Some(now);
                    let mut m = self.shared.metrics.lock();
                    m.prefix_queries += num_tokens as u64;
                    m.prefix_hits += hit_tokens as u64;
                }
                if let Some(l) = &seq.lora {
                    self.lora_running
                        .entry(l.id)
                        .or_insert_with(|| (l.name.clone(), 0))
                        .1 += 1;
                    seq.lora_held = true;
                }
                Self::account(&mut shape, seq, n);
                self.running.push(slot);
                self.scheduled.push((slot, n));
                budget -= n;
            }
            for slot in skipped.into_iter().rev() {
                self.waiting.push_front(slot);
            }
        }
        shape
    }

    fn account(shape: &mut StepShape, seq: &Seq, n: usize) {
        let c = seq.num_computed;
        if n == 1 && c + 1 == seq.tokens.len() && seq.outputs() > 0 {
            shape.decode_seqs += 1;
            shape.decode_kv_tokens += (c + 1) as u64;
        } else {
            shape.prefill_tokens += n as u64;
            shape.prefill_attn_pairs += n as f64 * (c as f64 + n as f64 / 2.0);
        }
    }

    fn preempt(&mut self, slot: usize) {
        let Some(seq) = self.seqs[slot].as_mut() else {
            return;
        };
        self.kv.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.committed = 0;
        seq.external_tokens = 0;
        if seq.lora_held
            && let Some(l) = &seq.lora
        {
            Self::lora_release(&mut self.lora_running, l.id);
        }
        seq.lora_held = false;
        self.waiting.push_front(slot);
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.lock().preemptions += 1;
    }

    fn lora_release(map: &mut HashMap<i64, (Arc<str>, usize)>, id: i64) {
        if let Some(e) = map.get_mut(&id) {
            e.1 -= 1;
            if e.1 == 0 {
                map.remove(&id);
            }
        }
    }

    /// Applies a finished step. All bookkeeping (cache, metrics, finished requests) happens
    /// before the step's tokens are released to clients, so a client that has its last token
    /// always finds it accounted for in `/metrics`.
    fn complete_step(&mut self, end: f64, shape: &StepShape, lag: Duration) {
        let bs = self.cfg.block_size;
        let max_model_len = self.cfg.max_model_len;
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let mut emits: Vec<(usize, mpsc::UnboundedSender<Emit>, Emit)> = Vec::new();
        let mut generated = 0u64;
        let mut new_prompt_tokens = 0u64;
        let mut by_source = [0u64; 3];
        let mut ttfts: Vec<f64> = Vec::new();
        let mut itls: Vec<f64> = Vec::new();
        let scheduled = std::mem::take(&mut self.scheduled);
        for &(slot, n) in &scheduled {
            let Some(seq) = self.seqs[slot].as_mut() else {
                continue;
            };
            seq.num_computed += n;
            let full = seq.num_computed / bs;
            if full > seq.committed {
                seq.ensure_hashes(full, self.root, bs, &mut self.scratch);
                let lora = seq.lora.as_ref().map(|l| EventLora {
                    id: l.id,
                    name: &l.name,
                });
                self.kv.commit(
                    &seq.blocks,
                    &seq.hashes,
                    seq.committed,
                    full,
                    &seq.tokens,
                    lora,
                );
                seq.committed = full;
            }
            if seq.num_computed < seq.tokens.len() {
                continue; // still prefilling
            }
            let idx = seq.outputs();
            let tok = output_token(seq.seed, idx, self.vocab);
            seq.tokens.push(tok);
            generated += 1;
            match seq.first_token {
                None => {
                    seq.first_token = Some(end);
                    ttfts.push((end - seq.arrival).max(0.0));
                    new_prompt_tokens += seq.prompt_len as u64;
                    let cached = seq.cached_tokens.unwrap_or(0).min(seq.prompt_len);
                    let external = seq.external_tokens.min(cached);
                    by_source[0] += (seq.prompt_len - cached) as u64;
                    by_source[1] += (cached - external) as u64;
                    by_source[2] += external as u64;
                }
                Some(_) => itls.push((end - seq.last_token).max(0.0)),
            }
            seq.last_token = end;
            let outputs = idx + 1;
            let reason = if seq.eos_at == Some(outputs) {
                Some(FinishReason::Stop)
            } else if outputs >= seq.max_tokens || seq.tokens.len() >= max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            };
            let emit = match reason {
                None => Emit::Token(tok),
                Some(reason) => {
                    finished.push((slot, reason));
                    Emit::Last(
                        tok,
                        Finish {
                            reason,
                            prompt_tokens: seq.prompt_len,
                            completion_tokens: outputs,
                            cached_tokens: seq.cached_tokens.unwrap_or(0),
                        },
                    )
                }
            };
            emits.push((slot, seq.tx.clone(), emit));
        }
        self.scheduled = scheduled;
        {
            let mut m = self.shared.metrics.lock();
            m.generation_tokens += generated;
            m.prompt_tokens += new_prompt_tokens;
            for (total, n) in m.prompt_tokens_by_source.iter_mut().zip(by_source) {
                *total += n;
            }
            for t in ttfts {
                m.ttft.observe(t);
            }
            for t in itls {
                m.itl.observe(t);
            }
            m.iteration_tokens
                .observe((shape.prefill_tokens + shape.decode_seqs) as f64);
            m.steps += 1;
            let lag = lag.as_secs_f64();
            m.step_lag.observe(lag);
            m.lag_max = m.lag_max.max(lag);
        }
        for (slot, reason) in finished {
            self.finish(slot, reason, end, true);
        }
        let seqs = &self.seqs;
        self.running.retain(|&s| seqs[s].is_some());
        self.update_gauges();
        self.flush_events();

        // Release the tokens; a closed channel means the client went away.
        let mut gone = Vec::new();
        for (slot, tx, emit) in emits {
            if tx.send(emit).is_err() && matches!(emit, Emit::Token(_)) {
                gone.push(slot);
            }
        }
        if !gone.is_empty() {
            for slot in gone {
                self.finish(slot, FinishReason::Abort, end, true);
            }
            let seqs = &self.seqs;
            self.running.retain(|&s| seqs[s].is_some());
            self.update_gauges();
            self.flush_events();
        }
    }

    /// Ends a request; `notified` when its handler already got `Emit::Last`.
    fn finish(&mut self, slot: usize, reason: FinishReason, now: f64, notified: bool) {
        let Some(mut seq) = self.seqs[slot].take() else {
            return;
        };
        self.free_slots.push(slot);
        if let Some(reply) = seq.kv_reply.take() {
            // vLLM's NIXL `request_finished`: a length-capped prefill for a remote decoder
            // keeps its blocks and tells where to read them.
            let params = match self.pd.as_mut() {
                Some(pd) if reason == FinishReason::Length && !seq.blocks.is_empty() => {
                    let blocks = std::mem::take(&mut seq.blocks);
                    let request_id = format!("simreq-{}", seq.id);
                    let params = KvTransferParams {
                        do_remote_prefill: true,
                        do_remote_decode: false,
                        remote_block_ids: blocks.iter().map(|&b| u64::from(b)).collect(),
                        remote_engine_id: pd.engine_id.clone(),
                        remote_request_id: request_id.clone(),
                        remote_host: pd.side_host.clone(),
                        remote_port: pd.side_port,
                        tp_size: pd.cfg.transfer.links,
                    };
                    pd.held
                        .insert(request_id, blocks, now + pd.cfg.abort_timeout_s);
                    Some(params)
                }
                _ => None,
            };
            let _ = reply.send(params);
        }
        if let Some(remote) = seq.remote.take()
            && let Some(pd) = &self.pd
        {
            // Aborted before its transfer started: let the prefill replica free the blocks.
            pd.puller.spawn_release(remote);
        }
        self.kv.free(&seq.blocks);
        if seq.lora_held
            && let Some(l) = &seq.lora
        {
            Self::lora_release(&mut self.lora_running, l.id);
        }
        let outputs = seq.outputs();
        if !notified {
            let _ = seq.tx.send(Emit::Done(Finish {
                reason,
                prompt_tokens: seq.prompt_len,
                completion_tokens: outputs,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            }));
        }
        let mut m = self.shared.metrics.lock();
        m.record_finished(
            reason,
            now - seq.arrival,
            seq.first_scheduled.map(|t| t - seq.arrival),
            seq.first_scheduled.zip(seq.first_token).map(|(s, f)| f - s),
            seq.first_token.map(|f| now - f),
            seq.first_scheduled.map(|s| now - s),
            seq.prompt_len,
            outputs,
            seq.max_tokens,
        );
    }

    fn update_gauges(&mut self) {
        let lora_info = self.cfg.lora.enabled.then(|| {
            let mut running: Vec<&str> = self.lora_running.values().map(|(n, _)| &**n).collect();
            running.sort_unstable();
            let mut waiting: Vec<&str> = self
                .waiting
                .iter()
                .filter_map(|&s| self.seqs[s].as_ref()?.lora.as_ref().map(|l| &*l.name))
                .collect();
            waiting.sort_unstable();
            waiting.dedup();
            (running.join(","), waiting.join(","))
        });
        let mut m = self.shared.metrics.lock();
        m.running = self.running.len();
        m.waiting = self.waiting.len() + self.recving;
        m.kv_usage = self.kv.usage();
        m.evictions = self.kv.evictions();
        if let Some(pd) = &self.pd {
            m.pd.held_requests = pd.held.len();
            m.pd.held_blocks = pd.held.blocks();
        }
        if let Some((running, waiting)) = lora_info {
            m.lora_running = running;
            m.lora_waiting = waiting;
            m.lora_updated_unix = self.clock.unix_now();
        }
    }

    fn flush_events(&mut self) {
        let Some(p) = &self.publisher else {
            return;
        };
        let events = self.kv.take_events();
        if events.is_empty() {
            return;
        }
        p.publish(EventBatch {
            ts: self.clock.unix_now(),
            events,
            data_parallel_rank: Some(0),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tokens_are_deterministic_and_in_vocab() {
        let a: Vec<u32> = (0..100).map(|i| output_token(7, i, 32_000)).collect();
        let b: Vec<u32> = (0..100).map(|i| output_token(7, i, 32_000)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t < 32_000));
        assert_ne!(
            a,
            (0..100)
                .map(|i| output_token(8, i, 32_000))
                .collect::<Vec<_>>()
        );
        // Not constant.
        assert!(a.iter().any(|&t| t != a[0]));
    }
}
