#!/usr/bin/env bash
# Routers side by side on the same simulated fleet and workload: for each router, a cold
# cluster of 4 simulated replicas (164,000 KV tokens each by default), the router on :8080,
# the workload through it (`llmsched bench`), then everything stopped. Prints comparison
# tables against one router (--against), the highest stage rate each router served within
# the TTFT objective, and writes result folders, logs, comparison.md and ttft-throughput.svg
# under the output folder (default: routers-YYYYMMDD-HHMMSS). With --repeat N the whole
# sequence runs N times, interleaved (router 1, 2, 3, then 1, 2, 3 again...), into run1/,
# run2/...; the summary table then has one row per router and run. Each row also says
# whether the simulator kept up with its clock (`sim resyncs`: steps more than 50 ms late,
# summed over the replicas; anything but 0 means the machine was too busy for that run).
#
# Routers:
#   rr           llmsched's built-in proxy with --baseline round-robin (the guide's "Service")
#   llmsched     llmsched's built-in proxy, default EndpointPickerConfig (approximate
#                prefix-cache 3, active-request 3, queue 1, kv 1); `approx` is the same router
#                under another name
#   precise      config/epp/precise-prefix-cache.yaml (or --precise-config), the replicas
#                publishing KV events to the EPP's socket (--zmq-port)
#   sglang       SGLang's router, --policy cache_aware (PyPI, into ./.tools/peers)
#   vllm-router  vllm-router, --policy cache_aware (PyPI, into ./.tools/peers)
#
# Usage: scripts/compare-routers.sh [--routers rr,llmsched,...] [--against NAME]
#          [--workload FILE] [--time-scale F] [--ttft-slo SECONDS] [--zmq-port P]
#          [--llmsched-config FILE] [--precise-config FILE] [--profile NAME]
#          [--kv-cache-tokens N] [--sim-args "ARGS"] [--repeat N] [--decision-log] [-o DIR]
#        --llmsched-config: an EndpointPickerConfig for the `llmsched` router (default: none,
#        i.e. the built-in default config)
#        --precise-config: the `precise` router's config (default
#        config/epp/precise-prefix-cache.yaml; its zmqEndpoint is pointed at --zmq-port);
#        `--precise-config NAME=FILE` (repeatable) adds a precise router named NAME
#        --profile, --kv-cache-tokens: the simulator's calibration profile (default
#        qwen3-32b-tp2-h100) and KV tokens per replica (default 164000); the replicas serve
#        the workload's model name whatever the profile; --sim-args: more `llmsched sim`
#        flags, split on spaces (e.g. "--max-model-len 32768" for a KV budget below the
#        profile's context length)
#        --decision-log: llmsched routers log each request's prefix decision
#        (`llmsched_decisions`, JSON lines in <router>.router.log; see README)
# Env:   CARGO_TARGET_DIR (default: target), LLMSCHED_BIN (use this llmsched binary, no
#        build), SGLANG_ROUTER_VERSION (0.3.2),
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
declare -A precise_cfg=([precise]=config/epp/precise-prefix-cache.yaml)
profile="qwen3-32b-tp2-h100"
kv_tokens=164000
repeat=1
decision_log=0
sim_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --routers) routers="$2"; shift 2 ;;
    --against) against="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --ttft-slo) slo="$2"; shift 2 ;;
    --zmq-port) zmq_port="$2"; shift 2 ;;
    --llmsched-config) llmsched_config="$2"; shift 2 ;;
    --precise-config)
      case "$2" in
        *=*) precise_cfg["${2%%=*}"]="${2#*=}" ;;
        *) precise_cfg[precise]="$2" ;;
      esac
      shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --kv-cache-tokens) kv_tokens="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --sim-args) sim_args="$2"; shift 2 ;;
    --decision-log) decision_log=1; shift ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$routers"
