#!/usr/bin/env bash
# The whole test suite: installs what the tests need (into ./.tools) and runs every
# crate's unit, integration and end-to-end tests.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
# Envoy, helm, kubernetes-validate, hadolint, pyzmq: installed into ./.tools and exported as the
# LLMSCHED_* variables the tests read (a test whose tool is missing fails, never skips).
tools_env="$(scripts/install-tools.sh --env)"
while IFS='=' read -r name value; do
  export "$name=$value"
done <<<"$tools_env"
cargo test --workspace --locked "$@"
