#!/usr/bin/env bash
# The hand-rolled SQL baseline: pgbench running debit.sql (one transaction per debit)
# against the schema in schema.sql, once per client count. With BATCH=N (N > 1) it runs
# debit-batch.sql instead: N debits per transaction.
#
#   bench/baseline/run-baseline.sh [clients...]        (default: 1 8 32 64 128)
#
# Prints one JSON line per client count on stdout, progress on stderr:
#   {"system":"baseline","clients":N,"ops_per_s":..,"p50_ms":..,"p99_ms":..,...}
# A client count that cannot be measured prints {"system":"baseline","clients":N,
# "error":"..."} and the script exits 1 after the others have run.
#
# Environment (all optional):
#   PGHOST, PGPORT, PGUSER   server and role (default 127.0.0.1, 5432, postgres)
#   BASELINE_DB              database, dropped and re-created (default reservoir_baseline)
#   DURATION                 seconds per measurement (default 10)
#   CLIENTS                  client counts when none are given as arguments
#   WORKSPACES               workspaces seeded and debited at random (default 1: hot row)
#   BATCH                    debits per transaction (default 1: debit.sql; N > 1:
#                            debit-batch.sql with N debits per transaction). ops_per_s
#                            is then debits/s (pgbench's tps x N), tx_per_s the tps,
#                            and the latencies are per transaction (per batch)
#   PGBENCH_THREADS          pgbench -j is min(clients, this) (default 2)
#   PGBENCH, PSQL            the binaries (default: PATH, then /usr/lib/postgresql/*/bin)
#   OUT_DIR                  pgbench output and logs (default /tmp/reservoir-bench)
#   KEEP_LOGS=1              keep the per-transaction logs (deleted after parsing otherwise)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
db=${BASELINE_DB:-reservoir_baseline}
duration=${DURATION:-10}
workspaces=${WORKSPACES:-1}
batch=${BATCH:-1}
threads_max=${PGBENCH_THREADS:-2}
out_dir=${OUT_DIR:-/tmp/reservoir-bench}
keep_logs=${KEEP_LOGS:-0}
# The balance and cap every workspace and project is seeded with (schema.sql).
seed_nanos=1000000000000000000

