#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Envoy, into ./.tools) and runs every
# crate's unit, integration and end-to-end tests.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
LLMSCHED_ENVOY_BIN="$(scripts/install-tools.sh)"
export LLMSCHED_ENVOY_BIN
cargo test --workspace --locked "$@"
