#!/usr/bin/env bash
# Reservoir against the hand-rolled baseline, side by side on the same PostgreSQL.
#
#   bench/baseline/compare.sh
#
# For each client count and each run, measures the baseline (run-baseline.sh: pgbench,
# one transaction per debit) and Reservoir (reservoir-bench, scenario usage-hot, against
# a freshly started `reservoir serve` on a fresh database), one after the other, never
# at the same time. Odd runs measure the baseline first, even runs Reservoir first, so
# neither always gets the warmer cache. Then prints the medians over the runs:
#
#   clients  baseline ops/s  baseline p99 ms  reservoir ops/s  reservoir p99 ms  ratio
#
# where ratio = reservoir ops/s / baseline ops/s (medians). Every measurement is also
# appended as one JSON line to $OUT_DIR/compare-<timestamp>.jsonl.
#
# Environment (all optional):
#   CLIENTS          client counts (default "1 8 32 64 128")
#   RUNS             measurements per client count and system; medians reported (default 3)
#   DURATION         seconds per measurement (default 10)
#   PGHOST, PGPORT, PGUSER   the PostgreSQL both systems use (default 127.0.0.1, 5432, postgres)
#   BASELINE_DB      the baseline's database (default reservoir_baseline)
#   RESERVOIR_DB     Reservoir's database, dropped and re-created per measurement
#                    (default reservoir_bench)
#   RESERVOIR_PORT   where the server listens (default 18080)
#   SKIP_BUILD=1     do not run cargo build (use the binaries as they are)
#   BIN_DIR          the folder holding reservoir and reservoir-bench (default the
#                    repository's target/release); with another folder set SKIP_BUILD=1
#   RESERVOIR_BIN, BENCH_BIN   the binaries (default $BIN_DIR/reservoir{,-bench})
#   BATCH            debits per call/transaction (default 1). With N > 1 the baseline
#                    runs debit-batch.sql (N debits per transaction) and Reservoir the
#                    usage-batch scenario with --batch-size N; ops/s are debits/s
#   BENCH_ARGS       extra arguments for `reservoir-bench run` (split on spaces)
#   READY_TIMEOUT    seconds to wait for /readyz (default 60)
#   OUT_DIR          results, server logs, pgbench output (default /tmp/reservoir-bench)
#   WORKSPACES, PGBENCH_THREADS, PGBENCH, PSQL   passed to run-baseline.sh
# Other RESERVOIR_* variables in the environment reach the server unchanged
# (for instance RESERVOIR_DB_CONNECTIONS_MAX or RESERVOIR_LOG).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
read -r -a clients_list <<<"${CLIENTS:-1 8 32 64 128}"
runs=${RUNS:-3}
duration=${DURATION:-10}
reservoir_db=${RESERVOIR_DB:-reservoir_bench}
port=${RESERVOIR_PORT:-18080}
ready_timeout=${READY_TIMEOUT:-60}
bin_dir=${BIN_DIR:-$repo/target/release}
reservoir_bin=${RESERVOIR_BIN:-$bin_dir/reservoir}
bench_bin=${BENCH_BIN:-$bin_dir/reservoir-bench}
batch=${BATCH:-1}
[[ $batch =~ ^[1-9][0-9]*$ ]] || { echo "[compare] error: BATCH must be a positive integer" >&2; exit 1; }
export BATCH=$batch
if ((batch > 1)); then
    scenario=usage-batch
    scenario_args=(--batch-size "$batch")
else
    scenario=usage-hot
    scenario_args=()
