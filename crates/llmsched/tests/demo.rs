//! `llmsched demo` as a user runs it: the real binary, real simulator replicas, the real
//! proxy and load generator on loopback. The workload is a small one so the test stays short;
//! the full guide-mini run is the README's first command.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::process::Command;

const TINY: &str = "\
api: {type: completion, streaming: true}
server: {type: vllm, model_name: Qwen/Qwen3-32B, base_url: 'http://127.0.0.1:1', ignore_eos: true}
data:
  type: shared_prefix
  shared_prefix: {num_groups: 4, num_prompts_per_group: 4, system_prompt_len: 2000, question_len: 100, output_len: 10}
load:
  type: poisson
  stages:
  - {rate: 4, duration: 4}
  - {rate: 8, duration: 4}
report:
  request_lifecycle: {summary: true, per_stage: true, per_request: false}
";

fn llmsched() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llmsched"))
}

#[test]
fn demo_runs_both_legs_and_writes_the_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("tiny.yaml");
    std::fs::write(&workload, TINY).unwrap();
    let out = dir.path().join("results");
    let output = llmsched()
        .args([
            "demo",
            "--replicas",
            "2",
            "--time-scale",
            "4",
            "--proxy-port",
            "0",
        ])
        .args(["--sim-base-port", "0", "--no-progress", "--workload"])
        .arg(&workload)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The guide's table, with both runs as columns.
    let table_header = stdout
        .lines()
        .find(|l| l.contains("round-robin") && l.contains("llmsched") && l.contains("Δ"))
        .unwrap_or_else(|| panic!("no comparison table in:\n{stdout}"));
    assert!(table_header.starts_with("Metric"), "{table_header}");
    assert!(stdout.contains("Requests/sec"), "{stdout}");
    for leg in ["round-robin", "llmsched"] {
        let summary = out.join(leg).join("summary_lifecycle_metrics.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
        let ok = json["successes"]["count"].as_u64().unwrap();
        assert!(ok > 0, "{leg}: no successful request in {json}");
        assert_eq!(json["failures"]["count"].as_u64(), Some(0), "{leg}: {json}");
        assert!(
            out.join(leg)
                .join("stage_1_lifecycle_metrics.json")
                .exists()
        );
    }
    let md = std::fs::read_to_string(out.join("comparison.md")).unwrap();
    assert!(
        md.contains("| round-robin |") || md.contains("round-robin"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("ttft-throughput.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.contains("<svg"),
        "not an SVG"
    );
}

/// `llmsched demo --pd`: the same two replicas aggregated, then as one prefill and one decode
/// replica behind the proxy's in-process P/D routing; every new long prompt is prefilled on
/// the prefill replica and its KV read by the decoder (the replicas' own counters, printed).
#[test]
fn demo_pd_compares_aggregated_and_disaggregated_serving() {
    const LONG: &str = "\
api: {type: completion, streaming: true}
server: {type: vllm, model_name: Qwen/Qwen3-32B, base_url: 'http://127.0.0.1:1', ignore_eos: true}
data:
  type: shared_prefix
  shared_prefix: {num_groups: 50, num_prompts_per_group: 1, system_prompt_len: 1900, question_len: 100, output_len: 20}
load:
  type: poisson
  stages:
  - {rate: 2, duration: 4}
report:
  request_lifecycle: {summary: true, per_stage: true, per_request: false}
";
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("long.yaml");
    std::fs::write(&workload, LONG).unwrap();
    let out = dir.path().join("results");
    let output = llmsched()
        .args(["demo", "--pd", "--replicas", "2", "--time-scale", "4"])
        .args([
            "--proxy-port",
            "0",
            "--sim-base-port",
            "0",
            "--no-progress",
            "--workload",
        ])
        .arg(&workload)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("aggregated") && l.contains("1p1d") && l.contains("Δ")),
        "no comparison table in:\n{stdout}"
    );
    assert!(stdout.contains("inter-token latency p90"), "{stdout}");
    let requests = |leg: &str| -> u64 {
        let summary = out.join(leg).join("summary_lifecycle_metrics.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
        assert_eq!(json["failures"]["count"].as_u64(), Some(0), "{leg}: {json}");
        json["successes"]["count"].as_u64().unwrap()
    };
    let n = requests("1p1d");
    assert!(n > 0 && requests("aggregated") == n, "{stdout}");
    // Every prompt is new (one per group): each one went through the prefill replica.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("1p1d:") && l.contains("KV transfers"))
        .unwrap_or_else(|| panic!("no P/D counters in:\n{stdout}"));
    assert!(
        line.contains(&format!("1p1d: {n} prompts prefilled"))
            && line.contains(&format!(", {n} KV transfers")),
        "{n} requests: {line}"
    );
}

#[test]
fn a_busy_proxy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("tiny.yaml");
    std::fs::write(&workload, TINY).unwrap();
    let output = llmsched()
        .args([
            "demo",
            "--replicas",
            "1",
            "--sim-base-port",
            "0",
            "--no-progress",
        ])
        .arg(format!("--proxy-port={port}"))
        .arg("--workload")
        .arg(&workload)
        .arg("-o")
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--proxy-port") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

#[test]
fn bad_demo_input_is_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--replicas", "0"], "--replicas"),
        (&["--pd", "--replicas", "1"], "--pd-prefill"),
        (&["--pd-prefill", "2"], "--pd"),
        (&["--time-scale=0"], "--time-scale"),
        (
            &["--workload", "/nonexistent/w.yaml"],
            "/nonexistent/w.yaml",
        ),
        (&["--baseline", "fastest"], "fastest"),
    ];
    for (flags, want) in cases {
        let output = llmsched()
            .arg("demo")
            .args(flags)
            .arg("-o")
            .arg(dir.path().join("r"))
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flags:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "load: [not, a, map\n").unwrap();
    let output = llmsched()
        .args(["demo", "--workload"])
        .arg(&garbage)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("garbage.yaml"), "{stderr}");
}

#[test]
fn envoy_config_prints_a_bootstrap() {
    let output = llmsched()
        .args([
            "envoy-config",
            "--mode",
            "round-robin",
            "--endpoints",
            "127.0.0.1:8000,127.0.0.1:8001",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("ROUND_ROBIN") && text.contains("8001"),
        "{text}"
    );
    let output = llmsched()
        .args(["envoy-config", "--mode", "round-robin"])
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "round robin without endpoints was accepted"
    );
}
