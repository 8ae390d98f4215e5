//! One full scheduling decision — parse the body, hash the prompt and look up the prefix
//! index (data producer), filter/score/pick (scheduler) — for an 8k-token prompt
//! (32,000 characters) at 8, 100 and 1,000 endpoints.
//!
//! * `decision/load_only/N`: `queue-scorer` + `kv-cache-utilization-scorer` (weights 2, 2),
//!   parse included: the baseline.
//! * `decision/default/N`: the reference default (`queue` 2, `kv-cache-utilization` 2,
//!   `prefix-cache` 3), prefix index warm: every endpoint has served 4 other 8k prompts, the
//!   request's first 2,000 tokens (a system prompt) were served by 8 endpoints and the whole
//!   prompt by one.
//! * `decision/default_hot_prefix/N`: as above, but the system prompt was served by *every*
//!   endpoint (the worst case for the lookup: 32 blocks held by N endpoints).
//! * `component/*`: the parts on their own (parse, hash, record after the pick), and forming
//!   the candidate list with and without the endpoint health check the director applies
//!   (`candidates_all/N` vs `candidates_healthy/N`: its cost per request).
//!
//! Run: `cargo bench -p llmsched-plugins --bench scheduling` (times are the benchmark
//! thread's CPU time; `BENCH_CLOCK=wall` for wall-clock time).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion};
use llmsched_core::config::{ConfigSource, LoadedConfig, load};
use llmsched_core::cycle::CycleState;
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointMetrics};
use llmsched_core::plugin::{Candidate, ParseOutcome};
use llmsched_core::registry::PluginHandle;
use llmsched_core::request::{Headers, InferenceRequest};
use llmsched_core::scheduler::{ProfileRunResult, SchedulingResult};

const LOAD_ONLY: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 2\n  - pluginRef: kv-cache-utilization-scorer\n    weight: 2\n";

const WORDS: [&str; 16] = [
    "the",
    "model",
    "server",
    "cache",
    "prefix",
    "token",
    "request",
    "latency",
    "router",
    "block",
    "endpoint",
    "queue",
    "prompt",
    "schedule",
    "gateway",
    "inference",
];

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Roughly `chars` characters of words.
    fn text(&mut self, chars: usize) -> String {
        let mut s = String::with_capacity(chars + 16);
        while s.len() < chars {
            s.push_str(WORDS[(self.next() % 16) as usize]);
            s.push(' ');
        }
        s.truncate(chars);
        s
    }
}

fn endpoints(n: u32) -> Vec<Arc<Endpoint>> {
    let mut rng = Lcg(n as u64);
    (0..n)
        .map(|i| {
            let meta = EndpointMeta {
                name: format!("pod-{i}"),
                address: IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1)),
                port: 8000,
                labels: Default::default(),
            };
            let e = Arc::new(Endpoint::new(EndpointId(i), meta));
            e.set_metrics(EndpointMetrics {
                waiting_queue_size: (rng.next() % 8) as u32,
                running_requests: (rng.next() % 32) as u32,
                kv_cache_usage: (rng.next() % 90) as f64 / 100.0,
                // Far in the future so the metrics stay fresh for the whole run.
                updated_at: Some(Instant::now() + Duration::from_secs(3600)),
                ..Default::default()
            });
            e
        })
        .collect()
}

fn body(prompt: &str) -> Bytes {
    let v = serde_json::json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "prompt": prompt,
        "max_tokens": 128,
        "stream": true,
        "temperature": 0.7,
    });
    Bytes::from(serde_json::to_vec(&v).expect("serializable"))
}

fn headers() -> Headers {
    [
        (":path", "/v1/completions"),
        ("content-type", "application/json"),
        ("x-request-id", "bench"),
    ]
    .into_iter()
    .collect()
}

struct Setup {
    cfg: LoadedConfig,
    eps: Vec<Arc<Endpoint>>,
    body: Bytes,
    headers: Headers,
}

impl Setup {
    fn new(config: Option<&str>, n: u32, hot_prefix: bool) -> Self {
        let registry = llmsched_plugins::default_registry();
        let handle = PluginHandle::default();
        let cfg = match config {
            Some(text) => load(text, ConfigSource::Text, &registry, &handle),
            None => llmsched_core::config::load_default(&registry, &handle),
        }
        .expect("bench config loads");
        let eps = endpoints(n);
        let mut rng = Lcg(7);
        let system = rng.text(8_000);
        let prompt = format!("{system}{}", rng.text(24_000));
        let s = Setup {
            cfg,
            eps,
            body: body(&prompt),
            headers: headers(),
        };
        if !s.cfg.data_producers.is_empty() {
            // Warm the index through the real pre-request hooks.
            for (i, e) in s.eps.iter().enumerate() {
                for _ in 0..4 {
                    s.record(&body(&rng.text(32_000)), e);
                }
                if hot_prefix || i < 8 {
                    s.record(&body(&format!("{system}{}", rng.text(24_000))), e);
                }
            }
            s.record(&s.body, &s.eps[s.eps.len() / 2]);
        }
        s
    }

    fn request(&self, body: &Bytes) -> InferenceRequest {
        let ParseOutcome::Parsed(b) = self
            .cfg
            .parser
            .parse_request(body.clone(), &self.headers)
            .expect("bench body parses")
        else {
            panic!("parser skipped the body")
        };
        InferenceRequest::new("bench", self.headers.clone(), Some(b))
    }

