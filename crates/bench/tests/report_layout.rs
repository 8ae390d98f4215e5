//! Report layouts: inference-perf's lifecycle JSON, the benchmark report v0.2 YAML, the
//! comparison table and the plot, built from a hand-made run.

use std::time::{Duration, SystemTime};

use llmsched_bench::config::LoadStage;
use llmsched_bench::metrics::{
    ChunkMark, RequestError, RequestRecord, StageLoad, SummaryOptions, summarize_requests,
};
use llmsched_bench::plot::render_svg;
use llmsched_bench::report::{benchmark_report_file, stage_file};
use llmsched_bench::sse::Usage;
use llmsched_bench::{
    BenchConfig, Comparison, GeneratorOverhead, RunResult, SavedRun, StageResult, StageStatus,
};

const CONFIG: &str = "
api: {type: completion, streaming: true}
server: {type: vllm, model_name: m, base_url: 'http://127.0.0.1:9', ignore_eos: true}
data:
  type: shared_prefix
  shared_prefix: {num_groups: 2, num_prompts_per_group: 3, system_prompt_len: 100, question_len: 20, output_len: 8}
load:
  type: poisson
  stages: [{rate: 2, duration: 2}, {rate: 4, duration: 1}]
report:
  request_lifecycle: {summary: true, per_stage: true, per_request: true}
";

fn rec(stage: usize, start: f64, scale: f64, cached: u64, fail: bool) -> RequestRecord {
    let chunks: Vec<ChunkMark> = (1..=8)
        .map(|k| ChunkMark::at(0.1 * scale + 0.02 * scale * f64::from(k), 1))
        .collect();
    RequestRecord {
        stage_id: stage,
        data_index: 0,
        session: None,
        scheduled_time: start,
        start_time: start,
        end_time: start + 0.5 * scale,
        streamed: true,
        chunks: if fail { Vec::new() } else { chunks },
        input_tokens: if fail { 0 } else { 120 },
        output_tokens: if fail { 0 } else { 8 },
        usage: (!fail).then_some(Usage {
            prompt_tokens: Some(120),
            completion_tokens: Some(8),
            cached_tokens: Some(cached),
        }),
        request_bytes: 700,
        invalid_chunks: 0,
        error: fail.then(|| RequestError {
            error_type: "HTTP Error 503".into(),
            error_msg: "busy".into(),
        }),
    }
}

/// A run with 4 requests in stage 0 and 4 in stage 1; `scale` stretches latencies.
fn run(label: &str, scale: f64, cached: u64) -> RunResult {
    let config = BenchConfig::from_yaml_str(CONFIG, None).expect("config");
    let records: Vec<RequestRecord> = (0..8)
        .map(|i| rec(i / 4, i as f64 * 0.5, scale, cached, i == 7))
        .collect();
    let opts = SummaryOptions::default();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
    let stages = config
        .stages()
        .expect("stages")
        .into_iter()
        .enumerate()
        .map(|(i, stage)| StageResult {
            stage_id: i,
            stage,
            status: StageStatus::Completed,
            start_time: t0 + Duration::from_secs(10 * i as u64),
            end_time: t0 + Duration::from_secs(10 * i as u64 + 3),
            planned_requests: stage.num_requests(),
            summary: summarize_requests(
                records.iter().filter(|r| r.stage_id == i),
                &opts,
                Some(StageLoad {
                    rate: stage.requested_rate(),
                    concurrency: None,
                }),
            ),
        })
        .collect();
    RunResult {
        label: label.into(),
        run_id: "0123456789abcdef0123456789abcdef".into(),
        model: "m".into(),
        time_scale: 1.0,
        prompt_seed: 1,
        arrival_seed: 1,
        tokenizer: "sim".into(),
        started_at: t0,
        ended_at: t0 + Duration::from_secs(13),
        interrupted: false,
        summary: summarize_requests(records.iter(), &opts, None),
        stages,
        records,
        overhead: GeneratorOverhead::default(),
        config,
    }
}

