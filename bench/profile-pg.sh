#!/usr/bin/env bash
# Where a debit's time goes on PostgreSQL, statement by statement: runs one scenario
# against a freshly started `reservoir serve` on a PostgreSQL that has
# pg_stat_statements loaded (a scratch cluster: never the shared server; see
# docs/BENCHMARKS.md "Profile" for how to start one), resets the statistics after the
# warm-up, and prints, for the measured window only:
#   - the writer's counters per batch (load / judge / write / commit),
#   - every statement with calls, mean execution and planning time, plans, rows,
#   - with PERF=1, `perf record` of the server (software clock, self time per symbol).
#
#   PG_URL_BASE=postgres://postgres@127.0.0.1:55432 bench/profile-pg.sh usage-hot --clients 1
#   PG_URL_BASE=... bench/profile-pg.sh usage-batch --clients 16 --batch-size 100
#
# Environment: PG_URL_BASE (required), DURATION (10), PORT (18086), BIN_DIR (target/release),
# OUT_DIR (/tmp/reservoir-bench), PERF=1. Other RESERVOIR_* variables reach the server.
set -euo pipefail
scenario=${1:?usage: profile-pg.sh <scenario> [reservoir-bench run args...]}
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pg_base=${PG_URL_BASE:?set PG_URL_BASE to a PostgreSQL with pg_stat_statements}
duration=${DURATION:-10}
port=${PORT:-18086}
bin_dir=${BIN_DIR:-$here/../target/release}
out_dir=${OUT_DIR:-/tmp/reservoir-bench}
db=reservoir_profile
url=$pg_base/$db
mkdir -p "$out_dir"
data_dir=$(mktemp -d "$out_dir/profile.XXXXXX")
admin_token=rsv_bench_$(python3 -c 'import secrets; print(secrets.token_hex(24))')
q() { psql "$pg_base/postgres" -X -q -v ON_ERROR_STOP=1 "$@"; }

q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
psql "$url" -X -q -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
(
    cd "$data_dir"
    exec env RESERVOIR_DATABASE_URL="$url" RESERVOIR_ADMIN_TOKEN="$admin_token" \
        RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES=true RESERVOIR_LISTEN="127.0.0.1:$port" \
        RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND="${RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND:-0}" \
        RESERVOIR_DATA_DIR="$data_dir" RESERVOIR_LOG=warn "$bin_dir/reservoir" serve
) >"$data_dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; do sleep 0.2; done

metrics() { curl -fsS "http://127.0.0.1:$port/metrics" | grep '^reservoir_writer_' | sort; }
# The warm-up is reservoir-bench's own (2 s); reset when it is over.
(sleep 3; psql "$url" -X -q -c "SELECT pg_stat_statements_reset()" >/dev/null; metrics >"$data_dir/before") &
helpers=($!)
if [[ ${PERF:-0} == 1 ]]; then
    (sleep 3; perf record -e cpu-clock -F 999 -g -p "$server" -o "$data_dir/perf.data" -- sleep "$((duration - 2))" 2>/dev/null) &
    helpers+=($!)
fi
RESERVOIR_ADMIN_TOKEN=$admin_token "$bin_dir/reservoir-bench" run --scenario "$scenario" \
    --url "http://127.0.0.1:$port" --database-url "$url" --duration-s "$((duration + 1))" "$@" \
    >"$data_dir/bench.json" 2>"$data_dir/bench.err"
wait "${helpers[@]}"
metrics >"$data_dir/after"
python3 - "$data_dir/before" "$data_dir/after" <<'PY'
import sys
def read(p):
    return {l.split()[0]: float(l.split()[1]) for l in open(p) if l.strip()}
b, a = read(sys.argv[1]), read(sys.argv[2])
d = {k.replace('reservoir_writer_', ''): a[k] - b.get(k, 0) for k in a}
batches = d.get('batches_total', 0) or 1
ops = d.get('ops_total', 0)
print(f"writer: {batches:.0f} batches, {ops:.0f} ops ({ops / batches:.1f} per batch)")
for phase in ('load', 'judge', 'write', 'commit'):
    s = d.get(f'{phase}_seconds_total', 0)
    print(f"  {phase:6} {s * 1000 / batches:8.3f} ms per batch  {s * 1e6 / max(ops, 1):8.1f} us per op")
PY
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('bench:', r['ops_per_s'], 'ops/s, p50', r['latency_ms']['p50'], 'p99', r['latency_ms']['p99'], 'ms; invariants_ok', r['invariants_ok'])" "$data_dir/bench.json"
psql "$url" -X -q -P pager=off -c "
SELECT calls, round(mean_exec_time::numeric, 3) AS exec_ms, round(mean_plan_time::numeric, 3) AS plan_ms,
       plans, round((total_exec_time + total_plan_time)::numeric, 1) AS total_ms, rows,
       left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS statement
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '$db')
ORDER BY total_exec_time + total_plan_time DESC LIMIT 15"
if [[ ${PERF:-0} == 1 ]]; then
    perf report -i "$data_dir/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -40
fi
echo "(files in $data_dir)"
