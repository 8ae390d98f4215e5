//! The metric math on hand-made token timelines. Every expected value is worked out by hand in
//! the comments from inference-perf's definitions.

use llmsched_bench::metrics::{
    ChunkMark, RequestError, RequestRecord, StageLoad, SummaryOptions, summarize_requests,
};
use llmsched_bench::sse::Usage;

const EPS: f64 = 1e-9;

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < EPS, "{what}: got {got}, want {want}");
}

fn record(start: f64, end: f64, chunks: &[(f64, u32)], output: u64, input: u64) -> RequestRecord {
    RequestRecord {
        stage_id: 0,
        data_index: 0,
        session: None,
        scheduled_time: start,
        start_time: start,
        end_time: end,
        streamed: true,
        chunks: chunks.iter().map(|&(t, n)| ChunkMark::at(t, n)).collect(),
        input_tokens: input,
        output_tokens: output,
        usage: None,
        request_bytes: 100,
        invalid_chunks: 0,
        error: None,
    }
}

/// A: start 0, end 2; chunks at +0.5 (1 token), +1.0 (2 tokens), +1.5 (1 token); 4 output
///    tokens; 10 input tokens; no usage.
///    Token times 0.5, 1.0, 1.0, 1.5 → TTFT 0.5, TPOT (1.5 − 0.5)/3 = 1/3,
///    ITL gaps 0.5, 0, 0.5, NTPOT 2/4 = 0.5, latency 2.
/// B: start 1, end 2.5; chunks at +0.25, +0.75 (1 token each); usage prompt 20,
///    completion 2, cached 16.
///    TTFT 0.25, TPOT 0.5/1 = 0.5, ITL 0.5, NTPOT 1.5/2 = 0.75, latency 1.5.
/// C: failed with HTTP 503, start 2, end 3 (scheduled at 1.9).
/// D: non-streamed success, start 0.5, end 1.5, 5 output tokens, 7 input tokens:
///    NTPOT 1/5 = 0.2, no TTFT/TPOT/ITL.
fn sample() -> Vec<RequestRecord> {
    let a = record(0.0, 2.0, &[(0.5, 1), (1.0, 2), (1.5, 1)], 4, 10);
    let mut b = record(1.0, 2.5, &[(0.25, 1), (0.75, 1)], 2, 20);
    b.usage = Some(Usage {
        prompt_tokens: Some(20),
        completion_tokens: Some(2),
        cached_tokens: Some(16),
    });
    let mut c = record(2.0, 3.0, &[], 0, 0);
    c.scheduled_time = 1.9;
    c.error = Some(RequestError {
        error_type: "HTTP Error 503".into(),
        error_msg: r#"{"error":{"message":"overloaded"}}"#.into(),
    });
    let mut d = record(0.5, 1.5, &[], 5, 7);
    d.streamed = false;
    vec![a, b, c, d]
}

