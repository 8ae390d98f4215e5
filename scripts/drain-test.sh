#!/usr/bin/env bash
# Graceful drain under load (issue 12): two simulated replicas, the EPP, long streaming
# generations (~20 s each); once they are all in flight the EPP gets SIGTERM. Reports, per
# front door (built-in proxy, Envoy + EPP), how many streams completed and how many were cut,
# and how long the EPP took to exit. With the default --drain-timeout (60 s) no stream should
# be cut; with a drain timeout shorter than the streams they are cut at the timeout.
#
# Usage: scripts/drain-test.sh [--doors proxy,envoy] [--streams 40] [--tokens 1250]
#                              [--drain-timeout 60s] [--out DIR]
# Env:   LLMSCHED_BIN  the llmsched binary (default: builds target/release/llmsched; an older
#                      build measures "before": it ignores --drain-timeout, pass
#                      --drain-timeout "" for it)
#        BASE_PORT     first of the ports used (default 18200; 18200-18220 must be free)
set -euo pipefail
cd "$(dirname "$0")/.."

doors=proxy,envoy streams=40 tokens=1250 drain=60s out=drain-test-results
while [ $# -gt 0 ]; do
  case "$1" in
    --doors) doors=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --drain-timeout) drain=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
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
base=${BASE_PORT:-18200}
sim_ports=($((base + 1)) $((base + 2)))
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

run_door() { # proxy|envoy
  local door=$1
  local dir="$out/$door"
  rm -rf "$dir"
  mkdir -p "$dir/streams"
  for i in 0 1; do
    "$bin" sim --replicas 1 --base-port "${sim_ports[$i]}" >"$dir/sim-$i.log" 2>&1 &
    pids+=("$!")
    wait_http "http://127.0.0.1:${sim_ports[$i]}/health" "replica $i"
  done
  local drain_flag=()
  [ -n "$drain" ] && drain_flag=(--drain-timeout "$drain")
  "$bin" epp --endpoints "127.0.0.1:${sim_ports[0]},127.0.0.1:${sim_ports[1]}" \
    --bind-address 127.0.0.1 --grpc-port "$grpc" --grpc-health-port "$health" \
    --metrics-port "$metrics" --proxy-port "$proxy" "${drain_flag[@]}" >"$dir/epp.log" 2>&1 &
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
  local curls=()
  for i in $(seq 1 "$streams"); do
    curl -sN --max-time 600 "$url/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\":\"Qwen/Qwen3-32B\",\"prompt\":\"stream $i of the drain test, tell me a long story\",\"max_tokens\":$tokens,\"ignore_eos\":true,\"stream\":true}" \
      >"$dir/streams/$i.sse" 2>/dev/null &
    curls+=("$!")
  done
  # Every stream has its first token before the signal.
  for _ in $(seq 1 600); do
    local started
    started=$( (grep -l '^data: {' "$dir"/streams/*.sse 2>/dev/null || true) | wc -l)
    [ "$started" -ge "$streams" ] && break
    sleep 0.1
  done
  echo "[$door] $started of $streams streams generating; SIGTERM to the EPP (drain timeout: ${drain:-default})"
  local t0
  t0=$(date +%s.%N)
  kill -TERM "$epp_pid"
  wait "$epp_pid" || true
  local t1
  t1=$(date +%s.%N)
  for c in "${curls[@]}"; do wait "$c" || true; done
  local done_count
  done_count=$( (grep -l '^data: \[DONE\]' "$dir"/streams/*.sse 2>/dev/null || true) | wc -l)
  echo "$door $streams $done_count $((streams - done_count)) $(awk "BEGIN {print $t1 - $t0}")" >>"$out/summary.txt"
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

rm -f "$out/summary.txt"
IFS=, read -r -a door_list <<<"$doors"
for d in "${door_list[@]}"; do run_door "$d"; done
echo
echo "| door | streams | completed | cut | SIGTERM to exit (s) |"
echo "| --- | ---: | ---: | ---: | ---: |"
while read -r door n ok cut secs; do
  printf '| %s | %s | %s | %s | %.1f |\n' "$door" "$n" "$ok" "$cut" "$secs"
done <"$out/summary.txt"
echo "results in $out/"
