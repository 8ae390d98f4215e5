#!/usr/bin/env bash
# llmsched against its peers on the same simulated fleet and workload, one cold cluster per
# router: round robin (llmsched's proxy with --baseline round-robin), llmsched (default
# EndpointPickerConfig, built-in proxy), SGLang's router (cache_aware) and vllm-router
# (cache_aware), both from PyPI, installed into ./.tools/peers. Prints the comparison tables,
# the highest stage rate each router served within the TTFT objective, and writes everything
# under the output folder (default: peers-YYYYMMDD-HHMMSS).
#
# Usage: scripts/compare-peers.sh [--workload FILE] [--time-scale F] [--ttft-slo SECONDS]
#                                 [--routers rr,llmsched,sglang,vllm-router] [-o DIR]
# Env:   CARGO_TARGET_DIR (default: target), SGLANG_ROUTER_VERSION (0.3.2),
#        VLLM_ROUTER_VERSION (0.1.17)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
workload="config/workloads/guide-mini.yaml"
scale=2.5
slo=1.0
routers="rr,llmsched,sglang,vllm-router"
out="peers-$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --ttft-slo) slo="$2"; shift 2 ;;
    --routers) routers="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p llmsched --bin llmsched
bin="$target/release/llmsched"

peers="$repo/.tools/peers"
if [[ ",$routers," == *",sglang,"* || ",$routers," == *",vllm-router,"* ]]; then
  if [ ! -x "$peers/bin/vllm-router" ] || [ ! -x "$peers/bin/sglang-router" ]; then
    echo "installing sglang-router and vllm-router into $peers" >&2
    python3 -m venv "$peers"
    "$peers/bin/pip" install --quiet --disable-pip-version-check \
      "sglang-router==${SGLANG_ROUTER_VERSION:-0.3.2}" "vllm-router==${VLLM_ROUTER_VERSION:-0.1.17}"
  fi
fi

mkdir -p "$out"
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

workers=(http://127.0.0.1:8000 http://127.0.0.1:8001 http://127.0.0.1:8002 http://127.0.0.1:8003)
eps="127.0.0.1:8000,127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003"
refresh_ms=$(python3 -c "print(max(5, round(50 / $scale)))")

run_one() { # label
  local label="$1"
  echo "== $label: cold cluster" >&2
  "$bin" sim --replicas 4 --base-port 8000 --kv-cache-tokens 164000 --time-scale "$scale" \
    >"$out/$label.sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for w in "${workers[@]}"; do wait_http "$w/health" 30; done
  case "$label" in
    rr) "$bin" epp --secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0 \
          --endpoints "$eps" --proxy-port 8080 --baseline round-robin >"$out/$label.router.log" 2>&1 & ;;
    llmsched) "$bin" epp --secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0 \
          --endpoints "$eps" --proxy-port 8080 --refresh-metrics-interval "${refresh_ms}ms" \
          >"$out/$label.router.log" 2>&1 & ;;
    sglang) "$peers/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port 8080 \
          --policy cache_aware --worker-urls "${workers[@]}" >"$out/$label.router.log" 2>&1 & ;;
    vllm-router) "$peers/bin/vllm-router" --host 127.0.0.1 --port 8080 --policy cache_aware \
          --worker-urls "${workers[@]}" >"$out/$label.router.log" 2>&1 & ;;
  esac
  local router=$!; pids+=("$router")
  wait_http http://127.0.0.1:8080/v1/models 60
  "$bin" bench --config "$workload" --base-url http://127.0.0.1:8080 --time-scale "$scale" \
    --no-progress -o "$out/$label" --label "$label" | tail -n +1 >"$out/$label.bench.txt"
  kill "$router" "$sim" 2>/dev/null || true
  wait "$router" "$sim" 2>/dev/null || true
  sleep 1
}

IFS=',' read -r -a list <<<"$routers"
for r in "${list[@]}"; do run_one "$r"; done

{
  echo "# Routers on $(basename "$workload"), 4 simulated replicas, time scale $scale"
  echo
  for r in "${list[@]}"; do
    [ "$r" = llmsched ] && continue
    [ -d "$out/llmsched" ] || break
    echo "## $r vs llmsched"
    echo
    "$bin" bench compare "$out/$r" "$out/llmsched" --markdown
    echo
  done
  echo "## Highest stage rate served within TTFT p90 ≤ ${slo} s"
  echo
  python3 - "$out" "$slo" "${list[@]}" <<'PY'
import json, os, sys
out, slo, routers = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
print("| router | highest rate (req/s) | TTFT mean (s) | TTFT p90 (s) | req/s | cached % |")
print("| --- | --- | --- | --- | --- | --- |")
for r in routers:
    d = os.path.join(out, r)
    best = 0.0
    i = 0
    while os.path.exists(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")):
        s = json.load(open(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")))
        t = s["successes"]["latency"].get("time_to_first_token") or {}
        ok = s["failures"]["count"] == 0 and t.get("p90", 1e9) <= slo
        if ok:
            best = max(best, s["load_summary"]["requested_rate"])
        i += 1
    m = json.load(open(os.path.join(d, "summary_lifecycle_metrics.json")))
    t = m["successes"]["latency"].get("time_to_first_token") or {}
    tp = m["successes"]["throughput"]
    pt = m["successes"].get("prompt_tokens") or {}
    cached = 100.0 * (pt.get("cached") or 0.0) / pt["total"] if pt.get("total") else float("nan")
    print(f"| {r} | {best:g} | {t.get('mean', float('nan')):.3f} | {t.get('p90', float('nan')):.3f} | "
          f"{tp['requests_per_sec']:.2f} | {cached:.1f} |")
PY
} | tee "$out/peers.md"
"$bin" bench plot "${list[@]/#/$out/}" -o "$out/ttft-throughput.svg" >/dev/null
echo "results in $out (peers.md, ttft-throughput.svg)" >&2
