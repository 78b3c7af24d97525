//! Step 2 of a batch: the money rules of debits, as functions over the loaded state
//! with no I/O. Each operation is admitted or refused as if it ran alone, in arrival
//! order, against the rows as the operations before it left them; a refusal changes
//! nothing. All money arithmetic goes through `Credits`' checked operations (the
//! module denies raw integer arithmetic).
//!
//! - Usage: priced at the model's current price less the account's discount, admitted
//!   if it fits the workspace's available credits (balance − reserved) and then its
//!   project's cap for the current period.
//! - Hold (reserve): the worst-case cost, admitted the same way, raises `reserved`.
//! - Settle: frees the hold (if still HELD; an EXPIRED hold was already freed) and
//!   charges the actual cost, or all that is available; the rest is shortfall.
//! - Release / expire: frees a HELD hold.
//! - Replays: the same request id and payload answer with the original result; the
//!   same id with another payload is IDEMPOTENCY_CONFLICT.

#![deny(clippy::arithmetic_side_effects)]

use super::posting::Posting;
use super::{Op, Reply, SettleRequest};
use crate::debits::budget;
use crate::debits::reservations::{ReserveRequest, Settled, settle_hash};
use crate::debits::usage::{self, ProjectRef, Recorded, UsageRequest};
use crate::error::{BillingError, Result};
use crate::ids::new_id;
use crate::ledger;
use crate::money::{Credits, DiscountBps};
use crate::pricing::{self, TokenPrice};
use chrono::{DateTime, Duration, Utc};
use entity::enums::{BalanceChangeCause, ReservationStatus};
use entity::{
    alert_thresholds, auto_reload_settings, models, projects, reservations as reservation_rows,
    usage_events, workspaces,
};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// A workspace row as the batch found it and as it is now.
pub(crate) struct WorkspaceState {
    pub row: workspaces::Model,
    pub before: workspaces::Model,
    /// Why it changed (None: unchanged).
    pub cause: Option<BalanceChangeCause>,
    /// The time of the last operation that changed it: the balance-change policies
    /// (auto-reload, alerts) judge the row as of then.
    pub changed_at: Option<DateTime<Utc>>,
}

impl WorkspaceState {
    pub(crate) fn new(row: workspaces::Model) -> Self {
        Self {
            before: row.clone(),
            row,
            cause: None,
            changed_at: None,
        }
    }
}

impl WorkspaceState {
    /// The batch's net change to the balance, for the UPDATE that applies it.
    pub(crate) fn balance_delta(&self) -> Result<i64> {
        net(self.row.balance_nanos, self.before.balance_nanos)
    }

    /// The batch's net change to the reserved credits.
    pub(crate) fn reserved_delta(&self) -> Result<i64> {
        net(self.row.reserved_nanos, self.before.reserved_nanos)
    }
}

fn net(after: i64, before: i64) -> Result<i64> {
    Ok(Credits::from_nanos(after)
        .checked_sub(Credits::from_nanos(before))?
        .nanos())
}

pub(crate) struct ProjectState {
    pub row: projects::Model,
    pub before: projects::Model,
}

impl ProjectState {
    pub(crate) fn new(row: projects::Model) -> Self {
        Self {
            before: row.clone(),
            row,
        }
    }
}

/// Everything a batch read, under its locks, as its operations leave it.
pub(crate) struct State {
    pub workspaces: HashMap<Uuid, WorkspaceState>,
    pub discounts: HashMap<Uuid, DiscountBps>,
    pub models: HashMap<String, models::Model>,
    pub projects: HashMap<Uuid, ProjectState>,
    /// (account, user) pairs of the attributed users that are members.
    pub members: HashSet<(Uuid, Uuid)>,
    pub reservations: HashMap<Uuid, reservation_rows::Model>,
    /// (workspace, request id) → the usage event recorded under it before this batch.
    pub used_usage: HashMap<(Uuid, String), usage_events::Model>,
    /// (workspace, request id) → the reservation made with it before this batch.
    pub used_reserve: HashMap<(Uuid, String), reservation_rows::Model>,
    /// The workspaces' auto-reload settings and alert thresholds (highest first), for
    /// the balance-change policies after the batch's writes.
    pub reload_settings: HashMap<Uuid, auto_reload_settings::Model>,
    pub thresholds: HashMap<Uuid, Vec<alert_thresholds::Model>>,
}

