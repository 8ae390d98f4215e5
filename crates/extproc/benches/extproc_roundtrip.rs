//! One ext_proc round trip over a real loopback gRPC connection (plaintext): a new stream,
//! request headers, the body in Envoy-sized chunks (16 KiB), then the routing answer
//! (headers response + re-chunked body) read to its end of stream, for a small and a ~30 KB
//! body. The same-run baseline is the bare `Director::route` call on the same body, so the
//! ratio shows what the transport (gRPC, protobuf, buffering, chunking) adds; a header-only
//! round trip (no parsing or scheduling) shows the transport's floor.
//!
//! `extproc_response/*` adds the response phase to the round trip, as Envoy drives it:
//! response headers, then the body chunks, every answer read to the body's end of stream:
//! an SSE stream of 64 events (each its own chunk), the same with the model name rewritten
//! back (`x-llm-d-model-name-rewrite`), and a 256 KB JSON response in 16 KiB chunks (held to
//! its end, then re-chunked).
//!
//! Measured in CPU time of the whole process (client, server and runtime threads; the
//! machine is shared), wall-clock time with `BENCH_CLOCK=wall`. With `BENCH_ITERS=N` each
//! case (or those matching the first argument) runs N times without criterion, for
//! `valgrind --tool=callgrind` instruction counts (see `llmsched_benchkit::run_counted`).
//!
//! `cargo bench -p llmsched-extproc --bench extproc_roundtrip`

use std::sync::Arc;

use criterion::Criterion;
use criterion::measurement::Measurement;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, body_mutation,
    processing_request, processing_response,
};
use llmsched_benchkit::{
    Case, Suite, bench_cases, config, iterations_requested, run_counted, run_process,
};
use llmsched_director::testing::{
    completion_body, endpoints, load_config, post_headers, set_queue,
};
use llmsched_director::{Director, IncomingRequest};
use llmsched_extproc::{ExtProcOptions, serve_ext_proc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n";
const ENVOY_CHUNK: usize = 16 * 1024;

fn header_map<'a>(h: impl Iterator<Item = (&'a str, &'a str)>) -> HeaderMap {
    HeaderMap {
        headers: h
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    }
}

fn headers_msg(end_of_stream: bool) -> ProcessingRequest {
    headers_msg_with(end_of_stream, &[])
}