for r in "${list[@]}"; do
  case "$r" in
    rr|llmsched|approx|sglang|vllm-router) ;;
    *) [ -n "${precise_cfg[$r]:-}" ] || {
         echo "unknown router '$r' (rr, llmsched, approx, precise, sglang, vllm-router, or a --precise-config NAME)" >&2; exit 2; } ;;
  esac
done
[ -n "$against" ] || against="${list[${#list[@]}-1]}"
if [ -n "$llmsched_config" ] && [ ! -f "$llmsched_config" ]; then
  echo "--llmsched-config: no such file: $llmsched_config" >&2; exit 2
fi
for k in "${!precise_cfg[@]}"; do
  if [ ! -f "${precise_cfg[$k]}" ]; then
    echo "--precise-config: no such file: ${precise_cfg[$k]}" >&2; exit 2
  fi
done
if [ ! -f "$workload" ]; then
  echo "--workload: no such file: $workload" >&2; exit 2
fi
case "$repeat" in ''|*[!0-9]*|0) echo "--repeat must be a positive integer" >&2; exit 2 ;; esac
case "$kv_tokens" in ''|*[!0-9]*|0) echo "--kv-cache-tokens must be a positive integer" >&2; exit 2 ;; esac
model=$(python3 -c "import re,sys; m=re.search(r'model_name:\s*(\S+)', open(sys.argv[1]).read()); print(m.group(1) if m else '')" "$workload")

if [ -n "${LLMSCHED_BIN:-}" ]; then
  bin="$LLMSCHED_BIN"   # a binary built before (e.g. a copy, so that edits do not rebuild it)
  [ -x "$bin" ] || { echo "LLMSCHED_BIN: not an executable: $bin" >&2; exit 2; }
else
  target="${CARGO_TARGET_DIR:-target}"
  cargo build --release --locked -p llmsched --bin llmsched
  bin="$target/release/llmsched"
fi

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
# The precise configs, with the KV-event socket on loopback at the chosen port.
for k in "${!precise_cfg[@]}"; do
  sed -e "s#zmqEndpoint: \"tcp://\*:5557\"#zmqEndpoint: \"tcp://127.0.0.1:${zmq_port}\"#" \
    "${precise_cfg[$k]}" >"$out/$k.epp.yaml"
  grep -q "tcp://127.0.0.1:${zmq_port}" "$out/$k.epp.yaml" || {
    echo "--precise-config: ${precise_cfg[$k]} has no 'zmqEndpoint: \"tcp://*:5557\"' line to point at --zmq-port" >&2; exit 2; }
done
sim_model=()
[ -z "$model" ] || sim_model=(--model "$model")
read -r -a sim_extra <<<"$sim_args"
sim_model+=(${sim_extra[@]+"${sim_extra[@]}"})
log_env=()
[ "$decision_log" = 0 ] || log_env=(env "RUST_LOG=info,llmsched_decisions=debug")

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
[ "$decision_log" = 0 ] || epp+=(--log-format json)
llmsched_args=()
[ -z "$llmsched_config" ] || llmsched_args=(--config-file "$llmsched_config")

start_router() { # label dir
  local log="$2/$1.router.log"
  case "$1" in
    rr) "$bin" epp "${epp[@]}" --baseline round-robin >"$log" 2>&1 & ;;
    llmsched|approx) ${log_env[@]+"${log_env[@]}"} "$bin" epp "${epp[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
               ${llmsched_args[@]+"${llmsched_args[@]}"} >"$log" 2>&1 & ;;
    sglang) "$peers/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port 8080 \
              --policy cache_aware --worker-urls "${workers[@]}" >"$log" 2>&1 & ;;
    vllm-router) "$peers/bin/vllm-router" --host 127.0.0.1 --port 8080 --policy cache_aware \
              --worker-urls "${workers[@]}" >"$log" 2>&1 & ;;
    *) ${log_env[@]+"${log_env[@]}"} "$bin" epp "${epp[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
               --config-file "$out/$1.epp.yaml" >"$log" 2>&1 & ;;
  esac
  router=$!; pids+=("$router")
}