/// The rows the batch has decided to write, applied after every operation was judged.
#[derive(Default)]
pub(crate) struct Writes {
    pub events: Vec<usage_events::Model>,
    pub postings: Vec<Posting>,
    pub new_reservations: Vec<reservation_rows::Model>,
    /// (row after, status before).
    pub resolved_reservations: Vec<(reservation_rows::Model, ReservationStatus)>,
    /// Usage recorded by this batch, for replays inside it: (ws, request id) → index.
    recorded: HashMap<(Uuid, String), usize>,
    /// Reservations made by this batch: (ws, request id) → index.
    reserved: HashMap<(Uuid, String), usize>,
}

/// Judges one operation; an Err is its refusal (nothing changed).
pub(crate) fn judge(
    state: &mut State,
    writes: &mut Writes,
    op: &Op,
    now: DateTime<Utc>,
) -> Result<Reply> {
    Ok(match op {
        Op::Usage { req, hash } => Reply::Usage(Ok(judge_usage(state, writes, req, hash, now)?)),
        Op::Reserve { req, hash } => {
            Reply::Reserve(Ok(judge_reserve(state, writes, req, hash, now)?))
        }
        Op::Settle(req) => Reply::Settle(Box::new(Ok(judge_settle(state, writes, req, now)?))),
        Op::Release { reservation_id, to } => {
            Reply::Release(Ok(judge_release(state, writes, *reservation_id, *to, now)?))
        }
    })
}

/// `nanos + delta`, checked: the one way this module moves a stored amount.
fn moved(nanos: i64, delta: Credits) -> Result<i64> {
    Ok(Credits::from_nanos(nanos).checked_add(delta)?.nanos())
}

fn price_of(model: &models::Model) -> TokenPrice {
    TokenPrice {
        prompt_per_million: Credits::from_nanos(model.prompt_price_per_million_nanos),
        completion_per_million: Credits::from_nanos(model.completion_price_per_million_nanos),
    }
}

/// The answer to a request id seen before: its original result if the payload is
/// the same, IDEMPOTENCY_CONFLICT if not.
pub(crate) fn replay_usage(event: &usage_events::Model, hash: &str) -> Result<Recorded> {
    if event.request_hash == hash {
        Ok(Recorded {
            event: event.clone(),
            replayed: true,
        })
    } else {
        Err(BillingError::IdempotencyConflict)
    }
}

/// The usage event recorded under a request id, by this batch or before it.
fn recorded<'a>(
    state: &'a State,
    writes: &'a Writes,
    key: &(Uuid, String),
) -> Option<&'a usage_events::Model> {
    match writes.recorded.get(key) {
        Some(index) => writes.events.get(*index),
        None => state.used_usage.get(key),
    }
}

/// Rolls a project's budget period in memory when a new one has begun.
fn roll(project: &mut projects::Model, now: DateTime<Utc>) {
    let start = budget::period_start(project.budget_period, now, project.budget_period_start);
    if start > project.budget_period_start {
        project.budget_spent_nanos = 0;
        project.budget_period_start = start;
    }
}

/// The project a request names: NOT_FOUND unless it belongs to the workspace.
fn find_project(state: &State, workspace_id: Uuid, project: &ProjectRef) -> Result<Option<Uuid>> {
    let found = match project {
        ProjectRef::None => return Ok(None),
        ProjectRef::Id(id) => state.projects.get(id).map(|p| &p.row),
        ProjectRef::Tag(tag) => state
            .projects
            .values()
            .map(|p| &p.row)
            .find(|p| p.workspace_id == workspace_id && p.tag == *tag),
    };
    match found {
        Some(p) if p.workspace_id == workspace_id => Ok(Some(p.id)),
        _ => Err(BillingError::NotFound("project")),
    }
}

