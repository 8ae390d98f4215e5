//! One request through the built-in proxy over real loopback sockets: an HTTP/1.1 keep-alive
//! client → the proxy (`llmsched_proxy::serve`, the director routing with `queue-scorer`) →
//! a minimal model server answering from memory → the response relayed back and read to its
//! end. The same-run baseline is the client straight to that model server (`direct/*`, for
//! the cases without a rewrite), so the difference is what the proxy adds (routing,
//! forwarding, response relay and accounting).
//!
//! Cases (the model server's answer):
//! * `json_small`: a ~300-byte non-streaming completion (relayed frame by frame);
//! * `json_small_rewritten`: the same with `x-llm-d-model-name-rewrite`, so the proxy reads
//!   the body whole and rewrites the model name back;
//! * `sse_64_events`: an SSE stream of 64 events, one chunk each;
//! * `sse_64_events_rewritten`: the same, each event's model rewritten back;
//! * `json_256KB`: a 256 KB non-streaming completion.
//!
//! Measured in CPU time of the whole process (client, proxy and model server share it; the
//! machine is shared), wall-clock time with `BENCH_CLOCK=wall`. With `BENCH_ITERS=N` each
//! case (or those matching the first argument) runs N times without criterion, for
//! `valgrind --tool=callgrind` instruction counts (see `llmsched_benchkit::run_counted`).
//!
//! `cargo bench -p llmsched-proxy --bench proxy_roundtrip`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use criterion::measurement::Measurement;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmsched_benchkit::{
    Case, Suite, bench_cases, config, iterations_requested, run_counted, run_process,
};
use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
use llmsched_director::Director;
use llmsched_director::testing::{completion_body, load_config};
use llmsched_proxy::{ProxyOptions, serve};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const TARGET: &str = "llama-adapter";

type Body = BoxBody<Bytes, Infallible>;

/// An SSE completion stream of `events` events answered as `model`, one chunk per event.
fn sse_chunks(model: &str, events: usize) -> Vec<Bytes> {
    (0..events)
        .map(|i| {
            let mut e = format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\" word{i}\",\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            );
            if i + 1 == events {
                e.push_str(&format!("data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n", 12 + events));
            }
            Bytes::from(e)
        })
        .collect()
}

/// A non-streaming completion of about `size` bytes of text answered as `model`.
fn json(model: &str, size: usize) -> Bytes {
    let text = "lorem ipsum dolor sit amet ".repeat(size / 27 + 1);
    Bytes::from(format!(
        "{{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"{}\",\"finish_reason\":\"length\"}}],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":4000,\"total_tokens\":4012}}}}",
        &text[..size]
    ))
}

/// The model server's answer for `x-bench-case` and `x-bench-model`.
fn answer(req: &Request<Incoming>) -> Response<Body> {
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let model = header("x-bench-model");
    let (content_type, body): (&str, Body) = match header("x-bench-case").as_str() {
        "sse" => {
            let frames = sse_chunks(&model, 64)
                .into_iter()
                .map(|c| Ok::<_, Infallible>(Frame::data(c)));
            (
                "text/event-stream",
                BodyExt::boxed(StreamBody::new(futures::stream::iter(frames))),
            )
        }
        "large" => (
            "application/json",
            Full::new(json(&model, 256 << 10)).boxed(),
        ),
        _ => ("application/json", Full::new(json(&model, 100)).boxed()),
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    r
}

/// A minimal HTTP/1.1 model server on loopback.
async fn model_server(shutdown: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                () = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let r = answer(&req);
                    // Read the request body to its end, as a model server does.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One request to `addr`; returns the response bytes read.
async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    case: &str,
    body: &Bytes,
    rewrite: bool,
) -> usize {
    let mut req = Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-bench-case", case)
        .header("x-bench-model", if rewrite { TARGET } else { MODEL });
    if rewrite {
        req = req.header("x-llm-d-model-name-rewrite", TARGET);
    }
    let resp = client
        .request(req.body(Full::new(body.clone())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    if rewrite {
        // The proxy rewrote the model name back; the direct baseline is never asked to.
        debug_assert!(!got.windows(TARGET.len()).any(|w| w == TARGET.as_bytes()));
    }
    got.len()
}

/// The model server and the proxy on loopback, and a client.
struct Fixture {
    rt: tokio::runtime::Runtime,
    upstream: SocketAddr,
    proxy: SocketAddr,
    client: HttpClient,
    shutdown: CancellationToken,
}

impl Fixture {
    fn start() -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shutdown = CancellationToken::new();
        let (upstream, proxy) = rt.block_on(async {
            let upstream = model_server(shutdown.clone()).await;
            let eps = StaticEndpoints::from_addrs(&[upstream]);
            for e in &eps.0.endpoints {
                // Fresh for the whole run, as a scraped pool is.
                e.set_metrics(EndpointMetrics {
                    updated_at: Some(Instant::now() + Duration::from_secs(3600)),
                    ..Default::default()
                });
            }
            let director =
                Arc::new(Director::builder(load_config(CONFIG).unwrap(), Arc::new(eps)).build());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let proxy = listener.local_addr().unwrap();
            tokio::spawn(serve(
                listener,
                director,
                ProxyOptions::default(),
                shutdown.clone(),
            ));
            (upstream, proxy)
        });
        let client: HttpClient = Client::builder(TokioExecutor::new()).build({
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            c
        });
        Fixture {
            rt,
            upstream,
            proxy,
            client,
            shutdown,
        }
    }

    fn cases(&self) -> Vec<Case<'_>> {
        let plain = completion_body(MODEL, "Say hello in French.", false);
        let streamed = completion_body(MODEL, "Say hello in French.", true);
        let mut cases = Vec::new();
        for (name, case, body, rewrite) in [
            ("json_small", "small", &plain, false),
            ("json_small_rewritten", "small", &plain, true),
            ("sse_64_events", "sse", &streamed, false),
            ("sse_64_events_rewritten", "sse", &streamed, true),
            ("json_256KB", "large", &plain, false),
        ] {
            let (rt, client) = (&self.rt, &self.client);
            let bytes = rt.block_on(send(client, self.upstream, case, body, false)) as u64;
            let targets = if rewrite {
                vec![("through_proxy", self.proxy)]
            } else {
                vec![("direct", self.upstream), ("through_proxy", self.proxy)]
            };
            for (path, addr) in targets {
                let body = body.clone();
                cases.push(Case {
                    group: "proxy",
                    name: format!("{path}/{name}"),
                    bytes: Some(bytes),
                    run: Box::new(move || rt.block_on(send(client, addr, case, &body, rewrite))),
                });
            }
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
    run_process(config(Duration::from_secs(3)), &Benches);
}
