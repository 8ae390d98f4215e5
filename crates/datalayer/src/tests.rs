//! End-to-end tests: real HTTP servers on loopback addresses (127.0.0.2, 127.0.0.3, …; Linux
//! routes all of 127/8 to `lo`) serving vLLM- and SGLang-shaped pages, real files on disk,
//! and the data layer started with [`crate::start`]. Nothing asserts on elapsed time: every
//! wait polls for the expected state with a generous deadline.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointSource, label};
use llmsched_core::plugin::{EndpointListener, Plugin};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod https;

use crate::metrics::ReloadLabels;
use crate::{
    DataLayerConfig, DataLayerHandle, DataLayerMetrics, EndpointStore, MetricOverrides,
    parse_endpoints_flag, start,
};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A page shaped like vLLM's (v1 engine) `/metrics`.
fn vllm_page(waiting: u32, running: u32, kv: f64, kv_name: &str) -> String {
    let l = format!("engine=\"0\",model_name=\"{MODEL}\"");
    let mut s = String::new();
    s.push_str("# HELP python_gc_objects_collected_total Objects collected during gc\n");
    s.push_str("# TYPE python_gc_objects_collected_total counter\n");
    s.push_str("python_gc_objects_collected_total{generation=\"0\"} 12345.0\n");
    s.push_str("# HELP vllm:num_requests_running Number of requests in model execution batches.\n");
    s.push_str("# TYPE vllm:num_requests_running gauge\n");
    s.push_str(&format!("vllm:num_requests_running{{{l}}} {running}.0\n"));
    s.push_str("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n");
    s.push_str("# TYPE vllm:num_requests_waiting gauge\n");
    s.push_str(&format!("vllm:num_requests_waiting{{{l}}} {waiting}.0\n"));
    s.push_str(&format!(
        "# HELP {kv_name} KV-cache usage. 1 means 100 percent usage.\n# TYPE {kv_name} gauge\n"
    ));
    s.push_str(&format!("{kv_name}{{{l}}} {kv}\n"));
    s.push_str("# HELP vllm:lora_requests_info Running stats on lora requests.\n");
    s.push_str("# TYPE vllm:lora_requests_info gauge\n");
    s.push_str("vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"old\",waiting_lora_adapters=\"\"} 1.7000000e+09\n");
    s.push_str("vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql-lora,tweet-lora\",waiting_lora_adapters=\"chat-lora\"} 1.7000002e+09\n");
    s.push_str("vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"older\",waiting_lora_adapters=\"x\"} 1.6e+09\n");
    s.push_str("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n");
    s.push_str("# TYPE vllm:cache_config_info gauge\n");
    s.push_str("vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"31872\",prefix_caching_hash_algo=\"sha256\"} 1.0\n");
    s.push_str("# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n");
    s.push_str("# TYPE vllm:prefix_cache_queries_total counter\n");
    s.push_str(&format!("vllm:prefix_cache_queries_total{{{l}}} 98304.0\n"));
    s.push_str(
        "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.\n",
    );
    s.push_str("# TYPE vllm:e2e_request_latency_seconds histogram\n");
    let mut cum = 0;
    for le in [
        "0.3", "0.5", "0.8", "1.0", "1.5", "2.0", "2.5", "5.0", "10.0", "+Inf",
    ] {
        cum += 1;
        s.push_str(&format!(
            "vllm:e2e_request_latency_seconds_bucket{{{l},le=\"{le}\"}} {cum}.0\n"
        ));
    }
    s.push_str(&format!(
        "vllm:e2e_request_latency_seconds_count{{{l}}} {cum}.0\n"
    ));
    s.push_str(&format!(
        "vllm:e2e_request_latency_seconds_sum{{{l}}} 17.25\n"
    ));
    s
}

