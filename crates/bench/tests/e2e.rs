//! End-to-end runs against a tiny OpenAI-compatible server on loopback
//! ([`llmsched_bench::fake_server`]). It is a minimal stand-in, not the simulator: the real
//! `llmsched sim` is being built concurrently, and these tests only need exact, controllable
//! responses (fixed output length, a toy prefix cache, injected faults). No assertion depends
//! on how long anything took, only on lower bounds the server guarantees by sleeping.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use llmsched_bench::fake_server::{FakeServer, FakeServerConfig};
use llmsched_bench::report::{benchmark_report_file, stage_file};
use llmsched_bench::{
    BenchConfig, Comparison, ProgressEvent, RunOptions, RunResult, SavedRun, StageStatus, run,
};
use tokio_util::sync::CancellationToken;

fn shared_prefix_config(
    base_url: &str,
    api: &str,
    streaming: bool,
    load: &str,
    output_len: u64,
) -> BenchConfig {
    let yaml = format!(
        "api: {{type: {api}, streaming: {streaming}}}\n\
         server: {{type: vllm, model_name: fake-model, base_url: '{base_url}', ignore_eos: true}}\n\
         data:\n  type: shared_prefix\n  shared_prefix: {{num_groups: 2, num_prompts_per_group: 3, \
         system_prompt_len: 32, question_len: 8, output_len: {output_len}}}\n\
         {load}\
         report:\n  request_lifecycle: {{summary: true, per_stage: true, per_request: true}}\n"
    );
    BenchConfig::from_yaml_str(&yaml, None).expect("config")
}

const TWO_STAGES: &str = "load:\n  type: poisson\n  interval: 1\n  stages:\n  - {rate: 8, duration: 1}\n  - {rate: 4, duration: 1}\n";