fn assert_json_close(a: &serde_json::Value, b: &serde_json::Value, path: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{path}"
            );
            for (k, v) in x {
                assert_json_close(v, &y[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                assert_json_close(v, w, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().expect("x"), y.as_f64().expect("y"));
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{path}: {x} vs {y}"
            );
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

#[test]
fn lifecycle_json_has_inference_perf_layout() {
    let dir = tempfile::tempdir().expect("tmp");
    let r = run("a", 1.0, 64);
    let files = r.write_to_dir(dir.path()).expect("write");
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for want in [
        "config.yaml",
        "summary_lifecycle_metrics.json",
        "stage_0_lifecycle_metrics.json",
        "stage_1_lifecycle_metrics.json",
        "benchmark_report_v0.2,_stage_0_lifecycle_metrics.json.yaml",
        "benchmark_report_v0.2,_stage_1_lifecycle_metrics.json.yaml",
        "per_request_lifecycle_metrics.json",
        "bench_run.json",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
        assert!(dir.path().join(want).is_file());
    }

    let text =
        std::fs::read_to_string(dir.path().join("summary_lifecycle_metrics.json")).expect("read");
    assert!(
        text.starts_with("{\n  \"benchmark_time_seconds\""),
        "2-space indented JSON"
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        keys(&v),
        [
            "benchmark_time_seconds",
            "failures",
            "load_summary",
            "successes"
        ]
    );
    let succ = &v["successes"];
    for k in [
        "count",
        "latency",
        "throughput",
        "request_size_bytes",
        "image",
        "video",
        "audio",
        "prompt_tokens",
        "prompt_len",
        "output_len",
        "output_tokens",
        "token_count_mismatches",
    ] {
        assert!(succ.get(k).is_some(), "successes.{k}");
    }
    let mut lat = keys(&succ["latency"]);
    lat.sort();
    assert_eq!(
        lat,
        [
            "inter_token_latency",
            "normalized_time_per_output_token",
            "request_latency",
            "time_per_output_token",
            "time_to_first_token"
        ]
    );
    let mut stat = keys(&succ["latency"]["time_to_first_token"]);
    stat.sort();
    let mut want = vec![
        "max", "mean", "median", "min", "p0.1", "p1", "p10", "p25", "p5", "p75", "p90", "p95",
        "p99", "p99.9",
    ];
    want.sort();
    assert_eq!(stat, want);
    let tput = &succ["throughput"];
    for k in [
        "input_tokens_per_sec",
        "output_tokens_per_sec",
        "total_tokens_per_sec",
        "requests_per_sec",
    ] {
        assert!(tput[k].is_f64(), "throughput.{k}");
    }
    assert_eq!(succ["count"], 7);
    assert_eq!(succ["prompt_tokens"]["total"], 840.0);
    assert_eq!(succ["prompt_tokens"]["cached"], 448.0);
    assert_eq!(v["failures"]["count"], 1);
    assert_eq!(
        v["failures"]["by_label"]["503 - Service Unavailable"]["count"],
        1
    );
    assert!(
        v["load_summary"].get("requested_rate").is_none(),
        "summary has no stage fields"
    );

    let stage: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(stage_file(1))).expect("read"),
    )
    .expect("json");
    assert_eq!(stage["load_summary"]["requested_rate"], 4.0);
    assert_eq!(stage["load_summary"]["count"], 4);
    assert!(stage["load_summary"]["achieved_rate"].is_f64());

    let per_request: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("per_request_lifecycle_metrics.json"))
            .expect("read"),
    )
    .expect("json");
    let entries = per_request.as_array().expect("array");
    assert_eq!(entries.len(), 8);
    assert_eq!(
        entries[0]["info"]["response_metrics"]["server_usage"]["prompt_tokens_details"]["cached_tokens"],
        64
    );
    assert_eq!(entries[7]["error"]["error_type"], "HTTP Error 503");

    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bench_run.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(meta["label"], "a");
    assert_eq!(meta["stages"].as_array().expect("stages").len(), 2);
}

