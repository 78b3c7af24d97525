//! Property test of the money rules: random sequences of usage, holds, settlements,
//! releases, transfers and purchases (with replays and conflicting replays), run
//! against a real database (SQLite, or PostgreSQL with TEST_DATABASE_URL), give the
//! same answers, balances and ledger sums as a plain in-memory model of the rules.
//! Operations go at random through the group-commit writer or alone; both are the
//! same engine, so both must agree with the model.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::Credits;
use billing::debits::reservations::{self, ReserveRequest};
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::debits::writer::{DebitWriter, SettleRequest, WriterConfig};
use billing::entity::enums::BudgetPeriod;
use billing::ledger::invariants;
use billing::sea_orm::DatabaseConnection;
use billing::transfers::{self, TransferRequest};
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use reservoir_tests::{TEST_MODEL, TestDb, add_test_model, fund, workspace};
use std::collections::HashMap;
use uuid::Uuid;

/// The test model's prices (see `TEST_MODEL`): nanocredits per token.
const PROMPT_NANOS: i64 = 1_000;
const COMPLETION_NANOS: i64 = 2_000;
/// Starting balance of workspace A, and the project's cap.
const FUNDED_NANOS: i64 = 5_000_000_000;
const PROJECT_LIMIT_NANOS: i64 = 3_000_000_000;

#[derive(Clone, Debug)]
enum Step {
    /// Usage under request id `key` (a small pool, so ids repeat: replays).
    Usage {
        key: u8,
        tokens: (i64, i64),
        project: bool,
    },
    Reserve {
        key: u8,
        tokens: (i64, i64),
        project: bool,
    },
    /// Settle the n-th reservation made so far (modulo), at these counts.
    Settle {
        nth: u8,
        tokens: (i64, i64),
    },
    Release {
        nth: u8,
    },
    /// Move credits between A and B (A → B when `out`).
    Transfer {
        key: u8,
        nanos: i64,
        out: bool,
    },
    /// A paid purchase credited to A.
    Purchase {
        whole_credits: i64,
    },
}

fn tokens() -> impl Strategy<Value = (i64, i64)> {
    (1i64..2_500_000, 0i64..1_200_000)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..12, tokens(), any::<bool>())
            .prop_map(|(key, tokens, project)| Step::Usage { key, tokens, project }),
        2 => (0u8..12, tokens(), any::<bool>())
            .prop_map(|(key, tokens, project)| Step::Reserve { key, tokens, project }),
        2 => (any::<u8>(), tokens()).prop_map(|(nth, tokens)| Step::Settle { nth, tokens }),
        1 => any::<u8>().prop_map(|nth| Step::Release { nth }),
        1 => (0u8..4, 1i64..2_000_000_000, any::<bool>())
            .prop_map(|(key, nanos, out)| Step::Transfer { key, nanos, out }),
        1 => (5i64..7).prop_map(|whole_credits| Step::Purchase { whole_credits }),
    ]
}

/// What the model says one step answers: Ok with an amount that identifies the
/// result, or the error code.
type Answer = Result<i64, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    Held,
    Settled,
    Released,
}

#[derive(Clone, Debug)]
struct ModelHold {
    key: u8,
    tokens: (i64, i64),
    amount: i64,
    project: bool,
    status: Hold,
    settled_tokens: Option<(i64, i64)>,
    settled_cost: i64,
}

/// The rules, written plainly.
#[derive(Default)]
struct Model {
    balance_a: i64,
    reserved_a: i64,
    balance_b: i64,
    project_spent: i64,
    project_reserved: i64,
    /// Usage request id → (payload, cost).
    usage: HashMap<u8, ((i64, i64, bool), i64)>,
    /// Reservations in creation order.
    holds: Vec<ModelHold>,
    transfers: HashMap<u8, (i64, bool)>,
}

fn cost(tokens: (i64, i64)) -> i64 {
    tokens.0 * PROMPT_NANOS + tokens.1 * COMPLETION_NANOS
}

impl Model {
    fn available(&self) -> i64 {
        self.balance_a - self.reserved_a
    }