fn headers_msg_with(end_of_stream: bool, extra: &[(&str, &str)]) -> ProcessingRequest {
    let h = post_headers("/v1/completions");
    let all = h.iter().chain(extra.iter().copied());
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(header_map(all)),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn response_headers_msg(content_type: &str) -> ProcessingRequest {
    let h = [(":status", "200"), ("content-type", content_type)];
    ProcessingRequest {
        request: Some(processing_request::Request::ResponseHeaders(HttpHeaders {
            headers: Some(header_map(h.into_iter())),
            end_of_stream: false,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn response_body_msgs(chunks: &[Vec<u8>]) -> Vec<ProcessingRequest> {
    let n = chunks.len();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| ProcessingRequest {
            request: Some(processing_request::Request::ResponseBody(HttpBody {
                body: c.clone(),
                end_of_stream: i + 1 == n,
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect()
}

/// An SSE completion stream of `events` events answered as `model`, one chunk per event
/// (the last one carries usage and `[DONE]`).
fn sse_chunks(model: &str, events: usize) -> Vec<Vec<u8>> {
    (0..events)
        .map(|i| {
            let mut e = format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\" word{i}\",\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            );
            if i + 1 == events {
                e.push_str(&format!("data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n", 12 + events));
            }
            e.into_bytes()
        })
        .collect()
}

/// A non-streaming completion of about `size` bytes answered as `model`, in `chunk`-byte
/// pieces.
fn json_chunks(model: &str, size: usize, chunk: usize) -> Vec<Vec<u8>> {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    let body = format!(
        "{{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{}\",\"finish_reason\":\"length\"}}],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":4000,\"total_tokens\":4012}}}}",
        &text[..size]
    );
    body.as_bytes().chunks(chunk).map(<[u8]>::to_vec).collect()
}

/// The body forwarded in one body response (request or response direction), if it is one.
fn streamed_body(m: &ProcessingResponse) -> Option<(usize, bool)> {
    let b = match &m.response {
        Some(processing_response::Response::RequestBody(b))
        | Some(processing_response::Response::ResponseBody(b)) => b,
        _ => return None,
    };
    match b
        .response
        .as_ref()
        .and_then(|c| c.body_mutation.as_ref())
        .and_then(|bm| bm.mutation.as_ref())
    {
        Some(body_mutation::Mutation::StreamedResponse(s)) => Some((s.body.len(), s.end_of_stream)),
        _ => None,
    }
}

async fn next(resp: &mut tonic::Streaming<ProcessingResponse>) -> ProcessingResponse {
    match resp.message().await {
        Ok(Some(m)) => m,
        other => panic!("unexpected end: {other:?}"),
    }
}

/// Reads body responses until one has end of stream; the bytes forwarded.
async fn read_body(resp: &mut tonic::Streaming<ProcessingResponse>) -> usize {
    let mut forwarded = 0;
    loop {
        let m = next(resp).await;
        if let Some((n, eos)) = streamed_body(&m) {
            forwarded += n;
            if eos {
                return forwarded;
            }
        }
    }
}

fn body_msgs(body: &[u8]) -> Vec<ProcessingRequest> {
    let n = body.len().div_ceil(ENVOY_CHUNK);
    body.chunks(ENVOY_CHUNK)
        .enumerate()
        .map(|(i, c)| ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: c.to_vec(),
                end_of_stream: i + 1 == n,
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect()
}

/// Half-closes the request side and reads the stream to its end, as Envoy ends a stream
/// (dropping it half-way would make the server count a reset stream per iteration, and h2
/// sends GOAWAY after 1,024 of them).
async fn close(
    tx: mpsc::Sender<ProcessingRequest>,
    mut resp: tonic::Streaming<ProcessingResponse>,
) {
    drop(tx);
    loop {
        match resp.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => panic!("stream failed: {e}"),
        }
    }
}

async fn round_trip(
    mut client: ExternalProcessorClient<tonic::transport::Channel>,
    msgs: &[ProcessingRequest],
) -> usize {
    let (tx, rx) = mpsc::channel(msgs.len() + 1);
    for m in msgs {
        // Capacity is sufficient: never blocks.
        let _ = tx.try_send(m.clone());
    }
    let mut resp = match client.process(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("process failed: {e}"),
    };
    let _ = next(&mut resp).await;
    // Header-only request: the headers response is the whole answer.
    let forwarded = if msgs.len() == 1 {
        0
    } else {
        read_body(&mut resp).await
    };
    close(tx, resp).await;
    forwarded
}

/// A whole exchange: the request (headers + body) routed, then the response (headers +
/// body) passed back. Returns the response bytes forwarded.
async fn exchange(
    mut client: ExternalProcessorClient<tonic::transport::Channel>,
    request: &[ProcessingRequest],
    response: &[ProcessingRequest],
) -> usize {
    let (tx, rx) = mpsc::channel(request.len() + response.len() + 1);
    for m in request {
        // Capacity is sufficient: never blocks.
        let _ = tx.try_send(m.clone());
    }
    let mut resp = match client.process(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("process failed: {e}"),
    };
    // The routing answer: headers response, then the request body.
    let _ = next(&mut resp).await;
    read_body(&mut resp).await;
    let _ = tx.try_send(response[0].clone());
    let _ = next(&mut resp).await;
    for m in &response[1..] {
        let _ = tx.try_send(m.clone());
    }
    let n = read_body(&mut resp).await;
    close(tx, resp).await;
    n
}

/// The EPP serving ext_proc on loopback and a client connected to it.
struct Fixture {
    rt: tokio::runtime::Runtime,
    director: Arc<Director>,
    client: ExternalProcessorClient<tonic::transport::Channel>,
    shutdown: CancellationToken,
}

impl Fixture {
    fn start() -> Fixture {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        };
        let eps = endpoints(8);
        for (i, e) in eps.0.endpoints.iter().enumerate() {
            set_queue(e, i as u32 % 3);
            // Fresh for the whole run, as a scraped pool is (metrics older than the staleness
            // threshold would make every endpoint unhealthy and route fail-open).
            let mut m = llmsched_core::endpoint::EndpointMetrics::clone(&e.metrics());
            m.updated_at = Some(std::time::Instant::now() + std::time::Duration::from_secs(3600));
            e.set_metrics(m);
        }
        let config = match load_config(CONFIG) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let director = Arc::new(Director::builder(config, eps).build());
        let shutdown = CancellationToken::new();
        let client = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(serve_ext_proc(
                listener,
                director.clone(),
                None,
                None,
                ExtProcOptions::default(),
                shutdown.clone(),
            ));
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect");
            ExternalProcessorClient::new(ch)
        });
        Fixture {
            rt,
            director,
            client,
            shutdown,
        }
    }

    fn cases(&self) -> Vec<Case<'_>> {
        let rt = &self.rt;
        let small = completion_body(
            "meta-llama/Llama-3.1-8B-Instruct",
            "Say hello in French.",
            false,
        );
        let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(680);
        let large = completion_body("meta-llama/Llama-3.1-8B-Instruct", &prompt, false);
        let mut cases = Vec::new();
        // The transport's floor: a header-only request (random endpoint, no parsing).
        let header_only = vec![headers_msg(true)];
        let client = self.client.clone();
        cases.push(Case {
            group: "extproc",
            name: "grpc_round_trip/header_only".into(),
            bytes: None,
            run: Box::new(move || rt.block_on(round_trip(client.clone(), &header_only))),
        });
        for (name, body) in [("small", small), ("30KB", large)] {
            let mut msgs = vec![headers_msg(false)];
            msgs.extend(body_msgs(&body));
            let client = self.client.clone();
            cases.push(Case {
                group: "extproc",
                name: format!("grpc_round_trip/{name}"),
                bytes: Some(body.len() as u64),
                run: Box::new(move || rt.block_on(round_trip(client.clone(), &msgs))),
            });
            let director = self.director.clone();
            cases.push(Case {
                group: "extproc",
                name: format!("director_route/{name}"),
                bytes: Some(body.len() as u64),
                run: Box::new(move || {
                    rt.block_on(async {
                        let r = director
                            .route(IncomingRequest::new(
                                post_headers("/v1/completions"),
                                body.clone(),
                            ))
                            .await;
                        match r {
                            Ok(r) => r.forward_body().len(),
                            Err(e) => panic!("{e}"),
                        }
                    })
                }),
            });
        }

        // The response phase.
        let model = "meta-llama/Llama-3.1-8B-Instruct";
        let target = "llama-adapter";
        let request = |stream: bool, rewrite: bool| {
            let extra: &[(&str, &str)] = if rewrite {
                &[("x-llm-d-model-name-rewrite", target)]
            } else {
                &[]
            };
            let mut msgs = vec![headers_msg_with(false, extra)];
            msgs.extend(body_msgs(&completion_body(
                model,
                "Say hello in French.",
                stream,
            )));
            msgs
        };
        let response = |content_type: &str, chunks: Vec<Vec<u8>>| {
            let mut msgs = vec![response_headers_msg(content_type)];
            msgs.extend(response_body_msgs(&chunks));
            (msgs, chunks.iter().map(Vec::len).sum::<usize>())
        };
        for (name, req, (resp, bytes)) in [
            (
                "sse_64_events",
                request(true, false),
                response("text/event-stream", sse_chunks(model, 64)),
            ),
            (
                "sse_64_events_rewritten",
                request(true, true),
                response("text/event-stream", sse_chunks(target, 64)),
            ),
            (
                "json_256KB",
                request(false, false),
                response(
                    "application/json",
                    json_chunks(model, 256 << 10, ENVOY_CHUNK),
                ),
            ),
        ] {
            let client = self.client.clone();
            cases.push(Case {
                group: "extproc_response",
                name: name.into(),
                bytes: Some(bytes as u64),
                run: Box::new(move || rt.block_on(exchange(client.clone(), &req, &resp))),
            });
        }
        cases
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let fixture = Fixture::start();
    bench_cases(c, &mut fixture.cases());
}

/// The benchmarks of this file.
struct Benches;

impl Suite for Benches {
    fn run<M: Measurement>(&self, c: &mut Criterion<M>) {
        bench(c);
    }
}

fn main() {
    if let Some(n) = iterations_requested() {
        let filter = std::env::args().nth(1);
        let fixture = Fixture::start();
        run_counted(&mut fixture.cases(), n, filter.as_deref());
        return;
    }
    run_process(config(std::time::Duration::from_secs(3)), &Benches);
}