#[test]
fn benchmark_report_v02_layout() {
    let dir = tempfile::tempdir().expect("tmp");
    run("a", 1.0, 64).write_to_dir(dir.path()).expect("write");
    let text = std::fs::read_to_string(dir.path().join(benchmark_report_file(0))).expect("read");
    assert!(text.starts_with("version: '0.2'"), "{}", &text[..40]);
    let v: serde_norway::Value = serde_norway::from_str(&text).expect("yaml");
    let get = |path: &[&str]| -> serde_norway::Value {
        let mut cur = &v;
        for p in path {
            cur = cur.get(*p).unwrap_or_else(|| panic!("missing {path:?}"));
        }
        cur.clone()
    };
    assert_eq!(
        get(&["run", "eid"]).as_str(),
        Some("0123456789abcdef0123456789abcdef")
    );
    assert_eq!(
        get(&["run", "time", "start"]).as_str(),
        Some("2025-10-09T08:53:20.000Z")
    );
    assert!(
        get(&["run", "time", "duration"])
            .as_str()
            .expect("dur")
            .starts_with("PT")
    );
    let load = get(&["scenario", "load", "standardized"]);
    assert_eq!(
        load.get("tool").and_then(|t| t.as_str()),
        Some("llmsched-bench")
    );
    assert_eq!(
        load.get("stage").and_then(serde_norway::Value::as_u64),
        Some(0)
    );
    assert_eq!(
        load.get("rate_qps").and_then(serde_norway::Value::as_f64),
        Some(2.0)
    );
    assert_eq!(
        load.get("input_seq_len")
            .and_then(|l| l.get("value"))
            .and_then(serde_norway::Value::as_f64),
        Some(120.0)
    );
    assert_eq!(
        load.get("prefix")
            .and_then(|p| p.get("num_users_per_group"))
            .and_then(serde_norway::Value::as_u64),
        Some(3)
    );
    let agg = get(&["results", "request_performance", "aggregate"]);
    assert_eq!(
        agg.get("requests")
            .and_then(|r| r.get("total"))
            .and_then(serde_norway::Value::as_u64),
        Some(4)
    );
    assert_eq!(
        agg.get("requests")
            .and_then(|r| r.get("failures"))
            .and_then(serde_norway::Value::as_u64),
        Some(0)
    );
    let ttft = agg
        .get("latency")
        .and_then(|l| l.get("time_to_first_token"))
        .expect("ttft");
    for k in [
        "units", "mean", "stddev", "min", "p0p1", "p1", "p5", "p10", "p25", "p50", "p75", "p90",
        "p95", "p99", "p99p9", "max",
    ] {
        assert!(ttft.get(k).is_some(), "ttft.{k}");
    }
    assert_eq!(ttft.get("units").and_then(|u| u.as_str()), Some("s"));
    // Every token of these requests arrives 0.12 s after the start.
    assert!(
        (ttft
            .get("mean")
            .and_then(serde_norway::Value::as_f64)
            .expect("mean")
            - 0.12)
            .abs()
            < 1e-6
    );
    let tpot_units = agg
        .get("latency")
        .and_then(|l| l.get("time_per_output_token"))
        .and_then(|t| t.get("units"))
        .and_then(|u| u.as_str());
    assert_eq!(tpot_units, Some("s/token"));
    let rate = agg
        .get("throughput")
        .and_then(|t| t.get("request_rate"))
        .expect("request_rate");
    assert_eq!(
        rate.get("units").and_then(|u| u.as_str()),
        Some("queries/s")
    );
    let hit = get(&["results", "observability", "components"]);
    let hit = hit
        .as_sequence()
        .and_then(|c| c.first())
        .and_then(|c| c.get("aggregate"))
        .and_then(|a| a.get("cache_hit_rate"))
        .and_then(|h| h.get("mean"))
        .and_then(serde_norway::Value::as_f64)
        .expect("cache hit rate");
    assert!((hit - 64.0 / 120.0 * 100.0).abs() < 1e-9);
}

#[test]
fn saved_runs_round_trip() {
    let dir = tempfile::tempdir().expect("tmp");
    let r = run("roundtrip", 1.0, 64);
    r.write_to_dir(dir.path()).expect("write");
    let saved = SavedRun::load(dir.path()).expect("load");
    assert_eq!(saved.label, "roundtrip");
    assert_eq!(saved.stages.len(), 2);
    let json = |s: &llmsched_bench::LifecycleSummary| serde_json::to_value(s).expect("json");
    // serde_json parses floats to within one ulp, so compare numbers with a tolerance.
    assert_json_close(
        &json(saved.summary.as_ref().expect("summary")),
        &json(&r.summary),
        "summary",
    );
    assert_json_close(
        &json(saved.stage(1).expect("stage 1")),
        &json(&r.stages[1].summary),
        "stage 1",
    );
    let (a, b) = (saved.plot_series(), r.plot_series());
    assert_eq!(a.label, b.label);
    assert_eq!(a.points.len(), b.points.len());
    for (p, q) in a.points.iter().zip(&b.points) {
        assert_eq!((p.stage_id, p.rate), (q.stage_id, q.rate));
        assert!((p.ttft_mean.expect("a") - q.ttft_mean.expect("b")).abs() < 1e-12);
    }

    let empty = tempfile::tempdir().expect("tmp");
    assert!(SavedRun::load(empty.path()).is_err());
    std::fs::write(
        empty.path().join("summary_lifecycle_metrics.json"),
        "{ not json",
    )
    .expect("write");
    let err = SavedRun::load(empty.path()).expect_err("bad json");
    assert!(
        err.to_string().contains("summary_lifecycle_metrics.json"),
        "{err}"
    );
    assert!(SavedRun::load(&empty.path().join("missing")).is_err());
}

