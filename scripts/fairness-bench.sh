#!/usr/bin/env bash
# Fairness under saturation, on the simulator: two tenants share one pool through the EPP's
# proxy with flow control on. "heavy" keeps 10x as many requests outstanding as "light"
# (closed loop, --heavy / --light concurrency), both tagged with
# x-gateway-inference-fairness-id; the pool admits --per-endpoint requests per replica
# (concurrency-detector), so the rest waits in the EPP's flow-control queue, where the
# band's fairness policy decides who goes next. For each policy: a fresh simulator and EPP,
# both tenants for --duration simulated seconds, then each tenant's served tokens/s (prompt
# tokens when the first token arrives + output tokens as they stream) and share, measured
# over the window where both ran, after --warmup seconds.
#
# Policies: global-strict (the default: FCFS across flows, so service follows offered load),
#           round-robin (equal turns), token-fair-share (equal tokens).
#
# Usage: scripts/fairness-bench.sh [--policies global-strict,token-fair-share,...]
#          [--duration S] [--warmup S] [--time-scale F] [--heavy N] [--light N]
#          [--heavy-output TOKENS] [--light-output TOKENS] [--replicas N] [--per-endpoint N]
#          [--base-port P] [--proxy-port P] [-o DIR]
#        Prompts are 256 tokens; outputs --heavy-output / --light-output tokens (128).
# Env:   CARGO_TARGET_DIR (default: target)
set -euo pipefail
cd "$(dirname "$0")/.."
policies="global-strict,token-fair-share"
duration=240
warmup=60
scale=4
heavy=160
light=16
heavy_output=128
light_output=128
replicas=2
per_endpoint=8
base_port=18100
proxy_port=18180
out="fairness-$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --policies) policies="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --heavy) heavy="$2"; shift 2 ;;
    --light) light="$2"; shift 2 ;;
    --heavy-output) heavy_output="$2"; shift 2 ;;
    --light-output) light_output="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    --per-endpoint) per_endpoint="$2"; shift 2 ;;
    --base-port) base_port="$2"; shift 2 ;;
    --proxy-port) proxy_port="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$policies"
for p in "${list[@]}"; do
  case "$p" in
    global-strict|round-robin|token-fair-share) ;;
    *) echo "unknown policy '$p' (global-strict, round-robin, token-fair-share)" >&2; exit 2 ;;
  esac
done
positive() { python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$1" 2>/dev/null; }
for v in "$duration" "$scale" "$heavy" "$light" "$heavy_output" "$light_output" "$replicas" "$per_endpoint" "$base_port" "$proxy_port"; do
  positive "$v" || { echo "numeric options must be positive numbers (got '$v')" >&2; exit 2; }
done
python3 -c "import sys; w, d = map(float, sys.argv[1:]); sys.exit(0 if 0 <= w < d else 1)" "$warmup" "$duration" 2>/dev/null \
  || { echo "--warmup must be a number >= 0 and below --duration (got '$warmup')" >&2; exit 2; }

target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p llmsched --bin llmsched
bin="$target/release/llmsched"
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

eps=""
for i in $(seq 0 $(( replicas - 1 ))); do
  eps="${eps:+$eps,}127.0.0.1:$(( base_port + i ))"
done

tenant_config() { # name concurrency output_len
  cat <<EOF
api:
  type: completion
  streaming: true
  headers: {x-gateway-inference-fairness-id: $1}
server:
  type: vllm
  base_url: http://127.0.0.1:${proxy_port}
  ignore_eos: true
data:
  type: shared_prefix
  shared_prefix: {num_groups: 32, num_prompts_per_group: 8, system_prompt_len: 0, question_len: 256, output_len: $3}
load:
  type: concurrent
  stages:
  - {num_requests: 1000000, concurrency_level: $2}
report:
  request_lifecycle: {summary: true, per_stage: false, per_request: true}
EOF
}
tenant_config heavy "$heavy" "$heavy_output" >"$out/heavy.yaml"
tenant_config light "$light" "$light_output" >"$out/light.yaml"

epp_config() { # policy
  local fc="flowControl: {}"
  case "$1" in
    round-robin) fc="flowControl: {defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}}" ;;
    token-fair-share) fc="flowControl: {defaultPriorityBand: {fairnessPolicyRef: token-fair-share-fairness-policy}}" ;;
  esac
  cat <<EOF
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: active-request-scorer
- type: concurrency-detector
  parameters: {maxConcurrency: ${per_endpoint}}