#[test]
fn latency_metrics_follow_inference_perf_definitions() {
    let s = summarize_requests(&sample(), &SummaryOptions::default(), None);
    let lat = &s.successes.latency;
    assert_eq!(s.successes.count, 3);
    assert_eq!(s.failures.count, 1);

    // Request latency over successes: [2, 1.5, 1].
    let rl = lat.request_latency.as_ref().expect("latency");
    assert_close(rl.mean, 1.5, "latency mean");
    assert_close(rl.min, 1.0, "latency min");
    assert_close(rl.max, 2.0, "latency max");
    assert_close(rl.median().expect("median"), 1.5, "latency median");
    // p90 of [1, 1.5, 2]: index 0.9 × 2 = 1.8 → 1.5 + 0.8 × 0.5 = 1.9.
    assert_close(rl.percentile(90.0).expect("p90"), 1.9, "latency p90");

    // TTFT only for streamed requests with more than one token time: [0.5, 0.25].
    let ttft = lat.time_to_first_token.as_ref().expect("ttft");
    assert_close(ttft.mean, 0.375, "ttft mean");
    assert_close(ttft.min, 0.25, "ttft min");

    // TPOT: [1/3, 0.5].
    let tpot = lat.time_per_output_token.as_ref().expect("tpot");
    assert_close(tpot.mean, (1.0 / 3.0 + 0.5) / 2.0, "tpot mean");

    // ITL pooled over requests: [0.5, 0, 0.5] from A and [0.5] from B.
    let itl = lat.inter_token_latency.as_ref().expect("itl");
    assert_close(itl.mean, 1.5 / 4.0, "itl mean");
    assert_close(itl.min, 0.0, "itl min (tokens of one chunk)");
    assert_close(itl.median().expect("median"), 0.5, "itl median");
    // p25 of [0, 0.5, 0.5, 0.5]: index 0.75 → 0 + 0.75 × 0.5 = 0.375.
    assert_close(itl.percentile(25.0).expect("p25"), 0.375, "itl p25");

    // NTPOT over all successes: [0.5, 0.75, 0.2].
    let ntpot = lat
        .normalized_time_per_output_token
        .as_ref()
        .expect("ntpot");
    assert_close(ntpot.mean, (0.5 + 0.75 + 0.2) / 3.0, "ntpot mean");
    assert_close(ntpot.min, 0.2, "ntpot min");
}

#[test]
fn throughput_uses_the_span_of_all_requests() {
    let s = summarize_requests(&sample(), &SummaryOptions::default(), None);
    // Span: min start 0, max end 3 (the failed request) → 3 s.
    assert_close(s.benchmark_time_seconds, 3.0, "span");
    let t = &s.successes.throughput;
    // Input 10 + 20 + 7 = 37, output 4 + 2 + 5 = 11, over 3 s.
    assert_close(t.input_tokens_per_sec, 37.0 / 3.0, "input tok/s");
    assert_close(t.output_tokens_per_sec, 11.0 / 3.0, "output tok/s");
    assert_close(t.total_tokens_per_sec, 48.0 / 3.0, "total tok/s");
    assert_close(t.requests_per_sec, 1.0, "req/s");
}

#[test]
fn tokens_cache_and_failures() {
    let s = summarize_requests(&sample(), &SummaryOptions::default(), None);
    let p = &s.successes.prompt_tokens;
    assert_close(p.total, 37.0, "prompt total");
    assert_close(p.cached.expect("cached"), 16.0, "cached");
    assert_close(p.uncached.expect("uncached"), 21.0, "uncached");
    assert_close(
        s.cached_prompt_ratio().expect("ratio"),
        16.0 / 37.0,
        "cached ratio",
    );
    // Server completion_tokens where usage exists (B: 2), else the client count (A: 4, D: 5).
    assert_close(s.successes.output_tokens.total, 11.0, "output_tokens total");
    assert_eq!(s.successes.token_count_mismatches, 0);

    let labels = &s.failures.by_label.0;
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].0, "503 - Service Unavailable");
    assert_eq!(labels[0].1.count, 1);
    assert_eq!(labels[0].1.messages[0].message, "overloaded");
    assert_close(
        s.failures.request_latency.as_ref().expect("lat").mean,
        1.0,
        "failed latency",
    );

    // Schedule delay: 0 for A, B, D and 2 − 1.9 = 0.1 for C.
    let delay = s.load_summary.schedule_delay.as_ref().expect("delay");
    assert_close(delay.max, 0.1, "schedule delay max");
    assert_close(delay.mean, 0.025, "schedule delay mean");
}

#[test]
fn stage_load_summary_uses_send_span() {
    let s = summarize_requests(
        &sample(),
        &SummaryOptions::default(),
        Some(StageLoad {
            rate: 2.0,
            concurrency: None,
        }),
    );
    let ls = &s.load_summary;
    assert_eq!(ls.count, 4);
    // Starts 0, 1, 2, 0.5 → send duration 2 → achieved 4 / 2 = 2.
    assert_close(ls.send_duration.expect("send"), 2.0, "send duration");
    assert_close(ls.achieved_rate.expect("achieved"), 2.0, "achieved rate");
    assert_eq!(ls.requested_rate, Some(2.0));
    assert_eq!(ls.concurrency, None);
}

