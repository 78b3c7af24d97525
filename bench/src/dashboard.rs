//! `seed-dashboard`: an account with history to read, written through the domain so
//! the ledger stays consistent; and the dashboard query the `dashboard` scenario runs.

use crate::fixtures::{self, PURCHASE_MAX_CREDITS};
use anyhow::Context;
use billing::Credits;
use billing::debits::usage::{ProjectRef, UsageRequest};
use billing::debits::writer::{DebitWriter, WriterConfig};
use billing::entity::enums::{BudgetPeriod, WorkspaceRole};
use billing::sea_orm::DatabaseConnection;
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::path::Path;
use uuid::Uuid;

/// A dashboard's page: balances, members, budgets, spend and three usage breakdowns
/// (by project, by member, by model: one chart each) for every workspace of the account.
pub const DASHBOARD: &str = r#"
query($id: ID!, $from: DateTime!, $to: DateTime!) {
  account(id: $id) {
    name totalBalance
    members { user { email } role }
    workspaces {
      id name balance reserved available
      members { user { name } role }
      projects { tag budget { limit spent remaining resetsAt } }
      spend { averageDailySpend(days: 7) projectedDepletionAt }
      byProject: usage(from: $from, to: $to, groupBy: [PROJECT]) {
        requests cost
        rows { project { tag } requests cost }
      }
      byMember: usage(from: $from, to: $to, groupBy: [MEMBER]) {
        rows { user { email } requests cost }
      }
      byModel: usage(from: $from, to: $to, groupBy: [MODEL]) {
        rows { model { id name } requests cost }
      }
    }
  }
}"#;

/// Where `seed-dashboard` leaves its output and `run --scenario dashboard` looks for
/// it when `--account-id`/`--token` are not given: the current directory.
pub const SEED_FILE: &str = "bench-dashboard.json";

const WORKSPACES: usize = 4;
const PROJECTS: usize = 5;
const MEMBERS: usize = 5;
/// Usage records in flight at once while seeding.
/// Events in flight while seeding: enough to fill the writer's batches.
const SEED_IN_FLIGHT: usize = 2_048;
const PROGRESS_EVERY: u64 = 100_000;
/// Token ranges of seeded events.
const PROMPT_TOKENS: (i64, i64) = (100, 1_500);
const COMPLETION_TOKENS: (i64, i64) = (20, 500);
/// Project budgets (monthly), so the dashboard's budget fields have a limit.
const BUDGET_CREDITS: i64 = 1_000_000;

#[derive(Debug, Serialize, Deserialize)]
pub struct Seeded {
    pub account_id: Uuid,
    /// The owner's user token (`rsv_u_…`).
    pub token: String,
    pub database: String,
    pub workspaces: usize,
    pub projects: usize,
    pub members: usize,
    pub events: u64,
    pub days: u32,
    pub seconds: f64,
}

impl Seeded {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {} (run `reservoir-bench seed-dashboard` first, or pass --account-id and --token)",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// SplitMix64 over the event index: the same seed gives the same events.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick(r: u64, n: usize) -> usize {
    (r % n as u64) as usize
}

fn in_range(r: u64, (lo, hi): (i64, i64)) -> i64 {
    lo + (r % (hi - lo + 1) as u64) as i64
}

struct Layout {
    workspaces: Vec<(Uuid, Vec<Uuid>)>,
    users: Vec<Uuid>,
    models: Vec<String>,
}

