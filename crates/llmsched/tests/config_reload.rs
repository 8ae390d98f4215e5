//! `--config-file` reload of a running `llmsched epp` process under load (two `llmsched sim`
//! processes behind its proxy, four clients sending requests all along):
//!
//! * an edit that changes scorer weights takes effect: with `session-affinity-scorer` at
//!   weight 0 a request's `x-session-token` is ignored and prefix affinity decides; at weight
//!   100 the token decides (the serving endpoint is read from the `x-session-token` the
//!   same plugin sets on every response);
//! * the approximate prefix index survives reloads that leave `prefix-cache-scorer`
//!   unchanged: prompts seen before the reloads still go to the endpoint holding them;
//! * a broken edit is rejected with the error a start with that file prints, logged and
//!   counted, and decisions keep following the previous configuration;
//! * with polling off (a long `--config-reload-interval`) SIGHUP reloads;
//! * not one request fails throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use common::*;

/// A configuration: prefix-cache-scorer (parameters fixed), active-request-scorer and
/// session-affinity-scorer with the given weights.
fn config(prefix: u32, active: u32, session: u32) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {{blockSizeTokens: 16, autoTune: false, lruCapacityPerServer: 50000}}
- type: active-request-scorer
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: {prefix}
  - pluginRef: active-request-scorer
    weight: {active}
  - pluginRef: session-affinity-scorer
    weight: {session}
"
    )
}

/// Replaces the file in one step (as editors and ConfigMap updates do).
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token(endpoint: SocketAddr) -> String {
    base64::engine::general_purpose::STANDARD.encode(endpoint.to_string())
}

/// A prompt with a long prefix of its own (its blocks identify it in the prefix index).
fn sticky_prompt(tag: &str) -> String {
    format!(
        "{} {tag}",
        format!("context of conversation {tag}: ").repeat(40)
    )
}