    fn produce(&self, req: &InferenceRequest, cands: &[Candidate<'_>]) -> CycleState {
        let mut cycle = CycleState::new();
        for (p, _) in &self.cfg.data_producers {
            p.produce(req, &mut cycle, cands);
        }
        cycle
    }

    fn record(&self, body: &Bytes, target: &Arc<Endpoint>) {
        let req = self.request(body);
        let cands: Vec<Candidate<'_>> = self.eps.iter().collect();
        let cycle = self.produce(&req, &cands);
        let result = SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![target.clone()],
                },
            )],
        };
        for (p, _) in &self.cfg.pre_request {
            p.pre_request(&req, &cycle, &result, &mut Vec::new());
            p.after_dispatch(&req, &cycle, &result);
        }
    }

    /// Parse + produce + schedule: one decision.
    fn decide(&self, cands: &[Candidate<'_>]) -> SchedulingResult {
        let req = self.request(&self.body);
        let cycle = self.produce(&req, cands);
        self.cfg
            .scheduler
            .schedule(&req, &cycle, cands)
            .expect("scheduling succeeds")
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let mut g = c.benchmark_group("decision");
    for n in [8u32, 100, 1000] {
        for (label, config, hot) in [
            ("load_only", Some(LOAD_ONLY), false),
            ("default", None, false),
            ("default_hot_prefix", None, true),
        ] {
            let s = Setup::new(config, n, hot);
            let cands: Vec<Candidate<'_>> = s.eps.iter().collect();
            // Sanity: the index knows the endpoint holding the whole prompt.
            if config.is_none() {
                let req = s.request(&s.body);
                let cycle = s.produce(&req, &cands);
                let m = cycle
                    .get::<llmsched_core::PrefixCacheMatch>()
                    .expect("prefix match produced");
                assert_eq!(m.total_blocks, 256);
                assert_eq!(m.matched(EndpointId(n / 2)), 256.0);
                assert!(m.matched_blocks.len() >= if hot { n as usize } else { 8.min(n as usize) });
            }
            g.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| black_box(s.decide(black_box(&cands))))
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("component");
    let s = Setup::new(None, 100, false);
    let cands: Vec<Candidate<'_>> = s.eps.iter().collect();
    let prompt_json = serde_json::to_vec(&Lcg(5).text(32_000)).expect("serializable");
    g.bench_function("baseline_serde_json_string_32k", |b| {
        b.iter(|| black_box(serde_json::from_slice::<String>(black_box(&prompt_json))))
    });
    g.bench_function("parse_openai_completions_8k", |b| {
        b.iter(|| black_box(s.request(black_box(&s.body))))
    });
    let chat = {
        let msgs = serde_json::json!([
            {"role": "system", "content": Lcg(3).text(8_000)},
            {"role": "user", "content": [{"type": "text", "text": Lcg(4).text(24_000)}]},
        ]);
        Bytes::from(
            serde_json::to_vec(
                &serde_json::json!({"model": "m", "messages": msgs, "stream": true}),
            )
            .expect("serializable"),
        )
    };
    let chat_headers: Headers = [(":path", "/v1/chat/completions")].into_iter().collect();
    g.bench_function("parse_openai_chat_8k", |b| {
        b.iter(|| {
            black_box(
                s.cfg
                    .parser
                    .parse_request(black_box(chat.clone()), &chat_headers),
            )
        })
    });
    let req = s.request(&s.body);
    g.bench_function("hash_8k_256_blocks", |b| {
        let text = req.prompt().prefix_text().expect("text prompt");
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            let seed = llmsched_plugins::prefix::hashing::seed_hash(&req.target_model, None);
            llmsched_plugins::prefix::hashing::hash_blocks(
                seed,
                text.as_bytes(),
                64,
                256,
                &mut out,
            );
            black_box(out.len())
        })
    });
    g.bench_function("produce_8k_100_endpoints", |b| {
        b.iter(|| black_box(s.produce(black_box(&req), &cands)))
    });
    let cycle = s.produce(&req, &cands);
    let result = s.decide(&cands);
    g.bench_function("pre_request_record_8k", |b| {
        b.iter(|| {
            for (p, _) in &s.cfg.pre_request {
                p.pre_request(&req, &cycle, &result, &mut Vec::new());
                p.after_dispatch(&req, &cycle, &result);
            }
        })
    });
    let policy = llmsched_core::health::HealthPolicy::default();
    for n in [8u32, 100, 1000] {
        let eps = endpoints(n);
        g.bench_with_input(BenchmarkId::new("candidates_all", n), &n, |b, _| {
            b.iter(|| {
                let cands: Vec<Candidate<'_>> = black_box(&eps).iter().collect();
                black_box(cands.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("candidates_healthy", n), &n, |b, _| {
            b.iter(|| {
                let now = llmsched_core::health::clock_ms(Instant::now());
                let cands: Vec<Candidate<'_>> = black_box(&eps)
                    .iter()
                    .filter(|e| e.is_routable_at(now, &policy))
                    .collect();
                black_box(cands.len())
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

fn main() {
    llmsched_benchkit::run(config(), &Benches);
}

/// The benchmarks of this file.
struct Benches;

impl llmsched_benchkit::Suite for Benches {
    fn run<M: Measurement>(&self, c: &mut Criterion<M>) {
        bench(c);
    }
}
