#!/usr/bin/env bash
# llmsched against its peers (round robin, SGLang's router and vllm-router in cache_aware
# mode) on guide-mini; see scripts/compare-routers.sh for the method and the options.
exec "$(dirname "$0")/compare-routers.sh" --routers rr,llmsched,sglang,vllm-router --against llmsched "$@"
