//! Whole-EPP integration tests: `llmsched_epp::start` wires the data layer, director and
//! servers exactly as `llmsched epp` does; a real tonic client drives ext_proc the way Envoy
//! does; the model servers are real HTTP servers on loopback addresses (127.0.0.x) serving
//! vLLM-shaped Prometheus text whose values each test controls, so the expected pick follows
//! from the plugins' formulas.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmsched_core::EndpointSource;
use llmsched_epp::{Args, EppError, EppHandle};
use llmsched_extproc::testing::*;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// A model server's `/metrics`, served over real HTTP; values settable at any time.
struct MetricsServer {
    addr: SocketAddr,
    state: Arc<Mutex<Load>>,
    _task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
struct Load {
    waiting: u32,
    running: u32,
    kv: f64,
    running_loras: String,
    waiting_loras: String,
    max_lora: u32,
}

fn vllm_text(l: &Load) -> String {
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {}\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} {}\n\
         # HELP vllm:lora_requests_info Running stats on lora requests.\n\
         # TYPE vllm:lora_requests_info gauge\n\
         vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} 1.7e9\n\
         # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"16\",num_gpu_blocks=\"1000\",engine=\"0\"}} 1.0\n",
        l.running, l.waiting, l.kv, l.max_lora, l.running_loras, l.waiting_loras
    )
}

impl MetricsServer {
    async fn start(ip: &str, load: Load) -> Self {
        let listener = TcpListener::bind(format!("{ip}:0")).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(load));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let body = if req.uri().path() == "/metrics" {
                            vllm_text(&st.lock())
                        } else {
                            String::new()
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            _task: task,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Load)) {
        f(&mut self.state.lock());
    }
}

