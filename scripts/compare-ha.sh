#!/usr/bin/env bash
# Active-active EPP replicas measured: the same workload through one Envoy (from
# `llmsched envoy-config`) in front of
#   one        1 `llmsched epp`
#   sync       3 `llmsched epp --ha-mode=active-active` sharing their state (--ha-peers)
#   nosync     3 `llmsched epp` routing independently (no --ha-mode)
#   syncfast   as sync with --ha-sync-interval FAST (default 2ms instead of 10ms): do the
#              replicas route better when they see each other's decisions sooner?
#   sync1      control: 3 synced EPPs running, but Envoy sends every request to the first
#              (the CPU cost of the extra processes and of applying the sync, without
#              several replicas deciding at once)
# each on a cold cluster of 4 simulated replicas (`llmsched sim`), the workload driven by
# `llmsched bench`. Envoy spreads the ext_proc streams over the EPPs (LEAST_REQUEST), so
# each of the 3 replicas sees about a third of the requests. Prints the fleet prefix-cache
# hit rate (cached prompt tokens), TTFT mean/p90 and throughput per setup, and writes
# comparison.md and the bench result folders under the output folder. Also per setup: how
# evenly the simulated replicas were loaded (requests and mean queue time of the busiest
# replica vs the mean) and the CPU seconds the EPPs, Envoy and the simulator used.
#
# Usage: scripts/compare-ha.sh [--setups one,sync,nosync,syncfast,sync1] [--workload FILE]
#          [--time-scale F] [--repeat N] [--ports BASE] [--fast-interval D] [-o DIR]
#        --ports: the simulated replicas listen on BASE..BASE+3 (default 8000), Envoy on
#        BASE+80 (admin BASE+81), EPP i on BASE+1000+100*i (grpc; +1 health, +2 sync,
#        +3 metrics)
# Env:   CARGO_TARGET_DIR (default: target), LLMSCHED_BIN (use this llmsched binary, no
#        build)
set -euo pipefail
cd "$(dirname "$0")/.."
setups="one,sync,nosync"
workload="config/workloads/guide-mini-heavy.yaml"
scale=1
repeat=1
ports=8000
fast=2ms
out="ha-$(date +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --setups) setups="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --time-scale) scale="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --ports) ports="$2"; shift 2 ;;
    --fast-interval) fast="$2"; shift 2 ;;
    -o|--output) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
IFS=',' read -r -a list <<<"$setups"
for s in "${list[@]}"; do
  case "$s" in one|sync|nosync|syncfast|sync1) ;; *) echo "unknown setup '$s' (one, sync, nosync, syncfast, sync1)" >&2; exit 2 ;; esac
done
[ -f "$workload" ] || { echo "--workload: no such file: $workload" >&2; exit 2; }
case "$ports" in ''|*[!0-9]*) echo "--ports must be a port number" >&2; exit 2 ;; esac
case "$repeat" in ''|*[!0-9]*|0) echo "--repeat must be a positive integer" >&2; exit 2 ;; esac
model=$(python3 -c "import re,sys; m=re.search(r'model_name:\s*(\S+)', open(sys.argv[1]).read()); print(m.group(1) if m else '')" "$workload")

if [ -n "${LLMSCHED_BIN:-}" ]; then
  bin="$LLMSCHED_BIN"
  [ -x "$bin" ] || { echo "LLMSCHED_BIN: not an executable: $bin" >&2; exit 2; }
else
  cargo build --release --locked -p llmsched --bin llmsched
  bin="${CARGO_TARGET_DIR:-target}/release/llmsched"
fi
envoy_bin="$(scripts/install-tools.sh)"

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
wait_ready() { # metrics-port seconds: the EPP's readiness (pool synced, HA bootstrap done)
  for _ in $(seq 1 $(( $2 * 10 ))); do
    curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null | grep -q '^llmsched_endpoint_healthy{.*} 1' && return 0
    sleep 0.1
  done
  echo "timeout waiting for the EPP on :$1" >&2; return 1
}

workers=() eps=""
for i in 0 1 2 3; do workers+=("http://127.0.0.1:$((ports + i))"); eps+="${eps:+,}127.0.0.1:$((ports + i))"; done
envoy_port=$((ports + 80)) envoy_admin=$((ports + 81)) epp_base=$((ports + 1000))
refresh_ms=$(python3 -c "print(max(5, round(50 / $scale)))")
sim_model=()
[ -z "$model" ] || sim_model=(--model "$model")