fn discount_of(state: &State, workspace_id: Uuid) -> Result<DiscountBps> {
    let ws = state
        .workspaces
        .get(&workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    state
        .discounts
        .get(&ws.row.account_id)
        .copied()
        .ok_or(BillingError::NotFound("account"))
}

/// What a debit or hold asks for, checked in a fixed order (workspace, account,
/// model, project, attributed user, token counts) so every refusal is the same one
/// whichever path a request took. Returns the cost and the project.
fn price_request(
    state: &State,
    workspace_id: Uuid,
    model_id: &str,
    project: &ProjectRef,
    user_id: Option<Uuid>,
    tokens: (i64, i64),
) -> Result<(Credits, Option<Uuid>)> {
    let discount = discount_of(state, workspace_id)?;
    let model = match state.models.get(model_id) {
        Some(m) if m.active => m,
        Some(_) => {
            return Err(BillingError::invalid(format!(
                "model {model_id} is no longer available"
            )));
        }
        None => return Err(BillingError::invalid(format!("unknown model {model_id}"))),
    };
    let project_id = find_project(state, workspace_id, project)?;
    let account_id = state
        .workspaces
        .get(&workspace_id)
        .map(|w| w.row.account_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    if let Some(user_id) = user_id
        && !state.members.contains(&(account_id, user_id))
    {
        return Err(BillingError::NotFound("user"));
    }
    let cost = pricing::usage_cost(price_of(model), tokens.0, tokens.1, discount)?.total;
    Ok((cost, project_id))
}

/// The two guards of a debit or hold, against the rows as this batch has left them:
/// the workspace's available credits, then the project's cap (after rolling its
/// period). Changes nothing but the roll, so a refusal leaves the state as it was.
fn admit(
    state: &mut State,
    workspace_id: Uuid,
    project_id: Option<Uuid>,
    amount: Credits,
    now: DateTime<Utc>,
) -> Result<()> {
    let ws = state
        .workspaces
        .get(&workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    let available = ledger::available(&ws.row);
    if available < amount {
        return Err(BillingError::InsufficientCredits { available });
    }
    if let Some(project_id) = project_id {
        let project = state
            .projects
            .get_mut(&project_id)
            .ok_or(BillingError::NotFound("project"))?;
        roll(&mut project.row, now);
        check_budget(&project.row, amount)?;
    }
    Ok(())
}

/// Admits `needed` under a project's cap: spent + reserved + needed ≤ limit. A sum
/// past the largest amount is over every cap.
fn check_budget(project: &projects::Model, needed: Credits) -> Result<()> {
    let Some(limit) = project.budget_limit_nanos else {
        return Ok(());
    };
    let used = Credits::from_nanos(project.budget_spent_nanos)
        .checked_add(Credits::from_nanos(project.budget_reserved_nanos))
        .and_then(|u| u.checked_add(needed));
    match used {
        Ok(used) if used <= Credits::from_nanos(limit) => Ok(()),
        _ => Err(BillingError::BudgetExceeded {
            available: usage::budget_remaining(project),
        }),
    }
}

/// Moves a project's counters by `spent` and `reserved` (after rolling its period).
fn charge_project(
    state: &mut State,
    project_id: Option<Uuid>,
    spent: Credits,
    reserved: Credits,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(project_id) = project_id else {
        return Ok(());
    };
    let project = state
        .projects
        .get_mut(&project_id)
        .ok_or(BillingError::NotFound("project"))?;
    roll(&mut project.row, now);
    let row = &mut project.row;
    let spent_after = moved(row.budget_spent_nanos, spent)?;
    let reserved_after = moved(row.budget_reserved_nanos, reserved)?;
    row.budget_spent_nanos = spent_after;
    row.budget_reserved_nanos = reserved_after;
    Ok(())
}

/// Moves a workspace's balance and reserved credits; returns the balance after.
fn charge_workspace(
    state: &mut State,
    workspace_id: Uuid,
    balance: Credits,
    reserved: Credits,
    (cause, now): (BalanceChangeCause, DateTime<Utc>),
) -> Result<i64> {
    let ws = state
        .workspaces
        .get_mut(&workspace_id)
        .ok_or(BillingError::NotFound("workspace"))?;
    let balance_after = moved(ws.row.balance_nanos, balance)?;
    let reserved_after = moved(ws.row.reserved_nanos, reserved)?;
    ws.row.balance_nanos = balance_after;
    ws.row.reserved_nanos = reserved_after;
    ws.cause = Some(cause);
    ws.changed_at = Some(now);
    Ok(balance_after)
}

/// Adds a usage event and its posting to the batch's writes.
fn record(
    writes: &mut Writes,
    key: (Uuid, String),
    event: usage_events::Model,
    charge: Credits,
    balance_after: i64,
    now: DateTime<Utc>,
) -> Result<()> {
    writes
        .postings
        .push(Posting::of_event(&event, charge, balance_after, now)?);
    writes.recorded.insert(key, writes.events.len());
    writes.events.push(event);
    Ok(())
}

fn judge_usage(
    state: &mut State,
    writes: &mut Writes,
    req: &UsageRequest,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<Recorded> {
    let key = (req.workspace_id, req.request_id.clone());
    if let Some(event) = recorded(state, writes, &key) {
        return replay_usage(event, hash);
    }
    let tokens = (req.prompt_tokens, req.completion_tokens);
    let (cost, project_id) = price_request(
        state,
        req.workspace_id,
        &req.model_id,
        &req.project,
        req.user_id,
        tokens,
    )?;
    admit(state, req.workspace_id, project_id, cost, now)?;
    let event = usage_events::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: req.model_id.clone(),
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: 0,
        request_id: req.request_id.clone(),
        request_hash: hash.to_owned(),
        reservation_id: None,
        ledger_transaction_id: None,
        created_at: now,
    };
    // Admitted: the checked moves below cannot fail short of a corrupt row, and if
    // one did, the batch fails as a whole and writes nothing.
    let debit = cost.checked_neg()?;
    let balance_after = charge_workspace(
        state,
        req.workspace_id,
        debit,
        Credits::ZERO,
        (BalanceChangeCause::Usage, now),
    )?;
    charge_project(state, project_id, cost, Credits::ZERO, now)?;
    record(writes, key, event.clone(), cost, balance_after, now)?;
    Ok(Recorded {
        event,
        replayed: false,
    })
}

fn judge_reserve(
    state: &mut State,
    writes: &mut Writes,
    req: &ReserveRequest,
    hash: &str,
    now: DateTime<Utc>,
) -> Result<reservation_rows::Model> {
    let key = (req.workspace_id, req.request_id.clone());
    let earlier = writes
        .reserved
        .get(&key)
        .and_then(|i| writes.new_reservations.get(*i))
        .or_else(|| state.used_reserve.get(&key));
    if let Some(r) = earlier {
        return if r.request_hash == hash {
            Ok(r.clone())
        } else {
            Err(BillingError::IdempotencyConflict)
        };
    }
    // A request id already recorded as direct usage cannot be held and settled again.
    if recorded(state, writes, &key).is_some() {
        return Err(BillingError::IdempotencyConflict);
    }
    let tokens = (req.max_prompt_tokens, req.max_completion_tokens);
    let (hold, project_id) = price_request(
        state,
        req.workspace_id,
        &req.model_id,
        &req.project,
        req.user_id,
        tokens,
    )?;
    admit(state, req.workspace_id, project_id, hold, now)?;
    let expires_at = now
        .checked_add_signed(Duration::seconds(req.ttl_seconds))
        .ok_or_else(|| BillingError::invalid("ttlSeconds is out of range"))?;
    charge_workspace(
        state,
        req.workspace_id,
        Credits::ZERO,
        hold,
        (BalanceChangeCause::Reservation, now),
    )?;
    charge_project(state, project_id, Credits::ZERO, hold, now)?;
    let reservation = reservation_rows::Model {
        id: new_id(),
        workspace_id: req.workspace_id,
        project_id,
        user_id: req.user_id,
        api_key_id: req.api_key_id,
        model_id: req.model_id.clone(),
        request_id: req.request_id.clone(),
        request_hash: hash.to_owned(),
        amount_nanos: hold.nanos(),
        status: ReservationStatus::Held,
        expires_at,
        usage_event_id: None,
        created_at: now,
        resolved_at: None,
    };
    writes.reserved.insert(key, writes.new_reservations.len());
    writes.new_reservations.push(reservation.clone());
    Ok(reservation)
}

/// A settlement of a reservation no longer HELD or EXPIRED: the replay of its
/// settlement, IDEMPOTENCY_CONFLICT for other counts, INVALID_INPUT if released.
fn settled_replay(
    state: &State,
    writes: &Writes,
    reservation: &reservation_rows::Model,
    hash: &str,
) -> Result<Settled> {
    let key = (reservation.workspace_id, reservation.request_id.clone());
    match (reservation.status, recorded(state, writes, &key)) {
        (ReservationStatus::Settled, Some(event)) => {
            let replayed = replay_usage(event, hash)?;
            Ok(Settled {
                event: replayed.event,
                reservation: reservation.clone(),
                replayed: true,
            })
        }
        (ReservationStatus::Settled, None) => Err(BillingError::Internal(
            "settled reservation without usage event".into(),
        )),
        (status, _) => Err(BillingError::invalid(format!(
            "reservation is {}; only a HELD reservation can be settled",
            status.as_str()
        ))),
    }
}

fn judge_settle(
    state: &mut State,
    writes: &mut Writes,
    req: &SettleRequest,
    now: DateTime<Utc>,
) -> Result<Settled> {
    let reservation = state
        .reservations
        .get(&req.reservation_id)
        .ok_or(BillingError::NotFound("reservation"))?
        .clone();
    let hash = settle_hash(&reservation, req.prompt_tokens, req.completion_tokens);
    let from = reservation.status;
    if !matches!(from, ReservationStatus::Held | ReservationStatus::Expired) {
        return settled_replay(state, writes, &reservation, &hash);
    }
    let key = (reservation.workspace_id, reservation.request_id.clone());
    if recorded(state, writes, &key).is_some() {
        // The request id was already used by a direct recordUsage.
        return Err(BillingError::IdempotencyConflict);
    }
    // The model may have been retired since the hold; it is still priced.
    let model = state
        .models
        .get(&reservation.model_id)
        .ok_or(BillingError::NotFound("model"))?;
    let discount = discount_of(state, reservation.workspace_id)?;
    let cost = pricing::usage_cost(
        price_of(model),
        req.prompt_tokens,
        req.completion_tokens,
        discount,
    )?
    .total;
    // An EXPIRED hold was already given back.
    let hold = match from {
        ReservationStatus::Held => Credits::from_nanos(reservation.amount_nanos),
        _ => Credits::ZERO,
    };
    settle_charge(
        state,
        writes,
        reservation,
        (req, hash, cost, hold, from),
        now,
    )
}

/// Frees the hold, then charges what is available: the cost, or all that is left,
/// with the rest recorded as shortfall.
fn settle_charge(
    state: &mut State,
    writes: &mut Writes,
    reservation: reservation_rows::Model,
    (req, hash, cost, hold, from): (&SettleRequest, String, Credits, Credits, ReservationStatus),
    now: DateTime<Utc>,
) -> Result<Settled> {
    let ws_id = reservation.workspace_id;
    let freed = hold.checked_neg()?;
    charge_workspace(
        state,
        ws_id,
        Credits::ZERO,
        freed,
        (BalanceChangeCause::Usage, now),
    )?;
    let available = state
        .workspaces
        .get(&ws_id)
        .map(|w| ledger::available(&w.row))
        .ok_or(BillingError::NotFound("workspace"))?;
    let charge = cost.min(available.max(Credits::ZERO));
    let shortfall = cost.checked_sub(charge)?;
    let debit = charge.checked_neg()?;
    let balance_after = charge_workspace(
        state,
        ws_id,
        debit,
        Credits::ZERO,
        (BalanceChangeCause::Usage, now),
    )?;
    charge_project(state, reservation.project_id, cost, freed, now)?;
    let event_id = new_id();
    let resolved = reservation_rows::Model {
        status: ReservationStatus::Settled,
        usage_event_id: Some(event_id),
        resolved_at: Some(now),
        ..reservation
    };
    let event = usage_events::Model {
        id: event_id,
        workspace_id: ws_id,
        project_id: resolved.project_id,
        user_id: resolved.user_id,
        api_key_id: resolved.api_key_id,
        model_id: resolved.model_id.clone(),
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
        cost_nanos: cost.nanos(),
        shortfall_nanos: shortfall.nanos(),
        request_id: resolved.request_id.clone(),
        request_hash: hash,
        reservation_id: Some(resolved.id),
        ledger_transaction_id: None,
        created_at: now,
    };
    let key = (ws_id, resolved.request_id.clone());
    record(writes, key, event.clone(), charge, balance_after, now)?;
    state.reservations.insert(resolved.id, resolved.clone());
    writes.resolved_reservations.push((resolved.clone(), from));
    Ok(Settled {
        event,
        reservation: resolved,
        replayed: false,
    })
}

/// HELD → `to` (RELEASED or EXPIRED), giving the hold back. A reservation already
/// released or expired is answered unchanged; releasing a settled one is
/// INVALID_INPUT, while expiring it (the sweep raced a settlement) leaves it be.
fn judge_release(
    state: &mut State,
    writes: &mut Writes,
    reservation_id: Uuid,
    to: ReservationStatus,
    now: DateTime<Utc>,
) -> Result<reservation_rows::Model> {
    let reservation = state
        .reservations
        .get(&reservation_id)
        .ok_or(BillingError::NotFound("reservation"))?;
    match reservation.status {
        ReservationStatus::Held => {}
        ReservationStatus::Released | ReservationStatus::Expired => return Ok(reservation.clone()),
        ReservationStatus::Settled if to == ReservationStatus::Expired => {
            return Ok(reservation.clone());
        }
        ReservationStatus::Settled => {
            return Err(BillingError::invalid("reservation is already settled"));
        }
    }
    let resolved = reservation_rows::Model {
        status: to,
        resolved_at: Some(now),
        ..reservation.clone()
    };
    let freed = Credits::from_nanos(resolved.amount_nanos).checked_neg()?;
    let ws_id = resolved.workspace_id;
    charge_workspace(
        state,
        ws_id,
        Credits::ZERO,
        freed,
        (BalanceChangeCause::Release, now),
    )?;
    charge_project(state, resolved.project_id, Credits::ZERO, freed, now)?;
    state.reservations.insert(resolved.id, resolved.clone());
    writes
        .resolved_reservations
        .push((resolved.clone(), ReservationStatus::Held));
    Ok(resolved)
}
