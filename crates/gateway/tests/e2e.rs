//! End to end with real parts: simulated vLLM replicas on distinct loopback IPs, the EPP
//! started in-process exactly as `llmsched epp` starts it, a real Envoy process running the
//! generated bootstrap in front of it, and the EPP's built-in proxy. Every scenario runs
//! through both front doors and must give the same results.
//!
//! Which endpoint served a request is established from three independent counters: the
//! EPP's `dispatched_total` per endpoint (what the scheduler chose), the replicas' own
//! finished-request counters (who really served), and, through Envoy, the
//! `x-llmsched-upstream-host` response header (where Envoy connected).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use llmsched_gateway::bootstrap::UPSTREAM_HOST_HEADER;
use llmsched_gateway::{BootstrapConfig, Mode};
use support::*;

/// Sends `body` through `door` and checks that exactly one endpoint was chosen by the EPP,
/// that this replica (and no other) served it, and (through Envoy) that Envoy connected
/// there. Returns the reply and the endpoint.
async fn send_and_locate(
    stack: &Stack,
    door: (&str, std::net::SocketAddr),
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> (Reply, String) {
    let (name, addr) = door;
    let d0 = stack.dispatched();
    let f0 = stack.finished();
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    let reply = send(&client(false), "POST", addr, path, &h, body).await;
    assert_eq!(reply.status, 200, "{name} {path}: {}", reply.text());
    let chosen = grown(&d0, &stack.dispatched());
    assert_eq!(
        chosen.len(),
        1,
        "{name}: the EPP must dispatch once: {chosen:?}"
    );
    let (endpoint, n) = chosen.into_iter().next().unwrap();
    assert_eq!(n, 1);
    wait_until("the replica to count the request", || {
        grown(&f0, &stack.finished()).get(&endpoint) == Some(&1)
    })
    .await;
    let served = grown(&f0, &stack.finished());
    assert_eq!(
        served.len(),
        1,
        "{name}: only the chosen replica serves: {served:?}"
    );
    if name == "envoy" {
        assert_eq!(
            reply.header(UPSTREAM_HOST_HEADER).as_deref(),
            Some(endpoint.as_str()),
            "Envoy must connect where the EPP pointed"
        );
    }
    assert_eq!(
        reply.header("x-went-into-resp-headers").as_deref(),
        Some("true"),
        "{name}: the EPP's response marker"
    );
    (reply, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_requests_reach_the_chosen_endpoint_intact() {
    let stack = Stack::start(3, fast_replica(), &[]).await;
    let big = big_prompt(1, 1_100_000);
    let small = words(7, 300);
    // (case, path, body, streaming, sent in many chunks)
    let cases: Vec<(&str, &str, String, bool, bool)> = vec![
        (
            "completions",
            "/v1/completions",
            completion(&small, 8, false),
            false,
            false,
        ),
        (
            "completions-stream",
            "/v1/completions",
            completion(&small, 8, true),
            true,
            false,
        ),
        (
            "chat",
            "/v1/chat/completions",
            chat(&small, 8, false),
            false,
            false,
        ),
        (
            "chat-stream",
            "/v1/chat/completions",
            chat(&small, 8, true),
            true,
            false,
        ),
        (
            "big-completions",
            "/v1/completions",
            completion(&big, 4, false),
            false,
            true,
        ),
        (
            "big-chat-stream",
            "/v1/chat/completions",
            chat(&big, 4, true),
            true,
            true,
        ),
    ];
    for (case, path, body, streaming, chunks) in &cases {
        let body = Bytes::from(body.clone());
        let mut replies = Vec::new();
        for door in stack.doors() {
            let request_id = format!("e2e-{case}");
            let headers = [("x-request-id", request_id.as_str())];
            let sent = if *chunks {
                assert!(body.len() > 1_000_000);
                chunked(body.clone(), 16 * 1024)
            } else {
                full(body.clone())
            };
            let (reply, endpoint) = send_and_locate(&stack, door, path, &headers, sent).await;
            let ctype = reply.header("content-type").unwrap_or_default();
            assert_eq!(
                ctype.contains("text/event-stream"),
                *streaming,
                "{case}: {ctype}"
            );
            if *streaming {
                assert!(
                    reply.text().ends_with("data: [DONE]\n\n"),
                    "{case}: {}",
                    reply.text()
                );
            } else {
                let usage = &reply.json()["usage"];
                assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{case}");
            }
            // The same request sent straight to that replica gives the same bytes.
            let direct = send(
                &client(false),
                "POST",
                endpoint.parse().unwrap(),
                path,
                &[
                    ("content-type", "application/json"),
                    ("x-request-id", &request_id),
                ],
                full(body.clone()),
            )
            .await;
            assert_eq!(direct.status, 200);
            assert_eq!(
                normalize(&reply.body),
                normalize(&direct.body),
                "{case} via {}: differs from the direct reply",
                door.0
            );
            replies.push(normalize(&reply.body));
        }
        assert_eq!(replies[0], replies[1], "{case}: Envoy and the proxy differ");
    }
    // Envoy health-checks the EPP over gRPC and finds it healthy.
    wait_until_async("Envoy to see the EPP healthy", || epp_healthy(&stack.envoy)).await;
    stack.shutdown().await;
}

async fn epp_healthy(envoy: &llmsched_gateway::Envoy) -> bool {
    let (_, clusters) = envoy.admin_get("/clusters").await.unwrap();
    clusters
        .lines()
        .any(|l| l.starts_with("llmsched_epp::") && l.ends_with("::health_flags::healthy"))
}

async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_have_the_documented_statuses_through_both_doors() {
    let stack = Stack::start(2, fast_replica(), &[]).await;
    let second = stack.sim.addrs()[1];
    let hint_other_port = format!("{}:1", second.ip());
    let ok = completion(&words(3, 20), 2, false);
    // (case, headers, body, status, body prefix)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "bad json",
            vec![],
            r#"{"model": "x", "prompt": "#.into(),
            400,
            "inference error: BadRequest - error unmarshaling request body",
        ),
        (
            "not an object",
            vec![],
            "[1, 2]".into(),
            400,
            "inference error: BadRequest - error unmarshaling request body",
        ),
        (
            "missing model",
            vec![],
            r#"{"prompt": "hello"}"#.into(),
            400,
            "inference error: BadRequest - model not found in request body",
        ),
        (
            "subset hint without a match",
            vec![("x-gateway-destination-endpoint-subset", "10.9.9.9:8000")],
            ok.clone(),
            503,
            "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request",
        ),
        (
            "empty subset hint",
            vec![("x-gateway-destination-endpoint-subset", "")],
            ok.clone(),
            503,
            "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request",
        ),
    ];
    for (case, headers, body, status, prefix) in &cases {
        let mut seen = Vec::new();
        for (door, addr) in stack.doors() {
            let d0 = stack.dispatched();
            let r = post(addr, "/v1/completions", headers, body).await;
            assert_eq!(r.status, *status, "{case} via {door}: {}", r.text());
            assert!(
                r.text().starts_with(prefix),
                "{case} via {door}: {}",
                r.text()
            );
            assert!(
                grown(&d0, &stack.dispatched()).is_empty(),
                "{case}: nothing dispatched"
            );
            seen.push((r.status, r.text(), r.header("content-type")));
        }
        assert_eq!(seen[0], seen[1], "{case}: Envoy and the proxy differ");
    }
    // A matching hint restricts the candidates by IP (the port is ignored).
    for door in stack.doors() {
        for _ in 0..4 {
            let (_, endpoint) = send_and_locate(
                &stack,
                door,
                "/v1/completions",
                &[("x-gateway-destination-endpoint-subset", &hint_other_port)],
                full(ok.clone()),
            )
            .await;
            assert_eq!(endpoint, second.to_string(), "via {}", door.0);
        }
    }
    assert_eq!(inflight(&stack.epp), 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_only_requests_and_other_paths_go_to_one_endpoint() {
    let stack = Stack::start(2, fast_replica(), &[]).await;
    for (door, addr) in stack.doors() {
        let r = send(&client(false), "GET", addr, "/v1/models", &[], full("")).await;
        assert_eq!(r.status, 200, "{door}: {}", r.text());
        assert_eq!(r.json()["data"][0]["id"], MODEL, "{door}");
        let r = send(&client(false), "GET", addr, "/health", &[], full("")).await;
        assert_eq!(r.status, 200, "{door}");
        // A path the OpenAI parser does not know is parsed as completions and scheduled.
        let r = post(
            addr,
            "/tokenize",
            &[],
            &serde_json::json!({"model": MODEL, "prompt": "a b c"}).to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{door}: {}", r.text());
        assert_eq!(r.json()["count"], 3, "{door}: {}", r.text());
        // Unknown routes reach the model server, which answers 404.
        let r = send(&client(false), "GET", addr, "/no/such/path", &[], full("")).await;
        assert_eq!(r.status, 404, "{door}");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_endpoints() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(&file, "endpoints: []\n").unwrap();
    let epp = start_epp("", &[&format!("--endpoints-file={}", file.display())]).await;
    let envoy = start_envoy_for(&epp).await;
    let doors = [
        ("envoy", envoy.listener_addr()),
        ("proxy", epp.proxy_addr.unwrap()),
    ];
    let mut seen = Vec::new();
    for (door, addr) in doors {
        let r = post(addr, "/v1/completions", &[], &completion("hi", 2, false)).await;
        assert_eq!(r.status, 503, "{door}: {}", r.text());
        assert_eq!(
            r.text(),
            "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request",
            "{door}"
        );
        let g = send(&client(false), "GET", addr, "/v1/models", &[], full("")).await;
        assert_eq!(g.status, 500, "{door}: {}", g.text());
        assert_eq!(
            g.text(),
            "inference error: Internal - no pods available in datastore",
            "{door}"
        );
        seen.push((r.status, r.text(), g.status, g.text()));
    }
    assert_eq!(seen[0], seen[1]);
    drop(envoy);
    epp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_refusing_connections_give_503() {
    init_logs();
    // A port nobody listens on: bind, note it, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
        l.local_addr().unwrap()
    };
    let epp = start_epp(&closed.to_string(), &[]).await;
    let envoy = start_envoy_for(&epp).await;
    for (door, addr) in [
        ("envoy", envoy.listener_addr()),
        ("proxy", epp.proxy_addr.unwrap()),
    ] {
        let r = post(addr, "/v1/completions", &[], &completion("hi", 2, false)).await;
        assert_eq!(r.status, 503, "{door}: {}", r.text());
        assert!(
            r.text()
                .starts_with("upstream connect error or disconnect/reset before headers"),
            "{door}: {}",
            r.text()
        );
        wait_until("in-flight counts to drain", || inflight(&epp) == 0).await;
    }
    drop(envoy);
    epp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_tries_the_fallback_endpoint_when_connecting_fails() {
    init_logs();
    let sim = start_sim(1, fast_replica()).await;
    let live = sim.addrs()[0];
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.8:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: random-picker\n  parameters: {maxNumOfEndpoints: 2}\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: random-picker\n";
    // Health checks off: the dead endpoint stays a candidate (as in the reference), so the
    // picker's fallback list is what saves the request. (With them on it is never picked;
    // see tests/endpoint_health.rs in the llmsched crate.)
    let epp = start_epp(
        &format!("{live},{dead}"),
        &[
            &format!("--config-text={config}"),
            "--endpoint-health-checks=false",
        ],
    )
    .await;
    let proxy = epp.proxy_addr.unwrap();
    let mut sent = 0;
    // The random picker puts the dead endpoint first half of the time; go on until it has
    // been first a few times (the chance of never is 2^-60).
    while dispatched(&epp)[&dead.to_string()] < 3 {
        assert!(sent < 60, "the dead endpoint was never picked first");
        let r = post(
            proxy,
            "/v1/completions",
            &[],
            &completion("hi there", 2, false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        sent += 1;
    }
    wait_until("the live replica to serve every request", || {
        finished(&sim)[&live.to_string()] == sent
    })
    .await;
    // In-flight counts moved to the endpoint that served, and were released.
    assert_eq!(inflight(&epp), 0);
    epp.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnects_cancel_the_upstream_request() {
    // Real time: a 20,000-token generation takes minutes, a disconnect must end it at once.
    let cfg = ReplicaConfigExt::slow();
    let stack = Stack::start(1, cfg, &[]).await;
    for (door, addr) in stack.doors() {
        let c = client(false);
        let req = http::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(full(completion("tell me everything", 20_000, true)))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{door}");
        let mut body = resp.into_body();
        // The first SSE chunk arrives while the replica is still generating: relayed as
        // produced, not buffered.
        let first = loop {
            let f = body.frame().await.expect("a first frame").unwrap();
            if let Ok(d) = f.into_data()
                && !d.is_empty()
            {
                break d;
            }
        };
        assert!(first.starts_with(b"data: {"), "{door}: {first:?}");
        assert_eq!(running(&stack.sim), 1, "{door}: still generating");
        assert_eq!(inflight(&stack.epp), 1, "{door}");
        drop(body);
        drop(c);
        wait_until("the replica to abort the request", || {
            running(&stack.sim) == 0
        })
        .await;
        wait_until("the EPP to release the in-flight count", || {
            inflight(&stack.epp) == 0
        })
        .await;
    }
    stack.shutdown().await;
}

/// Replica settings for specific tests.
struct ReplicaConfigExt;

impl ReplicaConfigExt {
    fn slow() -> llmsched_sim::ReplicaConfig {
        llmsched_sim::ReplicaConfig::from_profile("llama3.1-8b-h100")
            .unwrap()
            .with_time_scale(1.0)
    }

    fn with_adapter() -> llmsched_sim::ReplicaConfig {
        let mut c = fast_replica().with_lora(1, 1);
        c.lora.modules = vec![("adapter-x".into(), "/adapters/x".into())];
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn model_rewrites_are_undone_in_responses() {
    let stack = Stack::start(1, ReplicaConfigExt::with_adapter(), &[]).await;
    let replica = stack.sim.addrs()[0];
    for (case, path, streaming) in [
        ("completions", "/v1/completions", false),
        ("chat-stream", "/v1/chat/completions", true),
    ] {
        let body = if path.ends_with("chat/completions") {
            chat(&words(11, 50), 6, streaming)
        } else {
            completion(&words(11, 50), 6, streaming)
        };
        let id = format!("rewrite-{case}");
        let mut seen = Vec::new();
        for door in stack.doors() {
            let (reply, _) = send_and_locate(
                &stack,
                door,
                path,
                &[
                    ("x-request-id", &id),
                    ("x-llm-d-model-name-rewrite", "adapter-x"),
                ],
                full(body.clone()),
            )
            .await;
            assert!(
                !reply.text().contains("adapter-x"),
                "{case} via {}: {}",
                door.0,
                reply.text()
            );
            seen.push(normalize(&reply.body));
        }
        // The replica served the adapter; the client sees the model it asked for.
        let direct = send(
            &client(false),
            "POST",
            replica,
            path,
            &[("content-type", "application/json"), ("x-request-id", &id)],
            full(body.replace(MODEL, "adapter-x")),
        )
        .await;
        assert_eq!(direct.status, 200, "{}", direct.text());
        assert!(direct.text().contains("\"model\":\"adapter-x\""));
        let expected = normalize(&direct.body).replace("adapter-x", MODEL);
        assert_eq!(seen[0], expected, "{case} via Envoy");
        assert_eq!(seen[1], expected, "{case} via the proxy");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_clients_get_the_same_answers() {
    let stack = Stack::start(2, fast_replica(), &[]).await;
    let body = chat(&words(5, 40), 5, true);
    let mut seen = Vec::new();
    for (door, addr) in stack.doors() {
        let r = send(
            &client(true),
            "POST",
            addr,
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("x-request-id", "h2c"),
            ],
            full(body.clone()),
        )
        .await;
        assert_eq!(r.status, 200, "{door}: {}", r.text());
        assert!(r.text().ends_with("data: [DONE]\n\n"), "{door}");
        seen.push(normalize(&r.body));
        let m = send(&client(true), "GET", addr, "/v1/models", &[], full("")).await;
        assert_eq!(m.status, 200, "{door}");
    }
    assert_eq!(seen[0], seen[1]);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_epp_behind_envoy() {
    // The EPP's default: ext_proc over TLS with a self-signed certificate; Envoy
    // health-checks the plaintext health port.
    let stack = Stack::start(2, fast_replica(), &["--secure-serving=true"]).await;
    assert!(stack.epp.tls_certificate_pem.is_some());
    let door = stack.doors()[0];
    let (reply, _) = send_and_locate(
        &stack,
        door,
        "/v1/completions",
        &[],
        full(completion(&words(9, 30), 3, false)),
    )
    .await;
    assert_eq!(reply.json()["object"], "text_completion");
    wait_until_async("Envoy to see the TLS EPP healthy", || {
        epp_healthy(&stack.envoy)
    })
    .await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baselines_spread_requests_in_turn() {
    init_logs();
    let sim = start_sim(3, fast_replica()).await;
    let endpoints: Vec<String> = sim.addrs().iter().map(|a| a.to_string()).collect();
    // The built-in proxy's round-robin baseline.
    let epp = start_epp(&endpoints.join(","), &["--baseline=round-robin"]).await;
    let f0 = finished(&sim);
    for _ in 0..6 {
        let r = post(
            epp.proxy_addr.unwrap(),
            "/v1/completions",
            &[],
            &completion("a b", 2, false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-went-into-resp-headers"),
            None,
            "no EPP on this path"
        );
    }
    wait_until("six requests served", || {
        grown(&f0, &finished(&sim)).values().sum::<u64>() == 6
    })
    .await;
    let served = grown(&f0, &finished(&sim));
    assert_eq!(served.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    assert_eq!(
        dispatched(&epp).values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    // The baseline does not parse: the model server answers invalid JSON itself.
    let r = post(epp.proxy_addr.unwrap(), "/v1/completions", &[], "{oops").await;
    assert_eq!(r.status, 400);
    assert!(!r.text().starts_with("inference error"), "{}", r.text());
    assert_eq!(inflight(&epp), 0);
    epp.shutdown().await;

    // Envoy with a plain ROUND_ROBIN cluster (the "Kubernetes Service").
    let envoy = start_envoy(&BootstrapConfig {
        mode: Mode::RoundRobin,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        endpoints: sim.addrs(),
        upstream_host_header: true,
        ..BootstrapConfig::default()
    })
    .await;
    let f0 = finished(&sim);
    let mut hosts = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..6 {
        let r = post(
            envoy.listener_addr(),
            "/v1/completions",
            &[],
            &completion("a b", 2, false),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        *hosts
            .entry(r.header(UPSTREAM_HOST_HEADER).unwrap())
            .or_default() += 1;
    }
    assert_eq!(hosts.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    wait_until("six requests served", || {
        grown(&f0, &finished(&sim)).values().sum::<u64>() == 6
    })
    .await;
    drop(envoy);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_rejects_oversized_bodies_before_reading_them() {
    let stack = Stack::start(1, fast_replica(), &[]).await;
    let proxy = stack.epp.proxy_addr.unwrap();
    // Declared far beyond the 64 MiB limit: answered without waiting for the body.
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(grown(&Default::default(), &stack.dispatched()).is_empty());
    stack.shutdown().await;
}