run_one() { # setup dir
  local setup="$1" dir="$2" n=3 epp_list="" health_list="" ha=() peers=""
  [ "$setup" = one ] && n=1
  echo "== $setup: cold cluster ($dir)" >&2
  "$bin" sim --replicas 4 --base-port "$ports" --profile qwen3-32b-tp2-h100 --kv-cache-tokens 164000 \
    ${sim_model[@]+"${sim_model[@]}"} --time-scale "$scale" >"$dir/$setup.sim.log" 2>&1 &
  local sim=$!; pids+=("$sim")
  for w in "${workers[@]}"; do wait_http "$w/health" 30; done
  for i in $(seq 0 $((n - 1))); do peers+="${peers:+,}127.0.0.1:$((epp_base + 2 + 100 * i))"; done
  local epps=()
  for i in $(seq 0 $((n - 1))); do
    local base=$((epp_base + 100 * i))
    ha=()
    [ "$setup" = sync ] || [ "$setup" = sync1 ] && ha=(--ha-mode=active-active --ha-port "$((base + 2))" --ha-peers "$peers")
    [ "$setup" = syncfast ] && ha=(--ha-mode=active-active --ha-port "$((base + 2))" --ha-peers "$peers" --ha-sync-interval "$fast")
    "$bin" epp --secure-serving=false --bind-address 127.0.0.1 --endpoints "$eps" \
      --grpc-port "$base" --grpc-health-port "$((base + 1))" --metrics-port "$((base + 3))" \
      --refresh-metrics-interval "${refresh_ms}ms" ${ha[@]+"${ha[@]}"} \
      >"$dir/$setup.epp$i.log" 2>&1 &
    epps+=("$!"); pids+=("$!")
    if [ "$setup" != sync1 ] || [ "$i" = 0 ]; then
      epp_list+="${epp_list:+,}127.0.0.1:$base"; health_list+="${health_list:+,}$((base + 1))"
    fi
  done
  for i in $(seq 0 $((n - 1))); do wait_ready "$((epp_base + 3 + 100 * i))" 60; done
  "$bin" envoy-config --mode epp --listen-address 127.0.0.1 --listen-port "$envoy_port" \
    --admin "127.0.0.1:$envoy_admin" --epp "$epp_list" --epp-health-port "$health_list" --epp-tls=false \
    --health-check-interval 1s -o "$dir/$setup.envoy.yaml"
  "$envoy_bin" -c "$dir/$setup.envoy.yaml" --concurrency 1 --log-level warn \
    --disable-hot-restart >"$dir/$setup.envoy.log" 2>&1 &
  local envoy=$!; pids+=("$envoy")
  wait_http "http://127.0.0.1:$envoy_port/v1/models" 60
  # Every EPP healthy in Envoy's view before the load starts.
  for _ in $(seq 1 300); do
    [ "$(curl -fsS "http://127.0.0.1:$envoy_admin/clusters" | grep -c '^llmsched_epp::.*::health_flags::healthy$')" = "$(tr ',' '\n' <<<"$epp_list" | wc -l)" ] && break
    sleep 0.1
  done
  "$bin" bench --config "$workload" --base-url "http://127.0.0.1:$envoy_port" --time-scale "$scale" \
    --no-progress -o "$dir/$setup" --label "$setup" >"$dir/$setup.bench.txt"
  local resyncs=0
  for w in "${workers[@]}"; do
    local r
    r=$(curl -fsS "$w/metrics" 2>/dev/null | awk '/^llmsched_sim_clock_resyncs_total/ {print $2}')
    r=${r%.*}; resyncs=$(( resyncs + ${r:-0} ))
  done
  echo "$resyncs" >"$dir/$setup/sim_resyncs"
  # How evenly the simulated replicas were loaded.
  for i in 0 1 2 3; do
    curl -fsS "${workers[$i]}/metrics" >"$dir/$setup.sim$i.metrics" 2>/dev/null || true
  done
  # CPU seconds per process (utime + stime from /proc, in clock ticks).
  local tck; tck=$(getconf CLK_TCK)
  { for p in "${epps[@]}"; do echo "epp $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)"; done
    echo "envoy $(awk '{print $14 + $15}' "/proc/$envoy/stat" 2>/dev/null || echo 0)"
    echo "sim $(awk '{print $14 + $15}' "/proc/$sim/stat" 2>/dev/null || echo 0)"
    echo "ticks $tck"; } >"$dir/$setup/cpu_ticks"
  # The sync's own figures (sync setup): what each replica sent and learned.
  for i in $(seq 0 $((n - 1))); do
    curl -fsS "http://127.0.0.1:$((epp_base + 3 + 100 * i))/metrics" >"$dir/$setup.epp$i.metrics" 2>/dev/null || true
  done
  kill "$envoy" "${epps[@]}" "$sim" 2>/dev/null || true
  wait "$envoy" "${epps[@]}" "$sim" 2>/dev/null || true
  sleep 1
}

runs=()
for k in $(seq 1 "$repeat"); do
  if [ "$repeat" = 1 ]; then d="$out"; else d="$out/run$k"; fi
  mkdir -p "$d"; runs+=("$d")
  for s in "${list[@]}"; do run_one "$s" "$d"; done
done

{
  echo "# EPP replicas on $(basename "$workload"), one Envoy, 4 simulated replicas, time scale $scale"
  echo
  FAST="$fast" python3 - "${#runs[@]}" "${runs[@]}" "${list[@]}" <<'PY'
import json, os, re, sys
n = int(sys.argv[1]); runs, setups = sys.argv[2:2 + n], sys.argv[2 + n:]
names = {"one": "1 EPP", "sync": "3 EPPs, active-active (sync on)", "nosync": "3 EPPs, sync off",
         "sync1": "3 EPPs synced, Envoy uses 1 (control)",
         "syncfast": f"3 EPPs, active-active, sync every {os.environ.get('FAST', '2ms')}"}

def sim_balance(run, s):
    """(busiest replica's requests / mean, busiest replica's mean queue time / fleet mean)."""
    reqs, qsum, qcnt = [], [], []
    for i in range(4):
        p = os.path.join(run, f"{s}.sim{i}.metrics")
        if not os.path.exists(p):
            return None
        r = q = c = 0.0
        for line in open(p):
            if line.startswith("vllm:request_success_total"):
                r += float(line.split()[-1])
            elif line.startswith("vllm:request_queue_time_seconds_sum"):
                q += float(line.split()[-1])
            elif line.startswith("vllm:request_queue_time_seconds_count"):
                c += float(line.split()[-1])
        reqs.append(r); qsum.append(q); qcnt.append(c)
    if not sum(reqs) or not sum(qcnt):
        return None
    mean_q = sum(qsum) / sum(qcnt)
    worst_q = max(q / c for q, c in zip(qsum, qcnt) if c)
    return max(reqs) / (sum(reqs) / 4), (worst_q / mean_q if mean_q else float("nan")), mean_q

def cpu(d):
    try:
        rows = [l.split() for l in open(os.path.join(d, "cpu_ticks"))]
    except OSError:
        return "?"
    tck = float(dict((r[0], r[1]) for r in rows if r[0] == "ticks").get("ticks", 100))
    epp = sum(float(r[1]) for r in rows if r[0] == "epp") / tck
    env = sum(float(r[1]) for r in rows if r[0] == "envoy") / tck
    sim = sum(float(r[1]) for r in rows if r[0] == "sim") / tck
    return f"{epp:.0f} / {env:.0f} / {sim:.0f}"

print("| setup | run | cached % (hit rate) | TTFT mean (s) | TTFT p90 (s) | req/s | failures | sim resyncs | sync bytes sent/request | busiest replica: requests / queue time vs mean (mean queue s) | CPU s: EPPs / Envoy / sim |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in setups:
    for k in range(n):
        d = os.path.join(runs[k], s)
        p = os.path.join(d, "summary_lifecycle_metrics.json")
        if not os.path.exists(p):
            continue
        m = json.load(open(p))
        t = m["successes"]["latency"].get("time_to_first_token") or {}
        pt = m["successes"].get("prompt_tokens") or {}
        cached = 100.0 * (pt.get("cached") or 0.0) / pt["total"] if pt.get("total") else float("nan")
        reqs = m["successes"]["count"] + m["failures"]["count"]
        sent = 0.0
        for f in os.listdir(runs[k]):
            if f.startswith(s + ".epp") and f.endswith(".metrics"):
                for line in open(os.path.join(runs[k], f)):
                    if line.startswith('llmsched_ha_sync_bytes_total{direction="sent"}'):
                        sent += float(line.split()[-1])
        try:
            resyncs = open(os.path.join(d, "sim_resyncs")).read().strip()
        except OSError:
            resyncs = "?"
        per = f"{sent / reqs:.0f}" if s in ("sync", "sync1", "syncfast") and reqs else "-"
        b = sim_balance(runs[k], s)
        bal = f"{b[0]:.2f} / {b[1]:.2f} ({b[2]:.3f})" if b else "?"
        print(f"| {names[s]} | {k + 1} | {cached:.1f} | {t.get('mean', float('nan')):.3f} | {t.get('p90', float('nan')):.3f} | "
              f"{m['successes']['throughput']['requests_per_sec']:.2f} | {m['failures']['count']} | {resyncs} | {per} | {bal} | {cpu(d)} |")
PY
} | tee "$out/comparison.md"
echo "results in $out (comparison.md)" >&2