    fn admit(&self, amount: i64, project: bool) -> Result<(), String> {
        if self.available() < amount {
            return Err("INSUFFICIENT_CREDITS".into());
        }
        if project && self.project_spent + self.project_reserved + amount > PROJECT_LIMIT_NANOS {
            return Err("BUDGET_EXCEEDED".into());
        }
        Ok(())
    }

    fn usage(&mut self, key: u8, tokens: (i64, i64), project: bool) -> Answer {
        let payload = (tokens.0, tokens.1, project);
        if let Some((earlier, cost)) = self.usage.get(&key) {
            return if *earlier == payload {
                Ok(*cost)
            } else {
                Err("IDEMPOTENCY_CONFLICT".into())
            };
        }
        // A settled hold's usage event holds the key (with the settlement's payload).
        if self
            .holds
            .iter()
            .any(|h| h.key == key && h.status == Hold::Settled)
        {
            return Err("IDEMPOTENCY_CONFLICT".into());
        }
        let cost = cost(tokens);
        self.admit(cost, project)?;
        self.balance_a -= cost;
        if project {
            self.project_spent += cost;
        }
        self.usage.insert(key, (payload, cost));
        Ok(cost)
    }

    fn reserve(&mut self, key: u8, tokens: (i64, i64), project: bool) -> Answer {
        let hold = cost(tokens);
        if let Some(h) = self.holds.iter().find(|h| h.key == key) {
            return if h.tokens == tokens && h.project == project {
                Ok(h.amount)
            } else {
                Err("IDEMPOTENCY_CONFLICT".into())
            };
        }
        if self.usage.contains_key(&key) {
            return Err("IDEMPOTENCY_CONFLICT".into());
        }
        self.admit(hold, project)?;
        self.reserved_a += hold;
        if project {
            self.project_reserved += hold;
        }
        self.holds.push(ModelHold {
            key,
            tokens,
            amount: hold,
            project,
            status: Hold::Held,
            settled_tokens: None,
            settled_cost: 0,
        });
        Ok(hold)
    }

    fn settle(&mut self, index: usize, tokens: (i64, i64)) -> Answer {
        let h = self.holds[index].clone();
        match h.status {
            Hold::Settled if h.settled_tokens == Some(tokens) => return Ok(h.settled_cost),
            Hold::Settled => return Err("IDEMPOTENCY_CONFLICT".into()),
            Hold::Released => return Err("INVALID_INPUT".into()),
            Hold::Held => {}
        }
        if self.usage.contains_key(&h.key) {
            // Its request id was recorded as direct usage meanwhile.
            return Err("IDEMPOTENCY_CONFLICT".into());
        }
        let cost = cost(tokens);
        self.reserved_a -= h.amount;
        let charge = cost.min(self.available());
        self.balance_a -= charge;
        if h.project {
            self.project_reserved -= h.amount;
            self.project_spent += cost;
        }
        let hold = &mut self.holds[index];
        hold.status = Hold::Settled;
        hold.settled_tokens = Some(tokens);
        hold.settled_cost = cost;
        Ok(cost)
    }

    fn release(&mut self, index: usize) -> Answer {
        let h = self.holds[index].clone();
        match h.status {
            Hold::Settled => return Err("INVALID_INPUT".into()),
            Hold::Released => return Ok(h.amount),
            Hold::Held => {}
        }
        self.reserved_a -= h.amount;
        if h.project {
            self.project_reserved -= h.amount;
        }
        self.holds[index].status = Hold::Released;
        Ok(h.amount)
    }

    fn transfer(&mut self, key: u8, nanos: i64, out: bool) -> Answer {
        if let Some(earlier) = self.transfers.get(&key) {
            return if *earlier == (nanos, out) {
                Ok(nanos)
            } else {
                Err("IDEMPOTENCY_CONFLICT".into())
            };
        }
        let from_available = if out {
            self.available()
        } else {
            self.balance_b
        };
        if from_available < nanos {
            return Err("INSUFFICIENT_CREDITS".into());
        }
        if out {
            self.balance_a -= nanos;
            self.balance_b += nanos;
        } else {
            self.balance_b -= nanos;
            self.balance_a += nanos;
        }
        self.transfers.insert(key, (nanos, out));
        Ok(nanos)
    }
}

