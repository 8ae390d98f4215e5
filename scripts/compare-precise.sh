#!/usr/bin/env bash
# Precise (KV-event) vs approximate prefix-cache routing vs round robin; see
# scripts/compare-routers.sh for the method and the options (e.g. --routers approx,precise,
# --workload config/workloads/guide-evict.yaml).
exec "$(dirname "$0")/compare-routers.sh" --routers rr,approx,precise --against precise "$@"