pub async fn seed(
    db: &DatabaseConnection,
    database: &str,
    events: u64,
    days: u32,
) -> anyhow::Result<Seeded> {
    anyhow::ensure!(days >= 1, "--days must be at least 1");
    let started = std::time::Instant::now();
    let now = Utc::now();
    let begin = now - Duration::days(i64::from(days));
    let models = fixtures::active_models(db).await?;
    let tag = Uuid::new_v4().simple().to_string();
    let created = billing::accounts::create_account(
        db,
        &format!("bench dashboard {}", now.format("%Y-%m-%d %H:%M:%S")),
        &format!("owner-{tag}@bench.example"),
        "Dashboard Owner",
        begin,
    )
    .await?;

    // Worst case per event (the dearest model at the largest token counts), so no
    // workspace can run out whatever the draw.
    let worst_nanos = models
        .iter()
        .map(|m| {
            (i128::from(m.prompt_price_per_million_nanos) * i128::from(PROMPT_TOKENS.1)
                + i128::from(m.completion_price_per_million_nanos)
                    * i128::from(COMPLETION_TOKENS.1))
                / 1_000_000
                + 1
        })
        .max()
        .unwrap_or(1);
    let per_workspace = i128::from(events) / WORKSPACES as i128 + 1_000;
    let needed = worst_nanos * per_workspace * 5 / 4;
    let purchase = i128::from(PURCHASE_MAX_CREDITS) * 1_000_000_000;
    let purchases = ((needed + purchase - 1) / purchase).max(1);

    let mut layout = Layout {
        workspaces: Vec::new(),
        users: vec![created.owner.id],
        models: models.into_iter().map(|m| m.id).collect(),
    };
    for w in 0..WORKSPACES {
        let ws = billing::accounts::create_workspace(
            db,
            created.account.id,
            &format!("Workspace {}", w + 1),
            begin,
        )
        .await?;
        for _ in 0..purchases {
            fixtures::fund(
                db,
                ws.id,
                Credits::from_whole_credits(PURCHASE_MAX_CREDITS)?,
                begin,
            )
            .await?;
        }
        let mut projects = Vec::new();
        for p in 0..PROJECTS {
            let project = billing::accounts::create_project(
                db,
                ws.id,
                &format!("Project {}", p + 1),
                &format!("p{}", p + 1),
                begin,
            )
            .await?;
            billing::accounts::set_project_budget(
                db,
                project.id,
                Some(Credits::from_whole_credits(BUDGET_CREDITS)?),
                BudgetPeriod::Monthly,
                begin,
            )
            .await?;
            projects.push(project.id);
        }
        for m in 0..MEMBERS {
            let (user, _) = billing::accounts::add_workspace_member(
                db,
                ws.id,
                &format!("m{}-{tag}@bench.example", m + 1),
                Some(&format!("Member {}", m + 1)),
                WorkspaceRole::Member,
                begin,
            )
            .await?;
            if w == 0 {
                layout.users.push(user.id);
            }
        }
        layout.workspaces.push((ws.id, projects));
    }
    eprintln!(
        "seed-dashboard: account {} with {WORKSPACES} workspaces × {PROJECTS} projects, {MEMBERS} members; recording {events} usage events over {days} days",
        created.account.id
    );

    let span_us = Duration::days(i64::from(days))
        .num_microseconds()
        .unwrap_or(i64::MAX);
    let layout = &layout;
    let writer = DebitWriter::start(
        db.clone(),
        WriterConfig::for_backend(db.get_database_backend()),
        None,
    )?;
    let writer = &writer;
    let mut done = 0u64;
    let mut results = futures::stream::iter(0..events)
        .map(|i| {
            // Spread evenly over [begin, now), in index order (so periods roll forward).
            let offset = i128::from(span_us) * i128::from(i) / i128::from(events.max(1));
            let at = begin + Duration::microseconds(i64::try_from(offset).unwrap_or(0));
            let req = event(layout, &tag, i);
            record(writer, req, at)
        })
        .buffer_unordered(SEED_IN_FLIGHT);
    while let Some(result) = results.next().await {
        result.with_context(|| format!("recording a seeded usage event (after {done})"))?;
        done += 1;
        if done.is_multiple_of(PROGRESS_EVERY) {
            let s = started.elapsed().as_secs_f64();
            eprintln!(
                "seed-dashboard: {done}/{events} events, {s:.0} s, {:.0}/s",
                done as f64 / s
            );
        }
    }
    Ok(Seeded {
        account_id: created.account.id,
        token: created.owner_token,
        database: fixtures::redact(database),
        workspaces: WORKSPACES,
        projects: WORKSPACES * PROJECTS,
        members: MEMBERS,
        events,
        days,
        seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

fn event(layout: &Layout, tag: &str, i: u64) -> UsageRequest {
    let r = mix(i);
    let (workspace_id, projects) = &layout.workspaces[pick(r, layout.workspaces.len())];
    let r2 = mix(r);
    UsageRequest {
        workspace_id: *workspace_id,
        project: ProjectRef::Id(projects[pick(r >> 16, projects.len())]),
        model_id: layout.models[pick(r >> 32, layout.models.len())].clone(),
        prompt_tokens: in_range(r2, PROMPT_TOKENS),
        completion_tokens: in_range(r2 >> 24, COMPLETION_TOKENS),
        request_id: format!("seed-{tag}-{i}"),
        user_id: Some(layout.users[pick(r2 >> 48, layout.users.len())]),
        api_key_id: None,
    }
}

/// One usage event at a past instant.
async fn record(writer: &DebitWriter, req: UsageRequest, at: DateTime<Utc>) -> anyhow::Result<()> {
    // Through the group-committed writer, as the API records usage: same ledger, same
    // rollups, so the invariants hold after seeding.
    writer.record_usage(req, at).await?;
    Ok(())
}

/// The dashboard request body for an account: the last 30 days of usage.
pub fn body(account_id: Uuid, now: DateTime<Utc>) -> anyhow::Result<String> {
    let from = now - Duration::days(30);
    Ok(serde_json::json!({
        "query": DASHBOARD,
        "variables": { "id": account_id.to_string(), "from": from.to_rfc3339(), "to": now.to_rfc3339() },
    })
    .to_string())
}