run_one() { # label dir
  local label="$1" dir="$2" router="" kv=()
  echo "== $label: cold cluster ($dir)" >&2
  if [ -n "${precise_cfg[$label]:-}" ]; then
    # The EPP binds the KV-event socket first; the replicas dial it (as llm-d's simulator does).
    start_router "$label" "$dir"
    kv=(--kv-events-endpoint "tcp://127.0.0.1:${zmq_port}" --kv-events-mode connect)
  fi
  "$bin" sim --replicas 4 --base-port 8000 --profile "$profile" --kv-cache-tokens "$kv_tokens" \
    ${sim_model[@]+"${sim_model[@]}"} --time-scale "$scale" ${kv[@]+"${kv[@]}"} \
    >"$dir/$label.sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for w in "${workers[@]}"; do wait_http "$w/health" 30; done
  [ -n "$router" ] || start_router "$label" "$dir"
  wait_http http://127.0.0.1:8080/v1/models 60
  "$bin" bench --config "$workload" --base-url http://127.0.0.1:8080 --time-scale "$scale" \
    --no-progress -o "$dir/$label" --label "$label" >"$dir/$label.bench.txt"
  # Did the simulator keep up with its clock? (steps more than 50 ms late, all replicas)
  local resyncs=0
  for w in "${workers[@]}"; do
    local n
    n=$(curl -fsS "$w/metrics" 2>/dev/null | awk '/^llmsched_sim_clock_resyncs_total/ {print $2}')
    n=${n%.*}; resyncs=$(( resyncs + ${n:-0} ))
  done
  echo "$resyncs" >"$dir/$label/sim_resyncs"
  kill "$router" "$sim" 2>/dev/null || true
  wait "$router" "$sim" 2>/dev/null || true
  sleep 1
}

runs=()
for i in $(seq 1 "$repeat"); do
  if [ "$repeat" = 1 ]; then d="$out"; else d="$out/run$i"; fi
  mkdir -p "$d"; runs+=("$d")
  for r in "${list[@]}"; do run_one "$r" "$d"; done
done

{
  echo "# Routers on $(basename "$workload"), 4 simulated replicas ($profile, $kv_tokens KV tokens each), time scale $scale"
  echo
  for d in "${runs[@]}"; do
  for r in "${list[@]}"; do
    [ "$r" = "$against" ] && continue
    [ -d "$d/$against" ] || break
    echo "## $r vs $against${d#"$out"}"
    echo
    "$bin" bench compare "$d/$r" "$d/$against" --labels "$r,$against" --markdown
    echo
  done
  done
  echo "## Highest stage rate served within TTFT p90 ≤ ${slo} s"
  echo
  python3 - "$slo" "${#runs[@]}" "${runs[@]}" "${list[@]}" <<'PY'
import json, os, sys
slo, n = float(sys.argv[1]), int(sys.argv[2])
runs, routers = sys.argv[3:3 + n], sys.argv[3 + n:]
print("| router | run | highest rate (req/s) | TTFT mean (s) | TTFT p90 (s) | req/s | cached % | sim resyncs |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for k, r in [(k, r) for r in routers for k in range(n)]:
    d = os.path.join(runs[k], r)
    if not os.path.exists(os.path.join(d, "summary_lifecycle_metrics.json")):
        continue
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
    try:
        resyncs = open(os.path.join(d, "sim_resyncs")).read().strip()
    except OSError:
        resyncs = "?"
    print(f"| {r} | {k + 1} | {best:g} | {t.get('mean', float('nan')):.3f} | {t.get('p90', float('nan')):.3f} | "
          f"{tp['requests_per_sec']:.2f} | {cached:.1f} | {resyncs} |")
PY
} | tee "$out/comparison.md"
"$bin" bench plot "${list[@]/#/${runs[0]}/}" -o "$out/ttft-throughput.svg" --labels "$routers" >/dev/null
echo "results in $out (comparison.md, ttft-throughput.svg)" >&2
