//! A closed-loop ext_proc load generator: drives running `llmsched epp` processes the way
//! Envoy's `FULL_DUPLEX_STREAMED` filter does (request headers, the body in 16 KiB chunks,
//! the routing answer read to its end, then a short streamed response read back, then the
//! stream closed, so each request is a whole lifecycle: decision, in-flight accounting,
//! completion) and counts the scheduling decisions per second.
//!
//! With several `--epp` addresses the streams are spread over them round robin (one HTTP/2
//! connection per EPP, as Envoy holds one per upstream host), so the figure is the
//! replicas' aggregate. Prompts come from `--groups` shared prefixes of `--prefix-kb` KB
//! each plus a unique question, so the prefix index (and, between active-active replicas,
//! the sync) has real work.
//!
//! ```text
//! cargo run --release -p llmsched-extproc --example decision_load -- \
//!   --epp 127.0.0.1:9002[,127.0.0.1:9102,...] [--concurrency 32] [--seconds 10]
//!   [--warmup-seconds 2] [--prefix-kb 6] [--groups 40] [--model NAME]
//! ```
//!
//! Prints one JSON line: decisions, errors, seconds, decisions_per_sec, p50/p99 decision
//! latency (ms: from the first request message to the routing answer), per-EPP decisions,
//! and the generator's own CPU seconds (the machine is shared: the EPPs' CPU is read from
//! outside, see `scripts/bench-ha-decisions.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use llmsched_extproc::testing::{
    body_msg, headers_msg, is_request_headers, metadata_destination, request_body_chunk,
    response_body_chunk, response_body_msg, response_headers_msg,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

const ENVOY_CHUNK: usize = 16 * 1024;

struct Opts {
    epps: Vec<String>,
    concurrency: usize,
    seconds: f64,
    warmup: f64,
    prefix_kb: usize,
    groups: usize,
    model: String,
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "decision_load: {msg}\nusage: decision_load --epp HOST:PORT[,HOST:PORT...] [--concurrency N] [--seconds S] [--warmup-seconds S] [--prefix-kb K] [--groups G] [--model NAME]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        epps: Vec::new(),
        concurrency: 32,
        seconds: 10.0,
        warmup: 2.0,
        prefix_kb: 6,
        groups: 40,
        model: "Qwen/Qwen3-32B".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        let num = |v: String, what: &str| -> f64 {
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => x,
                _ => usage(&format!("{what}: not a non-negative number: '{v}'")),
            }
        };
        match a.as_str() {
            "--epp" => {
                o.epps = val()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--concurrency" => o.concurrency = num(val(), "--concurrency") as usize,
            "--seconds" => o.seconds = num(val(), "--seconds"),
            "--warmup-seconds" => o.warmup = num(val(), "--warmup-seconds"),
            "--prefix-kb" => o.prefix_kb = num(val(), "--prefix-kb") as usize,
            "--groups" => o.groups = num(val(), "--groups") as usize,
            "--model" => o.model = val(),
            "--bench" => {} // cargo bench/run may pass it
            other => usage(&format!("unknown argument '{other}'")),
        }
    }
    if o.epps.is_empty() {
        usage("--epp is required");
    }
    if o.concurrency == 0 || o.groups == 0 || o.seconds <= 0.0 {
        usage("--concurrency, --groups and --seconds must be positive");
    }
    o
}

/// A deterministic pseudo-random word stream (xorshift), so runs are comparable.
fn words(mut seed: u64, bytes: usize) -> String {
    const W: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut s = String::with_capacity(bytes + 16);
    seed |= 1;
    while s.len() < bytes {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        s.push_str(W[(seed % 16) as usize]);
        s.push(' ');
    }
    s
}

fn body(o: &Opts, prefixes: &[String], n: u64) -> Vec<u8> {
    let g = (n % prefixes.len() as u64) as usize;
    let prompt = format!(
        "{}{}",
        prefixes[g],
        words(n.wrapping_mul(0x9E37_79B9) + 7, 1200)
    );
    serde_json::json!({
        "model": o.model,
        "prompt": prompt,
        "max_tokens": 100,
        "stream": true,
    })
    .to_string()
    .into_bytes()
}

fn sse(model: &str) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\" w{i}\",\"finish_reason\":null}}]}}\n\n").into_bytes())
        .collect();
    out.push(format!("data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":2000,\"completion_tokens\":4,\"total_tokens\":2004}}}}\n\ndata: [DONE]\n\n").into_bytes());
    out
}

