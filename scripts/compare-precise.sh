#!/usr/bin/env bash
# Precise (KV-event) vs approximate prefix-cache routing vs round robin, on the same
# simulated fleet and workload, one cold cluster per router, all through llmsched's built-in
# proxy:
#   rr        llmsched epp --proxy-port ... --baseline round-robin
#   approx    the default EndpointPickerConfig (queue 2, kv-utilization 2, prefix-cache 3)
#   precise   config/epp/precise-prefix-cache.yaml (precise-prefix-cache 3, kv-utilization 2,
#             queue 2), the simulator replicas dialling the EPP's KV-event socket
# Prints the comparison tables and writes everything under the output folder (default:
# precise-YYYYMMDD-HHMMSS): result folders, logs, precise.md, ttft-throughput.svg.
#
# Usage: scripts/compare-precise.sh [--workload FILE] [--time-scale F] [--routers rr,approx,precise]
#                                   [--zmq-port P] [-o DIR]
# Env:   CARGO_TARGET_DIR (default: target)
set -euo pipefail
cd "$(dirname "$0")/.."
workload="config/workloads/guide-mini.yaml"
scale=2.5
routers="rr,approx,precise"
zmq_port=5557
out="precise-$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --routers) routers="$2"; shift 2 ;;
    --zmq-port) zmq_port="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p llmsched --bin llmsched
bin="$target/release/llmsched"

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
refresh_ms=$(python3 -c "print(max(5, round(50 / $scale)))")
common=(--secure-serving=false --grpc-port=0 --grpc-health-port=0 --metrics-port=0
        --endpoints "$eps" --proxy-port 8080)

run_one() { # label
  local label="$1"
  echo "== $label: cold cluster" >&2
  local router
  if [ "$label" = precise ]; then
    # The EPP binds the KV-event socket; the replicas dial it (as llm-d's simulator does).
    "$bin" epp "${common[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
      --config-file "$out/precise-prefix-cache.yaml" >"$out/$label.router.log" 2>&1 &
    router=$!; pids+=("$router")
  fi
  local kv=()
  [ "$label" = precise ] && kv=(--kv-events-endpoint "tcp://127.0.0.1:${zmq_port}" --kv-events-mode connect)
  "$bin" sim --replicas 4 --base-port 8000 --kv-cache-tokens 164000 --time-scale "$scale" "${kv[@]}" \
    >"$out/$label.sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for w in "${workers[@]}"; do wait_http "$w/health" 30; done
  case "$label" in
    rr) "$bin" epp "${common[@]}" --baseline round-robin >"$out/$label.router.log" 2>&1 &
        router=$!; pids+=("$router") ;;
    approx) "$bin" epp "${common[@]}" --refresh-metrics-interval "${refresh_ms}ms" \
          >"$out/$label.router.log" 2>&1 &
        router=$!; pids+=("$router") ;;
  esac
  wait_http http://127.0.0.1:8080/v1/models 60
  "$bin" bench --config "$workload" --base-url http://127.0.0.1:8080 --time-scale "$scale" \
    --no-progress -o "$out/$label" --label "$label" >"$out/$label.bench.txt"
  kill "$router" "$sim" 2>/dev/null || true
  wait "$router" "$sim" 2>/dev/null || true
  sleep 1
}

IFS=',' read -r -a list <<<"$routers"
for r in "${list[@]}"; do run_one "$r"; done

{
  echo "# Precise vs approximate vs round robin on $(basename "$workload"), 4 simulated replicas, time scale $scale"
  echo
  for r in "${list[@]}"; do
    [ "$r" = precise ] && continue
    [ -d "$out/precise" ] || break
    echo "## $r vs precise"
    echo
    "$bin" bench compare "$out/$r" "$out/precise" --labels "$r,precise" --markdown
    echo
  done
} | tee "$out/precise.md"
"$bin" bench plot "${list[@]/#/$out/}" -o "$out/ttft-throughput.svg" --labels "$routers" >/dev/null
echo "results in $out (precise.md, ttft-throughput.svg)" >&2
