#!/usr/bin/env bash
# Memory of the EPP under hostile input (issue 12, "clients can grow memory without limit"):
# each case starts a fresh simulated replica, a fresh EPP (release binary, default flags, its
# proxy on) and, for the ext_proc cases, Envoy in front of it, then reports the EPP's resident
# memory before (VmRSS), at its peak (VmHWM) and after, from /proc.
#
#   big-cl       one 300 MB request body with content-length, through Envoy (ext_proc)
#   big-chunked  the same body chunked (no content-length), through Envoy
#   stall        1,000 proxy connections announcing 64 MiB, sending 8 KiB each and stalling
#   names        N completions with unique model names through the proxy (default 40,000),
#                then one /metrics scrape: its size and time
#
# Usage: scripts/measure-hostile-input.sh [--cases big-cl,big-chunked,stall,names]
#                                         [--names 40000] [--body-mb 300] [--conns 1000]
# Env:   LLMSCHED_BIN  the llmsched binary to measure (default: builds target/release/llmsched;
#                      point it at an older build to measure "before")
#        BASE_PORT     first of the ports used (default 18200; 18200-18210 must be free)
set -euo pipefail
cd "$(dirname "$0")/.."

cases=big-cl,big-chunked,stall,names names=40000 body_mb=300 conns=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases=$2; shift 2 ;;
    --names) names=$2; shift 2 ;;
    --body-mb) body_mb=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin=${LLMSCHED_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -p llmsched --bin llmsched
  bin=target/release/llmsched
fi
envoy_bin="$(scripts/install-tools.sh)"
base=${BASE_PORT:-18200}
sim_port=$((base + 1)) grpc=$((base + 2)) health=$((base + 3)) metrics=$((base + 4))
proxy=$((base + 5)) envoy_port=$((base + 6)) envoy_admin=$((base + 7))
work=$(mktemp -d)
ulimit -n 20000 2>/dev/null || true

pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'cleanup; rm -rf "$work"' EXIT

wait_http() { # url what
  for _ in $(seq 1 600); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "timed out waiting for $2 ($1)" >&2
  exit 1
}

kb() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
mb() { awk -v v="$1" 'BEGIN {printf "%.0f MB", v / 1024}'; }

start_stack() { # with_envoy
  "$bin" sim --replicas 1 --base-port "$sim_port" >"$work/sim.log" 2>&1 &
  pids+=("$!")
  wait_http "http://127.0.0.1:$sim_port/health" "the replica"
  "$bin" epp --endpoints "127.0.0.1:$sim_port" --bind-address 127.0.0.1 --grpc-port "$grpc" \
    --grpc-health-port "$health" --metrics-port "$metrics" --proxy-port "$proxy" \
    >"$work/epp.log" 2>&1 &
  epp_pid=$!
  pids+=("$epp_pid")
  wait_http "http://127.0.0.1:$proxy/v1/models" "the EPP's proxy"
  if [ "$1" = yes ]; then
    "$bin" envoy-config --mode epp --listen-address 127.0.0.1 --listen-port "$envoy_port" \
      --admin "127.0.0.1:$envoy_admin" --epp "127.0.0.1:$grpc" --epp-health-port "$health" \
      -o "$work/envoy.yaml"
    "$envoy_bin" -c "$work/envoy.yaml" --concurrency 1 --log-level warn \
      --disable-hot-restart >"$work/envoy.log" 2>&1 &
    pids+=("$!")
    wait_http "http://127.0.0.1:$envoy_port/v1/models" "Envoy"
  fi
  sleep 1
  rss0=$(kb "$epp_pid" VmRSS)
}

stop_stack() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

report() { # case result
  local hwm rss
  sleep 2
  hwm=$(kb "$epp_pid" VmHWM)
  rss=$(kb "$epp_pid" VmRSS)
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$(mb "$rss0")" "$(mb "$hwm")" "$(mb "$rss")" "$2"
}

echo "binary: $bin"
echo
echo "| case | EPP RSS before | EPP peak RSS | EPP RSS after | result |"
echo "| --- | ---: | ---: | ---: | --- |"
IFS=, read -r -a case_list <<<"$cases"
for c in "${case_list[@]}"; do
  case "$c" in
    big-cl | big-chunked)
      start_stack yes
      flag=""
      [ "$c" = big-chunked ] && flag=--chunked
      # shellcheck disable=SC2086
      out=$(python3 scripts/hostile-input.py bigbody --port "$envoy_port" \
        --bytes $((body_mb * 1000 * 1000)) $flag 2>&1 | tr '\n' ' ')
      report "$c ($body_mb MB through Envoy)" "$out"
      stop_stack
      ;;
    stall)
      start_stack no
      python3 scripts/hostile-input.py stall --port "$proxy" --conns "$conns" --hold 8 \
        >"$work/stall.out" 2>&1 &
      stall_pid=$!
      pids+=("$stall_pid")
      for _ in $(seq 1 600); do grep -q ready "$work/stall.out" && break; sleep 0.1; done
      report "stall ($conns proxy connections announcing 64 MiB)" \
        "$(ss -Htn state established "( sport = :$proxy )" | wc -l) connections open at the proxy"
      stop_stack
      ;;
    names)
      start_stack no
      statuses=$(python3 scripts/hostile-input.py flood --port "$proxy" --count "$names")
      t0=$(date +%s.%N)
      curl -s -o "$work/metrics.txt" "http://127.0.0.1:$metrics/metrics"
      t1=$(date +%s.%N)
      size=$(stat -c %s "$work/metrics.txt")
      lines=$(wc -l <"$work/metrics.txt")
      other=$(awk '/^inference_objective_request_total\{model_name="other"/ {print $2}' "$work/metrics.txt")
      report "names ($names unique model names through the proxy)" \
        "statuses $statuses; /metrics $size bytes, $lines lines, scraped in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s; other=${other:-absent}"
      stop_stack
      ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
done
