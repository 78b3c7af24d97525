#!/usr/bin/env bash
# Every row of docs/BENCHMARKS.md's table in one run: for each build given, back to back,
# row by row (so two builds see the same machine state), medians of RUNS runs.
#
#   bench/run-all.sh /work/bench-bin/old /work/bench-bin/new
#
# Rows: usage-hot on PostgreSQL with 1, 8 and 64 clients next to the per-request pgbench
# baseline; usage-batch (16 clients x 100) next to the batched baseline (debit-batch.sql);
# usage-hot on SQLite with 64 clients; subscribe with 1,000 subscribers; the dashboard
# page with SEED_EVENTS events (default 1,000,000) and 8 clients.
# Environment: RUNS (3), DURATION (5), SEED_EVENTS (1000000), OUT_DIR
# (/tmp/reservoir-bench/all-<time>), ROWS (default "hot1 hot8 hot64 batch sqlite subscribe
# dashboard"). Each row's output (and the scripts' medians) lands in OUT_DIR; the summary
# lines are printed as they come.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
(($# > 0)) || { echo "usage: run-all.sh <bin dir> [<bin dir>...]" >&2; exit 1; }
export RUNS=${RUNS:-3} DURATION=${DURATION:-5} SKIP_BUILD=1
out=${OUT_DIR:-/tmp/reservoir-bench/all-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
read -r -a rows <<<"${ROWS:-hot1 hot8 hot64 batch sqlite subscribe dashboard}"
echo "[run-all] results in $out; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"

row() {
    local name=$1 bin=$2 tag
    tag=$(basename "$bin")
    local log="$out/$name-$tag.log"
    echo "[run-all] $(date -u +%H:%M:%S) $name $tag"
    case $name in
        hot1) CLIENTS=1 BIN_DIR=$bin OUT_DIR=$out "$here/baseline/compare.sh" ;;
        hot8) CLIENTS=8 BIN_DIR=$bin OUT_DIR=$out "$here/baseline/compare.sh" ;;
        hot64) CLIENTS=64 BIN_DIR=$bin OUT_DIR=$out "$here/baseline/compare.sh" ;;
        batch) CLIENTS=16 BATCH=100 BIN_DIR=$bin OUT_DIR=$out "$here/baseline/compare.sh" ;;
        sqlite) BIN_DIR=$bin OUT_DIR=$out "$here/run-scenario.sh" usage-hot sqlite --clients 64 ;;
        subscribe) BIN_DIR=$bin OUT_DIR=$out "$here/run-scenario.sh" subscribe postgres --subscribers 1000 ;;
        dashboard) SEED_EVENTS=${SEED_EVENTS:-1000000} BIN_DIR=$bin OUT_DIR=$out \
            "$here/run-scenario.sh" dashboard postgres --clients 8 ;;
        *) echo "unknown row $name" >&2; return 1 ;;
    esac >"$log" 2>"$log.err" || echo "[run-all] $name $tag failed (see $log.err)"
    # compare.sh prints its table; run-scenario.sh its medians as the last JSON line.
    grep -E '^ +[0-9]+ |^\{"scenario"' "$log" | sed "s|^|[run-all] $name $tag: |" || true
}

for name in "${rows[@]}"; do
    for bin in "$@"; do
        row "$name" "$bin"
    done
done
echo "[run-all] done $(date -u +%H:%M:%S)"
