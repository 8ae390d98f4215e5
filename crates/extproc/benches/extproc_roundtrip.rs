//! One ext_proc round trip over a real loopback gRPC connection (plaintext): a new stream,
//! request headers, the body in Envoy-sized chunks (16 KiB), then the routing answer
//! (headers response + re-chunked body) read to its end of stream, for a small and a ~30 KB
//! body. The same-run baseline is the bare `Director::route` call on the same body, so the
//! ratio shows what the transport (gRPC, protobuf, buffering, chunking) adds; a header-only
//! round trip (no parsing or scheduling) shows the transport's floor.
//!
//! `cargo bench -p llmsched-extproc --bench extproc_roundtrip`

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, body_mutation, processing_request,
    processing_response,
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

fn headers_msg(end_of_stream: bool) -> ProcessingRequest {
    let h = post_headers("/v1/completions");
    ProcessingRequest {
        request: Some(processing_request::Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: h
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.to_string(),
                        value: String::new(),
                        raw_value: v.as_bytes().to_vec(),
                    })
                    .collect(),
            }),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
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

async fn round_trip(
    client: &mut ExternalProcessorClient<tonic::transport::Channel>,
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
    let mut forwarded = 0;
    loop {
        let m = match resp.message().await {
            Ok(Some(m)) => m,
            other => panic!("unexpected end: {other:?}"),
        };
        if msgs.len() == 1 {
            // Header-only request: the headers response is the whole answer.
            return 0;
        }
        if let Some(processing_response::Response::RequestBody(b)) = &m.response
            && let Some(body_mutation::Mutation::StreamedResponse(s)) = b
                .response
                .as_ref()
                .and_then(|c| c.body_mutation.as_ref())
                .and_then(|bm| bm.mutation.as_ref())
        {
            forwarded += s.body.len();
            if s.end_of_stream {
                break;
            }
        }
    }
    drop(tx);
    forwarded
}

fn bench(c: &mut Criterion) {
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
    let mut client = rt.block_on(async {
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

    let small = completion_body(
        "meta-llama/Llama-3.1-8B-Instruct",
        "Say hello in French.",
        false,
    );
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(680);
    let large = completion_body("meta-llama/Llama-3.1-8B-Instruct", &prompt, false);
    let mut group = c.benchmark_group("extproc");
    // The transport's floor: a header-only request (random endpoint, no parsing).
    let header_only = vec![headers_msg(true)];
    group.bench_function("grpc_round_trip/header_only", |b| {
        b.iter(|| rt.block_on(round_trip(&mut client, &header_only)))
    });
    for (name, body) in [("small", small), ("30KB", large)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        let mut msgs = vec![headers_msg(false)];
        msgs.extend(body_msgs(&body));
        group.bench_with_input(
            BenchmarkId::new("grpc_round_trip", name),
            &msgs,
            |b, msgs| b.iter(|| rt.block_on(round_trip(&mut client, msgs))),
        );
        group.bench_with_input(
            BenchmarkId::new("director_route", name),
            &body,
            |b, body| {
                b.iter(|| {
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
                })
            },
        );
    }
    group.finish();
    shutdown.cancel();
}

criterion_group!(benches, bench);
criterion_main!(benches);
