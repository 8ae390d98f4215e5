#!/usr/bin/env bash
# Prefill/decode disaggregation vs aggregated serving on the same simulated GPUs: for each
# setup, a cold fleet of 4 simulated replicas, `llmsched epp` with its built-in proxy on
# :8080, the workload through it (`llmsched bench`), then everything stopped. Prints the
# comparison tables against the aggregated run and a per-stage table (TTFT, inter-token
# latency p90, throughput), and writes result folders, logs and comparison.md under the
# output folder (default: pd-YYYYMMDD-HHMMSS).
#
# Setups (--setups, comma-separated):
#   agg    4 aggregated replicas (`llmsched sim --role both`), llmsched's default config
#   1p3d   1 prefill replica (`--role prefill`) + 3 decode replicas (`--role decode`), each
#          decoder behind its own `llmsched pd-sidecar`; the EPP runs --pd-config (default
#          config/epp/pd-sim-epp-config.yaml, the reference's simulator P/D example)
#   2p2d   the same with 2 prefill + 2 decode replicas
#
# Usage: scripts/compare-pd.sh [--setups agg,1p3d,2p2d] [--workload FILE] [--time-scale F]
#          [--profile NAME] [--pd-config FILE] [--kv-transfer-link NAME] [-o DIR]
# Env:   CARGO_TARGET_DIR (default: target), LLMSCHED_BIN (use this llmsched binary, no build)
set -euo pipefail
cd "$(dirname "$0")/.."
setups="agg,1p3d,2p2d"
workload="config/workloads/pd-long.yaml"
scale=2.5
profile="qwen3-32b-tp2-h100"
pd_config="config/epp/pd-sim-epp-config.yaml"
link="rdma-400g"
out="pd-$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --setups) setups="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --pd-config) pd_config="$2"; shift 2 ;;
    --kv-transfer-link) link="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$setups"
for s in "${list[@]}"; do
  case "$s" in
    agg|1p3d|2p2d) ;;
    *) echo "unknown setup '$s' (agg, 1p3d, 2p2d)" >&2; exit 2 ;;
  esac
done
for f in "$workload" "$pd_config"; do
  [ -f "$f" ] || { echo "no such file: $f" >&2; exit 2; }
done
model=$(python3 -c "import re,sys; m=re.search(r'model_name:\s*(\S+)', open(sys.argv[1]).read()); print(m.group(1) if m else '')" "$workload")
sim_model=()
[ -z "$model" ] || sim_model=(--model "$model")

if [ -n "${LLMSCHED_BIN:-}" ]; then
  bin="$LLMSCHED_BIN"
  [ -x "$bin" ] || { echo "LLMSCHED_BIN: not an executable: $bin" >&2; exit 2; }
else
  cargo build --release --locked -p llmsched --bin llmsched
  bin="${CARGO_TARGET_DIR:-target}/release/llmsched"
fi

pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_http() { # url seconds
  for _ in $(seq 1 $(( $2 * 10 ))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timeout waiting for $1" >&2; return 1
}

mkdir -p "$out"
refresh_ms=$(python3 -c "print(max(5, round(50 / $scale)))")
epp=(--secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0
     --proxy-port 8080 --refresh-metrics-interval "${refresh_ms}ms")
sim=("$bin" sim --profile "$profile" ${sim_model[@]+"${sim_model[@]}"} --time-scale "$scale"
     --kv-side-channel-port 0 --kv-transfer-link "$link")

run_one() { # setup
  local s="$1" started=()
  echo "== $s: cold cluster" >&2
  local replicas=(8000 8001 8002 8003)
  case "$s" in
    agg)
      "${sim[@]}" --role both --replicas 4 --base-port 8000 >"$out/$s.sim.log" 2>&1 &
      started+=($!)
      for p in "${replicas[@]}"; do wait_http "http://127.0.0.1:$p/health" 30; done
      "$bin" epp "${epp[@]}" --endpoints 127.0.0.1:8000,127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003 \
        >"$out/$s.epp.log" 2>&1 &
      started+=($!)
      ;;
    1p3d|2p2d)
      local np=${s:0:1} nd=${s:2:1}
      "${sim[@]}" --role prefill --replicas "$np" --base-port 8000 >"$out/$s.prefill.log" 2>&1 &
      started+=($!)
      "${sim[@]}" --role decode --replicas "$nd" --base-port $(( 8000 + np )) >"$out/$s.decode.log" 2>&1 &
      started+=($!)
      local file="$out/$s.endpoints.yaml"
      echo "endpoints:" >"$file"
      for i in $(seq 0 $(( np - 1 ))); do
        echo "- {name: prefill-$i, address: 127.0.0.1, port: $(( 8000 + i )), labels: {llm-d.ai/role: prefill}}" >>"$file"
      done
      for i in $(seq 0 $(( nd - 1 ))); do
        local vllm=$(( 8000 + np + i )) side=$(( 8100 + np + i ))
        wait_http "http://127.0.0.1:$vllm/health" 30
        "$bin" pd-sidecar --listen-address 127.0.0.1 --port "$side" --vllm-host 127.0.0.1 \
          --vllm-port "$vllm" --secure-proxy=false >"$out/$s.sidecar-$i.log" 2>&1 &
        started+=($!)
        wait_http "http://127.0.0.1:$side/health" 30
        echo "- {name: decode-$i, address: 127.0.0.1, port: $side, labels: {llm-d.ai/role: decode}}" >>"$file"
      done
      wait_http "http://127.0.0.1:8000/health" 30
      # The decoders' own pd-sidecars do the prefill hop (the proxy forwards the header).
      "$bin" epp "${epp[@]}" --endpoints-file "$file" --config-file "$pd_config" \
        --proxy-pd-routing=sidecar >"$out/$s.epp.log" 2>&1 &
      started+=($!)
      ;;
  esac
  pids+=("${started[@]}")
  wait_http http://127.0.0.1:8080/v1/models 60
  "$bin" bench --config "$workload" --base-url http://127.0.0.1:8080 --time-scale "$scale" \
    --no-progress -o "$out/$s" --label "$s" >"$out/$s.bench.txt"
  # Did the simulator keep up with its clock? And what did the P/D path do?
  local resyncs=0 transfers=0
  for p in "${replicas[@]}"; do
    local m n t
    m=$(curl -fsS "http://127.0.0.1:$p/metrics" 2>/dev/null || true)
    n=$(awk '/^llmsched_sim_clock_resyncs_total/ {print $2}' <<<"$m"); n=${n%.*}
    t=$(awk '/^vllm:nixl_xfer_time_seconds_count/ {print $2}' <<<"$m"); t=${t%.*}
    resyncs=$(( resyncs + ${n:-0} )); transfers=$(( transfers + ${t:-0} ))
  done
  echo "$resyncs" >"$out/$s/sim_resyncs"
  echo "$transfers" >"$out/$s/kv_transfers"
  # Per-hop breakdown: every replica's and sidecar's own metrics, kept with the results.
  for p in "${replicas[@]}"; do
    curl -fsS "http://127.0.0.1:$p/metrics" >"$out/$s/metrics-replica-$p.txt" 2>/dev/null || true
    curl -fsS "http://127.0.0.1:$(( p + 100 ))/pd-sidecar/metrics" >"$out/$s/metrics-sidecar-$(( p + 100 )).txt" 2>/dev/null \
      || rm -f "$out/$s/metrics-sidecar-$(( p + 100 )).txt"
  done
  kill "${started[@]}" 2>/dev/null || true
  wait "${started[@]}" 2>/dev/null || true
  sleep 1
}

for s in "${list[@]}"; do run_one "$s"; done

