#!/usr/bin/env bash
# Precise prefix routing (config/epp/precise-prefix-cache.yaml) vs the approximate index
# (llmsched's default config) vs SGLang's router (cache_aware) on the eviction workload
# (config/workloads/evict-burst.yaml: prefixes beyond the fleet's KV cache, bursts of new
# prefixes, a ladder up to the fleet's capacity); see scripts/compare-routers.sh for the
# method and the options. The 8B profile:
#   scripts/compare-evict.sh --workload config/workloads/evict-burst-8b.yaml \
#     --profile llama3.1-8b-h100 --kv-cache-tokens 128000
exec "$(dirname "$0")/compare-routers.sh" --routers approx,precise,sglang --against precise \
  --workload config/workloads/evict-burst.yaml --time-scale 1.5 "$@"