/// One run's fixture: a fresh account (so cases share a database but no state).
struct Case {
    ws_a: Uuid,
    ws_b: Uuid,
    project_id: Uuid,
    case: Uuid,
    /// Reservation ids in creation order (as the model's `holds`).
    holds: Vec<Uuid>,
}

async fn new_case(db: &DatabaseConnection, now: DateTime<Utc>) -> anyhow::Result<Case> {
    let case = Uuid::now_v7();
    let email = format!("owner-{}@model.example", case.simple());
    let created = billing::accounts::create_account(db, "Model Co", &email, "Owner", now).await?;
    let account = created.account.id;
    let ws_a = billing::accounts::create_workspace(db, account, "A", now)
        .await?
        .id;
    let ws_b = billing::accounts::create_workspace(db, account, "B", now)
        .await?
        .id;
    let project = billing::accounts::create_project(db, ws_a, "P", "p", now).await?;
    let limit = Some(Credits::from_nanos(PROJECT_LIMIT_NANOS));
    billing::accounts::set_project_budget(db, project.id, limit, BudgetPeriod::Monthly, now)
        .await?;
    fund(db, ws_a, "5", now).await?;
    Ok(Case {
        ws_a,
        ws_b,
        project_id: project.id,
        case,
        holds: Vec::new(),
    })
}

fn code<T>(r: billing::Result<T>, ok: impl FnOnce(T) -> i64) -> Answer {
    r.map(ok).map_err(|e| e.code().as_str().to_owned())
}

fn usage_request(c: &Case, key: u8, tokens: (i64, i64), project: bool) -> UsageRequest {
    UsageRequest {
        workspace_id: c.ws_a,
        project: if project {
            ProjectRef::Id(c.project_id)
        } else {
            ProjectRef::None
        },
        model_id: TEST_MODEL.into(),
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        request_id: format!("{}-{key}", c.case),
        user_id: None,
        api_key_id: None,
    }
}

/// Runs one step for real, through the writer or alone.
async fn run(
    db: &DatabaseConnection,
    writer: Option<&DebitWriter>,
    c: &mut Case,
    step: &Step,
    now: DateTime<Utc>,
) -> anyhow::Result<Answer> {
    Ok(match step {
        Step::Usage {
            key,
            tokens,
            project,
        } => {
            let req = usage_request(c, *key, *tokens, *project);
            let r = match writer {
                Some(w) => w.record_usage(req, now).await,
                None => usage::record_usage(db, req, now).await,
            };
            code(r, |r| r.event.cost_nanos)
        }
        Step::Reserve {
            key,
            tokens,
            project,
        } => {
            let u = usage_request(c, *key, *tokens, *project);
            let req = ReserveRequest {
                workspace_id: u.workspace_id,
                project: u.project,
                model_id: u.model_id,
                max_prompt_tokens: tokens.0,
                max_completion_tokens: tokens.1,
                request_id: u.request_id,
                ttl_seconds: 600,
                user_id: None,
                api_key_id: None,
            };
            let r = match writer {
                Some(w) => w.reserve(req, now).await,
                None => reservations::reserve(db, req, now).await,
            };
            if let Ok(r) = &r
                && !c.holds.contains(&r.id)
            {
                c.holds.push(r.id);
            }
            code(r, |r| r.amount_nanos)
        }
        Step::Settle { nth, tokens } => {
            let id = c.holds[usize::from(*nth) % c.holds.len()];
            let r = match writer {
                Some(w) => {
                    let req = SettleRequest {
                        reservation_id: id,
                        workspace_id: c.ws_a,
                        prompt_tokens: tokens.0,
                        completion_tokens: tokens.1,
                    };
                    w.settle(req, now).await
                }
                None => reservations::settle(db, id, tokens.0, tokens.1, now).await,
            };
            code(r, |s| s.event.cost_nanos)
        }
        Step::Release { nth } => {
            let id = c.holds[usize::from(*nth) % c.holds.len()];
            let r = match writer {
                Some(w) => w.release(c.ws_a, id, now).await,
                None => reservations::release(db, id, now).await,
            };
            code(r, |r| r.amount_nanos)
        }
        Step::Transfer { key, nanos, out } => {
            let (from, to) = if *out {
                (c.ws_a, c.ws_b)
            } else {
                (c.ws_b, c.ws_a)
            };
            let req = TransferRequest {
                from_workspace_id: from,
                to_workspace_id: to,
                amount: Credits::from_nanos(*nanos),
                memo: None,
                idempotency_key: format!("{}-t{key}", c.case),
                created_by_user_id: None,
            };
            code(transfers::transfer(db, req, now).await, |t| {
                t.transfer.amount_nanos
            })
        }
        Step::Purchase { whole_credits } => {
            fund(db, c.ws_a, &whole_credits.to_string(), now).await?;
            Ok(whole_credits * 1_000_000_000)
        }
    })
}

