-- The same debit, batched: one transaction carries :batch debits of one workspace and
-- project (pgbench -D batch=100), the best a hand-written system can do with the
-- obvious schema. Three statements per transaction whatever the batch size:
--   1. the batch's items (:batch rows, a fresh request id and a random cost each,
--      the same distribution as debit.sql) are built in a CTE;
--   2. workspace guard and project guard take the batch's sum off the balance and
--      add it to the spend, only if both allow it;
--   3. the ledger rows, one per item, idempotent on (workspace_id, request_id),
--      written only if both guards passed.
-- All three are one statement (data-modifying CTEs), so the workspace row is locked
-- for one round trip plus the commit's WAL flush, once per :batch debits.
--
-- The guards are applied to the batch's sum (all or nothing): cheaper than a per-item
-- decision, which is what Reservoir does (each item of a recordUsageBatch is admitted
-- or refused on its own). With the seed of schema.sql nothing is ever refused.
--
-- Variables (pgbench -D name=value):
--   workspaces  how many seeded workspaces to pick from (1 is the hot row)
--   batch       debits per transaction
\set ws random(1, :workspaces)
BEGIN;
WITH items AS (
    SELECT gen_random_uuid()::text AS request_id,
           (1000 + floor(random() * 999001))::bigint AS cost
    FROM generate_series(1, :batch)
), total AS (
    SELECT sum(cost)::bigint AS s FROM items
), w AS (
    UPDATE workspaces SET balance_nanos = balance_nanos - (SELECT s FROM total)
    WHERE id = :ws AND balance_nanos - reserved_nanos >= (SELECT s FROM total)
    RETURNING id
), p AS (
    UPDATE projects SET budget_spent_nanos = budget_spent_nanos + (SELECT s FROM total)
    WHERE id = :ws AND budget_spent_nanos + (SELECT s FROM total) <= budget_limit_nanos
      AND EXISTS (SELECT 1 FROM w)
    RETURNING id
)
INSERT INTO ledger (workspace_id, project_id, request_id, amount_nanos)
SELECT :ws, :ws, i.request_id, i.cost FROM items i WHERE EXISTS (SELECT 1 FROM p);
END;
