//! The ledger's invariants, checked against the database as it is. Used by the tests
//! after every concurrency run and by `reservoir check` in operations.

use crate::error::Result;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

/// Each query returns the rows that break one invariant, with a printable detail.
const CHECKS: &[(&str, &str)] = &[
    (
        "each one-dimension rollup adds up to the full daily rollup",
        "SELECT x.subject, x.expected, x.actual FROM ( \
           SELECT w.name || ' by ' || k.dimension AS subject, \
                  CAST(COALESCE((SELECT SUM(d.cost_nanos) FROM usage_daily d \
                                 WHERE d.workspace_id = w.id), 0) AS BIGINT) AS expected, \
                  CAST(COALESCE((SELECT SUM(b.cost_nanos) FROM usage_daily_by b \
                                 WHERE b.workspace_id = w.id AND b.dimension = k.dimension), 0) AS BIGINT) AS actual \
           FROM workspaces w CROSS JOIN (SELECT 'project' AS dimension UNION ALL SELECT 'member' \
                UNION ALL SELECT 'api_key' UNION ALL SELECT 'model') k \
         ) x WHERE x.expected <> x.actual",
    ),
    (
        "cached balance equals the sum of the workspace's ledger entries",
        "SELECT w.name AS subject, CAST(w.balance_nanos AS BIGINT) AS expected, \
                CAST(COALESCE(SUM(e.amount_nanos), 0) AS BIGINT) AS actual \
         FROM workspaces w LEFT JOIN ledger_entries e ON e.workspace_id = w.id \
         GROUP BY w.id, w.name, w.balance_nanos \
         HAVING w.balance_nanos <> COALESCE(SUM(e.amount_nanos), 0)",
    ),
    (
        "every ledger transaction sums to zero",
        "SELECT CAST(t.idempotency_key AS TEXT) AS subject, CAST(0 AS BIGINT) AS expected, \
                CAST(COALESCE(SUM(e.amount_nanos), 0) AS BIGINT) AS actual \
         FROM ledger_transactions t LEFT JOIN ledger_entries e ON e.transaction_id = t.id \
         GROUP BY t.id, t.idempotency_key \
         HAVING COALESCE(SUM(e.amount_nanos), 0) <> 0 OR COUNT(e.id) < 2",
    ),
    (
        "no balance is negative and reserved stays within 0..=balance",
        "SELECT w.name AS subject, CAST(w.reserved_nanos AS BIGINT) AS expected, \
                CAST(w.balance_nanos AS BIGINT) AS actual \
         FROM workspaces w \
         WHERE w.balance_nanos < 0 OR w.reserved_nanos < 0 OR w.reserved_nanos > w.balance_nanos",
    ),
    (
        "reserved equals the sum of the workspace's HELD reservations",
        "SELECT w.name AS subject, CAST(w.reserved_nanos AS BIGINT) AS expected, \
                CAST(COALESCE(SUM(r.amount_nanos), 0) AS BIGINT) AS actual \
         FROM workspaces w LEFT JOIN reservations r ON r.workspace_id = w.id AND r.status = 'HELD' \
         GROUP BY w.id, w.name, w.reserved_nanos \
         HAVING w.reserved_nanos <> COALESCE(SUM(r.amount_nanos), 0)",
    ),
    (
        "a project's reserved budget equals the sum of its HELD reservations",
        "SELECT p.tag AS subject, CAST(p.budget_reserved_nanos AS BIGINT) AS expected, \
                CAST(COALESCE(SUM(r.amount_nanos), 0) AS BIGINT) AS actual \
         FROM projects p LEFT JOIN reservations r ON r.project_id = p.id AND r.status = 'HELD' \
         GROUP BY p.id, p.tag, p.budget_reserved_nanos \
         HAVING p.budget_reserved_nanos <> COALESCE(SUM(r.amount_nanos), 0)",
    ),
    (
        "usage charged to a workspace equals its usage events' cost less shortfall",
        "SELECT w.name AS subject, \
                CAST(COALESCE((SELECT SUM(u.cost_nanos - u.shortfall_nanos) FROM usage_events u \
                               WHERE u.workspace_id = w.id), 0) AS BIGINT) AS expected, \
                CAST(-COALESCE((SELECT SUM(e.amount_nanos) FROM ledger_entries e \
                                WHERE e.workspace_id = w.id AND e.kind = 'USAGE'), 0) AS BIGINT) AS actual \
         FROM workspaces w \
         WHERE COALESCE((SELECT SUM(u.cost_nanos - u.shortfall_nanos) FROM usage_events u \
                         WHERE u.workspace_id = w.id), 0) \
            <> -COALESCE((SELECT SUM(e.amount_nanos) FROM ledger_entries e \
                          WHERE e.workspace_id = w.id AND e.kind = 'USAGE'), 0)",
    ),
    (
        "every usage event is posted by one USAGE ledger transaction",
        "SELECT CAST(u.request_id AS TEXT) AS subject, CAST(1 AS BIGINT) AS expected, \
                CAST(0 AS BIGINT) AS actual \
         FROM usage_events u LEFT JOIN ledger_transactions t \
           ON t.id = u.ledger_transaction_id AND t.kind = 'USAGE' \
         WHERE t.id IS NULL",
    ),
    (
        "a USAGE transaction earns usage_revenue the cost of the events it posts",
        "SELECT CAST(t.idempotency_key AS TEXT) AS subject, \
                CAST(COALESCE(u.cost_nanos, -1) AS BIGINT) AS expected, \
                CAST(COALESCE(r.amount_nanos, 0) AS BIGINT) AS actual \
         FROM ledger_transactions t \
         LEFT JOIN (SELECT ledger_transaction_id, SUM(cost_nanos) AS cost_nanos \
                    FROM usage_events GROUP BY ledger_transaction_id) u \
           ON u.ledger_transaction_id = t.id \
         LEFT JOIN (SELECT transaction_id, SUM(amount_nanos) AS amount_nanos FROM ledger_entries \
                    WHERE system_account = 'usage_revenue' GROUP BY transaction_id) r \
           ON r.transaction_id = t.id \
         WHERE t.kind = 'USAGE' \
           AND (u.cost_nanos IS NULL OR u.cost_nanos <> COALESCE(r.amount_nanos, 0))",
    ),
    (
        "a USAGE transaction takes from its events' one workspace their cost less shortfall",
        "SELECT CAST(t.idempotency_key AS TEXT) AS subject, \
                CAST(-u.charge_nanos AS BIGINT) AS expected, \
                CAST(COALESCE(SUM(e.amount_nanos), 0) AS BIGINT) AS actual \
         FROM ledger_transactions t \
         JOIN (SELECT ledger_transaction_id, COUNT(DISTINCT workspace_id) AS workspaces, \
                      SUM(cost_nanos - shortfall_nanos) AS charge_nanos \
               FROM usage_events GROUP BY ledger_transaction_id) u \
           ON u.ledger_transaction_id = t.id \
         LEFT JOIN ledger_entries e ON e.transaction_id = t.id AND e.workspace_id IS NOT NULL \
         LEFT JOIN (SELECT DISTINCT ledger_transaction_id, workspace_id FROM usage_events) m \
           ON m.ledger_transaction_id = t.id AND m.workspace_id = e.workspace_id \
         WHERE t.kind = 'USAGE' \
         GROUP BY t.id, t.idempotency_key, u.charge_nanos, u.workspaces \
         HAVING u.workspaces <> 1 OR COUNT(e.id) <> 1 OR COUNT(m.workspace_id) <> 1 \
             OR COALESCE(SUM(e.amount_nanos), 0) <> -u.charge_nanos",
    ),
    (
        "the last balance event of a workspace carries its cached sequence",
        "SELECT w.name AS subject, CAST(w.balance_sequence AS BIGINT) AS expected, \
                CAST(COALESCE(MAX(b.sequence), 0) AS BIGINT) AS actual \
         FROM workspaces w LEFT JOIN balance_events b ON b.workspace_id = w.id \
         GROUP BY w.id, w.name, w.balance_sequence \
         HAVING w.balance_sequence <> COALESCE(MAX(b.sequence), 0)",
    ),
    (
        "the last balance event of a workspace carries its cached balance",
        "SELECT w.name AS subject, CAST(w.balance_nanos AS BIGINT) AS expected, \
                CAST(b.balance_nanos AS BIGINT) AS actual \
         FROM workspaces w JOIN balance_events b \
           ON b.workspace_id = w.id AND b.sequence = w.balance_sequence \
         WHERE b.balance_nanos <> w.balance_nanos",
    ),
    (
        "the last balance event of a workspace carries its cached reserved credits",
        "SELECT w.name AS subject, CAST(w.reserved_nanos AS BIGINT) AS expected, \
                CAST(b.reserved_nanos AS BIGINT) AS actual \
         FROM workspaces w JOIN balance_events b \
           ON b.workspace_id = w.id AND b.sequence = w.balance_sequence \
         WHERE b.reserved_nanos <> w.reserved_nanos",
    ),
    (
        "each workspace entry's balance_after is the running sum of its entries",
        "SELECT CAST(r.id AS TEXT) AS subject, CAST(r.balance_after_nanos AS BIGINT) AS expected, \
                CAST(r.running AS BIGINT) AS actual \
         FROM (SELECT e.id, e.balance_after_nanos, \
                      SUM(e.amount_nanos) OVER (PARTITION BY e.workspace_id ORDER BY e.id) AS running \
               FROM ledger_entries e WHERE e.workspace_id IS NOT NULL) r \
         WHERE r.balance_after_nanos <> r.running",
    ),
    (
        "every succeeded purchase is posted exactly once, and no other purchase is",
        "SELECT CAST(p.idempotency_key AS TEXT) AS subject, \
                CAST(CASE WHEN p.status = 'SUCCEEDED' THEN 1 ELSE 0 END AS BIGINT) AS expected, \
                CAST(COUNT(t.id) AS BIGINT) AS actual \
         FROM purchases p LEFT JOIN ledger_transactions t ON t.purchase_id = p.id \
         GROUP BY p.id, p.idempotency_key, p.status \
         HAVING COUNT(t.id) <> CASE WHEN p.status = 'SUCCEEDED' THEN 1 ELSE 0 END",
    ),
];

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub subject: String,
    pub expected: i64,
    pub actual: i64,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (expected {}, found {})",
            self.invariant, self.subject, self.expected, self.actual
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks_run: usize,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs every invariant check; the report lists each violation found.
pub async fn check(db: &DatabaseConnection) -> Result<Report> {
    let backend = db.get_database_backend();
    let mut report = Report::default();
    for (invariant, sql) in CHECKS {
        let rows = db
            .query_all_raw(Statement::from_string(backend, *sql))
            .await?;
        for row in rows {
            report.violations.push(Violation {
                invariant,
                subject: row
                    .try_get::<String>("", "subject")
                    .unwrap_or_else(|_| "?".into()),
                expected: row.try_get::<i64>("", "expected")?,
                actual: row.try_get::<i64>("", "actual")?,
            });
        }
        report.checks_run += 1;
    }
    Ok(report)
}
