#!/usr/bin/env bash
# One reservoir-bench scenario, RUNS times, each against a freshly started server on a
# fresh database; prints every run's JSON line and then the medians.
#
#   bench/run-scenario.sh <scenario> <sqlite|postgres> [extra reservoir-bench run args...]
#
#   bench/run-scenario.sh usage-hot sqlite --clients 64
#   bench/run-scenario.sh usage-batch postgres --clients 16
#   bench/run-scenario.sh subscribe postgres --subscribers 1000
#   SEED_EVENTS=1000000 bench/run-scenario.sh dashboard postgres
#   bench/run-scenario.sh followups postgres --clients 64
#
# followups starts `reservoir api` (not `serve`): the bench runs the worker itself, as a
# process of its own with this script's server environment, so it can SIGKILL it.
#
# Environment: RUNS (3), DURATION (10), PORT (18085), OUT_DIR (/tmp/reservoir-bench),
# SKIP_BUILD=1, BIN_DIR (the folder holding reservoir and reservoir-bench, default the
# repository's target/release; with another folder set SKIP_BUILD=1), PG_URL_BASE (postgres://postgres@127.0.0.1:5432), SEED_EVENTS (for
# dashboard: events seeded once before the runs, default 1000000; the dashboard runs
# reuse one server and one seeded database). Other RESERVOIR_* variables reach the server.
set -euo pipefail

scenario=${1:?usage: run-scenario.sh <scenario> <sqlite|postgres> [args...]}
backend=${2:?usage: run-scenario.sh <scenario> <sqlite|postgres> [args...]}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runs=${RUNS:-3}
duration=${DURATION:-10}
port=${PORT:-18085}
out_dir=${OUT_DIR:-/tmp/reservoir-bench}
pg_base=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}
mkdir -p "$out_dir"
results="$out_dir/$scenario-$backend-$(date -u +%Y%m%dT%H%M%SZ).jsonl"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    (cd "$repo" && cargo build --release -p reservoir -p reservoir-bench >&2)
fi
bin_dir=${BIN_DIR:-$repo/target/release}
server_bin=$bin_dir/reservoir
bench_bin=$bin_dir/reservoir-bench
[[ -x $server_bin && -x $bench_bin ]] || { echo "no reservoir / reservoir-bench in $bin_dir" >&2; exit 1; }
echo "[run-scenario] binaries from $bin_dir" >&2
# Subscribers and the server each hold one descriptor per connection.
ulimit -n 65536 2>/dev/null || ulimit -n 4096

server_pid=
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

# Starts a server on a fresh database; sets $db_url, $data_dir and $server_env (the
# followups bench hands the latter to the worker it starts).
start_server() {
    data_dir=$(mktemp -d "$out_dir/server.XXXXXX")
    local mode=serve
    [[ $scenario == followups ]] && mode=api
    server_env=(RESERVOIR_DATA_DIR="$data_dir" RESERVOIR_LISTEN="127.0.0.1:$port"
        RESERVOIR_DEMO_SEED=false RESERVOIR_LOG="${RESERVOIR_LOG:-warn}"
        # The load generator is one credential at full speed: measure the engine, not
        # the per-key limit.
        RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND="${RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND:-0}"
        # followups registers the bench's own plain-HTTP receiver.
        RESERVOIR_WEBHOOKS_ALLOW_HTTP=true)
    if [[ $backend == postgres ]]; then
        local name="reservoir_bench_run"
        psql "$pg_base/postgres" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null
        psql "$pg_base/postgres" -qc "CREATE DATABASE $name" >/dev/null
        db_url="$pg_base/$name"
        server_env+=(RESERVOIR_DATABASE_URL="$db_url" RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES=true
            RESERVOIR_ADMIN_TOKEN="bench-admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')")
    else
        db_url="sqlite://$data_dir/reservoir.db"
    fi
    (cd "$data_dir" && exec env "${server_env[@]}" "$server_bin" "$mode" >"$data_dir/server.log" 2>&1) &
    server_pid=$!
    for _ in $(seq 1 600); do
        curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || { cat "$data_dir/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "server did not become ready" >&2
    exit 1
}

writer_metrics() {
    curl -fs "http://127.0.0.1:$port/metrics" | grep '^reservoir_writer_' | tr '\n' ' '
}

if [[ $scenario == dashboard ]]; then
    start_server
    (cd "$data_dir" && "$bench_bin" seed-dashboard --database-url "$db_url" \
        --events "${SEED_EVENTS:-1000000}" >"$data_dir/seed.json")
    # DASHBOARD_VACUUM=1: VACUUM ANALYZE after seeding, what autovacuum (off on the
    # bench's shared server) would do after a bulk load. Off by default, so figures
    # compare with earlier sessions' (docs/BENCHMARKS.md, 2026-12-07: both conditions).
    [[ $backend == postgres && ${DASHBOARD_VACUUM:-0} == 1 ]] && psql "$db_url" -qc "VACUUM ANALYZE" >/dev/null
fi
for run in $(seq 1 "$runs"); do
    [[ $scenario == dashboard ]] || start_server
    echo "[run-scenario] $scenario on $backend, run $run/$runs" >&2
    # Only followups runs a worker (older bench binaries know no --worker-bin, and
    # side-by-side runs use them with this script).
    worker_args=()
    [[ $scenario == followups ]] && worker_args=(--worker-bin "$server_bin")
    (cd "$data_dir" && env "${server_env[@]}" "$bench_bin" run --scenario "$scenario" \
        --url "http://127.0.0.1:$port" "${worker_args[@]}" \
        --database-url "$db_url" --duration-s "$duration" "$@") | tee -a "$results"
    echo "[run-scenario] writer: $(writer_metrics)" >&2
    [[ $scenario == dashboard ]] || stop_server
done
stop_server
python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
def med(key, sub=None):
    values = [r[key][sub] if sub else r[key] for r in rows if (r.get(key) is not None)]
    return statistics.median(values) if values else None
summary = {
    "scenario": rows[0]["scenario"], "backend": rows[0]["backend"], "runs": len(rows),
    "ops_per_s_median": med("ops_per_s"),
    "p50_ms_median": med("latency_ms", "p50"), "p99_ms_median": med("latency_ms", "p99"),
    "all_invariants_ok": all(r.get("invariants_ok") for r in rows),
    "all_admitted_match_ledger": all(r.get("admitted_matches_ledger") for r in rows),
}
if rows[0]["scenario"] == "followups":
    for key in ("capture", "receipt_email", "alert_email", "webhook"):
        summary[key + "_steady_p99_ms_median"] = statistics.median(r["followups"][key]["steady_ms"]["p99"] for r in rows)
        summary[key + "_all_p99_ms_median"] = statistics.median(r["followups"][key]["all_ms"]["p99"] for r in rows)
        summary[key + "_lost_total"] = sum(r["followups"][key]["lost"] for r in rows)
        summary[key + "_duplicates_total"] = sum(r["followups"][key]["duplicates"] for r in rows)
    summary["all_targets_met"] = all(r["followups"]["target"]["met"] for r in rows)
if rows[0]["scenario"] == "subscribe":
    summary["delivery_p50_ms_median"] = med("delivery_ms", "p50")
    summary["delivery_p99_ms_median"] = med("delivery_ms", "p99")
    summary["gaps_total"] = sum(r.get("gaps", 0) for r in rows)
    summary["delivered_total"] = sum(r.get("delivered", 0) for r in rows)
    summary["expected_total"] = sum(r.get("expected", 0) for r in rows)
print(json.dumps(summary))
EOF
echo "[run-scenario] raw results: $results" >&2
