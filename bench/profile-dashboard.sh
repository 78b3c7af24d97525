#!/usr/bin/env bash
# Where a dashboard page goes: the dashboard scenario (run-scenario.sh, one run) on a
# PostgreSQL with pg_stat_statements loaded (a scratch cluster, never the shared server:
# docs/BENCHMARKS.md "Profile"), and, during the measured window, `perf record -a` of every
# process (server, PostgreSQL, load generator) and the statements' statistics.
#
#   PG_URL_BASE=postgres://postgres@127.0.0.1:55432 bench/profile-dashboard.sh /work/bench-bin/new
#
# Environment: PG_URL_BASE (required), OUT_DIR (/tmp/reservoir-bench/dashboard-profile-<time>),
# DURATION (10), SEED_EVENTS (1000000), DASHBOARD_VACUUM. Prints the by-process split, the
# server's hottest symbols and the top statements; the files stay in OUT_DIR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${1:?usage: profile-dashboard.sh <bin dir>}
out=${OUT_DIR:-/tmp/reservoir-bench/dashboard-profile-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
export PG_URL_BASE=${PG_URL_BASE:?set PG_URL_BASE to a PostgreSQL with pg_stat_statements}
export RUNS=1 DURATION=${DURATION:-10} SKIP_BUILD=1 SEED_EVENTS=${SEED_EVENTS:-1000000} \
    BIN_DIR=$bin OUT_DIR=$out PORT=${PORT:-18095}
db=$PG_URL_BASE/reservoir_bench_run
"$here/run-scenario.sh" dashboard postgres --clients 8 >"$out/run.log" 2>"$out/run.err" &
runner=$!
until grep -q "run 1/1" "$out/run.err" 2>/dev/null; do
    kill -0 "$runner" 2>/dev/null || { cat "$out/run.err" >&2; exit 1; }
    sleep 0.5
done
sleep 3 # past the load generator's warm-up
psql "$db" -X -q -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
    -c "SELECT pg_stat_statements_reset()" >/dev/null
perf record -a -g -F 499 -e cpu-clock -o "$out/perf.data" -- sleep 5 2>"$out/perf.err"
psql "$db" -X -P pager=off -c "
SELECT calls, round(mean_exec_time::numeric, 3) AS exec_ms, round(mean_plan_time::numeric, 3) AS plan_ms,
       round((total_exec_time + total_plan_time)::numeric, 1) AS total_ms, rows,
       left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS statement
FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 20" >"$out/statements.txt"
wait "$runner" || true
tail -1 "$out/run.log"
perf report -i "$out/perf.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null |
    grep -v '^#' | grep '%' | head -12
perf report -i "$out/perf.data" --no-children --comm 'actix-server wo' --sort dso,symbol --stdio -g none 2>/dev/null |
    grep -v '^#' | grep '%' | head -25
cat "$out/statements.txt"
echo "(files in $out)"
