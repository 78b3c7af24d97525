#!/usr/bin/env bash
# Rows of run-all.sh for two builds on a noisy machine: REPS rounds (default 5) of one run
# per build and row, the builds' order alternating each round (old, new; then new, old;
# ...), so a drift of the machine's speed falls on both. Prints each run's compare.sh
# line prefixed with its round; take the medians (docs/BENCHMARKS.md, 2026-12-07).
#
#   ROWS="hot64 batch hot8 hot1" bench/interleave.sh /work/bench-bin/old /work/bench-bin/new
#
# Environment: REPS (5), ROWS ("hot64 batch hot8 hot1"), OUT_DIR
# (/tmp/reservoir-bench/interleave-<time>), and what run-all.sh reads (DURATION).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# == 2)) || { echo "usage: interleave.sh <old bin dir> <new bin dir>" >&2; exit 1; }
out=${OUT_DIR:-/tmp/reservoir-bench/interleave-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
for rep in $(seq 1 "${REPS:-5}"); do
    for row in ${ROWS:-hot64 batch hot8 hot1}; do
        if ((rep % 2)); then order=("$1" "$2"); else order=("$2" "$1"); fi
        for bin in "${order[@]}"; do
            tag=$(basename "$bin")
            RUNS=1 OUT_DIR="$out/$row-$tag-$rep" ROWS=$row "$here/run-all.sh" "$bin" 2>&1 |
                grep "$row $tag:" | sed "s/^/rep$rep /" || true
        done
    done
done
