-- The hand-rolled baseline: the smallest schema that can carry "the obvious design"
-- of a prepaid debit (workspace guard, project guard, ledger insert, one transaction).
-- It lives in its own database (reservoir_baseline by default) and is rebuilt before
-- every measurement, so each run starts from the same empty ledger.
--
--   psql -h 127.0.0.1 -U postgres -d reservoir_baseline -v workspaces=1 -f schema.sql
--
-- workspaces: how many workspaces (and projects, one each) to seed; default 1 (the hot
-- row every client fights over). 1000 spreads the load, see debit.sql.

\set ON_ERROR_STOP on
\if :{?workspaces}
\else
\set workspaces 1
\endif

SET client_min_messages = warning;

DROP TABLE IF EXISTS ledger;
DROP TABLE IF EXISTS projects;
DROP TABLE IF EXISTS workspaces;

CREATE TABLE workspaces (
    id             bigint PRIMARY KEY,
    balance_nanos  bigint NOT NULL CHECK (balance_nanos >= 0),
    reserved_nanos bigint NOT NULL DEFAULT 0
);

CREATE TABLE projects (
    id                 bigint PRIMARY KEY,
    workspace_id       bigint NOT NULL REFERENCES workspaces (id),
    budget_limit_nanos bigint NOT NULL,
    budget_spent_nanos bigint NOT NULL DEFAULT 0
);

CREATE TABLE ledger (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces (id),
    project_id   bigint NOT NULL REFERENCES projects (id),
    request_id   text NOT NULL,
    amount_nanos bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, request_id)
);

-- A huge balance and a huge cap, so that no debit is ever refused: the benchmark
-- measures the write path, not the refusal path. 10^18 nanos is 10^9 credits; a
-- 10-second run at 10k debits/s of at most 10^6 nanos spends 10^11.
INSERT INTO workspaces (id, balance_nanos, reserved_nanos)
SELECT g, 1000000000000000000, 0
FROM generate_series(1, :workspaces) AS g;

-- One project per workspace, with the same id.
INSERT INTO projects (id, workspace_id, budget_limit_nanos, budget_spent_nanos)
SELECT g, g, 1000000000000000000, 0
FROM generate_series(1, :workspaces) AS g;

VACUUM ANALYZE workspaces;
VACUUM ANALYZE projects;
VACUUM ANALYZE ledger;