{
  echo "# P/D vs aggregated on $(basename "$workload"): 4 simulated replicas ($profile, KV link $link), time scale $scale"
  echo
  base="${list[0]}"
  for s in "${list[@]:1}"; do
    echo "## $s vs $base"
    echo
    "$bin" bench compare "$out/$s" "$out/$base" --labels "$s,$base" --markdown
    echo
  done
  echo "## Per stage"
  echo
  python3 - "$out" "${list[@]}" <<'PY'
import json, os, sys
out, setups = sys.argv[1], sys.argv[2:]
def g(s, *k):
    for x in k:
        s = (s or {}).get(x)
    return s
print("| setup | rate (req/s) | TTFT mean (s) | TTFT p90 (s) | ITL p50 (ms) | ITL p90 (ms) | ITL p99 (ms) | output tok/s | req/s | cached % | failures |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in setups:
    d, i = os.path.join(out, s), 0
    while os.path.exists(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")):
        m = json.load(open(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")))
        lat = m["successes"]["latency"]
        ttft, itl = lat.get("time_to_first_token") or {}, lat.get("inter_token_latency") or {}
        tp = m["successes"]["throughput"]
        pt = m["successes"].get("prompt_tokens") or {}
        cached = 100.0 * (pt.get("cached") or 0.0) / pt["total"] if pt.get("total") else float("nan")
        print(f"| {s} | {g(m, 'load_summary', 'requested_rate'):g} | {ttft.get('mean', float('nan')):.3f} | "
              f"{ttft.get('p90', float('nan')):.3f} | {1e3 * itl.get('median', float('nan')):.1f} | "
              f"{1e3 * itl.get('p90', float('nan')):.1f} | {1e3 * itl.get('p99', float('nan')):.1f} | {tp.get('output_tokens_per_sec', float('nan')):.0f} | "
              f"{tp['requests_per_sec']:.2f} | {cached:.0f} | {m['failures']['count']} |")
        i += 1
print()
# TTFT of new prompts (prefilled: on a prefill replica with P/D) and of repeated ones (cached
# on a replica), from the per-request records: a request is "new" when less than half its
# prompt was reported cached (the sidecar reports the prefill replica's cached tokens).
pr_rows, stall_rows = [], []
for s in setups:
    f = os.path.join(out, s, "per_request_lifecycle_metrics.json")
    if not os.path.exists(f):
        continue
    by = {}
    gaps = {}
    for r in json.load(open(f)):
        rm = r["info"].get("response_metrics") or {}
        ct = rm.get("chunk_times") or []
        if not ct:
            continue
        g = [b - a for a, b in zip(ct, ct[1:])]
        st = gaps.setdefault(r["stage_id"], {"itl": [], "stalled": 0, "requests": 0})
        st["itl"].extend(g)
        st["requests"] += 1
        st["stalled"] += any(x > 0.1 for x in g)
        usage = rm.get("server_usage") or {}
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        new = cached < 0.5 * (r["info"].get("input_tokens") or 1)
        by.setdefault((r["stage_id"], new), []).append(ct[0] - r["start_time"])
    for (stage, new), v in sorted(by.items()):
        v.sort()
        q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
        pr_rows.append(f"| {s} | {stage} | {'new' if new else 'repeated'} | {len(v)} | {sum(v) / len(v):.3f} | {q(0.5):.3f} | {q(0.9):.3f} |")
    for stage, st in sorted(gaps.items()):
        v = sorted(st["itl"])
        if v:
            q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
            stall_rows.append(f"| {s} | {stage} | {len(v)} | {1e3 * q(0.99):.1f} | {1e3 * q(0.999):.1f} | {1e3 * v[-1]:.1f} | "
                              f"{sum(1 for x in v if x > 0.1)} | {st['stalled']} of {st['requests']} |")
if pr_rows:
    print("| setup | stage | prompts | requests | TTFT mean (s) | TTFT p50 (s) | TTFT p90 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(pr_rows))
    print()
if stall_rows:
    # Decode stalls: a decode step that shares its batch with a long prefill (aggregated
    # replicas) takes the prefill's time; every request running there sees that gap.
    print("| setup | stage | token gaps | ITL p99 (ms) | ITL p99.9 (ms) | ITL max (ms) | gaps > 100 ms | requests with a gap > 100 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(stall_rows))
    print()
# Per hop, over the whole run, from the components' own metrics (means in seconds).
def prom(path):
    vals = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, v = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            vals[name] = vals.get(name, 0.0) + float(v)
        except ValueError:
            pass
    return vals
def role(path):
    for line in open(path):
        if line.startswith("llmsched_sim_info{"):
            return line.split('role="', 1)[1].split('"', 1)[0]
    return "?"
def mean(m, name):
    c = m.get(name + "_count", 0.0)
    return f"{m.get(name + '_sum', 0.0) / c:.3f}" if c else "-"
print("| setup | component | requests | queue (s) | prefill compute (s) | TTFT at the replica (s) | KV transfer (s) | prefill hop in the sidecar (s) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for s in setups:
    d = os.path.join(out, s)
    if not os.path.isdir(d):
        continue
    groups = {}
    for f in sorted(os.listdir(d)):
        if f.startswith("metrics-replica-"):
            key = role(os.path.join(d, f)) + " replicas"
        elif f.startswith("metrics-sidecar-"):
            key = "sidecars"
        else:
            continue
        m = groups.setdefault(key, {})
        for k, v in prom(os.path.join(d, f)).items():
            m[k] = m.get(k, 0.0) + v
    for key, m in sorted(groups.items()):
        n = m.get("vllm:time_to_first_token_seconds_count") or m.get("llmsched_pd_sidecar_prefill_duration_seconds_count") or 0
        print(f"| {s} | {key} | {n:.0f} | {mean(m, 'vllm:request_queue_time_seconds')} | {mean(m, 'vllm:request_prefill_time_seconds')} | "
              f"{mean(m, 'vllm:time_to_first_token_seconds')} | {mean(m, 'vllm:nixl_xfer_time_seconds')} | {mean(m, 'llmsched_pd_sidecar_prefill_duration_seconds')} |")
print()
print("| setup | KV transfers | sim resyncs |")
print("| --- | --- | --- |")
for s in setups:
    r = lambda f: open(os.path.join(out, s, f)).read().strip() if os.path.exists(os.path.join(out, s, f)) else "?"
    print(f"| {s} | {r('kv_transfers')} | {r('sim_resyncs')} |")
PY
} | tee "$out/comparison.md"
echo "results in $out (comparison.md)" >&2