if [[ $# -gt 0 ]]; then
    clients_list=("$@")
else
    read -r -a clients_list <<<"${CLIENTS:-1 8 32 64 128}"
fi

log() { printf '[baseline] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_pg_bin() {
    local name=$1 candidate
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return
    fi
    for candidate in /usr/lib/postgresql/*/bin/"$name"; do
        if [[ -x $candidate ]]; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    return 1
}

pgbench=${PGBENCH:-$(find_pg_bin pgbench)} || die "pgbench not found; set PGBENCH"
psql_bin=${PSQL:-$(find_pg_bin psql)} || die "psql not found; set PSQL"

[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer, got '$duration'"
[[ $workspaces =~ ^[1-9][0-9]*$ ]] || die "WORKSPACES must be a positive integer, got '$workspaces'"
[[ $batch =~ ^[1-9][0-9]*$ ]] || die "BATCH must be a positive integer, got '$batch'"
if ((batch > 1)); then
    script=$here/debit-batch.sql
else
    script=$here/debit.sql
fi
[[ $threads_max =~ ^[1-9][0-9]*$ ]] || die "PGBENCH_THREADS must be a positive integer"
[[ $db =~ ^[a-z_][a-z0-9_]*$ ]] || die "BASELINE_DB must be a plain lower-case identifier"
for n in "${clients_list[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "client counts must be positive integers, got '$n'"
done

psql_q() { PGOPTIONS='-c client_min_messages=warning' "$psql_bin" -X -q -v ON_ERROR_STOP=1 "$@"; }

mkdir -p "$out_dir"

log "pgbench: $pgbench ($("$pgbench" --version))"
log "server: $(psql_q -d postgres -Atc 'SHOW server_version') at $PGHOST:$PGPORT," \
    "synchronous_commit=$(psql_q -d postgres -Atc 'SHOW synchronous_commit')," \
    "max_connections=$(psql_q -d postgres -Atc 'SHOW max_connections')"

psql_q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
psql_q -d postgres -c "CREATE DATABASE $db"

# Connections this role can still open (superusers may use the reserved slots).
free_connections() {
    psql_q -d postgres -Atc "
        SELECT current_setting('max_connections')::int
             - CASE WHEN r.rolsuper THEN 0
                    ELSE current_setting('superuser_reserved_connections')::int END
             - (SELECT count(*) FROM pg_stat_activity
                WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())
        FROM pg_roles r WHERE r.rolname = current_user"
}

emit_error() {
    printf '{"system":"baseline","clients":%s,"error":"%s"}\n' "$1" "$2"
}

failures=0
for clients in "${clients_list[@]}"; do
    threads=$((clients < threads_max ? clients : threads_max))
    free=$(free_connections)
    if ((clients > free)); then
        log "clients=$clients: skipped, the server has only $free free connections" \
            "(raise max_connections)"
        emit_error "$clients" "needs $clients connections, the server has $free free (max_connections)"
        failures=$((failures + 1))
        continue
    fi

    # Same starting point for every measurement: empty ledger, fresh rows, clean WAL.
    psql_q -d "$db" -v workspaces="$workspaces" -f "$here/schema.sql"
    psql_q -d "$db" -c 'CHECKPOINT' 2>/dev/null || log "CHECKPOINT refused (not superuser?), going on"

    run_dir=$(mktemp -d "$out_dir/baseline-c${clients}.XXXXXX")
    log "clients=$clients threads=$threads duration=${duration}s workspaces=$workspaces batch=$batch -> $run_dir"
    rc=0
    "$pgbench" -n -M prepared -c "$clients" -j "$threads" -T "$duration" \
        -D workspaces="$workspaces" -D batch="$batch" -f "$script" \
        -l --log-prefix="$run_dir/tx" "$db" \
        >"$run_dir/pgbench.out" 2>"$run_dir/pgbench.err" || rc=$?
    if ((rc != 0)); then
        log "clients=$clients: pgbench exited $rc; see $run_dir/pgbench.err:"
        tail -n 5 "$run_dir/pgbench.err" >&2 || true
        emit_error "$clients" "pgbench exited $rc, see $run_dir/pgbench.err"
        failures=$((failures + 1))
        continue
    fi

    tps=$(awk '/^tps = / { print $3; exit }' "$run_dir/pgbench.out")
    processed=$(awk -F': ' '/^number of transactions actually processed/ { print $2; exit }' \
        "$run_dir/pgbench.out")
    failed=$(awk '/^number of failed transactions/ { print $5; exit }' "$run_dir/pgbench.out")
    avg_ms=$(awk '/^latency average = / { print $4; exit }' "$run_dir/pgbench.out")
    processed=${processed%%/*}
    failed=${failed:-0}
    if [[ -z $tps || -z $processed || -z $avg_ms ]]; then
        emit_error "$clients" "could not parse $run_dir/pgbench.out"
        failures=$((failures + 1))
        continue
    fi

    # Per-transaction log lines: client_id transaction_no time_us script_no epoch epoch_us.
    # The third field is the latency in microseconds ("failed"/"skipped" otherwise).
    read -r logged p50_ms p99_ms max_ms < <(
        cat "$run_dir"/tx.* |
            awk '$3 ~ /^[0-9]+$/ { print $3 }' |
            sort -n |
            awk '{ v[NR] = $1 }
                 function rank(p,   i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return v[i] }
                 END {
                     if (NR == 0) { print 0, "null", "null", "null"; exit }
                     printf "%d %.3f %.3f %.3f\n", NR, rank(0.50) / 1000, rank(0.99) / 1000, v[NR] / 1000
                 }'
    )
    if [[ $keep_logs != 1 ]]; then
        rm -f "$run_dir"/tx.*
    fi

    # Every committed debit left one ledger row and moved its workspace and project by
    # the same amount. A debit whose COMMIT was in flight when the timer fired is
    # committed but not counted by pgbench, so the ledger may exceed the count by at
    # most one transaction (BATCH rows) per client.
    read -r ledger_rows mismatches < <(psql_q -d "$db" -At -F ' ' -c "
        WITH l AS (
            SELECT workspace_id, project_id, count(*) AS n, sum(amount_nanos) AS s
            FROM ledger GROUP BY workspace_id, project_id
        )
        SELECT (SELECT coalesce(sum(n), 0) FROM l),
               (SELECT count(*) FROM workspaces w
                LEFT JOIN (SELECT workspace_id, sum(s) AS s FROM l GROUP BY workspace_id) x
                       ON x.workspace_id = w.id
                WHERE $seed_nanos - w.balance_nanos <> coalesce(x.s, 0))
             + (SELECT count(*) FROM projects p
                LEFT JOIN (SELECT project_id, sum(s) AS s FROM l GROUP BY project_id) y
                       ON y.project_id = p.id
                WHERE p.budget_spent_nanos <> coalesce(y.s, 0))")
    invariants_ok=false
    if ((mismatches == 0 && ledger_rows >= processed * batch &&
        ledger_rows - processed * batch <= clients * batch)); then
        invariants_ok=true
    fi

    ops_per_s=$(awk -v t="$tps" -v b="$batch" 'BEGIN { printf "%.2f", t * b }')
    printf '{"system":"baseline","clients":%s,"threads":%s,"duration_s":%s,"workspaces":%s,"batch":%s,"ops_per_s":%s,"tx_per_s":%s,"p50_ms":%s,"p99_ms":%s,"max_ms":%s,"avg_ms":%s,"transactions":%s,"logged":%s,"failed":%s,"ledger_rows":%s,"invariants_ok":%s}\n' \
        "$clients" "$threads" "$duration" "$workspaces" "$batch" "$ops_per_s" "$tps" "$p50_ms" "$p99_ms" "$max_ms" \
        "$avg_ms" "$processed" "$logged" "$failed" "$ledger_rows" "$invariants_ok"
    if [[ $invariants_ok != true ]]; then
        log "clients=$clients: invariant check FAILED (ledger_rows=$ledger_rows" \
            "transactions=$processed mismatched_rows=$mismatches)"
        failures=$((failures + 1))
    fi
done

if ((failures > 0)); then
    log "$failures of ${#clients_list[@]} measurements failed"
    exit 1
fi
