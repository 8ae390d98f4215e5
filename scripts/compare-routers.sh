#!/usr/bin/env bash
# Routers side by side on the same simulated fleet and workload: for each router, a cold
# cluster of 4 simulated replicas (164,000 KV tokens each), the router on :8080, the workload
# through it (`llmsched bench`), then everything stopped. Prints comparison tables against one
# router (--against), the highest stage rate each router served within the TTFT objective,
# and writes result folders, logs, comparison.md and ttft-throughput.svg under the output
# folder (default: routers-YYYYMMDD-HHMMSS).
#
# Routers:
#   rr           llmsched's built-in proxy with --baseline round-robin (the guide's "Service")
#   llmsched     llmsched's built-in proxy, default EndpointPickerConfig (queue 2, kv 2,
#                approximate prefix-cache 3); `approx` is the same router under another name
#   precise      config/epp/precise-prefix-cache.yaml (precise-prefix-cache 3, kv 2, queue 2),
#                the replicas publishing KV events to the EPP's socket (--zmq-port)
#   sglang       SGLang's router, --policy cache_aware (PyPI, into ./.tools/peers)
#   vllm-router  vllm-router, --policy cache_aware (PyPI, into ./.tools/peers)
#
# Usage: scripts/compare-routers.sh [--routers rr,llmsched,...] [--against NAME]
#          [--workload FILE] [--time-scale F] [--ttft-slo SECONDS] [--zmq-port P]
#          [--llmsched-config FILE] [-o DIR]
#        --llmsched-config: an EndpointPickerConfig for the `llmsched` router (default: none,
#        i.e. the built-in default config)
# Env:   CARGO_TARGET_DIR (default: target), SGLANG_ROUTER_VERSION (0.3.2),
#        VLLM_ROUTER_VERSION (0.1.17)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
routers="rr,llmsched"
against=""
workload="config/workloads/guide-mini.yaml"
scale=2.5
slo=1.0
zmq_port=5557
out="routers-$(date +%Y%m%d-%H%M%S)"
llmsched_config=""
while [ $# -gt 0 ]; do
  case "$1" in
    --routers) routers="$2"; shift 2 ;;
    --against) against="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --ttft-slo) slo="$2"; shift 2 ;;
    --zmq-port) zmq_port="$2"; shift 2 ;;
    --llmsched-config) llmsched_config="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$routers"
for r in "${list[@]}"; do
  case "$r" in
    rr|llmsched|approx|precise|sglang|vllm-router) ;;
    *) echo "unknown router '$r' (rr, llmsched, approx, precise, sglang, vllm-router)" >&2; exit 2 ;;
  esac
done
[ -n "$against" ] || against="${list[${#list[@]}-1]}"
if [ -n "$llmsched_config" ] && [ ! -f "$llmsched_config" ]; then
  echo "--llmsched-config: no such file: $llmsched_config" >&2; exit 2
fi

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
# The guide's precise config, with the KV-event socket on loopback at the chosen port.
sed -e "s#zmqEndpoint: \"tcp://\*:5557\"#zmqEndpoint: \"tcp://127.0.0.1:${zmq_port}\"#" \
  config/epp/precise-prefix-cache.yaml >"$out/precise-prefix-cache.yaml"

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
# Metrics refreshed every 50 ms of simulated time.
refresh_ms=$(python3 -c "print(max(5, round(50 / $scale)))")
epp=(--secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0
     --endpoints "$eps" --proxy-port 8080)
llmsched_args=()
[ -z "$llmsched_config" ] || llmsched_args=(--config-file "$llmsched_config")

start_router() { # label
  local log="$out/$1.router.log"
  case "$1" in
    rr) "$bin" epp "${epp[@]}" --baseline round-robin >"$log" 2>&1 & ;;
    llmsched|approx) "$bin" epp "${epp[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
               "${llmsched_args[@]}" >"$log" 2>&1 & ;;
    precise) "$bin" epp "${epp[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
               --config-file "$out/precise-prefix-cache.yaml" >"$log" 2>&1 & ;;
    sglang) "$peers/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port 8080 \
              --policy cache_aware --worker-urls "${workers[@]}" >"$log" 2>&1 & ;;
    vllm-router) "$peers/bin/vllm-router" --host 127.0.0.1 --port 8080 --policy cache_aware \
              --worker-urls "${workers[@]}" >"$log" 2>&1 & ;;
  esac
  router=$!; pids+=("$router")
}

run_one() { # label
  local label="$1" router="" kv=()
  echo "== $label: cold cluster" >&2
  if [ "$label" = precise ]; then
    # The EPP binds the KV-event socket first; the replicas dial it (as llm-d's simulator does).
    start_router "$label"
    kv=(--kv-events-endpoint "tcp://127.0.0.1:${zmq_port}" --kv-events-mode connect)
  fi
  "$bin" sim --replicas 4 --base-port 8000 --kv-cache-tokens 164000 --time-scale "$scale" "${kv[@]}" \
    >"$out/$label.sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for w in "${workers[@]}"; do wait_http "$w/health" 30; done
  [ -n "$router" ] || start_router "$label"
  wait_http http://127.0.0.1:8080/v1/models 60
  "$bin" bench --config "$workload" --base-url http://127.0.0.1:8080 --time-scale "$scale" \
    --no-progress -o "$out/$label" --label "$label" >"$out/$label.bench.txt"
  kill "$router" "$sim" 2>/dev/null || true
  wait "$router" "$sim" 2>/dev/null || true
  sleep 1
}

for r in "${list[@]}"; do run_one "$r"; done

{
  echo "# Routers on $(basename "$workload"), 4 simulated replicas, time scale $scale"
  echo
  for r in "${list[@]}"; do
    [ "$r" = "$against" ] && continue
    [ -d "$out/$against" ] || break
    echo "## $r vs $against"
    echo
    "$bin" bench compare "$out/$r" "$out/$against" --labels "$r,$against" --markdown
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
    best, i = 0.0, 0
    while os.path.exists(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")):
        s = json.load(open(os.path.join(d, f"stage_{i}_lifecycle_metrics.json")))
        t = s["successes"]["latency"].get("time_to_first_token") or {}
        if s["failures"]["count"] == 0 and t.get("p90", 1e9) <= slo:
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
} | tee "$out/comparison.md"
"$bin" bench plot "${list[@]/#/$out/}" -o "$out/ttft-throughput.svg" --labels "$routers" >/dev/null
echo "results in $out (comparison.md, ttft-throughput.svg)" >&2
