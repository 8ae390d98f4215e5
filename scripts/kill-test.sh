#!/usr/bin/env bash
# The production kill test (issue 12): three simulated replicas, each its own `llmsched sim`
# process, the EPP with its default configuration, streaming load at 20 requests/s for 60 s;
# 20 s in, one replica is killed with `kill -9`, 10 s later it is restarted. Runs through the
# built-in proxy and through Envoy + EPP (ext_proc), each on a fresh cluster, and reports the
# failed requests, split into those in flight on the killed replica (cut mid-response:
# unavoidable) and new requests that were answered with an error.
#
# Usage: scripts/kill-test.sh [--doors proxy,envoy] [--rate 20] [--seconds 60] [--kill-at 20]
#                             [--down 10] [--out DIR]
# Env:   LLMSCHED_BIN  the llmsched binary to test (default: builds target/release/llmsched;
#                      point it at an older build to measure "before")
#        EPP_FLAGS     extra `llmsched epp` flags (e.g. "--config-file config/epp/reference-default.yaml")
#        BASE_PORT     first of the ports used (default 18100; 18100-18120 must be free)
set -euo pipefail
cd "$(dirname "$0")/.."

doors=proxy,envoy rate=20 seconds=60 kill_at=20 down=10 out=kill-test-results
while [ $# -gt 0 ]; do
  case "$1" in
    --doors) doors=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --kill-at) kill_at=$2; shift 2 ;;
    --down) down=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin=${LLMSCHED_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p llmsched --bin llmsched
  bin=target/release/llmsched
fi
envoy_bin=""
case ",$doors," in *,envoy,*) envoy_bin="$(scripts/install-tools.sh)" ;; esac
base=${BASE_PORT:-18100}
sim_ports=($((base + 1)) $((base + 2)) $((base + 3)))
grpc=$((base + 10)) health=$((base + 11)) metrics=$((base + 12)) proxy=$((base + 13))
envoy_port=$((base + 14)) envoy_admin=$((base + 15))
mkdir -p "$out"

pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_http() { # url what
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "timed out waiting for $2 ($1)" >&2
  exit 1
}

start_sim() { # index
  "$bin" sim --replicas 1 --base-port "${sim_ports[$1]}" >"$out/sim-$1.log" 2>&1 &
  sim_pids[$1]=$!
  pids+=("$!")
  wait_http "http://127.0.0.1:${sim_ports[$1]}/health" "replica $1"
}

cat >"$out/workload.yaml" <<EOF
# kill-test.sh: streaming completions at a constant $rate req/s for $seconds s.
api: {type: completion, streaming: true}
server: {type: vllm, model_name: Qwen/Qwen3-32B, base_url: 'http://127.0.0.1:1', ignore_eos: true}
data:
  type: shared_prefix
  shared_prefix: {num_groups: 30, num_prompts_per_group: 40, system_prompt_len: 500, question_len: 100, output_len: 100}
load:
  type: constant
  stages:
  - {rate: $rate, duration: $seconds}
report:
  request_lifecycle: {summary: true, per_stage: false, per_request: true}
EOF

run_door() { # proxy|envoy
  local door=$1
  local dir="$out/$door"
  rm -rf "$dir"
  mkdir -p "$dir"
  sim_pids=()
  for i in 0 1 2; do start_sim "$i"; done
  local eps="127.0.0.1:${sim_ports[0]},127.0.0.1:${sim_ports[1]},127.0.0.1:${sim_ports[2]}"
  # shellcheck disable=SC2086
  "$bin" epp --endpoints "$eps" --bind-address 127.0.0.1 --grpc-port "$grpc" \
    --grpc-health-port "$health" --metrics-port "$metrics" --proxy-port "$proxy" \
    ${EPP_FLAGS:-} >"$dir/epp.log" 2>&1 &
  local epp_pid=$!
  pids+=("$epp_pid")
  wait_http "http://127.0.0.1:$proxy/v1/models" "the EPP's proxy"
  local url="http://127.0.0.1:$proxy"
  if [ "$door" = envoy ]; then
    "$bin" envoy-config --mode epp --listen-address 127.0.0.1 --listen-port "$envoy_port" \
      --admin "127.0.0.1:$envoy_admin" --epp "127.0.0.1:$grpc" --epp-health-port "$health" \
      -o "$dir/envoy.yaml"
    "$envoy_bin" -c "$dir/envoy.yaml" --concurrency 1 --log-level warn \
      --disable-hot-restart >"$dir/envoy.log" 2>&1 &
    pids+=("$!")
    wait_http "http://127.0.0.1:$envoy_port/v1/models" "Envoy"
    url="http://127.0.0.1:$envoy_port"
  fi
  echo "[$door] load: $rate req/s for $seconds s; kill -9 replica 0 at ${kill_at}s, restart it ${down}s later"
  "$bin" bench -c "$out/workload.yaml" --base-url "$url" -o "$dir/bench" --no-progress \
    >"$dir/bench.log" 2>&1 &
  local bench_pid=$!
  pids+=("$bench_pid")
  sleep "$kill_at"
  local victim="127.0.0.1:${sim_ports[0]}"
  curl -s "http://$victim/metrics" |
    awk '/^vllm:num_requests_(running|waiting)\{/ {n += $2} END {print int(n)}' >"$dir/inflight-at-kill"
  kill -9 "${sim_pids[0]}"
  echo "[$door] killed $victim with $(cat "$dir/inflight-at-kill") requests in flight on it"
  sleep "$down"
  start_sim 0
  echo "[$door] restarted $victim"
  wait "$bench_pid" || true
  curl -s "http://127.0.0.1:$metrics/metrics" >"$dir/epp-metrics.txt" || true
  kill "$epp_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

IFS=, read -r -a door_list <<<"$doors"
for d in "${door_list[@]}"; do run_door "$d"; done

python3 - "$out" "${door_list[@]}" <<'EOF'
import json, os, sys
out, doors = sys.argv[1], sys.argv[2:]
print()
print("| door | requests | failed | in flight on the killed replica (cut) | new requests answered with an error | in flight at kill (replica's own count) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for door in doors:
    d = os.path.join(out, door)
    with open(os.path.join(d, "bench", "per_request_lifecycle_metrics.json")) as f:
        reqs = json.load(f)
    failed = [r for r in reqs if r.get("error")]
    # A request answered with an HTTP error never reached a replica that then died; anything
    # else (body cut, connection reset after the headers) was in flight when it died.
    rejected = [r for r in failed if r["error"]["error_type"].startswith("HTTP Error")]
    cut = len(failed) - len(rejected)
    with open(os.path.join(d, "inflight-at-kill")) as f:
        at_kill = f.read().strip()
    print(f"| {door} | {len(reqs)} | {len(failed)} | {cut} | {len(rejected)} | {at_kill} |")
    kinds = {}
    for r in failed:
        k = r["error"]["error_type"]
        kinds[k] = kinds.get(k, 0) + 1
    if kinds:
        print(f"|   {door} errors | " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + " | | | | |")
EOF
echo "results in $out/"