fn args(extra: &[String]) -> Args {
    let mut v: Vec<String> = [
        "epp",
        "--secure-serving=false",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--bind-address=127.0.0.1",
        "--refresh-metrics-interval=10ms",
        // Streams the tests leave open are cut at once on shutdown (not after 60 s).
        "--drain-timeout=50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend_from_slice(extra);
    Args::try_parse_from(v).unwrap()
}

async fn start(servers: &[&MetricsServer], extra: &[&str]) -> EppHandle {
    let eps: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let mut a: Vec<String> = vec![format!("--endpoints={}", eps.join(","))];
    a.extend(extra.iter().map(|s| s.to_string()));
    llmsched_epp::start(args(&a)).await.unwrap()
}

/// Waits until every endpoint's scraped metrics reflect the servers' current values.
async fn scraped(epp: &EppHandle, servers: &[&MetricsServer]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = epp.store().snapshot();
        let ok = servers.iter().all(|s| {
            let l = s.state.lock().clone();
            snap.by_hostport(&s.addr.to_string()).is_some_and(|e| {
                let m = e.metrics();
                m.updated_at.is_some()
                    && m.waiting_queue_size == l.waiting
                    && (m.kv_cache_usage - l.kv).abs() < 1e-9
                    && m.running_lora_adapters.len()
                        == l.running_loras.split(',').filter(|s| !s.is_empty()).count()
            })
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics were not scraped in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn client(epp: &EppHandle) -> envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient<tonic::transport::Channel>{
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(ch)
}

fn completion(model: &str, prompt: &str, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": 10, "stream": stream
    }))
    .unwrap()
}

const POST: [(&str, &str); 4] = [
    (":method", "POST"),
    (":path", "/v1/completions"),
    ("content-type", "application/json"),
    ("x-request-id", "req-1"),
];

/// Sends headers (+ extra) and `body` in `chunks`; returns the routing answer's headers and
/// the forwarded body with its chunk sizes, or the immediate response.
enum Answer {
    Routed {
        headers: Vec<(String, String)>,
        metadata_destination: Option<String>,
        body: Vec<u8>,
        chunk_sizes: Vec<usize>,
        conv: Box<Conv>,
    },
    Immediate(i32, String),
}

async fn send(epp: &EppHandle, extra: &[(&str, &str)], body: &[u8], chunks: usize) -> Answer {
    let mut c = client(epp).await;
    send_on(&mut c, extra, body, chunks, None).await
}

async fn send_on(
    c: &mut envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient<tonic::transport::Channel>,
    extra: &[(&str, &str)],
    body: &[u8],
    chunks: usize,
    subset: Option<&[&str]>,
) -> Answer {
    let mut conv = Conv::open(c).await;
    let mut h: Vec<(&str, &str)> = POST.to_vec();
    h.extend_from_slice(extra);
    let mut msg = headers_msg(&h, false);
    if let Some(hint) = subset {
        msg = with_metadata(msg, subset_metadata(hint));
    }
    conv.send(msg).await;
    conv.send_body(body, chunks).await;
    let first = conv.next().await;
    if let Some((status, body, _headers)) = immediate(&first) {
        return Answer::Immediate(status, body);
    }
    let (_, headers) = headers_of(&first).expect("request headers response");
    let metadata_destination = metadata_destination(&first);
    let (body, chunk_sizes) = conv.read_request_body().await;
    Answer::Routed {
        headers,
        metadata_destination,
        body,
        chunk_sizes,
        conv: Box::new(conv),
    }
}

fn destination(a: &Answer) -> String {
    match a {
        Answer::Routed { headers, .. } => get(headers, "x-gateway-destination-endpoint")
            .expect("destination header")
            .to_string(),
        Answer::Immediate(s, b) => panic!("expected a route, got {s}: {b}"),
    }
}

#[tokio::test]
async fn picks_the_least_loaded_endpoint_from_scraped_metrics_and_echoes_headers() {
    let a = MetricsServer::start(
        "127.0.0.2",
        Load {
            waiting: 10,
            kv: 0.9,
            ..Default::default()
        },
    )
    .await;
    let b = MetricsServer::start(
        "127.0.0.3",
        Load {
            waiting: 0,
            kv: 0.1,
            ..Default::default()
        },
    )
    .await;
    let c = MetricsServer::start(
        "127.0.0.4",
        Load {
            waiting: 5,
            kv: 0.5,
            ..Default::default()
        },
    )
    .await;
    let epp = start(&[&a, &b, &c], &[]).await;
    scraped(&epp, &[&a, &b, &c]).await;

    // queue: a 0, b 1, c 0.5; kv: a 0.1, b 0.9, c 0.5; prefix: 0 → b wins.
    let r = send(
        &epp,
        &[
            ("x-custom", "kept"),
            ("x-llm-d-inference-objective", "none"),
        ],
        &completion("m", "hello", false),
        3,
    )
    .await;
    assert_eq!(destination(&r), b.addr.to_string());
    let Answer::Routed {
        headers,
        metadata_destination,
        body,
        ..
    } = &r
    else {
        unreachable!()
    };
    assert_eq!(
        metadata_destination.as_deref(),
        Some(b.addr.to_string().as_str())
    );
    assert_eq!(get(headers, "x-custom"), Some("kept"));
    assert_eq!(get(headers, "x-request-id"), Some("req-1"));
    // Control headers are consumed, not echoed.
    assert_eq!(get(headers, "x-llm-d-inference-objective"), None);
    assert_eq!(
        get(headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(body, &completion("m", "hello", false));

    // The load moves: now c is the least loaded.
    b.set(|l| {
        l.waiting = 20;
        l.kv = 0.95;
    });
    c.set(|l| {
        l.waiting = 0;
        l.kv = 0.0;
    });
    scraped(&epp, &[&a, &b, &c]).await;
    let r = send(&epp, &[], &completion("m", "a different prompt", false), 1).await;
    assert_eq!(destination(&r), c.addr.to_string());
    drop(r);
    epp.shutdown().await;
}

#[tokio::test]
async fn split_bodies_are_reassembled_and_rechunked_at_62000_bytes() {
    let a = MetricsServer::start("127.0.0.5", Load::default()).await;
    let epp = start(&[&a], &[]).await;
    scraped(&epp, &[&a]).await;
    let prompt = "word ".repeat(60_000); // ~300 KB
    let body = completion("m", &prompt, false);
    let r = send(&epp, &[], &body, 97).await;
    let Answer::Routed {
        body: fwd,
        chunk_sizes,
        ..
    } = r
    else {
        panic!("not routed")
    };
    assert_eq!(fwd, body);
    assert!(chunk_sizes.len() >= body.len() / 62_000);
    assert!(chunk_sizes.iter().all(|&n| n <= 62_000), "{chunk_sizes:?}");
    epp.shutdown().await;
}

#[tokio::test]
async fn subset_hints_restrict_candidates_by_ip() {
    let a = MetricsServer::start(
        "127.0.0.6",
        Load {
            waiting: 0,
            ..Default::default()
        },
    )
    .await;
    let b = MetricsServer::start(
        "127.0.0.7",
        Load {
            waiting: 9,
            kv: 0.9,
            ..Default::default()
        },
    )
    .await;
    let epp = start(&[&a, &b], &[]).await;
    scraped(&epp, &[&a, &b]).await;
    let mut c = client(&epp).await;
    // Only b allowed (ports ignored): b is chosen despite its load.
    let r = send_on(
        &mut c,
        &[],
        &completion("m", "x", false),
        1,
        Some(&["127.0.0.7:1"]),
    )
    .await;
    assert_eq!(destination(&r), b.addr.to_string());
    for hint in [&["10.9.9.9"][..], &[][..]] {
        match send_on(&mut c, &[], &completion("m", "x", false), 1, Some(hint)).await {
            Answer::Immediate(status, body) => {
                assert_eq!(status, 503, "{hint:?}");
                assert_eq!(
                    body,
                    "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"
                );
            }
            Answer::Routed { .. } => panic!("hint {hint:?} should match nothing"),
        }
    }
    epp.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_the_reference_400s() {
    let a = MetricsServer::start("127.0.0.8", Load::default()).await;
    let epp = start(&[&a], &[]).await;
    scraped(&epp, &[&a]).await;
    for (body, want) in [
        (
            &b"{\"model\": \"m\", \"prompt\": "[..],
            "inference error: BadRequest - error unmarshaling request body",
        ),
        (
            &b"not json at all"[..],
            "inference error: BadRequest - error unmarshaling request body",
        ),
        (
            &br#"{"prompt": "no model here"}"#[..],
            "inference error: BadRequest - model not found in request body",
        ),
    ] {
        match send(&epp, &[], body, 2).await {
            Answer::Immediate(status, text) => {
                assert_eq!(status, 400);
                assert!(text.starts_with(want), "{text}");
            }
            Answer::Routed { .. } => panic!("{} was routed", String::from_utf8_lossy(body)),
        }
    }
    // Metrics count the errors by code.
    let m = metrics_text(&epp).await;
    assert!(
        m.contains("inference_objective_request_error_total{")
            && m.contains("error_code=\"BadRequest\""),
        "{m}"
    );
    epp.shutdown().await;
}

async fn metrics_text(epp: &EppHandle) -> String {
    let stream = tokio::net::TcpStream::connect(epp.metrics_addr)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::get("/metrics")
                .header("host", "epp")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test]
async fn no_endpoints_gives_503_with_a_body_and_500_without() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("eps.yaml");
    std::fs::write(&file, "endpoints: []\n").unwrap();
    let epp = llmsched_epp::start(args(&[format!("--endpoints-file={}", file.display())]))
        .await
        .unwrap();
    match send(&epp, &[], &completion("m", "x", false), 1).await {
        Answer::Immediate(status, body) => {
            assert_eq!(status, 503);
            assert_eq!(
                body,
                "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"
            );
        }
        Answer::Routed { .. } => panic!("routed with no endpoints"),
    }
    // Header-only request: the reference's 500.
    let mut c = client(&epp).await;
    let mut conv = Conv::open(&mut c).await;
    conv.send(headers_msg(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
    ))
    .await;
    let (status, body, _) = immediate(&conv.next().await).expect("immediate response");
    assert_eq!(status, 500);
    assert_eq!(
        body,
        "inference error: Internal - no pods available in datastore"
    );
    epp.shutdown().await;
}

const OBJECTIVES: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: skipped}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  rules:
  - matches: [{model: {type: Exact, value: food-review}}]
    targets: [{modelRewrite: food-review-v2, weight: 100}]
"#;

#[tokio::test]
async fn objectives_file_drives_rewrites_priorities_and_shedding() {
    let a = MetricsServer::start(
        "127.0.0.9",
        Load {
            waiting: 0,
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objectives.yaml");
    std::fs::write(&file, OBJECTIVES).unwrap();
    let epp = start(&[&a], &[&format!("--objectives-file={}", file.display())]).await;
    // "m" was served before (the fake endpoints here answer no requests), so it is a label
    // value of its own (llmsched_core::labels).
    epp.director().metrics().known.learn("m");
    scraped(&epp, &[&a]).await;

    // Rewrite: the forwarded body carries the target model.
    let r = send(&epp, &[], &completion("food-review", "p", false), 2).await;
    let Answer::Routed { body, .. } = &r else {
        panic!("not routed")
    };
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["model"], "food-review-v2");
    drop(r);

    // Saturated pool (utilization-detector: queue 6 / threshold 5 ≥ 1): sheddable requests
    // (priority < 0) are dropped, others pass.
    a.set(|l| l.waiting = 6);
    scraped(&epp, &[&a]).await;
    match send(
        &epp,
        &[("x-gateway-inference-objective", "batch")],
        &completion("m", "p", false),
        1,
    )
    .await
    {
        Answer::Immediate(status, body) => {
            assert_eq!(status, 429);
            assert_eq!(
                body,
                "inference error: ResourceExhausted - system saturated, sheddable request dropped"
            );
        }
        Answer::Routed { .. } => panic!("sheddable request routed while saturated"),
    }
    let r = send(
        &epp,
        &[("x-llm-d-inference-objective", "critical")],
        &completion("m", "p", false),
        1,
    )
    .await;
    assert_eq!(destination(&r), a.addr.to_string());
    drop(r);
    let m = metrics_text(&epp).await;
    assert!(m.contains("inference_objective_request_total{model_name=\"food-review\",target_model_name=\"food-review-v2\",priority=\"0\"} 1"), "{m}");
    assert!(m.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"10\"} 1"), "{m}");
    epp.shutdown().await;
}

#[tokio::test]
async fn lora_affinity_prefers_the_endpoint_running_the_adapter() {
    let a = MetricsServer::start(
        "127.0.0.10",
        Load {
            max_lora: 4,
            ..Default::default()
        },
    )
    .await;
    let b = MetricsServer::start(
        "127.0.0.11",
        Load {
            max_lora: 4,
            running_loras: "sql-lora".into(),
            ..Default::default()
        },
    )
    .await;
    let config = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: lora-affinity-scorer\n";
    let epp = start(&[&a, &b], &[&format!("--config-text={config}")]).await;
    scraped(&epp, &[&a, &b]).await;
    // a: room to load (0.8), b: running (1.0).
    for _ in 0..5 {
        let r = send(&epp, &[], &completion("sql-lora", "q", false), 1).await;
        assert_eq!(destination(&r), b.addr.to_string());
    }
    epp.shutdown().await;
}

#[tokio::test]
async fn repeated_prompts_stick_to_the_endpoint_holding_their_prefix() {
    let servers = [
        MetricsServer::start("127.0.0.12", Load::default()).await,
        MetricsServer::start("127.0.0.13", Load::default()).await,
        MetricsServer::start("127.0.0.14", Load::default()).await,
    ];
    let refs: Vec<&MetricsServer> = servers.iter().collect();
    let epp = start(&refs, &[]).await;
    scraped(&epp, &refs).await;
    let system = "you are a helpful assistant ".repeat(200);
    let first = destination(
        &send(
            &epp,
            &[],
            &completion("m", &format!("{system} question one"), false),
            4,
        )
        .await,
    );
    for q in ["two", "three", "four", "five"] {
        let d = destination(
            &send(
                &epp,
                &[],
                &completion("m", &format!("{system} question {q}"), false),
                4,
            )
            .await,
        );
        assert_eq!(d, first, "prefix affinity lost for question {q}");
    }
    epp.shutdown().await;
}

#[tokio::test]
async fn fallback_endpoints_follow_max_num_of_endpoints() {
    let a = MetricsServer::start(
        "127.0.0.15",
        Load {
            waiting: 0,
            ..Default::default()
        },
    )
    .await;
    let b = MetricsServer::start(
        "127.0.0.16",
        Load {
            waiting: 5,
            ..Default::default()
        },
    )
    .await;
    let c = MetricsServer::start(
        "127.0.0.17",
        Load {
            waiting: 9,
            ..Default::default()
        },
    )
    .await;
    let config = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}\n";
    let epp = start(&[&a, &b, &c], &[&format!("--config-text={config}")]).await;
    scraped(&epp, &[&a, &b, &c]).await;
    let r = send(&epp, &[], &completion("m", "x", false), 1).await;
    assert_eq!(destination(&r), format!("{},{}", a.addr, b.addr));
    drop(r);
    epp.shutdown().await;
}

#[tokio::test]
async fn streaming_usage_is_accounted_across_chunk_boundaries() {
    let a = MetricsServer::start("127.0.0.18", Load::default()).await;
    let epp = start(&[&a], &[]).await;
    // "m" was served before (the fake endpoints here answer no requests), so it is a label
    // value of its own (llmsched_core::labels).
    epp.director().metrics().known.learn("m");
    scraped(&epp, &[&a]).await;
    let r = send(&epp, &[], &completion("m", "count me", true), 1).await;
    let Answer::Routed { mut conv, .. } = r else {
        panic!("not routed")
    };
    conv.send(response_headers_msg(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))
    .await;
    let h = conv.next().await;
    let (_, set) = headers_of(&h).expect("response headers answer");
    assert_eq!(get(&set, "x-went-into-resp-headers"), Some("true"));
    let sse = "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":37,\"completion_tokens\":5,\"total_tokens\":42,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\ndata: [DONE]\n\n";
    let (p1, p2) = sse.split_at(70); // split inside the usage frame
    conv.send(response_body_msg(p1.as_bytes(), false)).await;
    assert_eq!(
        response_body_chunk(&conv.next().await).unwrap().0,
        p1.as_bytes()
    );
    conv.send(response_body_msg(p2.as_bytes(), true)).await;
    assert_eq!(
        response_body_chunk(&conv.next().await).unwrap(),
        (p2.as_bytes(), true)
    );
    drop(conv);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(&epp).await;
        if m.contains("inference_objective_input_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 37")
            && m.contains("inference_objective_output_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 5")
            && m.contains("inference_objective_prompt_cached_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 32")
        {
            break;
        }
        assert!(Instant::now() < deadline, "usage not accounted:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request finished: nothing in flight.
    assert!(
        epp.store()
            .snapshot()
            .endpoints
            .iter()
            .all(|e| e.inflight_requests() == 0)
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn startup_errors_name_the_culprit() {
    let bad_file = args(&[
        "--endpoints=127.0.0.1:1".into(),
        "--config-file=/nonexistent/epp.yaml".into(),
    ]);
    let e = llmsched_epp::start(bad_file).await.unwrap_err();
    assert!(matches!(e, EppError::ConfigRead { .. }));
    assert!(e.to_string().contains("/nonexistent/epp.yaml"), "{e}");

    let bad_plugin = args(&[
        "--endpoints=127.0.0.1:1".into(),
        "--config-text=apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n  parameters: {bogus: 1}\n".into(),
    ]);
    let e = llmsched_epp::start(bad_plugin)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--config-text") && e.contains("queue-scorer") && e.contains("bogus"),
        "{e}"
    );

    let bad_endpoints = args(&["--endpoints=not-an-address".into()]);
    let e = llmsched_epp::start(bad_endpoints)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not-an-address"), "{e}");

    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let busy = args(&[
        "--endpoints=127.0.0.1:1".into(),
        format!("--metrics-port={port}"),
    ]);
    let e = llmsched_epp::start(busy).await.unwrap_err().to_string();
    assert!(
        e.contains("--metrics-port") && e.contains(&port.to_string()),
        "{e}"
    );
}
