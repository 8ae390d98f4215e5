#!/usr/bin/env python3
"""Prefix-routing decisions against what the engines really served, per router.

Reads the decision log of llmsched routers (`RUST_LOG=info,llmsched_decisions=debug`,
`--log-format json`; `scripts/compare-routers.sh --decision-log` writes it into each
`<router>.router.log`) and classifies every request by what the index believed when it was
routed and what the engine reported as cached (`usage.prompt_tokens_details.cached_tokens`):

  followed, right   the index believed the target held >= 1 block and the engine served
                    at least half of that belief from its cache
  followed, stale   the index believed the target held the prefix, the engine had (mostly)
                    lost it: a belief the engine's evictions made wrong
  cold, right       nobody was believed to hold anything and the engine had nothing
  cold, missed      nobody was believed to hold anything, yet the engine served a hit (the
                    index forgot a prefix the engine still had)
  elsewhere         the index believed another endpoint held more than the target (load
                    scorers won): a copy of the prefix is made if the target lacks it

Usage: scripts/decision-table.py LABEL=ROUTER_LOG [LABEL=ROUTER_LOG ...] [--windows N]
Prints one markdown table: per class, the requests and the share of their prompt tokens
served from cache, per router; with --windows N also per N equal time windows of each run.
"""
import json
import sys


def load(path):
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            if "prefix decision" not in line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            fl = ev.get("fields", {})
            if fl.get("message") != "prefix decision":
                continue
            fl["_ts"] = ev.get("timestamp", "")
            rows.append(fl)
    return rows


def classify(r):
    believed = float(r.get("believed_tokens", 0))
    best = float(r.get("best_tokens", 0))
    cached = float(r.get("cached_tokens", 0))
    if best > believed + 1e-9:
        return "elsewhere"
    if believed > 0:
        return "followed, right" if cached >= 0.5 * believed else "followed, stale"
    return "cold, missed" if cached > 0 else "cold, right"


CLASSES = ["followed, right", "followed, stale", "cold, right", "cold, missed", "elsewhere"]


def summarize(rows):
    out = {c: [0, 0.0, 0.0] for c in CLASSES + ["all"]}
    for r in rows:
        if int(r.get("status", 0)) != 200:
            continue
        for c in (classify(r), "all"):
            o = out[c]
            o[0] += 1
            o[1] += float(r.get("prompt_tokens", 0))
            o[2] += float(r.get("cached_tokens", 0))
    return out


def cell(o):
    if o[0] == 0:
        return "0"
    return f"{o[0]} ({100.0 * o[2] / o[1]:.0f} % cached)" if o[1] else f"{o[0]}"


def main(argv):
    windows = 1
    pairs = []
    i = 0
    while i < len(argv):
        if argv[i] == "--windows":
            windows = int(argv[i + 1])
            i += 2
            continue
        label, _, path = argv[i].partition("=")
        pairs.append((label, load(path)))
        i += 1
    if not pairs:
        print(__doc__)
        return 2
    for w in range(windows):
        title = "all requests" if windows == 1 else f"window {w + 1}/{windows} of each run"
        print(f"\n{title}\n")
        print("| class | " + " | ".join(l for l, _ in pairs) + " |")
        print("| --- |" + " --- |" * len(pairs))
        sums = []
        for _, rows in pairs:
            rows = sorted(rows, key=lambda r: r["_ts"])
            n = len(rows)
            sums.append(summarize(rows[n * w // windows:n * (w + 1) // windows]))
        for c in CLASSES + ["all"]:
            print(f"| {c} | " + " | ".join(cell(s[c]) for s in sums) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
