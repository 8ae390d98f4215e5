#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Envoy, pyzmq + msgpack, into ./.tools)
# and runs every crate's unit, integration and end-to-end tests.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
LLMSCHED_ENVOY_BIN="$(scripts/install-tools.sh)"
export LLMSCHED_ENVOY_BIN
# pyzmq for the ZMQ interop tests; required here, so they fail instead of skipping.
LLMSCHED_PYTHONPATH="$(scripts/install-tools.sh --python-path)"
export LLMSCHED_PYTHONPATH
export LLMSCHED_REQUIRE_PYZMQ=1
cargo test --workspace --locked "$@"
