#!/usr/bin/env bash
# Scheduling decisions per second of 1 EPP vs 3 active-active EPP replicas (aggregate) on
# this machine: 4 simulated replicas (`llmsched sim`, only scraped: no inference is run),
# then per setup the EPPs and a closed-loop ext_proc load generator
# (`crates/extproc/examples/decision_load.rs`: Envoy's message sequence, whole request
# lifecycles, prompts of --prefix-kb shared prefixes + a unique question) spreading its
# streams round robin over the EPPs. Prints, per setup: decisions/s, decision latency p50/p99,
# the EPPs' CPU seconds (from /proc) and decisions per EPP CPU second, the generator's CPU.
#
# Usage: scripts/bench-ha-decisions.sh [--setups one,sync,nosync] [--concurrency 32]
#          [--seconds 10] [--prefix-kb 6] [--repeat N] [--ports BASE]
# Env:   CARGO_TARGET_DIR (default: target), LLMSCHED_BIN (use this llmsched binary),
#        DECISION_LOAD_BIN (use this decision_load example binary)
set -euo pipefail
cd "$(dirname "$0")/.."
setups="one,sync,nosync" conc=32 secs=10 kb=6 repeat=1 ports=8400
while [ $# -gt 0 ]; do
  case "$1" in
    --setups) setups="$2"; shift 2 ;;
    --concurrency) conc="$2"; shift 2 ;;
    --seconds) secs="$2"; shift 2 ;;
    --prefix-kb) kb="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --ports) ports="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$setups"
for s in "${list[@]}"; do
  case "$s" in one|sync|nosync) ;; *) echo "unknown setup '$s' (one, sync, nosync)" >&2; exit 2 ;; esac
done
case "$repeat" in ''|*[!0-9]*|0) echo "--repeat must be a positive integer" >&2; exit 2 ;; esac
target="${CARGO_TARGET_DIR:-target}"
bin="${LLMSCHED_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --locked -p llmsched --bin llmsched
  bin="$target/release/llmsched"
fi
load="${DECISION_LOAD_BIN:-}"
if [ -z "$load" ]; then
  cargo build --release --locked -p llmsched-extproc --example decision_load
  load="$target/release/examples/decision_load"
fi

pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
wait_ready() { # metrics-port seconds
  for _ in $(seq 1 $(( $2 * 10 ))); do
    curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | grep -q '^llmsched_endpoint_healthy{.*} 1' && return 0
    sleep 0.1
  done
  echo "timeout waiting for the EPP on :$1" >&2; return 1
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
tck=$(getconf CLK_TCK)

eps=""
for i in 0 1 2 3; do eps+="${eps:+,}127.0.0.1:$((ports + i))"; done
"$bin" sim --replicas 4 --base-port "$ports" --profile qwen3-32b-tp2-h100 --model Qwen/Qwen3-32B \
  >/dev/null 2>&1 &
pids+=("$!")
for i in 0 1 2 3; do
  for _ in $(seq 1 300); do curl -fsS -o /dev/null "http://127.0.0.1:$((ports + i))/health" 2>/dev/null && break; sleep 0.1; done
done

echo "| setup | run | decisions/s | latency p50 / p99 (ms) | EPP CPU s (sum) | decisions per EPP CPU s | generator CPU s | errors |"
echo "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"
for k in $(seq 1 "$repeat"); do
  for setup in "${list[@]}"; do
    n=3; [ "$setup" = one ] && n=1
    base=$((ports + 1000)) peers="" addrs="" epps=()
    for i in $(seq 0 $((n - 1))); do peers+="${peers:+,}127.0.0.1:$((base + 2 + 100 * i))"; done
    for i in $(seq 0 $((n - 1))); do
      b=$((base + 100 * i)) ha=()
      [ "$setup" = sync ] && ha=(--ha-mode=active-active --ha-port "$((b + 2))" --ha-peers "$peers")
      "$bin" epp --secure-serving=false --bind-address 127.0.0.1 --endpoints "$eps" \
        --grpc-port "$b" --grpc-health-port "$((b + 1))" --metrics-port "$((b + 3))" \
        ${ha[@]+"${ha[@]}"} >/dev/null 2>&1 &
      epps+=("$!"); pids+=("$!")
      addrs+="${addrs:+,}127.0.0.1:$b"
    done
    for i in $(seq 0 $((n - 1))); do wait_ready "$((base + 3 + 100 * i))" 60; done
    # CPU is read around the measured window (the generator warms up for 2 s first).
    out=$(mktemp)
    "$load" --epp "$addrs" --concurrency "$conc" --seconds "$secs" --prefix-kb "$kb" >"$out" &
    lp=$!
    sleep 2
    c0=0; for p in "${epps[@]}"; do c0=$((c0 + $(ticks "$p"))); done
    wait "$lp"
    c1=0; for p in "${epps[@]}"; do c1=$((c1 + $(ticks "$p"))); done
    python3 - "$setup" "$k" "$(( c1 - c0 ))" "$tck" "$out" <<'PY'
import json, sys
setup, run, dt, tck, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = json.loads(open(path).read().strip().splitlines()[-1])
names = {"one": "1 EPP", "sync": "3 EPPs active-active", "nosync": "3 EPPs, sync off"}
cpu = dt / tck
per = r["decisions"] / cpu if cpu else float("nan")
print(f"| {names[setup]} | {run} | {r['decisions_per_sec']:.0f} | {r['latency_ms_p50']:.2f} / {r['latency_ms_p99']:.2f} | "
      f"{cpu:.1f} | {per:.0f} | {r['generator_cpu_seconds']:.1f} | {r['errors']} |")
PY
    rm -f "$out"
    kill "${epps[@]}" 2>/dev/null || true
    wait "${epps[@]}" 2>/dev/null || true
  done
done
