-- One debit, the obvious way: one transaction per request, three statements.
--   1. workspace guard: take the cost off the balance if what is free covers it;
--   2. project guard: add the cost to the project's spend if the cap allows it;
--   3. ledger insert, idempotent on (workspace_id, request_id).
-- The workspace row stays locked from statement 1 until COMMIT, across the round
-- trips of statements 2 and 3 and the commit's WAL flush: that lock is what every
-- client queues on when they all debit the same workspace.
--
-- Variables (pgbench -D name=value):
--   workspaces  how many seeded workspaces to pick from (required; 1 is the hot
--               row); must not exceed the number seeded by schema.sql.
--
-- The seed makes refusals impossible, so the guards never fail and the application's
-- "0 rows updated: roll back and refuse" branch is not exercised; run-baseline.sh
-- checks afterwards that every committed debit left one ledger row and moved both
-- balances by the same amount.
\set ws random(1, :workspaces)
\set cost random(1000, 1000000)
BEGIN;
UPDATE workspaces SET balance_nanos = balance_nanos - :cost WHERE id = :ws AND balance_nanos - reserved_nanos >= :cost;
UPDATE projects SET budget_spent_nanos = budget_spent_nanos + :cost WHERE id = :ws AND budget_spent_nanos + :cost <= budget_limit_nanos;
INSERT INTO ledger (workspace_id, project_id, request_id, amount_nanos) VALUES (:ws, :ws, gen_random_uuid()::text, :cost);
END;