fn model_step(m: &mut Model, step: &Step) -> Answer {
    match step {
        Step::Usage {
            key,
            tokens,
            project,
        } => m.usage(*key, *tokens, *project),
        Step::Reserve {
            key,
            tokens,
            project,
        } => m.reserve(*key, *tokens, *project),
        Step::Settle { nth, tokens } => m.settle(usize::from(*nth) % m.holds.len(), *tokens),
        Step::Release { nth } => m.release(usize::from(*nth) % m.holds.len()),
        Step::Transfer { key, nanos, out } => m.transfer(*key, *nanos, *out),
        Step::Purchase { whole_credits } => {
            m.balance_a += whole_credits * 1_000_000_000;
            Ok(whole_credits * 1_000_000_000)
        }
    }
}

async fn run_case(
    db: &DatabaseConnection,
    writer: &DebitWriter,
    steps: &[(Step, bool)],
) -> anyhow::Result<()> {
    let now = Utc
        .with_ymd_and_hms(2026, 11, 15, 12, 0, 0)
        .single()
        .expect("valid time");
    let mut case = new_case(db, now).await?;
    let mut model = Model {
        balance_a: FUNDED_NANOS,
        ..Model::default()
    };
    for (i, (step, via_writer)) in steps.iter().enumerate() {
        // A settle or release before any hold exists has nothing to name.
        if matches!(step, Step::Settle { .. } | Step::Release { .. }) && model.holds.is_empty() {
            continue;
        }
        let expected = model_step(&mut model, step);
        let got = run(db, via_writer.then_some(writer), &mut case, step, now).await?;
        anyhow::ensure!(
            got == expected,
            "step {i} {step:?}: got {got:?}, model says {expected:?}"
        );
        let a = workspace(db, case.ws_a).await?;
        let b = workspace(db, case.ws_b).await?;
        let found = (a.balance_nanos, a.reserved_nanos, b.balance_nanos);
        let want = (model.balance_a, model.reserved_a, model.balance_b);
        anyhow::ensure!(
            found == want,
            "step {i} {step:?}: balances {found:?}, model {want:?}"
        );
    }
    let report = invariants::check(db).await?;
    anyhow::ensure!(report.is_ok(), "invariants: {:?}", report.violations);
    Ok(())
}

#[test]
fn money_rules_match_a_plain_model() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let t = rt.block_on(TestDb::new())?;
    let now = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .expect("valid time");
    rt.block_on(add_test_model(&t.db, now))?;
    let writer = {
        let _guard = rt.enter();
        DebitWriter::start(
            t.db.clone(),
            WriterConfig::for_backend(t.db.get_database_backend()),
            None,
        )?
    };
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy = proptest::collection::vec((step(), any::<bool>()), 1..40);
    let result = runner.run(&strategy, |steps| {
        rt.block_on(run_case(&t.db, &writer, &steps))
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    drop(writer);
    rt.block_on(t.finish())?;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
