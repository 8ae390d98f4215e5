//! Measures what scraping costs.
//!
//! 1. Parse + extract of a realistic vLLM `/metrics` page (15 histograms, counters, process
//!    metrics; ~60 KiB), timed over many iterations:
//!
//!    `cargo run --release -p llmsched-datalayer --example scrape_cost`
//!
//! 2. Whole-process CPU of the data layer scraping real endpoints over HTTP for a while
//!    (serve the page from another process, e.g. `--write-page /tmp/page.txt` and a static
//!    HTTP/1.1 keep-alive server), printed as CPU time per endpoint per second:
//!
//!    `... --example scrape_cost -- --endpoints 127.0.0.2:8000,127.0.0.3:8000 --seconds 20`

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmsched_core::endpoint::EndpointMetrics;
use llmsched_datalayer::{
    DataLayerConfig, DataLayerMetrics, EndpointStore, MetricMappings, parse_endpoints_flag,
};

fn histogram(out: &mut String, name: &str, labels: &str, buckets: &[&str]) {
    out.push_str(&format!(
        "# HELP {name} Histogram of {name}.\n# TYPE {name} histogram\n"
    ));
    for (i, le) in buckets.iter().chain(["+Inf"].iter()).enumerate() {
        out.push_str(&format!(
            "{name}_bucket{{{labels},le=\"{le}\"}} {}.0\n",
            i * 7
        ));
    }
    out.push_str(&format!(
        "{name}_count{{{labels}}} 1234.0\n{name}_sum{{{labels}}} 5678.9\n"
    ));
}

/// A page shaped like a vLLM v1 server's, with the usual histogram families.
fn vllm_page() -> String {
    let l = "engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
    let mut s = String::new();
    for g in 0..3 {
        s.push_str(&format!("# HELP python_gc_objects_collected_total Objects collected during gc\n# TYPE python_gc_objects_collected_total counter\npython_gc_objects_collected_total{{generation=\"{g}\"}} 1234.0\n"));
    }
    s.push_str("# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1234.56\n");
    for (n, v) in [
        ("vllm:num_requests_running", "12.0"),
        ("vllm:num_requests_waiting", "3.0"),
        ("vllm:kv_cache_usage_perc", "0.4242"),
    ] {
        s.push_str(&format!(
            "# HELP {n} gauge\n# TYPE {n} gauge\n{n}{{{l}}} {v}\n"
        ));
    }
    s.push_str("# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e9\n");
    s.push_str("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"31872\"} 1.0\n");
    for c in [
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ] {
        s.push_str(&format!(
            "# HELP {c} counter\n# TYPE {c} counter\n{c}{{{l}}} 98765.0\n"
        ));
    }
    for r in ["stop", "length", "abort"] {
        s.push_str(&format!(
            "vllm:request_success_total{{{l},finished_reason=\"{r}\"}} 42.0\n"
        ));
    }
    let secs = [
        "0.001", "0.005", "0.01", "0.02", "0.04", "0.06", "0.08", "0.1", "0.25", "0.5", "0.75",
        "1.0", "2.5", "5.0", "7.5", "10.0", "20.0", "40.0", "80.0", "160.0",
    ];
    let toks = [
        "1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0", "1000.0", "2000.0",
        "5000.0", "10000.0", "20000.0", "50000.0", "100000.0",
    ];
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ] {
        histogram(&mut s, h, l, &secs);
    }
    for h in [
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:iteration_tokens_total",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
        "vllm:request_prefill_kv_computed_tokens",
    ] {
        histogram(&mut s, h, l, &toks);
    }
    s
}

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let page = vllm_page();
    if let Some(path) = arg("--write-page") {
        std::fs::write(&path, &page).expect("write page");
        println!("wrote {} bytes to {path}", page.len());
        return;
    }

    let mappings = MetricMappings::default();
    let ex = mappings.for_labels(&Default::default());
    let prev = EndpointMetrics::default();
    let n = 20_000;
    let (t, c) = (Instant::now(), cpu_seconds());
    for _ in 0..n {
        let out = ex
            .extract_text(&page, &prev, Instant::now())
            .expect("page parses");
        std::hint::black_box(out);
    }
    // Process CPU time, not wall time: the machine may be shared.
    let per_cpu = (cpu_seconds() - c) / f64::from(n);
    println!(
        "parse+extract: {} lines, {} bytes: {:.1} µs CPU per page (wall {:?}) = {:.2} ms CPU per endpoint per second at 50 ms",
        page.lines().count(),
        page.len(),
        per_cpu * 1e6,
        t.elapsed() / n,
        per_cpu * 20.0 * 1e3,
    );

    let Some(eps) = arg("--endpoints") else {
        return;
    };
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(10);
    let static_endpoints = parse_endpoints_flag(&eps, &[]).expect("--endpoints");
    let count = static_endpoints.len();
    let metrics = DataLayerMetrics::default();
    let config = DataLayerConfig {
        static_endpoints,
        ..Default::default()
    };
    let handle = llmsched_datalayer::start(
        config,
        Arc::new(EndpointStore::new()),
        metrics.clone(),
        Default::default(),
    )
    .await
    .expect("start");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let s0: u64 = handle
        .store()
        .current()
        .endpoints
        .iter()
        .map(|e| metrics.scrapes_of(e.name()))
        .sum();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (c1, wall) = (cpu_seconds(), t0.elapsed().as_secs_f64());
    let s1: u64 = handle
        .store()
        .current()
        .endpoints
        .iter()
        .map(|e| metrics.scrapes_of(e.name()))
        .sum();
    let errors: u64 = handle
        .store()
        .current()
        .endpoints
        .iter()
        .map(|e| metrics.errors_of(e.name()))
        .sum();
    println!(
        "live: {count} endpoints, {wall:.1} s, {} scrapes ({:.1}/s per endpoint), {errors} errors, CPU {:.3} s = {:.2} ms CPU per endpoint per second ({:.1} µs per scrape)",
        s1 - s0,
        (s1 - s0) as f64 / wall / count as f64,
        c1 - c0,
        (c1 - c0) / wall / count as f64 * 1e3,
        (c1 - c0) / (s1 - s0).max(1) as f64 * 1e6,
    );
    handle.shutdown().await;
}