/// Sends `prompt` through the proxy (with `x-session-token: session` when given); the
/// endpoint that served it, from the response's `x-session-token`.
async fn served_by(
    proxy: SocketAddr,
    sims: &[SocketAddr],
    prompt: &str,
    session: Option<SocketAddr>,
) -> SocketAddr {
    let t = session.map(token);
    let headers: Vec<(&str, &str)> = t
        .as_deref()
        .map(|t| vec![("x-session-token", t)])
        .unwrap_or_default();
    let resp = post(proxy, completion(prompt, 4, false), &headers)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp
        .headers()
        .get("x-session-token")
        .expect("x-session-token on the response")
        .to_str()
        .unwrap()
        .to_string();
    use http_body_util::BodyExt;
    resp.into_body().collect().await.unwrap();
    *sims
        .iter()
        .find(|s| token(**s) == got)
        .unwrap_or_else(|| panic!("x-session-token {got} names no replica"))
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Decisions whose target held the whole prompt in the approximate prefix index (prefix
/// indexer hit ratio above 0.9).
async fn full_prefix_hits(epp: &EppProc) -> f64 {
    let (_, m) = get(epp.metrics, "/metrics").await.unwrap();
    let count = metric(&m, "inference_extension_prefix_indexer_hit_ratio_count").unwrap_or(0.0);
    let low = metric(
        &m,
        "inference_extension_prefix_indexer_hit_ratio_bucket{le=\"0.9\"}",
    )
    .unwrap_or(0.0);
    count - low
}

async fn reloads(epp: &EppProc, result: &str) -> f64 {
    let (_, m) = get(epp.metrics, "/metrics").await.unwrap();
    metric(
        &m,
        &format!("llmsched_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

async fn wait_reloads(epp: &EppProc, result: &str, n: f64) {
    let start = std::time::Instant::now();
    while reloads(epp, result).await < n {
        assert!(
            start.elapsed() < DEADLINE,
            "no {result} reload #{n}; log:\n{}",
            epp.log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients sending unique prompts through the proxy until stopped; counts and failures.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<parking_lot::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let stream = i.is_multiple_of(2);
                        let body = completion(&unique_prompt(&format!("load {c} {i}")), 8, stream);
                        match post_whole(proxy, body, &[]).await {
                            Ok((200, _)) => {}
                            Ok((s, b)) => failures.lock().push(format!("{s}: {b}")),
                            Err(e) => failures.lock().push(e),
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failures,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().clone();
        (self.sent.load(Ordering::SeqCst), failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_edits_apply_under_load_without_losing_requests_or_the_prefix_index() {
    init_logs();
    let sims = [
        SimProc::start("127.0.0.91", 10.0).await,
        SimProc::start("127.0.0.92", 10.0).await,
    ];
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let other = |a: SocketAddr| if a == addrs[0] { addrs[1] } else { addrs[0] };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epp.yaml");
    write_config(&path, &config(10, 1, 0));
    let file_flag = format!("--config-file={}", path.display());
    let epp = EppProc::start(&addrs, &[&file_flag, "--config-reload-interval=100ms"]).await;
    let load = Load::start(epp.proxy, 4);

    // Weights A: session affinity 0. Prompts learn their endpoint (the second send of each
    // is decided by its prefix); `p` prompts check the index later, `q` prompts the weights.
    let mut owner: BTreeMap<String, SocketAddr> = BTreeMap::new();
    for tag in (0..8)
        .map(|i| format!("p{i}"))
        .chain((0..4).map(|i| format!("q{i}")))
    {
        let prompt = sticky_prompt(&tag);
        let first = served_by(epp.proxy, &addrs, &prompt, None).await;
        let again = served_by(epp.proxy, &addrs, &prompt, Some(other(first))).await;
        assert_eq!(
            again, first,
            "{tag}: prefix affinity decides, the token is ignored"
        );
        owner.insert(tag, first);
    }

    // Weights B: session affinity 100. The token now wins over the prefix.
    write_config(&path, &config(10, 1, 100));
    wait_reloads(&epp, "success", 1.0).await;
    for i in 0..4 {
        let tag = format!("q{i}");
        let want = other(owner[&tag]);
        let got = served_by(epp.proxy, &addrs, &sticky_prompt(&tag), Some(want)).await;
        assert_eq!(
            got, want,
            "{tag}: the session token decides after the reload"
        );
    }

    // Weights C: back to 0. The `p` prompts were only seen before the reloads: the index
    // built then still sends each to its endpoint (a new index would leave 8 coin flips).
    write_config(&path, &config(10, 1, 0));
    wait_reloads(&epp, "success", 2.0).await;
    let hits_before = full_prefix_hits(&epp).await;
    for i in 0..8 {
        let tag = format!("p{i}");
        let got = served_by(
            epp.proxy,
            &addrs,
            &sticky_prompt(&tag),
            Some(other(owner[&tag])),
        )
        .await;
        assert_eq!(
            got, owner[&tag],
            "{tag}: the prefix index survived two reloads"
        );
    }
    // Each of the 8 was a whole-prompt hit in the index (a fresh index would give none).
    let hits = full_prefix_hits(&epp).await - hits_before;
    assert!(hits >= 8.0, "{hits} whole-prompt hits after the reloads");
    assert!(
        epp.log_contains("carried_over") && epp.log_contains("prefix-cache-scorer"),
        "the reload log names what was carried over"
    );

    // A broken edit: rejected with the start's error, logged, counted; C stays in effect.
    let broken = config(10, 1, 0).replace(
        "  - pluginRef: active-request-scorer",
        "  - pluginRef: no-such-plugin",
    );
    write_config(&path, &broken);
    wait_reloads(&epp, "failure", 1.0).await;
    let start_error = {
        // The same file, read by a fresh start.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmsched"))
            .args(["epp", "--endpoints=127.0.0.1:1", "--secure-serving=false"])
            .arg(format!("--config-file={}", path.display()))
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "a start with the broken file fails");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let detail = "references undefined plugin 'no-such-plugin'";
    assert!(start_error.contains(detail), "{start_error}");
    let expected = format!(
        "config file {}: schedulingProfiles[default] {detail}",
        path.display()
    );
    assert!(start_error.contains(&expected), "{start_error}");
    assert!(
        epp.log_contains("configuration reload rejected") && epp.log_contains(&expected),
        "the rejection is logged with the start's error: {:?}",
        epp.log.lock().unwrap()
    );
    let (_, m) = get(epp.metrics, "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, "llmsched_config_last_reload_successful"),
        Some(0.0)
    );
    for i in 0..4 {
        let tag = format!("p{i}");
        let got = served_by(
            epp.proxy,
            &addrs,
            &sticky_prompt(&tag),
            Some(other(owner[&tag])),
        )
        .await;
        assert_eq!(got, owner[&tag], "{tag}: configuration C still decides");
    }

    // A data-layer edit cannot apply while running: refused as a whole, with the reason.
    let data_layer = config(10, 1, 100).replace(
        "- type: session-affinity-scorer\n",
        "- type: session-affinity-scorer\n- type: metrics-data-source\n  parameters: {path: /other}\n",
    );
    write_config(&path, &data_layer);
    wait_reloads(&epp, "failure", 2.0).await;
    assert!(epp.log_contains("the data layer changed"));
    let got = served_by(
        epp.proxy,
        &addrs,
        &sticky_prompt("p0"),
        Some(other(owner["p0"])),
    )
    .await;
    assert_eq!(got, owner["p0"], "nothing of the refused version applied");

    // The fixed file applies again.
    write_config(&path, &config(10, 1, 100));
    wait_reloads(&epp, "success", 3.0).await;
    let got = served_by(
        epp.proxy,
        &addrs,
        &sticky_prompt("p1"),
        Some(other(owner["p1"])),
    )
    .await;
    assert_eq!(got, other(owner["p1"]));
    let (_, m) = get(epp.metrics, "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, "llmsched_config_last_reload_successful"),
        Some(1.0)
    );
    assert!(
        m.lines().any(
            |l| l.starts_with("llmsched_config_info{source=\"file\",hash=\"") && l.ends_with(" 1")
        ),
        "{m}"
    );

    let (sent, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}",
        failures.len()
    );
    assert!(sent >= 20, "the load ran all along ({sent} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_polling_would_not_yet() {
    init_logs();
    let sims = [
        SimProc::start("127.0.0.93", 10.0).await,
        SimProc::start("127.0.0.94", 10.0).await,
    ];
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let other = |a: SocketAddr| if a == addrs[0] { addrs[1] } else { addrs[0] };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epp.yaml");
    write_config(&path, &config(10, 1, 0));
    let file_flag = format!("--config-file={}", path.display());
    let epp = EppProc::start(&addrs, &[&file_flag, "--config-reload-interval=1h"]).await;
    let prompt = sticky_prompt("hup");
    let first = served_by(epp.proxy, &addrs, &prompt, None).await;
    assert_eq!(
        served_by(epp.proxy, &addrs, &prompt, Some(other(first))).await,
        first
    );

    write_config(&path, &config(10, 1, 100));
    epp.signal("HUP");
    wait_reloads(&epp, "success", 1.0).await;
    assert!(epp.log_contains("SIGHUP: reloading the configuration"));
    assert_eq!(
        served_by(epp.proxy, &addrs, &prompt, Some(other(first))).await,
        other(first),
        "the new weights apply after SIGHUP"
    );
    // The process is still serving (SIGHUP did not end it).
    assert_eq!(
        get(epp.metrics, "/metrics").await.map(|(s, _)| s),
        Some(200)
    );
}