saturationDetector: {pluginRef: concurrency-detector}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: active-request-scorer, weight: 1}
${fc}
EOF
}

run_one() { # policy
  local p="$1" dir="$out/$1"
  mkdir -p "$dir"
  epp_config "$p" >"$dir/epp.yaml"
  echo "== $p: $replicas replicas, heavy $heavy vs light $light outstanding (outputs $heavy_output / $light_output tokens), ${duration}s at time scale $scale" >&2
  "$bin" sim --replicas "$replicas" --base-port "$base_port" --time-scale "$scale" >"$dir/sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for i in $(seq 0 $(( replicas - 1 ))); do wait_http "http://127.0.0.1:$(( base_port + i ))/health" 30; done
  "$bin" epp --secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0 \
    --endpoints "$eps" --proxy-port "$proxy_port" --config-file "$dir/epp.yaml" >"$dir/epp.log" 2>&1 &
  local epp=$!; pids+=("$epp")
  wait_http "http://127.0.0.1:${proxy_port}/v1/models" 60
  local benches=()
  for t in heavy light; do
    "$bin" bench --config "$out/$t.yaml" --time-scale "$scale" --no-progress --per-request \
      -o "$dir/$t" --label "$t" >"$dir/$t.bench.txt" 2>&1 &
    benches+=($!)
  done
  sleep "$(python3 -c "print($duration / $scale)")"
  kill -INT "${benches[@]}" 2>/dev/null || true
  for b in "${benches[@]}"; do wait "$b" || true; done
  kill "$epp" "$sim" 2>/dev/null || true
  wait "$epp" "$sim" 2>/dev/null || true
  for t in heavy light; do
    [ -f "$dir/$t/per_request_lifecycle_metrics.json" ] \
      || { echo "$p: no results from $t (see $dir/$t.bench.txt)" >&2; exit 1; }
  done
}

for p in "${list[@]}"; do run_one "$p"; done

python3 - "$out" "$warmup" "$scale" "${list[@]}" <<'PY' | tee "$out/fairness.md"
import datetime, json, sys

out, warmup, scale = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
policies = sys.argv[4:]

def load(d):
    meta = json.load(open(f"{d}/bench_run.json"))
    start = datetime.datetime.fromisoformat(meta["started_at"].replace("Z", "+00:00")).timestamp()
    reqs = json.load(open(f"{d}/per_request_lifecycle_metrics.json"))
    events = []  # (simulated seconds since the epoch, tokens)
    for r in reqs:
        m = r["info"]["response_metrics"]
        times, toks = m["chunk_times"], m["chunk_tokens"]
        if not times:
            continue
        # Time in the run is simulated seconds; align runs on the wall clock.
        t0 = start * scale
        events.append((t0 + times[0], r["info"]["input_tokens"]))
        events.extend((t0 + t, n) for t, n in zip(times, toks))
    return events

names = {"global-strict": "global-strict-fairness-policy (default, FCFS)",
         "round-robin": "round-robin-fairness-policy",
         "token-fair-share": "token-fair-share-fairness-policy"}
print("| fairness policy | heavy tok/s | light tok/s | light's share | heavy : light served |")
print("| --- | ---: | ---: | ---: | ---: |")
for p in policies:
    ev = {t: load(f"{out}/{p}/{t}") for t in ("heavy", "light")}
    lo = max(min(e[0] for e in ev[t]) for t in ev) + warmup
    hi = min(max(e[0] for e in ev[t]) for t in ev)
    if hi <= lo:
        sys.exit(f"{p}: the tenants' runs do not overlap beyond the warm-up")
    rate = {t: sum(n for (x, n) in ev[t] if lo <= x < hi) / (hi - lo) for t in ev}
    total = rate["heavy"] + rate["light"]
    print(f"| {names[p]} | {rate['heavy']:,.0f} | {rate['light']:,.0f} | "
          f"{100 * rate['light'] / total:.1f} % | {rate['heavy'] / max(rate['light'], 1e-9):.2f} : 1 |")
print()
print(f"Window: {hi - lo:.0f} simulated s after a {warmup:.0f} s warm-up (last policy); "
      f"tokens = prompt tokens at the first token + output tokens as streamed.")
PY
echo "results in $out" >&2