#[test]
fn server_output_tokens_option_and_mismatches() {
    let mut recs = sample();
    // B's server says 3 tokens while its chunks carried 2: a mismatch, and with
    // use_server_output_tokens TPOT = 0.5 / (3 − 1) = 0.25 and NTPOT = 1.5 / 3 = 0.5.
    recs[1].usage = Some(Usage {
        prompt_tokens: Some(20),
        completion_tokens: Some(3),
        cached_tokens: Some(16),
    });
    let opts = SummaryOptions {
        use_server_output_tokens: true,
        ..SummaryOptions::default()
    };
    let s = summarize_requests(&recs, &opts, None);
    assert_eq!(s.successes.token_count_mismatches, 1);
    let tpot = s
        .successes
        .latency
        .time_per_output_token
        .as_ref()
        .expect("tpot");
    assert_close(tpot.max, 1.0 / 3.0, "A's TPOT stays 1/3");
    assert_close(tpot.min, 0.25, "B's TPOT with server count");
    let ntpot = s
        .successes
        .latency
        .normalized_time_per_output_token
        .as_ref()
        .expect("ntpot");
    assert_close(ntpot.mean, (0.5 + 0.5 + 0.2) / 3.0, "ntpot mean");
    // Output throughput follows the same count: 4 + 3 + 5 = 12 over 3 s.
    assert_close(
        s.successes.throughput.output_tokens_per_sec,
        4.0,
        "output tok/s",
    );
}

#[test]
fn single_token_and_empty_outputs() {
    // One token: no TTFT (needs more than one token time), NTPOT = latency.
    let one = record(0.0, 1.0, &[(0.4, 1)], 1, 3);
    // No output at all: NTPOT enters as 0.
    let none = record(0.0, 2.0, &[], 0, 3);
    let s = summarize_requests(&[one, none], &SummaryOptions::default(), None);
    assert!(s.successes.latency.time_to_first_token.is_none());
    assert!(s.successes.latency.time_per_output_token.is_none());
    assert!(s.successes.latency.inter_token_latency.is_none());
    let ntpot = s
        .successes
        .latency
        .normalized_time_per_output_token
        .as_ref()
        .expect("ntpot");
    assert_close(ntpot.min, 0.0, "zero-output NTPOT");
    assert_close(ntpot.max, 1.0, "one-token NTPOT");
}

#[test]
fn empty_and_all_failed_sets() {
    let empty = summarize_requests(&[], &SummaryOptions::default(), None);
    assert_eq!(empty.load_summary.count, 0);
    assert!(empty.successes.latency.request_latency.is_none());

    let mut failed = record(1.0, 4.0, &[], 0, 0);
    failed.error = Some(RequestError {
        error_type: "ClientConnectorError".into(),
        error_msg: "Cannot connect to host http://127.0.0.1:1: connection refused".into(),
    });
    let s = summarize_requests(&[failed], &SummaryOptions::default(), None);
    assert_eq!(s.successes.count, 0);
    assert_close(s.successes.throughput.requests_per_sec, 0.0, "no successes");
    assert_eq!(s.failures.by_label.0[0].0, "Connection Error");
    assert!(s.cached_prompt_ratio().is_none());
}

#[test]
fn custom_percentiles_are_used() {
    let opts = SummaryOptions {
        percentiles: vec![50.0, 99.0],
        ..SummaryOptions::default()
    };
    let s = summarize_requests(&sample(), &opts, None);
    let rl = s.successes.latency.request_latency.as_ref().expect("rl");
    assert_eq!(rl.percentiles.len(), 2);
    // p99 of [1, 1.5, 2]: index 1.98 → 1.5 + 0.98 × 0.5 = 1.99.
    assert_close(rl.percentile(99.0).expect("p99"), 1.99, "p99");
}