fn opts(label: &str, time_scale: f64) -> RunOptions {
    RunOptions {
        label: label.into(),
        time_scale,
        ..RunOptions::default()
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

fn label_count(r: &RunResult, label: &str) -> u64 {
    r.summary
        .failures
        .by_label
        .0
        .iter()
        .find(|(l, _)| l == label)
        .map_or(0, |(_, f)| f.count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stage_run_writes_correct_reports() {
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    let config = shared_prefix_config(&server.base_url(), "completion", true, TWO_STAGES, 5);
    let r = run(config, opts("fake", 4.0)).await.expect("run");

    assert!(!r.interrupted);
    assert_eq!(r.stages.len(), 2);
    assert_eq!(
        r.stages
            .iter()
            .map(|s| s.planned_requests)
            .collect::<Vec<_>>(),
        [8, 4]
    );
    assert!(r.stages.iter().all(|s| s.status == StageStatus::Completed));
    assert_eq!(r.stages[0].summary.load_summary.count, 8);
    assert_eq!(r.stages[1].summary.load_summary.count, 4);
    assert_eq!(r.summary.successes.count, 12);
    assert_eq!(r.summary.failures.count, 0);
    for rec in &r.records {
        assert_eq!(rec.output_tokens, 5);
        assert_eq!(rec.chunks.iter().map(|c| c.tokens).sum::<u32>(), 5);
        assert_eq!(rec.input_tokens, 40, "server-reported prompt tokens");
        assert_eq!(rec.invalid_chunks, 0);
    }
    // Every request but the first of each group hits the toy cache on its 32-word prefix.
    assert_eq!(r.summary.successes.prompt_tokens.cached, Some(320.0));
    assert_eq!(r.summary.successes.prompt_tokens.total, 480.0);
    // The server waits 5 ms before the first token; at time scale 4 that is ≥ 20 ms.
    let ttft = r
        .summary
        .successes
        .latency
        .time_to_first_token
        .as_ref()
        .expect("ttft");
    assert!(ttft.min >= 0.02, "ttft min {}", ttft.min);
    assert_eq!(r.overhead.requests, 12);
    assert_eq!(r.overhead.chunks, 60);
    assert!(r.overhead.max_in_flight >= 1);
    if cfg!(unix) {
        assert!(r.overhead.cpu_seconds.is_some_and(|c| c > 0.0));
    }
    assert_eq!(server.stats().requests.load(Ordering::Relaxed), 12);

    let dir = tempfile::tempdir().expect("tmp");
    r.write_to_dir(dir.path()).expect("write");
    let stage0 = read_json(&dir.path().join(stage_file(0)));
    assert_eq!(stage0["load_summary"]["count"], 8);
    assert_eq!(stage0["load_summary"]["requested_rate"], 8.0);
    assert_eq!(stage0["successes"]["output_len"]["mean"], 5.0);
    let summary = read_json(&dir.path().join("summary_lifecycle_metrics.json"));
    assert_eq!(summary["successes"]["count"], 12);
    let br: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(dir.path().join(benchmark_report_file(1))).expect("read"),
    )
    .expect("yaml");
    let total = br
        .get("results")
        .and_then(|r| r.get("request_performance"))
        .and_then(|r| r.get("aggregate"))
        .and_then(|a| a.get("requests"))
        .and_then(|q| q.get("total"))
        .and_then(serde_norway::Value::as_u64);
    assert_eq!(total, Some(4));
    let per_request = read_json(&dir.path().join("per_request_lifecycle_metrics.json"));
    assert_eq!(per_request.as_array().expect("array").len(), 12);
    let config_copy =
        BenchConfig::from_file(&dir.path().join("config.yaml")).expect("config.yaml parses");
    assert_eq!(config_copy.stages().expect("stages").len(), 2);
    // The effective seeds are recorded, so the copy reproduces the run.
    assert_eq!(
        config_copy.data.shared_prefix.as_ref().and_then(|s| s.seed),
        Some(42)
    );
    assert_eq!(config_copy.load.base_seed, Some(42));

    let saved = SavedRun::load(dir.path()).expect("load");
    let cmp = Comparison::new("a", saved.overall().expect("summary"), "b", &r.summary);
    assert_eq!(
        cmp.row("Requests/sec").and_then(|row| row.delta()),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_counted_by_cause() {
    let server = FakeServer::start(FakeServerConfig {
        fail_every: Some(5),
        truncate_every: Some(7),
        garbage_every: Some(3),
        omit_done_every: Some(11),
        ..FakeServerConfig::default()
    })
    .await
    .expect("server");
    let load =
        "load:\n  type: concurrent\n  stages:\n  - {num_requests: 30, concurrency_level: 4}\n";
    let config = shared_prefix_config(&server.base_url(), "completion", true, load, 6);
    let r = run(config, opts("faults", 1.0)).await.expect("run");

    // Server arrival n = 1..30: 503 when n % 5 == 0 (6 requests); cut off mid-body when
    // n % 7 == 0, or no [DONE] when n % 11 == 0 (7, 14, 21, 28, 11, 22: 6 requests);
    // a non-JSON line when n % 3 == 0 and the request was not rejected (8 requests).
    assert_eq!(r.summary.load_summary.count, 30);
    assert_eq!(label_count(&r, "503 - Service Unavailable"), 6);
    assert_eq!(
        label_count(&r, "clientpayloaderror"),
        6,
        "{:#?}",
        r.summary.failures.by_label
    );
    assert_eq!(r.summary.failures.count, 12);
    assert_eq!(r.summary.successes.count, 18);
    assert_eq!(
        r.records
            .iter()
            .map(|x| u64::from(x.invalid_chunks))
            .sum::<u64>(),
        8
    );
    // Successful requests with a garbage line still count all their tokens.
    assert!(
        r.records
            .iter()
            .filter(|x| x.error.is_none())
            .all(|x| x.output_tokens == 6)
    );
    assert_eq!(r.stages[0].summary.load_summary.concurrency, Some(4));

    let dir = tempfile::tempdir().expect("tmp");
    r.write_to_dir(dir.path()).expect("write");
    let summary = read_json(&dir.path().join("summary_lifecycle_metrics.json"));
    assert_eq!(
        summary["failures"]["by_label"]["503 - Service Unavailable"]["count"],
        6
    );
    let meta = read_json(&dir.path().join("bench_run.json"));
    assert_eq!(meta["invalid_chunks"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_fails_every_request_but_reports() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = shared_prefix_config(
        &format!("http://127.0.0.1:{port}"),
        "completion",
        true,
        "load:\n  type: constant\n  stages:\n  - {rate: 10, duration: 1}\n",
        5,
    );
    let r = run(config, opts("down", 5.0)).await.expect("run completes");
    assert_eq!(r.summary.failures.count, 10);
    assert_eq!(label_count(&r, "Connection Error"), 10);
    assert_eq!(r.summary.successes.count, 0);
    let dir = tempfile::tempdir().expect("tmp");
    r.write_to_dir(dir.path()).expect("write");
    let br = std::fs::read_to_string(dir.path().join(benchmark_report_file(0))).expect("read");
    let v: serde_norway::Value = serde_norway::from_str(&br).expect("yaml");
    let agg = v
        .get("results")
        .and_then(|r| r.get("request_performance"))
        .and_then(|r| r.get("aggregate"))
        .expect("aggregate");
    assert!(agg.get("latency").is_none());
    assert_eq!(
        agg.get("requests")
            .and_then(|q| q.get("failures"))
            .and_then(serde_norway::Value::as_u64),
        Some(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_discovery_failure_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut config = shared_prefix_config(
        &format!("http://127.0.0.1:{port}"),
        "completion",
        true,
        "load:\n  type: constant\n  stages:\n  - {rate: 1, duration: 1}\n",
        5,
    );
    config.server.as_mut().expect("server").model_name = None;
    let err = run(config, opts("x", 1.0)).await.expect_err("no server");
    assert!(err.to_string().contains("/v1/models"), "{err}");

    // With a server, the model is discovered.
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    let mut config = shared_prefix_config(
        &server.base_url(),
        "completion",
        true,
        "load:\n  type: constant\n  stages:\n  - {rate: 2, duration: 1}\n",
        5,
    );
    config.server.as_mut().expect("server").model_name = None;
    let r = run(config, opts("x", 4.0)).await.expect("run");
    assert_eq!(r.model, "fake-model");
    assert_eq!(r.summary.successes.count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_reported_as_timeout() {
    let server = FakeServer::start(FakeServerConfig {
        ttft: Duration::from_secs(30),
        ..FakeServerConfig::default()
    })
    .await
    .expect("server");
    let load =
        "load:\n  type: constant\n  request_timeout: 0.2\n  stages:\n  - {rate: 4, duration: 1}\n";
    let config = shared_prefix_config(&server.base_url(), "completion", true, load, 5);
    let r = run(config, opts("timeouts", 1.0)).await.expect("run");
    assert_eq!(label_count(&r, "Timeout"), 4);
    // Latency is at least the timeout.
    let lat = r
        .summary
        .failures
        .request_latency
        .as_ref()
        .expect("latency");
    assert!(lat.min >= 0.2, "{}", lat.min);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_context_grows_per_session() {
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    for api in ["completion", "chat"] {
        let load = "load:\n  type: constant\n  stages:\n  - {rate: 8, duration: 1}\n";
        let yaml = format!(
            "api: {{type: {api}, streaming: true}}\n\
             server: {{model_name: fake-model, base_url: '{}'}}\n\
             data:\n  type: shared_prefix\n  shared_prefix: {{num_groups: 1, num_prompts_per_group: 2, \
             system_prompt_len: 6, question_len: 4, output_len: 3, enable_multi_turn_chat: true}}\n{load}",
            server.base_url()
        );
        let config = BenchConfig::from_yaml_str(&yaml, None).expect("config");
        let r = run(config, opts(api, 4.0)).await.expect("run");
        assert_eq!(r.summary.successes.count, 8, "{api}");
        // Session s gets requests s, s + 2, s + 4, s + 6; turn t sends t + 1 copies of the
        // 10-word prompt and t replies of 3 words: 10, 23, 36, 49 tokens.
        for session in 0..2u64 {
            let mut turns: Vec<_> = r
                .records
                .iter()
                .filter(|x| x.session == Some(session))
                .collect();
            turns.sort_by_key(|x| x.data_index);
            let tokens: Vec<u64> = turns.iter().map(|x| x.input_tokens).collect();
            assert_eq!(tokens, [10, 23, 36, 49], "{api} session {session}");
            assert!(
                turns
                    .windows(2)
                    .all(|w| w[0].request_bytes < w[1].request_bytes)
            );
            // A session's turns never overlap.
            assert!(turns.windows(2).all(|w| w[0].end_time <= w[1].start_time));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_streaming_and_multi_token_chunks() {
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    let load = "load:\n  type: constant\n  stages:\n  - {rate: 6, duration: 1}\n";
    let config = shared_prefix_config(&server.base_url(), "chat", false, load, 5);
    let r = run(config, opts("chat", 4.0)).await.expect("run");
    assert_eq!(r.summary.successes.count, 6);
    assert!(
        r.summary.successes.latency.time_to_first_token.is_none(),
        "no TTFT without streaming"
    );
    assert_eq!(
        r.summary.successes.output_len.as_ref().expect("len").mean,
        5.0
    );
    assert!(r.records.iter().all(|x| !x.streamed && x.chunks.is_empty()));

    let chunky = FakeServer::start(FakeServerConfig {
        tokens_per_chunk: 3,
        ..FakeServerConfig::default()
    })
    .await
    .expect("server");
    let config = shared_prefix_config(&chunky.base_url(), "chat", true, load, 7);
    let r = run(config, opts("chunky", 4.0)).await.expect("run");
    assert_eq!(r.summary.successes.count, 6);
    for rec in &r.records {
        assert_eq!(
            rec.chunks.iter().map(|c| c.tokens).collect::<Vec<_>>(),
            [3, 3, 1]
        );
        assert_eq!(rec.output_tokens, 7);
    }
    // Tokens of one chunk share its arrival time: the pooled ITL contains zeros.
    let itl = r
        .summary
        .successes
        .latency
        .inter_token_latency
        .as_ref()
        .expect("itl");
    assert_eq!(itl.min, 0.0);
    assert_eq!(r.summary.successes.token_count_mismatches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_keeps_finished_requests() {
    let server = FakeServer::start(FakeServerConfig::default())
        .await
        .expect("server");
    let load = "load:\n  type: constant\n  stages:\n  - {rate: 20, duration: 100}\n  - {rate: 1, duration: 1}\n";
    let config = shared_prefix_config(&server.base_url(), "completion", true, load, 5);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let saw_start = Arc::new(AtomicBool::new(false));
    let seen = saw_start.clone();
    let progress = Arc::new(move |e: &ProgressEvent| match e {
        ProgressEvent::StageStarted { total_requests, .. } => {
            assert_eq!(*total_requests, 2000);
            seen.store(true, Ordering::SeqCst);
        }
        ProgressEvent::RequestFinished { finished, .. } if *finished >= 3 => trigger.cancel(),
        _ => {}
    });
    let r = run(
        config,
        RunOptions {
            label: "cancel".into(),
            cancel: Some(cancel),
            progress: Some(progress),
            ..RunOptions::default()
        },
    )
    .await
    .expect("run");
    assert!(saw_start.load(Ordering::SeqCst));
    assert!(r.interrupted);
    assert_eq!(r.stages.len(), 1, "the second stage never starts");
    assert_eq!(r.stages[0].status, StageStatus::Interrupted);
    assert!(
        r.records.len() >= 3 && r.records.len() < 2000,
        "{}",
        r.records.len()
    );
    let dir = tempfile::tempdir().expect("tmp");
    r.write_to_dir(dir.path()).expect("write");
    assert_eq!(
        read_json(&dir.path().join("bench_run.json"))["interrupted"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_time_scale_is_rejected() {
    let config = shared_prefix_config("http://127.0.0.1:9", "completion", true, TWO_STAGES, 5);
    for bad in [0.0, -1.0, f64::NAN] {
        assert!(run(config.clone(), opts("x", bad)).await.is_err());
    }
}