fi
read -r -a bench_args <<<"${BENCH_ARGS:-}"
out_dir=${OUT_DIR:-/tmp/reservoir-bench}
export OUT_DIR=$out_dir DURATION=$duration

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $runs =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$runs'"
[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer, got '$duration'"
[[ $port =~ ^[0-9]+$ ]] || die "RESERVOIR_PORT must be a port number, got '$port'"
[[ $reservoir_db =~ ^[a-z_][a-z0-9_]*$ ]] || die "RESERVOIR_DB must be a plain lower-case identifier"
((${#clients_list[@]} > 0)) || die "CLIENTS is empty"
for n in "${clients_list[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "client counts must be positive integers, got '$n'"
done
command -v python3 >/dev/null || die "python3 is needed to read the JSON results"
command -v curl >/dev/null || die "curl is needed to wait for the server"

psql_bin=${PSQL:-}
if [[ -z $psql_bin ]]; then
    for candidate in "$(command -v psql || true)" /usr/lib/postgresql/*/bin/psql; do
        if [[ -n $candidate && -x $candidate ]]; then
            psql_bin=$candidate
            break
        fi
    done
fi
[[ -n $psql_bin ]] || die "psql not found; set PSQL"
psql_q() { PGOPTIONS='-c client_min_messages=warning' "$psql_bin" -X -q -v ON_ERROR_STOP=1 "$@"; }

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building (cargo build --release -p reservoir -p reservoir-bench)"
    (cd "$repo" && cargo build --release -p reservoir -p reservoir-bench) >&2
fi
[[ -x $reservoir_bin ]] || die "no server binary at $reservoir_bin"
[[ -x $bench_bin ]] || die "no load generator at $bench_bin"

mkdir -p "$out_dir"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results=$out_dir/compare-$stamp.jsonl
: >"$results"

reservoir_url=postgres://$PGUSER@$PGHOST:$PGPORT/$reservoir_db
base_url=http://127.0.0.1:$port
admin_token=rsv_bench_$(python3 -c 'import secrets; print(secrets.token_hex(24))')
data_dir=$(mktemp -d "$out_dir/reservoir-data.XXXXXX")

server_pid=
stop_server() {
    [[ -n $server_pid ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        # The server allows in-flight work 10 s after SIGTERM; give it a little more.
        local waited=0
        while kill -0 "$server_pid" 2>/dev/null && ((waited < 150)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$server_pid" 2>/dev/null; then
            log "server $server_pid ignored SIGTERM for 15 s; killing it"
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

if curl -fsS -o /dev/null --max-time 2 "$base_url/healthz" 2>/dev/null; then
    die "something already answers on $base_url; stop it or set RESERVOIR_PORT"
fi

# Adds the run number to run-baseline.sh's line, or turns reservoir-bench's stdout into
# one line with the same field names as the baseline's (the raw object kept as "raw").
normalize() {
    python3 - "$@" <<'PY'
import json, os, sys

system, clients, run, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
obj = None
with open(path) as f:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            candidate = json.loads(line)
        except ValueError:
            continue
        if isinstance(candidate, dict):
            obj = candidate
if obj is None:
    try:
        with open(path) as f:
            candidate = json.load(f)  # a pretty-printed object
        obj = candidate if isinstance(candidate, dict) else None
    except ValueError:
        pass
if obj is None:
    out = {"system": system, "clients": clients, "run": run, "error": f"no JSON object in {path}"}
elif system == "baseline":
    out = dict(obj, run=run)
else:
    latency = obj.get("latency_ms") or {}
    checks = [obj.get(k) for k in ("invariants_ok", "admitted_matches_ledger") if k in obj]
    out = {
        "system": "reservoir",
        "clients": clients,
        "run": run,
        "ops_per_s": obj.get("ops_per_s"),
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "invariants_ok": all(c is True for c in checks) if checks else None,
        "bench_exit": int(os.environ.get("BENCH_EXIT", "0")),
        "raw": obj,
    }
    if out["ops_per_s"] is None:
        out["error"] = "no ops_per_s in reservoir-bench output"
print(json.dumps(out, separators=(",", ":")))
PY
}

measure_baseline() {
    local clients=$1 run=$2 file
    file=$(mktemp "$out_dir/baseline-out.XXXXXX")
    log "baseline  clients=$clients run=$run/$runs"
    "$here/run-baseline.sh" "$clients" >"$file" || log "run-baseline.sh failed (see the line it printed)"
    normalize baseline "$clients" "$run" "$file" | tee -a "$results" >&2
    rm -f "$file"
}

measure_reservoir() {
    local clients=$1 run=$2
    local tag=c${clients}-r${run} file server_log waited=0
    file=$out_dir/reservoir-bench-$stamp-$tag.out
    server_log=$out_dir/reservoir-server-$stamp-$tag.log
    log "reservoir clients=$clients run=$run/$runs (server log $server_log)"

    psql_q -d postgres -c "DROP DATABASE IF EXISTS $reservoir_db WITH (FORCE)"
    psql_q -d postgres -c "CREATE DATABASE $reservoir_db"
    rm -rf "${data_dir:?}"/*
    # From the data folder, so that no .env of the checkout reaches the server.
    (
        cd "$data_dir"
        exec env \
            RESERVOIR_DATABASE_URL="$reservoir_url" \
            RESERVOIR_ADMIN_TOKEN="$admin_token" \
            RESERVOIR_ALLOW_SANDBOX_WITH_POSTGRES=true \
            RESERVOIR_LISTEN="127.0.0.1:$port" \
            RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND="${RESERVOIR_RATE_LIMIT_USAGE_PER_SECOND:-0}" \
            RESERVOIR_DATA_DIR="$data_dir" \
            "$reservoir_bin" serve
    ) >"$server_log" 2>&1 &
    server_pid=$!

    until curl -fsS -o /dev/null --max-time 2 "$base_url/readyz" 2>/dev/null; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            wait "$server_pid" 2>/dev/null || true
            server_pid=
            log "the server exited before it was ready; last lines of $server_log:"
            tail -n 20 "$server_log" >&2 || true
            printf '{"system":"reservoir","clients":%s,"run":%s,"error":"server exited, see %s"}\n' \
                "$clients" "$run" "$server_log" | tee -a "$results" >&2
            return 0
        fi
        if ((waited >= ready_timeout * 5)); then
            stop_server
            printf '{"system":"reservoir","clients":%s,"run":%s,"error":"not ready after %s s"}\n' \
                "$clients" "$run" "$ready_timeout" | tee -a "$results" >&2
            return 0
        fi
        sleep 0.2
        waited=$((waited + 1))
    done

    local rc=0
    RESERVOIR_ADMIN_TOKEN=$admin_token "$bench_bin" run --scenario "$scenario" \
        --url "$base_url" --database-url "$reservoir_url" \
        --clients "$clients" --duration-s "$duration" "${scenario_args[@]}" "${bench_args[@]}" \
        >"$file" 2>"$file.err" || rc=$?
    # The writer's counters of the run (batches, ops, load/judge/write/commit seconds).
    curl -fsS --max-time 5 "$base_url/metrics" 2>/dev/null | grep '^reservoir_writer_' >"$file.writer" || true
    log "writer: $(tr '\n' ' ' <"$file.writer")"
    stop_server
    if ((rc != 0)); then
        log "reservoir-bench exited $rc; see $file.err:"
        tail -n 5 "$file.err" >&2 || true
    fi
    BENCH_EXIT=$rc normalize reservoir "$clients" "$run" "$file" | tee -a "$results" >&2
}

log "results -> $results"
log "binaries: $reservoir_bin, $bench_bin; scenario $scenario, batch $batch"
log "PostgreSQL $PGHOST:$PGPORT: $(psql_q -d postgres -Atc 'SHOW server_version')," \
    "synchronous_commit=$(psql_q -d postgres -Atc 'SHOW synchronous_commit')," \
    "max_connections=$(psql_q -d postgres -Atc 'SHOW max_connections'); $(nproc) cores"
for clients in "${clients_list[@]}"; do
    for ((run = 1; run <= runs; run++)); do
        if ((run % 2 == 1)); then
            measure_baseline "$clients" "$run"
            measure_reservoir "$clients" "$run"
        else
            measure_reservoir "$clients" "$run"
            measure_baseline "$clients" "$run"
        fi
    done
done

python3 - "$results" "$runs" "$duration" "$batch" <<'PY' | tee "${results%.jsonl}.txt"
import json, statistics, sys

path, runs, duration, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = [json.loads(line) for line in open(path) if line.strip()]
by = {}
for r in rows:
    by.setdefault((r["clients"], r["system"]), []).append(r)

def med(system, clients, key):
    vals = [r[key] for r in by.get((clients, system), [])
            if "error" not in r and isinstance(r.get(key), (int, float))]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)

def fmt(v, width, decimals):
    return ("-" if v is None else f"{v:.{decimals}f}").rjust(width)

print(f"# medians of {runs} run(s) of {duration} s; ratio = reservoir ops/s / baseline ops/s"
      + (f"; {batch} debits per call/transaction, ops = debits, p99 per call" if batch > 1 else ""))
print(f"{'clients':>7}  {'baseline ops/s':>14}  {'baseline p99 ms':>15}  "
      f"{'reservoir ops/s':>15}  {'reservoir p99 ms':>16}  {'ratio':>6}  notes")
failed = False
for clients in sorted({c for c, _ in by}):
    b_ops, b_n = med("baseline", clients, "ops_per_s")
    b_p99, _ = med("baseline", clients, "p99_ms")
    r_ops, r_n = med("reservoir", clients, "ops_per_s")
    r_p99, _ = med("reservoir", clients, "p99_ms")
    ratio = r_ops / b_ops if r_ops is not None and b_ops else None
    notes = []
    for system, n in (("baseline", b_n), ("reservoir", r_n)):
        if n < runs:
            notes.append(f"{system}: {runs - n} of {runs} failed")
    bad = [r for (c, s), rs in by.items() if c == clients for r in rs
           if "error" not in r and r.get("invariants_ok") is False]
    if bad:
        notes.append("INVARIANTS FAILED: " + ", ".join(sorted({r['system'] for r in bad})))
    failed = failed or bool(notes)
    print(f"{clients:>7}  {fmt(b_ops, 14, 0)}  {fmt(b_p99, 15, 1)}  "
          f"{fmt(r_ops, 15, 0)}  {fmt(r_p99, 16, 1)}  {fmt(ratio, 6, 2)}  {'; '.join(notes)}")
sys.exit(1 if failed else 0)
PY