#[test]
fn comparison_table_in_the_seed_guide_form() {
    // B is twice as slow per request and reports no cache hits.
    let a = run("k8s", 1.0, 64);
    let b = run("llmd", 2.0, 0);
    let table = Comparison::new(&a.label, &a.summary, &b.label, &b.summary);

    let md = table.to_markdown();
    let lines: Vec<&str> = md.lines().collect();
    assert!(lines[0].starts_with("- **Throughput**: Requests/sec"));
    let header = lines
        .iter()
        .position(|l| l.starts_with("| Metric"))
        .expect("header");
    let cols: Vec<&str> = lines[header]
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        cols,
        ["Metric", "k8s", "llmd", "Δ (llmd - k8s)", "Δ% vs k8s"]
    );
    assert!(lines[header + 1].starts_with("|:-"));
    assert!(
        lines[header + 2..]
            .iter()
            .all(|l| l.starts_with('|') && l.ends_with('|'))
    );

    // Mean request latency: A = 0.5 s, B = 1.0 s → Δ +0.5, +100 %.
    let row = table.row("Request latency mean (s)").expect("row");
    assert_eq!((row.a, row.b), (Some(0.5), Some(1.0)));
    assert_eq!(row.b_is_better(), Some(false));
    let line = lines
        .iter()
        .find(|l| l.contains("Request latency mean (s)"))
        .expect("line");
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    assert_eq!(&cells[2..6], ["0.5", "1", "+0.5", "+100.0%"]);

    // Cached prompt tokens: 64/120 vs 0 → −100 %.
    let cached = table.row("Cached prompt tokens (%)").expect("row");
    assert!((cached.a.expect("a") - 64.0 / 120.0 * 100.0).abs() < 1e-9);
    assert_eq!(cached.delta_pct(), Some(-100.0));

    let text = table.to_text();
    let first = text.lines().next().expect("header");
    assert!(
        first.starts_with("Metric") && first.ends_with("Δ% vs k8s"),
        "{first}"
    );
    assert_eq!(text.lines().count(), 2 + table.rows.len());
}

#[test]
fn plot_has_both_panels_and_every_series() {
    let a = run("k8s", 1.0, 64);
    let b = run("llmd", 2.0, 0);
    let svg = render_svg(&[a.plot_series(), b.plot_series()]).expect("svg");
    assert!(svg.starts_with("<svg"));
    for text in [
        "Time to first token vs request rate",
        "Output token throughput vs request rate",
        "k8s mean",
        "llmd p90",
    ] {
        assert!(svg.contains(text), "missing {text}");
    }
    let pts = a.plot_series().points;
    assert_eq!(pts.iter().map(|p| p.rate).collect::<Vec<_>>(), [2.0, 4.0]);
    assert!((pts[0].ttft_mean.expect("ttft") - 0.12).abs() < 1e-6);
    // An empty plot still renders axes.
    assert!(render_svg(&[]).expect("empty").starts_with("<svg"));
}

#[test]
fn concurrent_stages_plot_against_achieved_rate() {
    let mut r = run("c", 1.0, 0);
    r.stages[0].stage = LoadStage::Concurrent {
        num_requests: 4,
        concurrency: 2,
    };
    r.stages[0].summary.load_summary.concurrency = Some(2);
    let achieved = r.stages[0].summary.successes.throughput.requests_per_sec;
    let p = r.plot_series();
    assert!(
        p.points
            .iter()
            .any(|pt| pt.stage_id == 0 && pt.rate == achieved)
    );
}
