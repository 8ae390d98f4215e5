#!/usr/bin/env bash
# The EPP's overhead in one command: builds the release binaries, starts a simulated replica,
# the EPP (with its built-in proxy), Envoy + EPP and Envoy round robin, and measures latency
# (direct vs proxy vs Envoy+EPP vs Envoy round robin) at several concurrencies for 30 KB and
# 220 KB prompts, the EPP's CPU per request, and scheduling decisions per second per EPP core
# through Envoy. Prints markdown tables (see crates/gateway/README.md).
#
# Usage: scripts/bench-overhead.sh [--concurrency 1,8,64] [--prompt-kb 30,220] [--seconds 5]
#                                  [--throughput-concurrency 64] [--envoy-concurrency 1]
#                                  [--epp-tls true|false] [--out report.md]
# Env:   CARGO_TARGET_DIR (default: target)
set -euo pipefail
cd "$(dirname "$0")/.."
envoy="$(scripts/install-tools.sh)"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p llmsched --bin llmsched
cargo build --release --locked -p llmsched-gateway --example overhead
exec "$target/release/examples/overhead" \
  --llmsched-bin "$target/release/llmsched" --envoy-bin "$envoy" "$@"
