//! Per-chunk cost of the streaming path (SSE line splitting, JSON chunk decoding, word
//! counting) and of summarizing a run.
//!
//! `cargo bench -p llmsched-bench --bench sse_parser`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmsched_bench::metrics::{ChunkMark, RequestRecord, SummaryOptions, summarize_requests};
use llmsched_bench::sse::{SseData, SseLines, parse_chunk};
use llmsched_tokenizer::SimTokenizer;

const CHUNKS: usize = 1000;

fn completion_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"cmpl-42\",\"object\":\"text_completion\",\"created\":1760000000,\"model\":\"Qwen/Qwen3-32B\",\
         \"choices\":[{{\"index\":0,\"text\":\" w{i}\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}}],\"usage\":null}}\n\n"
    )
}

fn consume(frames: &[Vec<u8>]) -> u64 {
    let mut lines = SseLines::new();
    let mut tokens = 0u64;
    for f in frames {
        lines.feed(f, |d| {
            if let SseData::Payload(p) = d
                && let Ok(c) = parse_chunk(p)
                && let Some(t) = c.text
            {
                tokens += SimTokenizer::count(&t) as u64;
            }
        });
    }
    tokens
}

fn sse(c: &mut Criterion) {
    let events: Vec<String> = (0..CHUNKS).map(completion_event).collect();
    let one_per_frame: Vec<Vec<u8>> = events.iter().map(|e| e.as_bytes().to_vec()).collect();
    let coalesced = vec![events.concat().into_bytes()];
    // Frames cut at arbitrary points (every 61 bytes), so lines span frames.
    let split: Vec<Vec<u8>> = events
        .concat()
        .into_bytes()
        .chunks(61)
        .map(<[u8]>::to_vec)
        .collect();

    let mut g = c.benchmark_group("sse_stream");
    g.throughput(Throughput::Elements(CHUNKS as u64));
    g.bench_function("one_event_per_frame", |b| {
        b.iter(|| black_box(consume(black_box(&one_per_frame))))
    });
    g.bench_function("all_events_in_one_frame", |b| {
        b.iter(|| black_box(consume(black_box(&coalesced))))
    });
    g.bench_function("frames_of_61_bytes", |b| {
        b.iter(|| black_box(consume(black_box(&split))))
    });
    g.finish();
}

fn summarize(c: &mut Criterion) {
    let records: Vec<RequestRecord> = (0..10_000)
        .map(|i| {
            let start = i as f64 * 0.01;
            RequestRecord {
                stage_id: 0,
                data_index: i,
                session: None,
                scheduled_time: start,
                start_time: start,
                end_time: start + 2.0,
                streamed: true,
                chunks: (0..100)
                    .map(|k| ChunkMark::at(0.1 + 0.019 * f64::from(k), 1))
                    .collect(),
                input_tokens: 7200,
                output_tokens: 100,
                usage: None,
                request_bytes: 36_000,
                invalid_chunks: 0,
                error: None,
            }
        })
        .collect();
    let opts = SummaryOptions::default();
    let mut g = c.benchmark_group("summarize");
    g.sample_size(10);
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("10k_requests_100_tokens", |b| {
        b.iter(|| black_box(summarize_requests(black_box(&records), &opts, None)))
    });
    g.finish();
}

criterion_group!(benches, sse, summarize);
criterion_main!(benches);