/// A page shaped like SGLang's `/metrics`.
fn sglang_page(queue: u32, running: u32, usage: f64) -> String {
    let l = "engine_type=\"unified\",model_name=\"qwen/qwen2.5-0.5b-instruct\",pp_rank=\"0\",tp_rank=\"0\"";
    format!(
        "# HELP sglang:num_running_reqs The number of running requests.\n\
         # TYPE sglang:num_running_reqs gauge\n\
         sglang:num_running_reqs{{{l}}} {running}.0\n\
         # HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n\
         # TYPE sglang:num_queue_reqs gauge\n\
         sglang:num_queue_reqs{{{l}}} {queue}.0\n\
         # HELP sglang:token_usage The token usage.\n\
         # TYPE sglang:token_usage gauge\n\
         sglang:token_usage{{{l}}} {usage}\n\
         # HELP sglang:cache_config_info Cache configuration.\n\
         # TYPE sglang:cache_config_info gauge\n\
         sglang:cache_config_info{{num_pages=\"65536\",page_size=\"1\"}} 1.0\n\
         # HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
         # TYPE sglang:time_to_first_token_seconds histogram\n\
         sglang:time_to_first_token_seconds_bucket{{{l},le=\"0.1\"}} 3.0\n\
         sglang:time_to_first_token_seconds_bucket{{{l},le=\"+Inf\"}} 4.0\n\
         sglang:time_to_first_token_seconds_sum{{{l}}} 0.5\n\
         sglang:time_to_first_token_seconds_count{{{l}}} 4.0\n"
    )
}

#[derive(Clone)]
enum Reply {
    Text(String),
    Status(u16, String),
    Raw(Vec<u8>),
}

struct TestServer {
    addr: SocketAddr,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
}

impl TestServer {
    fn set(&self, reply: Reply) {
        *self.reply.lock() = reply;
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn name(&self) -> String {
        self.addr.to_string()
    }
}

async fn serve(ip: &str, reply: Reply) -> TestServer {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reply = Arc::new(Mutex::new(reply));
    let hits = Arc::new(AtomicUsize::new(0));
    let (r, h) = (reply.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (r, h) = (r.clone(), h.clone());
            let svc = service_fn(move |_req| {
                h.fetch_add(1, Ordering::SeqCst);
                let reply = r.lock().clone();
                async move {
                    let (status, body) = match reply {
                        Reply::Text(t) => (200, t.into_bytes()),
                        Reply::Status(s, t) => (s, t.into_bytes()),
                        Reply::Raw(b) => (200, b),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
        }
    });
    TestServer { addr, reply, hits }
}

/// Accepts connections and never answers.
async fn serve_hung(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// An address nothing listens on.
async fn closed_addr(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    listener.local_addr().unwrap()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn test_config() -> DataLayerConfig {
    DataLayerConfig {
        refresh_interval: Duration::from_millis(20),
        scrape_timeout: Duration::from_secs(5),
        max_backoff: Duration::from_millis(100),
        file_poll_interval: Duration::from_millis(20),
        ..Default::default()
    }
}

async fn start_with(config: DataLayerConfig) -> (DataLayerHandle, DataLayerMetrics) {
    let metrics = DataLayerMetrics::default();
    let h = start(
        config,
        Arc::new(EndpointStore::new()),
        metrics.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    (h, metrics)
}

fn endpoint(h: &DataLayerHandle, name: &str) -> Arc<Endpoint> {
    h.store()
        .snapshot()
        .by_name(name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
        .clone()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl Plugin for Recorder {
    fn type_name(&self) -> &'static str {
        "recorder"
    }
    fn name(&self) -> &str {
        "recorder"
    }
}

impl EndpointListener for Recorder {
    fn endpoint_added(&self, endpoint: &Arc<Endpoint>) {
        self.events.lock().push(format!("+{}", endpoint.name()));
    }
    fn endpoint_removed(&self, id: EndpointId) {
        self.events.lock().push(format!("-{id}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_vllm_page_including_lora_newest_sample_and_cache_geometry() {
    let srv = serve(
        "127.0.0.2",
        Reply::Text(vllm_page(5, 3, 0.42, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&srv.name(), &[]).unwrap(),
        ..test_config()
    };
    let (h, metrics) = start_with(config).await;
    assert!(h.store().is_synced());
    let ep = endpoint(&h, &srv.name());
    wait_for("first scrape", || ep.metrics().updated_at.is_some()).await;
    let m = ep.metrics();
    assert_eq!(m.waiting_queue_size, 5);
    assert_eq!(m.running_requests, 3);
    assert_eq!(m.kv_cache_usage, 0.42);
    // The LoRA sample with the largest value (newest) is the middle one.
    assert_eq!(m.running_lora_adapters, ["sql-lora", "tweet-lora"]);
    assert_eq!(m.waiting_lora_adapters, ["chat-lora"]);
    assert_eq!(m.max_lora, 4);
    assert_eq!(m.block_size, Some(16));
    assert_eq!(m.num_gpu_blocks, Some(31872));
    assert_eq!(metrics.errors_of(&srv.name()), 0);

    // Values follow the server.
    srv.set(Reply::Text(vllm_page(
        0,
        9,
        0.9,
        "vllm:kv_cache_usage_perc",
    )));
    wait_for("new values", || ep.metrics().running_requests == 9).await;
    assert_eq!(ep.metrics().waiting_queue_size, 0);
    let stats = h.pool_stats();
    assert_eq!(stats.ready_pods, 1);
    assert_eq!(stats.average_running_requests, Some(9.0));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_kv_metric_name_is_understood() {
    let srv = serve(
        "127.0.0.2",
        Reply::Text(vllm_page(1, 2, 0.25, "vllm:gpu_cache_usage_perc")),
    )
    .await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&srv.name(), &[]).unwrap(),
        ..test_config()
    };
    let (h, metrics) = start_with(config).await;
    let ep = endpoint(&h, &srv.name());
    wait_for("first scrape", || ep.metrics().updated_at.is_some()).await;
    assert_eq!(ep.metrics().kv_cache_usage, 0.25);
    // Both present (a release exporting both): the new name wins.
    let both = format!(
        "{}vllm:kv_cache_usage_perc{{engine=\"0\"}} 0.75\n",
        vllm_page(1, 2, 0.25, "vllm:gpu_cache_usage_perc")
    );
    srv.set(Reply::Text(both));
    wait_for("new KV name preferred", || {
        ep.metrics().kv_cache_usage == 0.75
    })
    .await;
    assert_eq!(metrics.errors_of(&srv.name()), 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_endpoint_is_read_with_the_sglang_mapping() {
    let sg = serve("127.0.0.3", Reply::Text(sglang_page(7, 2, 0.33))).await;
    let vl = serve(
        "127.0.0.4",
        Reply::Text(vllm_page(1, 1, 0.1, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &file,
        format!(
            "endpoints:\n\
             - name: sglang-0\n  address: {}\n  port: {}\n  labels: {{llm-d.ai/engine-type: sglang}}\n\
             - name: vllm-0\n  address: {}\n  port: {}\n",
            sg.addr.ip(),
            sg.addr.port(),
            vl.addr.ip(),
            vl.addr.port()
        ),
    )
    .unwrap();
    let config = DataLayerConfig {
        endpoints_file: Some(file),
        ..test_config()
    };
    let (h, _) = start_with(config).await;
    let sge = endpoint(&h, "sglang-0");
    let vle = endpoint(&h, "vllm-0");
    wait_for("both scraped", || {
        sge.metrics().updated_at.is_some() && vle.metrics().updated_at.is_some()
    })
    .await;
    let m = sge.metrics();
    assert_eq!(
        (m.waiting_queue_size, m.running_requests, m.kv_cache_usage),
        (7, 2, 0.33)
    );
    assert_eq!((m.block_size, m.num_gpu_blocks), (Some(1), Some(65536)));
    assert_eq!(vle.metrics().waiting_queue_size, 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_hung_endpoints_do_not_delay_the_healthy_one() {
    let hung = serve_hung("127.0.0.2").await;
    let closed = closed_addr("127.0.0.3").await;
    let healthy = serve(
        "127.0.0.4",
        Reply::Text(vllm_page(1, 1, 0.5, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&format!("{hung},{closed},{}", healthy.addr), &[])
            .unwrap(),
        // Far longer than the test: the hung endpoint's first scrape never ends.
        scrape_timeout: Duration::from_secs(120),
        ..test_config()
    };
    let (h, metrics) = start_with(config).await;
    let hung_name = hung.to_string();
    let closed_name = closed.to_string();
    wait_for("the closed endpoint to fail", || {
        metrics.errors_of_reason(&closed_name, "connect") >= 1
    })
    .await;
    wait_for("20 scrapes of the healthy endpoint", || {
        metrics.scrapes_of(&healthy.name()) >= 20
    })
    .await;
    // The hung endpoint is still inside its first scrape: no success, no error yet.
    assert_eq!(metrics.scrapes_of(&hung_name), 0);
    assert_eq!(metrics.errors_of(&hung_name), 0);
    assert_eq!(metrics.scrapes_of(&closed_name), 0);
    let now = Instant::now();
    let snap = h.store().snapshot();
    assert!(
        !snap
            .by_name(&healthy.name())
            .unwrap()
            .metrics()
            .is_stale(now, Duration::from_secs(2))
    );
    assert!(
        snap.by_name(&hung_name)
            .unwrap()
            .metrics()
            .updated_at
            .is_none()
    );
    assert!(
        snap.by_name(&closed_name)
            .unwrap()
            .metrics()
            .updated_at
            .is_none()
    );
    assert_eq!(h.pool_stats().ready_pods, 1);
    // Shutdown is not held up by the hanging scrape.
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_timeout_is_counted() {
    let hung = serve_hung("127.0.0.5").await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&hung.to_string(), &[]).unwrap(),
        scrape_timeout: Duration::from_millis(100),
        ..test_config()
    };
    let (h, metrics) = start_with(config).await;
    wait_for("a timeout", || {
        metrics.errors_of_reason(&hung.to_string(), "timeout") >= 2
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_poisons_metrics_and_failures_go_stale() {
    let good = vllm_page(4, 2, 0.5, "vllm:kv_cache_usage_perc");
    let srv = serve("127.0.0.6", Reply::Text(good.clone())).await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&srv.name(), &[]).unwrap(),
        staleness_threshold: Duration::from_millis(300),
        max_body_bytes: 256 << 10,
        ..test_config()
    };
    let (h, metrics) = start_with(config).await;
    let name = srv.name();
    let ep = endpoint(&h, &name);
    wait_for("first scrape", || ep.metrics().updated_at.is_some()).await;
    let baseline = (**ep.metrics()).clone();

    let truncated = good[..good.find("vllm:num_requests_waiting{").unwrap() + 30].to_string();
    let nan = good.replace("vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.5", "vllm:kv_cache_usage_perc{engine=\"0\"} NaN");
    let inf = good.replace("vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 4.0", "vllm:num_requests_waiting{engine=\"0\"} +Inf");
    let missing_value = good.replace("} 2.0\n", "}\n");
    let no_queue = good.replace("vllm:num_requests_waiting{", "vllm:something_else{");
    let mut huge = good.clone();
    while huge.len() < 1 << 20 {
        huge.push_str("filler_metric{a=\"b\"} 1\n");
    }
    let mut not_utf8 = good.clone().into_bytes();
    not_utf8.extend_from_slice(b"m{a=\"\xff\xfe\"} 1\n");
    let cases: Vec<(Reply, &str)> = vec![
        (
            Reply::Status(502, "<html><body>502 Bad Gateway</body></html>".into()),
            "http_status",
        ),
        (
            Reply::Text("<html><body><h1>It works</h1></body></html>\n".into()),
            "parse",
        ),
        (Reply::Text(truncated), "parse"),
        (Reply::Text(missing_value), "parse"),
        (Reply::Text(nan), "invalid_value"),
        (Reply::Text(inf), "invalid_value"),
        (Reply::Text(no_queue), "missing_metric"),
        (Reply::Text(huge), "body_too_large"),
        (Reply::Raw(not_utf8), "parse"),
        (Reply::Text(String::new()), "missing_metric"),
    ];
    for (reply, reason) in cases {
        let before = metrics.errors_of_reason(&name, reason);
        srv.set(reply);
        wait_for(&format!("a '{reason}' error"), || {
            metrics.errors_of_reason(&name, reason) > before
        })
        .await;
        // Every scrape from now on fails: the metrics must not move at all.
        let frozen = (**ep.metrics()).clone();
        let after_first = metrics.errors_of_reason(&name, reason);
        wait_for(&format!("a second '{reason}' error"), || {
            metrics.errors_of_reason(&name, reason) > after_first
        })
        .await;
        assert_eq!(
            **ep.metrics(),
            frozen,
            "metrics untouched by a '{reason}' failure"
        );
        assert_eq!(
            (frozen.waiting_queue_size, frozen.running_requests),
            (baseline.waiting_queue_size, baseline.running_requests)
        );
        assert_eq!(frozen.kv_cache_usage, baseline.kv_cache_usage);
        // Back to a good page between cases, so each case starts from fresh metrics.
        srv.set(Reply::Text(good.clone()));
        let seen = ep.metrics().updated_at;
        wait_for("recovery", || ep.metrics().updated_at != seen).await;
    }

    // A failing endpoint keeps its last values but goes stale, and leaves the ready count.
    srv.set(Reply::Status(503, "unavailable".into()));
    let before = metrics.errors_of(&name);
    wait_for("failure", || metrics.errors_of(&name) > before).await;
    let last = ep.metrics().updated_at;
    wait_for("staleness", || {
        ep.metrics()
            .is_stale(Instant::now(), Duration::from_millis(300))
    })
    .await;
    assert_eq!(ep.metrics().updated_at, last, "no update while failing");
    assert_eq!(ep.metrics().waiting_queue_size, 4);
    assert_eq!(h.pool_stats().ready_pods, 0);
    assert_eq!(h.pool_stats().average_queue_size, None);
    // Recovery makes it fresh again.
    srv.set(Reply::Text(good));
    wait_for("fresh again", || h.pool_stats().ready_pods == 1).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_membership_changes_start_and_stop_scrapers_and_notify_listeners() {
    let a = serve(
        "127.0.0.7",
        Reply::Text(vllm_page(1, 0, 0.1, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let b = serve(
        "127.0.0.8",
        Reply::Text(vllm_page(2, 0, 0.2, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    let entry = |name: &str, s: &TestServer| {
        format!(
            "- {{name: {name}, address: '{}', port: {}}}\n",
            s.addr.ip(),
            s.addr.port()
        )
    };
    std::fs::write(&file, format!("endpoints:\n{}", entry("a", &a))).unwrap();
    let store = Arc::new(EndpointStore::new());
    let rec = Arc::new(Recorder::default());
    store.add_listener(rec.clone());
    let mut changes = store.subscribe();
    let metrics = DataLayerMetrics::default();
    let h = start(
        DataLayerConfig {
            endpoints_file: Some(file.clone()),
            ..test_config()
        },
        store.clone(),
        metrics.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(store.is_synced());
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    let ep_a = endpoint(&h, "a");
    wait_for("a scraped", || metrics.scrapes_of("a") >= 2).await;

    // Swap a for b.
    write_atomically(&file, &format!("endpoints:\n{}", entry("b", &b)));
    wait_for("b scraped", || metrics.scrapes_of("b") >= 2).await;
    assert!(changes.has_changed().unwrap());
    assert!(store.snapshot().by_name("a").is_none());
    assert_eq!(metrics.scrapes_of("a"), 0, "a's series were dropped");
    // a's scraper is gone: its server sees no more requests while b keeps being scraped.
    let b_now = metrics.scrapes_of("b");
    wait_for("b scraped more", || metrics.scrapes_of("b") >= b_now + 3).await;
    let a_hits = a.hits();
    let b_now = metrics.scrapes_of("b");
    wait_for("b scraped even more", || {
        metrics.scrapes_of("b") >= b_now + 10
    })
    .await;
    assert_eq!(a.hits(), a_hits, "a is no longer scraped");

    // Add a back: a new id, scraped again.
    write_atomically(
        &file,
        &format!("endpoints:\n{}{}", entry("a", &a), entry("b", &b)),
    );
    wait_for("a back", || metrics.scrapes_of("a") >= 1).await;
    let ep_a2 = endpoint(&h, "a");
    assert!(ep_a2.id() > ep_a.id());
    let events = rec.events.lock().clone();
    assert_eq!(
        events,
        [
            "+a".to_string(),
            format!("-{}", ep_a.id()),
            "+b".to_string(),
            "+a".to_string()
        ]
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_file_reload_valid_invalid_valid() {
    let a = serve(
        "127.0.0.9",
        Reply::Text(vllm_page(1, 0, 0.1, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    let file_label = file.display().to_string();
    let valid_a = format!(
        "endpoints:\n- name: a\n  address: {}\n  port: {}\n",
        a.addr.ip(),
        a.addr.port()
    );
    std::fs::write(&file, &valid_a).unwrap();
    let (h, metrics) = start_with(DataLayerConfig {
        endpoints_file: Some(file.clone()),
        ..test_config()
    })
    .await;
    let reloads = |outcome: &str| {
        metrics
            .file_reloads
            .get(&ReloadLabels {
                file: file_label.clone(),
                outcome: outcome.into(),
            })
            .map_or(0, |c| c.get())
    };
    let gen0 = h.store().snapshot().generation;

    // Invalid: an unknown key. The last good set stays.
    write_atomically(
        &file,
        &format!("{valid_a}- name: b\n  address: 10.0.0.1\n  prot: 8000\n"),
    );
    wait_for("rejection", || reloads("rejected") == 1).await;
    let snap = h.store().snapshot();
    assert_eq!(snap.generation, gen0);
    assert_eq!(snap.len(), 1);
    assert!(snap.by_name("a").is_some());
    // Deleting the file keeps the set too.
    std::fs::remove_file(&file).unwrap();
    // Valid again, with a second endpoint (and a label on a).
    write_atomically(
        &file,
        &format!(
            "endpoints:\n- name: a\n  address: {}\n  port: {}\n  labels: {{llm-d.ai/role: decode}}\n\
             - name: b\n  address: 10.0.0.1\n  port: 8000\n",
            a.addr.ip(),
            a.addr.port()
        ),
    );
    wait_for("applied", || reloads("applied") == 1).await;
    let snap = h.store().snapshot();
    assert_eq!(snap.len(), 2);
    assert_eq!(
        snap.by_name("a").unwrap().label("llm-d.ai/role"),
        Some("decode")
    );
    assert!(snap.generation > gen0);
    assert_eq!(reloads("rejected"), 1, "the bad content was tried once");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objectives_file_reload_valid_invalid_valid() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objectives.yaml");
    let doc = |priority: &str| {
        format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {{name: critical}}\nspec: {{priority: {priority}}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: skipped}}\n---\n\
             apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModelRewrite\nmetadata: {{name: canary}}\n\
             spec:\n  rules:\n  - matches: [{{model: {{value: food-review}}}}]\n    targets:\n\
             \x20   - {{modelRewrite: food-review-v1, weight: 90}}\n\
             \x20   - {{modelRewrite: food-review-v2, weight: 10}}\n"
        )
    };
    std::fs::write(&file, doc("10")).unwrap();
    let (h, metrics) = start_with(DataLayerConfig {
        objectives_file: Some(file.clone()),
        ..test_config()
    })
    .await;
    let obj = h.objectives().clone();
    assert_eq!(obj.load().priority("critical"), Some(10));
    let rw = obj.load();
    let targets = rw.rewrite_for("food-review").unwrap();
    assert_eq!(targets.choose(0), Some("food-review-v1"));
    assert_eq!(targets.choose(95), Some("food-review-v2"));

    let label = |outcome: &str| ReloadLabels {
        file: file.display().to_string(),
        outcome: outcome.into(),
    };
    write_atomically(&file, &doc("high"));
    wait_for("rejection", || {
        metrics.file_reloads.get(&label("rejected")).is_some()
    })
    .await;
    assert_eq!(obj.load().priority("critical"), Some(10), "last good kept");
    write_atomically(&file, &doc("-1"));
    wait_for("reload", || obj.load().priority("critical") == Some(-1)).await;
    assert!(obj.load().rewrite_for("food-review").is_some());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_rejects_bad_inputs_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("eps.yaml");
    std::fs::write(
        &eps,
        "endpoints:\n- address: 10.0.0.1\n  port: 8000\n  lables: {}\n",
    )
    .unwrap();
    let try_start = |config: DataLayerConfig| async move {
        start(
            config,
            Arc::new(EndpointStore::new()),
            DataLayerMetrics::default(),
            CancellationToken::new(),
        )
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = try_start(DataLayerConfig {
        endpoints_file: Some(eps.clone()),
        ..test_config()
    })
    .await;
    assert!(
        e.contains("eps.yaml") && e.contains("lables") && e.contains("line 4"),
        "{e}"
    );

    std::fs::write(&eps, "endpoints:\n- {address: 10.0.0.1, port: 8000}\n").unwrap();
    let e = try_start(DataLayerConfig {
        endpoints_file: Some(eps.clone()),
        static_endpoints: parse_endpoints_flag("10.0.0.1:8000", &[]).unwrap(),
        ..test_config()
    })
    .await;
    assert!(
        e.contains("--endpoints and") && e.contains("10.0.0.1:8000"),
        "{e}"
    );

    let e = try_start(DataLayerConfig {
        endpoints_file: Some(dir.path().join("missing.yaml")),
        ..test_config()
    })
    .await;
    assert!(e.contains("missing.yaml: cannot read"), "{e}");

    let obj = dir.path().join("obj.yaml");
    std::fs::write(
        &obj,
        "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: a}\nspec: {prio: 1}\n",
    )
    .unwrap();
    let e = try_start(DataLayerConfig {
        objectives_file: Some(obj),
        ..test_config()
    })
    .await;
    assert!(
        e.contains("obj.yaml: document 1") && e.contains("prio"),
        "{e}"
    );

    let e = try_start(DataLayerConfig {
        metric_overrides: MetricOverrides {
            kv_cache_usage_percentage: Some("kv{a=~\"x\"}".into()),
            ..Default::default()
        },
        ..test_config()
    })
    .await;
    assert!(e.contains("only '='"), "{e}");

    let e = try_start(DataLayerConfig {
        refresh_interval: Duration::ZERO,
        ..test_config()
    })
    .await;
    assert!(e.contains("refresh interval"), "{e}");
    let e = try_start(DataLayerConfig {
        metrics_path: "metrics".into(),
        ..test_config()
    })
    .await;
    assert!(e.contains("absolute URL path"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_name_overrides_and_metrics_port_are_honoured() {
    let page = "custom_waiting{kind=\"q\"} 6\ncustom_waiting{kind=\"other\"} 99\n\
                vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.3\n";
    let metrics_srv = serve("127.0.0.10", Reply::Text(page.into())).await;
    // The endpoint's own port has nothing listening; metrics come from metrics_port.
    let serving = closed_addr("127.0.0.10").await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&serving.to_string(), &[]).unwrap(),
        metrics_port: Some(metrics_srv.addr.port()),
        metric_overrides: MetricOverrides {
            total_queued_requests: Some("custom_waiting{kind=q}".into()),
            ..Default::default()
        },
        ..test_config()
    };
    let (h, _) = start_with(config).await;
    let ep = endpoint(&h, &serving.to_string());
    wait_for("scrape", || ep.metrics().updated_at.is_some()).await;
    assert_eq!(ep.metrics().waiting_queue_size, 6);
    h.shutdown().await;
}

/// A discovery source changes the metrics port while scrapers run (Kubernetes: the pool
/// goes from one target port to several): running scrapers follow before their next scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_port_changes_while_running() {
    let page = vllm_page(3, 1, 0.5, "vllm:kv_cache_usage_perc");
    let own = serve("127.0.0.11", Reply::Text(page.clone())).await;
    let side = serve("127.0.0.11", Reply::Text(page)).await;
    let config = DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&own.name(), &[]).unwrap(),
        metrics_port: Some(side.addr.port()),
        ..test_config()
    };
    let (h, _) = start_with(config).await;
    assert_eq!(h.metrics_port().get(), Some(side.addr.port()));
    wait_for("scrapes on the metrics port", || side.hits() >= 2).await;
    assert_eq!(own.hits(), 0);
    h.metrics_port().set(None);
    wait_for("scrapes on the endpoint's own port", || own.hits() >= 2).await;
    let side_hits = side.hits();
    let own_hits = own.hits();
    wait_for("more scrapes on the own port", || {
        own.hits() >= own_hits + 3
    })
    .await;
    assert!(
        side.hits() <= side_hits + 1,
        "the old port is no longer scraped"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_stop_scraping() {
    let srv = serve(
        "127.0.0.11",
        Reply::Text(vllm_page(1, 1, 0.1, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let cancel = CancellationToken::new();
    let store = Arc::new(EndpointStore::new());
    let metrics = DataLayerMetrics::default();
    let h = start(
        DataLayerConfig {
            static_endpoints: parse_endpoints_flag(&srv.name(), &[]).unwrap(),
            ..test_config()
        },
        store.clone(),
        metrics.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    wait_for("scrapes", || srv.hits() >= 3).await;
    // Cancelling the parent token stops the tasks; shutdown then returns promptly.
    cancel.cancel();
    h.shutdown().await;
    let hits = srv.hits();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(srv.hits(), hits, "no scrape after shutdown");

    // Dropping the handle also stops everything.
    let h = start(
        DataLayerConfig {
            static_endpoints: Vec::new(),
            ..test_config()
        },
        store.clone(),
        DataLayerMetrics::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    wait_for("scrapes after restart", || srv.hits() >= hits + 3).await;
    drop(h);
    // The scraper exits on its own; wait until requests stop arriving, then check they stay
    // stopped.
    let mut last = srv.hits();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = srv.hits();
        if now == last {
            break;
        }
        last = now;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(srv.hits(), last);
}

#[test]
fn scrape_uri_brackets_ipv6_and_uses_metrics_port() {
    let settings = crate::ScrapeSettings {
        interval: Duration::from_millis(50),
        timeout: Duration::from_secs(1),
        max_backoff: Duration::from_secs(1),
        max_body_bytes: 1,
        scheme: crate::MetricsScheme::Http,
        tls: None,
        path: "/metrics".into(),
        metrics_port: crate::MetricsPort::default(),
        health: Default::default(),
    };
    let ep = Endpoint::new(
        EndpointId(0),
        EndpointMeta {
            name: "x".into(),
            address: "fd00::1".parse().unwrap(),
            port: 8000,
            labels: BTreeMap::from([(label::ENGINE_TYPE.to_string(), "vllm".to_string())]),
        },
    );
    assert_eq!(
        crate::scraper::scrape_uri(&ep, &settings)
            .unwrap()
            .to_string(),
        "http://[fd00::1]:8000/metrics"
    );
    let s2 = crate::ScrapeSettings {
        metrics_port: crate::MetricsPort::new(Some(9100)),
        path: "/custom/metrics".into(),
        ..settings
    };
    assert_eq!(
        crate::scraper::scrape_uri(&ep, &s2).unwrap().to_string(),
        "http://[fd00::1]:9100/custom/metrics"
    );
}

/// A `/metrics` server that can be killed (listener and open connections closed at once,
/// as `kill -9` does) and restarted on the same address.
struct Killable {
    addr: SocketAddr,
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Killable {
    async fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vllm_page(
                        1,
                        1,
                        0.5,
                        "vllm:kv_cache_usage_perc",
                    )))))
                });
                conns.spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            tasks: Some(tasks),
        }
    }

    /// Aborting the accept task drops its connection set, which aborts every connection.
    async fn kill(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
            while t.join_next().await.is_some() {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_drive_endpoint_health_a_dead_endpoint_is_excluded_and_readmitted() {
    use llmsched_core::health::{FailureKind, Health, HealthPolicy};
    let policy = HealthPolicy {
        backoff: Duration::from_millis(100),
        ..HealthPolicy::default()
    };
    let mut a = Killable::start("127.0.0.40:0".parse().unwrap()).await;
    let b = serve(
        "127.0.0.41",
        Reply::Text(vllm_page(0, 0, 0.1, "vllm:kv_cache_usage_perc")),
    )
    .await;
    let hung = serve_hung("127.0.0.42").await;
    let (h, _m) = start_with(DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&format!("{},{},{hung}", a.addr, b.addr), &[])
            .unwrap(),
        health: policy.clone(),
        ..test_config()
    })
    .await;
    let (ea, eb, eh) = (
        endpoint(&h, &a.addr.to_string()),
        endpoint(&h, &b.name()),
        endpoint(&h, &hung.to_string()),
    );
    let health = |e: &Arc<Endpoint>| e.health(Instant::now(), &policy);
    wait_for("both live endpoints to be healthy", || {
        health(&ea).is_healthy() && health(&eb).is_healthy()
    })
    .await;
    // Accepting connections is not enough: an endpoint that never answers a scrape is
    // never routable.
    assert_eq!(health(&eh), Health::NeverScraped);

    a.kill().await;
    wait_for(
        "the dead endpoint to be marked failing by a refused scrape",
        || {
            ea.health_counters().failures[FailureKind::Connect as usize] > 0
                && !health(&ea).is_healthy()
        },
    )
    .await;
    assert!(health(&eb).is_healthy());
    assert_eq!(ea.health_counters().became_unhealthy, 1);

    let a = Killable::start(a.addr).await;
    // (The scraper observes, logs and counts the transition right after its scrape.)
    wait_for(
        "the restarted endpoint to be readmitted by a scrape",
        || health(&ea).is_healthy() && ea.health_counters().became_healthy == 2,
    )
    .await;
    let c = ea.health_counters();
    // never-scraped → healthy, healthy → failing, failing/awaiting probe → healthy.
    assert_eq!((c.became_unhealthy, c.became_healthy), (1, 2));
    drop(a);
    h.shutdown().await;
}