/// One whole request lifecycle on one stream. Returns the decision latency and the
/// destination, or why it failed.
async fn one(
    client: &mut ExternalProcessorClient<Channel>,
    body: &[u8],
    response: &[Vec<u8>],
) -> Result<(Duration, String), String> {
    let (tx, rx) = mpsc::channel::<ProcessingRequest>(64);
    let start = Instant::now();
    let mut resp = client
        .process(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("open: {}: {}", s.code(), s.message()))?
        .into_inner();
    let send = |m: ProcessingRequest| {
        let tx = tx.clone();
        async move { tx.send(m).await.map_err(|_| "stream closed".to_string()) }
    };
    let headers = [
        (":method", "POST"),
        (":path", "/v1/completions"),
        (":authority", "llm"),
        ("content-type", "application/json"),
    ];
    send(headers_msg(&headers, false)).await?;
    let n = body.len().div_ceil(ENVOY_CHUNK).max(1);
    for (i, c) in body.chunks(ENVOY_CHUNK).enumerate() {
        send(body_msg(c, i + 1 == n)).await?;
    }
    let mut next = async || match resp.message().await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("stream ended early".to_string()),
        Err(s) => Err(format!("{}: {}", s.code(), s.message())),
    };
    let mut dest = None;
    let mut latency = None;
    // The routing answer (headers) and the re-chunked request body.
    loop {
        let m = next().await?;
        if is_request_headers(&m) {
            latency = Some(start.elapsed());
            dest = metadata_destination(&m);
        }
        if let Some((_, true)) = request_body_chunk(&m) {
            break;
        }
        if m.response.is_none() {
            return Err("empty response".into());
        }
    }
    let latency = latency.ok_or("no headers response")?;
    let dest = dest.ok_or("no destination in the routing answer")?;
    send(response_headers_msg(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))
    .await?;
    for (i, c) in response.iter().enumerate() {
        send(response_body_msg(c, i + 1 == response.len())).await?;
    }
    loop {
        let m = next().await?;
        if let Some((_, true)) = response_body_chunk(&m) {
            break;
        }
    }
    drop(tx);
    while let Ok(Some(_)) = resp.message().await {}
    Ok((latency, dest))
}

/// This process's CPU seconds (every thread), from /proc (clock ticks of 1/100 s).
fn process_cpu() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // After the comm field: state is index 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = Arc::new(parse());
    let prefixes: Arc<Vec<String>> = Arc::new(
        (0..o.groups)
            .map(|g| words(g as u64 * 7919 + 1, o.prefix_kb * 1024))
            .collect(),
    );
    let response = Arc::new(sse(&o.model));
    let mut clients = Vec::new();
    for a in &o.epps {
        let ch = Endpoint::from_shared(format!("http://{a}"))
            .unwrap_or_else(|e| usage(&format!("--epp {a}: {e}")))
            .connect()
            .await
            .unwrap_or_else(|e| {
                eprintln!("decision_load: cannot connect to {a}: {e}");
                std::process::exit(1)
            });
        clients.push(ExternalProcessorClient::new(ch).max_decoding_message_size(64 << 20));
    }
    let counter = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let mut client = clients[w % clients.len()].clone();
        let (o, prefixes, response) = (o.clone(), prefixes.clone(), response.clone());
        let (counter, measuring, stop) = (counter.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<f64> = Vec::new();
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let b = body(&o, &prefixes, n);
                let r = one(&mut client, &b, &response).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Ok((l, _)) => {
                        ok += 1;
                        lat.push(l.as_secs_f64() * 1e3);
                    }
                    Err(e) => {
                        errors += 1;
                        last_error = Some(e);
                    }
                }
            }
            (w % o.epps.len(), ok, errors, lat, last_error)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(o.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let (t0, cpu0) = (Instant::now(), process_cpu());
    tokio::time::sleep(Duration::from_secs_f64(o.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (wall, cpu1) = (t0.elapsed().as_secs_f64(), process_cpu());
    let mut per_epp = vec![0u64; o.epps.len()];
    let (mut ok, mut errors, mut lat, mut last_error) = (0u64, 0u64, Vec::new(), None);
    for t in tasks {
        let (i, k, e, l, le) = t.await.unwrap();
        per_epp[i] += k;
        ok += k;
        errors += e;
        lat.extend(l);
        last_error = last_error.or(le);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    // Requests finishing after the stop are counted (the loop checks the flag before the
    // next one); the wall time covers them only approximately, so count per measured second.
    println!(
        "{}",
        serde_json::json!({
            "epps": o.epps,
            "concurrency": o.concurrency,
            "decisions": ok,
            "errors": errors,
            "last_error": last_error,
            "seconds": wall,
            "decisions_per_sec": ok as f64 / wall,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
            "per_epp": per_epp,
            "generator_cpu_seconds": cpu1 - cpu0,
        })
    );
}
