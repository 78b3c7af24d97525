//! Who may do what, over real HTTP: a role matrix (every caller × every mutation class
//! and the guarded reads) and a cross-account probe of every top-level id argument.
//!
//! The rules (billing::accounts::access and the resolvers): account OWNER/ADMIN are admins of
//! every workspace of their account; a workspace API key records usage, reserves,
//! settles and reads its own workspace, nothing else; the platform admin token may do
//! everything and alone may create accounts, set pricing agreements, mark invoices paid
//! and edit the model catalog. Anything the caller cannot see (another account, a
//! workspace of their account they do not belong to) is NOT_FOUND; a weaker role on
//! something the caller can see is FORBIDDEN. A refusal writes nothing.
#![allow(
    clippy::too_many_lines,
    reason = "test code: a test and its fixtures read as one scenario, top to bottom"
)]

use billing::Credits;
use billing::accounts;
use billing::debits::reservations::{self, ReserveRequest};
use billing::debits::usage::{self, ProjectRef, UsageRequest};
use billing::entity::enums::{AccountRole, WorkspaceRole};
use billing::entity::{self, account_members, users};
use billing::payments::purchases::{self, PurchaseCreditsRequest, PurchaseItem};
use billing::payments::{self, SandboxGateway};
use billing::sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter,
};
use billing::transfers::{self, TransferRequest};
use chrono::Utc;
use reservoir_tests::app::{ADMIN_TOKEN, App};
use reservoir_tests::{Fixture, TEST_MODEL, TestDb, fund, money_row_counts};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

// --- outcomes -------------------------------------------------------------------------

const OK: &str = "ok";
const NULL: &str = "null";
const F: &str = "FORBIDDEN";
const N: &str = "NOT_FOUND";
const INV: &str = "INVALID_INPUT";

/// What a response says about `field`: the first error's code, `null` when the field is
/// null without an error, the first item's `errorCode` for a batch, else `ok`.
fn outcome(response: &Value, field: &str) -> String {
    if let Some(errors) = response["errors"].as_array()
        && !errors.is_empty()
    {
        return errors[0]["extensions"]["code"]
            .as_str()
            .unwrap_or("ERROR WITHOUT A CODE")
            .to_owned();
    }
    let data = &response["data"][field];
    if data.is_null() {
        return NULL.to_owned();
    }
    if let Some(code) = data[0]["errorCode"].as_str() {
        return code.to_owned();
    }
    OK.to_owned()
}

/// Authentication stamps `last_used_at` on the credential it used (at most once a
/// minute): bookkeeping of the call itself, not something the call changed.
fn mask_last_used(row: String) -> String {
    match row.find("last_used_at: ") {
        Some(start) => {
            let rest = &row[start..];
            let end = rest.find(", ").map_or(row.len(), |i| start + i);
            format!("{}{}", &row[..start], &row[end..])
        }
        None => row,
    }
}

/// Every row of every table, formatted and sorted: equal snapshots mean nothing was
/// written anywhere.
type Snapshot = Vec<(&'static str, Vec<String>)>;

macro_rules! dump_tables {
    ($db:expr, $($table:ident),+ $(,)?) => {{
        let mut out: Snapshot = Vec::new();
        $(
            let mut rows: Vec<String> = entity::$table::Entity::find()
                .all($db)
                .await?
                .iter()
                .map(|r| mask_last_used(format!("{r:?}")))
                .collect();
            rows.sort();
            out.push((stringify!($table), rows));
        )+
        out
    }};
}

async fn snapshot(db: &DatabaseConnection) -> anyhow::Result<Snapshot> {
    Ok(dump_tables!(
        db,
        accounts,
        users,
        account_members,
        user_tokens,
        workspaces,
        workspace_members,
        projects,
        api_keys,
        payment_methods,
        purchases,
        invoices,
        invoice_lines,
        ledger_transactions,
        ledger_entries,
        usage_events,
        usage_daily,
        reservations,
        transfers,
        auto_reload_settings,
        alert_thresholds,
        alert_recipients,
        balance_events,
        notifications,
        models,
        credit_packages,
    ))
}

/// The tables whose rows differ between two snapshots.
fn changed_tables(before: &Snapshot, after: &Snapshot) -> Vec<&'static str> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b != a)
        .map(|(b, _)| b.0)
        .collect()
}

// --- shared setup ---------------------------------------------------------------------

fn fresh_id() -> String {
    Uuid::now_v7().simple().to_string()
}

/// A user who belongs to the account with this role and to none of its workspaces.
async fn account_user(
    db: &DatabaseConnection,
    account_id: Uuid,
    email: &str,
    role: AccountRole,
) -> anyhow::Result<Uuid> {
    let now = Utc::now();
    let id = Uuid::now_v7();
    users::Entity::insert(users::ActiveModel {
        id: Set(id),
        email: Set(email.to_owned()),
        name: Set(email.split('@').next().unwrap_or("user").to_owned()),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    account_members::Entity::insert(account_members::ActiveModel {
        account_id: Set(account_id),
        user_id: Set(id),
        role: Set(role),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    Ok(id)
}

async fn set_verified(db: &DatabaseConnection, account_id: Uuid) -> anyhow::Result<()> {
    let account = entity::accounts::Entity::find_by_id(account_id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no account {account_id}"))?;
    let mut active = account.into_active_model();
    active.verified = Set(true);
    active.update(db).await?;
    Ok(())
}

/// An OPEN invoice: a package bought by invoice (the account must be verified).
async fn open_invoice(db: &DatabaseConnection, workspace_id: Uuid) -> anyhow::Result<Uuid> {
    let bought = purchases::purchase_credits(
        db,
        PurchaseCreditsRequest {
            workspace_id,
            item: PurchaseItem::Package("pkg_10".into()),
            payment_method_id: None,
            pay_by_invoice: true,
            idempotency_key: format!("invoice-{}", fresh_id()),
            created_by_user_id: None,
        },
        Utc::now(),
    )
    .await?;
    bought
        .purchase
        .invoice_id
        .ok_or_else(|| anyhow::anyhow!("an invoice purchase without an invoice"))
}

/// A HELD reservation in the workspace.
async fn hold(db: &DatabaseConnection, workspace_id: Uuid) -> anyhow::Result<Uuid> {
    let reservation = reservations::reserve(
        db,
        ReserveRequest {
            workspace_id,
            project: ProjectRef::None,
            model_id: TEST_MODEL.into(),
            max_prompt_tokens: 10,
            max_completion_tokens: 10,
            request_id: format!("hold-{}", fresh_id()),
            ttl_seconds: 600,
            user_id: None,
            api_key_id: None,
        },
        Utc::now(),
    )
    .await?;
    Ok(reservation.id)
}

// --- the role matrix ------------------------------------------------------------------

/// The callers of the matrix, in the column order of the expectation tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Who {
    /// The platform admin token.
    Platform,
    /// The account's OWNER.
    Owner,
    /// An account ADMIN in no workspace.
    AcctAdmin,
    /// An account MEMBER in no workspace.
    AcctMember,
    /// Workspace A's ADMIN (an account MEMBER).
    AAdmin,
    /// Workspace A's MEMBER.
    AMember,
    /// Workspace A's VIEWER.
    AViewer,
    /// A MEMBER of workspace B only.
    BMember,
    /// ADMIN of both A and B (an account MEMBER).
    AbAdmin,
    /// An API key of workspace A.
    KeyA,
    /// An API key of workspace B.
    KeyB,
    /// The OWNER of another account.
    Stranger,
}

const WHO: [Who; 12] = [
    Who::Platform,
    Who::Owner,
    Who::AcctAdmin,
    Who::AcctMember,
    Who::AAdmin,
    Who::AMember,
    Who::AViewer,
    Who::BMember,
    Who::AbAdmin,
    Who::KeyA,
    Who::KeyB,
    Who::Stranger,
];

// Columns: platform, owner, acct admin, acct member, A admin, A member, A viewer,
// B member, A+B admin, key A, key B, stranger.
/// Account OWNER/ADMIN: createWorkspace, addPaymentMethod, removePaymentMethod.
const ACCOUNT_ADMIN: [&str; 12] = [OK, OK, OK, F, F, F, F, F, F, N, N, N];
/// ADMIN of workspace A (an account MEMBER outside A cannot see it: NOT_FOUND).
const WORKSPACE_ADMIN: [&str; 12] = [OK, OK, OK, N, OK, F, F, N, OK, F, N, N];
/// ADMIN of both workspaces (transfer A → B).
const BOTH_ADMIN: [&str; 12] = [OK, OK, OK, N, N, F, F, N, OK, F, N, N];
/// Usage in workspace A: its API key, its MEMBERs and ADMINs, not its VIEWERs.
const USAGE: [&str; 12] = [OK, OK, OK, N, OK, OK, F, N, OK, OK, N, N];
/// Usage without a workspaceId: only an API key (its own workspace).
const OWN_WORKSPACE_USAGE: [&str; 12] = [INV, INV, INV, INV, INV, INV, INV, INV, INV, OK, OK, INV];
/// A token for workspace A's MEMBER: themself or an account OWNER/ADMIN.
const TOKEN_FOR_MEMBER: [&str; 12] = [OK, OK, OK, F, F, OK, F, F, F, N, N, N];
/// A token for oneself (the platform admin and keys ask for A's MEMBER).
const TOKEN_FOR_SELF: [&str; 12] = [OK, OK, OK, OK, OK, OK, OK, OK, OK, N, N, OK];
/// Platform admin only.
const PLATFORM_ONLY: [&str; 12] = [OK, F, F, F, F, F, F, F, F, F, F, F];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    CreateWorkspace,
    AddPaymentMethod,
    RemovePaymentMethod,
    CreateProject,
    AddWorkspaceMember,
    CreateApiKey,
    RevokeApiKey,
    PurchaseCredits,
    SetProjectBudget,
    ConfigureAutoReload,
    SetAlertThresholds,
    TransferCredits,
    RecordUsage,
    RecordUsageBatch,
    ReserveCredits,
    SettleReservation,
    ReleaseReservation,
    RecordUsageOwnWorkspace,
    CreateUserTokenForMember,
    CreateUserTokenForSelf,
    CreateAccount,
    SetPricingAgreement,
    MarkInvoicePaid,
    UpsertModel,
}

const MATRIX: &[(Op, [&str; 12])] = &[
    (Op::CreateWorkspace, ACCOUNT_ADMIN),
    (Op::AddPaymentMethod, ACCOUNT_ADMIN),
    (Op::RemovePaymentMethod, ACCOUNT_ADMIN),
    (Op::CreateProject, WORKSPACE_ADMIN),
    (Op::AddWorkspaceMember, WORKSPACE_ADMIN),
    (Op::CreateApiKey, WORKSPACE_ADMIN),
    (Op::RevokeApiKey, WORKSPACE_ADMIN),
    (Op::PurchaseCredits, WORKSPACE_ADMIN),
    (Op::SetProjectBudget, WORKSPACE_ADMIN),
    (Op::ConfigureAutoReload, WORKSPACE_ADMIN),
    (Op::SetAlertThresholds, WORKSPACE_ADMIN),
    (Op::TransferCredits, BOTH_ADMIN),
    (Op::RecordUsage, USAGE),
    (Op::RecordUsageBatch, USAGE),
    (Op::ReserveCredits, USAGE),
    (Op::SettleReservation, USAGE),
    (Op::ReleaseReservation, USAGE),
    (Op::RecordUsageOwnWorkspace, OWN_WORKSPACE_USAGE),
    (Op::CreateUserTokenForMember, TOKEN_FOR_MEMBER),
    (Op::CreateUserTokenForSelf, TOKEN_FOR_SELF),
    (Op::CreateAccount, PLATFORM_ONLY),
    (Op::SetPricingAgreement, PLATFORM_ONLY),
    (Op::MarkInvoicePaid, PLATFORM_ONLY),
    (Op::UpsertModel, PLATFORM_ONLY),
];

/// What to undo after a call, so that cards do not pile up to the account's limit.
enum Cleanup {
    None,
    RemoveCard(Uuid),
    RemoveReturnedCard,
}

struct Call {
    field: &'static str,
    query: &'static str,
    vars: Value,
    cleanup: Cleanup,
}

fn call(field: &'static str, query: &'static str, vars: Value) -> Call {
    Call {
        field,
        query,
        vars,
        cleanup: Cleanup::None,
    }
}

/// One account (OWNER, account ADMIN and MEMBER), workspaces A and B funded, workspace
/// members of every role, an API key of each workspace, and a stranger account.
struct Roles {
    t: TestDb,
    app: App,
    gw: SandboxGateway,
    account: Uuid,
    ws_a: Uuid,
    ws_b: Uuid,
    project_a: Uuid,
    owner: Uuid,
    stranger_account: Uuid,
    stranger_ws: Uuid,
    tokens: HashMap<Who, String>,
    users: HashMap<Who, Uuid>,
    seq: AtomicU64,
}

impl Roles {
    async fn new() -> anyhow::Result<Self> {
        let t = TestDb::new().await?;
        let db = &t.db;
        let now = Utc::now();
        let f = Fixture::new(db, now).await?;
        fund(db, f.ws_a, "1000", now).await?;
        fund(db, f.ws_b, "1000", now).await?;
        set_verified(db, f.account_id).await?;
        let gw = SandboxGateway::new();
        payments::cards::add_payment_method(db, &gw, f.account_id, "tok_visa", true, now).await?;
        let project_a = accounts::create_project(db, f.ws_a, "Alpha", "alpha", now)
            .await?
            .id;

        let mut users = HashMap::new();
        users.insert(Who::Owner, f.owner_id);
        users.insert(
            Who::AcctAdmin,
            account_user(
                db,
                f.account_id,
                "acct-admin@roles.example",
                AccountRole::Admin,
            )
            .await?,
        );
        users.insert(
            Who::AcctMember,
            account_user(
                db,
                f.account_id,
                "acct-member@roles.example",
                AccountRole::Member,
            )
            .await?,
        );
        for (who, ws, email, role) in [
            (
                Who::AAdmin,
                f.ws_a,
                "a-admin@roles.example",
                WorkspaceRole::Admin,
            ),
            (
                Who::AMember,
                f.ws_a,
                "a-member@roles.example",
                WorkspaceRole::Member,
            ),
            (
                Who::AViewer,
                f.ws_a,
                "a-viewer@roles.example",
                WorkspaceRole::Viewer,
            ),
            (
                Who::BMember,
                f.ws_b,
                "b-member@roles.example",
                WorkspaceRole::Member,
            ),
            (
                Who::AbAdmin,
                f.ws_a,
                "ab-admin@roles.example",
                WorkspaceRole::Admin,
            ),
            (
                Who::AbAdmin,
                f.ws_b,
                "ab-admin@roles.example",
                WorkspaceRole::Admin,
            ),
        ] {
            let (user, _) = accounts::add_workspace_member(db, ws, email, None, role, now).await?;
            users.insert(who, user.id);
        }
        let stranger =
            accounts::create_account(db, "Stranger Co", "stranger@roles.example", "Stranger", now)
                .await?;
        let stranger_ws = accounts::create_workspace(db, stranger.account.id, "S", now).await?;
        users.insert(Who::Stranger, stranger.owner.id);

        let mut tokens = HashMap::new();
        tokens.insert(Who::Platform, ADMIN_TOKEN.to_owned());
        for (who, user) in &users {
            tokens.insert(
                *who,
                accounts::create_user_token(db, *user, "roles", now).await?,
            );
        }
        let key_a = accounts::create_api_key(db, f.ws_a, "key a", None, now).await?;
        let key_b = accounts::create_api_key(db, f.ws_b, "key b", None, now).await?;
        tokens.insert(Who::KeyA, key_a.secret);
        tokens.insert(Who::KeyB, key_b.secret);

        let app = App::start(&t).await?;
        Ok(Self {
            app,
            gw,
            account: f.account_id,
            ws_a: f.ws_a,
            ws_b: f.ws_b,
            project_a,
            owner: f.owner_id,
            stranger_account: stranger.account.id,
            stranger_ws: stranger_ws.id,
            tokens,
            users,
            seq: AtomicU64::new(0),
            t,
        })
    }

    fn fresh(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.seq.fetch_add(1, Ordering::Relaxed))
    }

    fn token(&self, who: Who) -> anyhow::Result<&str> {
        self.tokens
            .get(&who)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("no token for {who:?}"))
    }

    fn user(&self, who: Who) -> anyhow::Result<Uuid> {
        self.users
            .get(&who)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no user for {who:?}"))
    }

    async fn gql(&self, who: Who, query: &str, vars: Value) -> anyhow::Result<Value> {
        self.app.gql(Some(self.token(who)?), query, vars).await
    }

    fn usage_input(&self, workspace_id: Option<Uuid>) -> Value {
        let mut input = json!({
            "modelId": TEST_MODEL,
            "promptTokens": 10,
            "completionTokens": 10,
            "requestId": self.fresh("req"),
        });
        if let Some(id) = workspace_id {
            input["workspaceId"] = json!(id.to_string());
        }
        input
    }

    /// The state a call needs (a card to remove, a key to revoke, a hold to settle, an
    /// invoice to pay), and the call itself with fresh names and keys.
    async fn prepare(&self, op: Op, who: Who) -> anyhow::Result<Call> {
        let db = &self.t.db;
        let now = Utc::now();
        let account = self.account.to_string();
        let a = self.ws_a.to_string();
        Ok(match op {
            Op::CreateWorkspace => call(
                "createWorkspace",
                "mutation($input: CreateWorkspaceInput!) { createWorkspace(input: $input) { id } }",
                json!({ "input": { "accountId": account, "name": self.fresh("ws") } }),
            ),
            Op::AddPaymentMethod => Call {
                cleanup: Cleanup::RemoveReturnedCard,
                ..call(
                    "addPaymentMethod",
                    "mutation($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id } }",
                    json!({ "input": { "accountId": account, "token": "tok_visa" } }),
                )
            },
            Op::RemovePaymentMethod => {
                let card = payments::cards::add_payment_method(
                    db,
                    &self.gw,
                    self.account,
                    "tok_visa",
                    false,
                    now,
                )
                .await?
                .id;
                Call {
                    cleanup: Cleanup::RemoveCard(card),
                    ..call(
                        "removePaymentMethod",
                        "mutation($id: ID!) { removePaymentMethod(id: $id) }",
                        json!({ "id": card.to_string() }),
                    )
                }
            }
            Op::CreateProject => {
                let tag = self.fresh("p");
                call(
                    "createProject",
                    "mutation($input: CreateProjectInput!) { createProject(input: $input) { id } }",
                    json!({ "input": { "workspaceId": a, "name": tag, "tag": tag } }),
                )
            }
            Op::AddWorkspaceMember => call(
                "addWorkspaceMember",
                "mutation($input: AddWorkspaceMemberInput!) { addWorkspaceMember(input: $input) { role } }",
                json!({ "input": {
                    "workspaceId": a,
                    "email": format!("{}@roles.example", self.fresh("invitee")),
                    "role": "VIEWER",
                } }),
            ),
            Op::CreateApiKey => call(
                "createApiKey",
                "mutation($input: CreateApiKeyInput!) { createApiKey(input: $input) { secret } }",
                json!({ "input": { "workspaceId": a, "name": self.fresh("key") } }),
            ),
            Op::RevokeApiKey => {
                let key = accounts::create_api_key(db, self.ws_a, &self.fresh("victim"), None, now)
                    .await?
                    .api_key
                    .id;
                call(
                    "revokeApiKey",
                    "mutation($id: ID!) { revokeApiKey(id: $id) { revokedAt } }",
                    json!({ "id": key.to_string() }),
                )
            }
            Op::PurchaseCredits => call(
                "purchaseCredits",
                "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { status } }",
                json!({ "input": {
                    "workspaceId": a,
                    "packageId": "pkg_10",
                    "idempotencyKey": self.fresh("buy"),
                } }),
            ),
            Op::SetProjectBudget => call(
                "setProjectBudget",
                "mutation($input: SetProjectBudgetInput!) { setProjectBudget(input: $input) { id } }",
                json!({ "input": {
                    "projectId": self.project_a.to_string(),
                    "limit": "1000",
                    "period": "MONTHLY",
                } }),
            ),
            Op::ConfigureAutoReload => call(
                "configureAutoReload",
                "mutation($input: ConfigureAutoReloadInput!) { configureAutoReload(input: $input) { enabled } }",
                json!({ "input": {
                    "workspaceId": a,
                    "enabled": false,
                    "threshold": "1",
                    "amount": "10",
                } }),
            ),
            Op::SetAlertThresholds => call(
                "setAlertThresholds",
                "mutation($input: SetAlertThresholdsInput!) { setAlertThresholds(input: $input) { id } }",
                json!({ "input": {
                    "workspaceId": a,
                    "thresholds": [{
                        "amount": "1",
                        "severity": "WARNING",
                        "recipientIds": [self.owner.to_string()],
                    }],
                } }),
            ),
            Op::TransferCredits => call(
                "transferCredits",
                "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { id } }",
                json!({ "input": {
                    "fromWorkspaceId": a,
                    "toWorkspaceId": self.ws_b.to_string(),
                    "amount": "0.01",
                    "idempotencyKey": self.fresh("move"),
                } }),
            ),
            Op::RecordUsage => call(
                "recordUsage",
                "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
                json!({ "input": self.usage_input(Some(self.ws_a)) }),
            ),
            Op::RecordUsageBatch => call(
                "recordUsageBatch",
                "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { usage { id } errorCode } }",
                json!({ "inputs": [self.usage_input(Some(self.ws_a))] }),
            ),
            Op::ReserveCredits => call(
                "reserveCredits",
                "mutation($input: ReserveCreditsInput!) { reserveCredits(input: $input) { status } }",
                json!({ "input": {
                    "workspaceId": a,
                    "modelId": TEST_MODEL,
                    "maxPromptTokens": 10,
                    "maxCompletionTokens": 10,
                    "requestId": self.fresh("hold"),
                } }),
            ),
            Op::SettleReservation => {
                let id = hold(db, self.ws_a).await?;
                call(
                    "settleReservation",
                    "mutation($input: SettleReservationInput!) { settleReservation(input: $input) { id } }",
                    json!({ "input": {
                        "reservationId": id.to_string(),
                        "promptTokens": 5,
                        "completionTokens": 5,
                    } }),
                )
            }
            Op::ReleaseReservation => {
                let id = hold(db, self.ws_a).await?;
                call(
                    "releaseReservation",
                    "mutation($id: ID!) { releaseReservation(id: $id) { status } }",
                    json!({ "id": id.to_string() }),
                )
            }
            Op::RecordUsageOwnWorkspace => call(
                "recordUsage",
                "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
                json!({ "input": self.usage_input(None) }),
            ),
            Op::CreateUserTokenForMember | Op::CreateUserTokenForSelf => {
                let target = match (op, self.users.get(&who)) {
                    (Op::CreateUserTokenForSelf, Some(me)) => *me,
                    _ => self.user(Who::AMember)?,
                };
                call(
                    "createUserToken",
                    "mutation($input: CreateUserTokenInput!) { createUserToken(input: $input) { token } }",
                    json!({ "input": { "userId": target.to_string(), "name": self.fresh("token") } }),
                )
            }
            Op::CreateAccount => {
                let name = self.fresh("acct");
                call(
                    "createAccount",
                    "mutation($input: CreateAccountInput!) { createAccount(input: $input) { ownerToken } }",
                    json!({ "input": {
                        "name": name,
                        "ownerEmail": format!("{name}@roles.example"),
                        "ownerName": name,
                    } }),
                )
            }
            Op::SetPricingAgreement => call(
                "setPricingAgreement",
                "mutation($input: SetPricingAgreementInput!) { setPricingAgreement(input: $input) { id } }",
                json!({ "input": {
                    "accountId": account,
                    "verified": true,
                    "volumeDiscountPercent": "0",
                    "paymentTermsDays": 30,
                } }),
            ),
            Op::MarkInvoicePaid => {
                let invoice = open_invoice(db, self.ws_a).await?;
                call(
                    "markInvoicePaid",
                    "mutation($id: ID!) { markInvoicePaid(id: $id) { status } }",
                    json!({ "id": invoice.to_string() }),
                )
            }
            Op::UpsertModel => call(
                "upsertModel",
                "mutation($input: UpsertModelInput!) { upsertModel(input: $input) { id } }",
                json!({ "input": {
                    "id": format!("test/{}", self.fresh("model")),
                    "name": "Roles model",
                    "promptPricePerMillion": "1",
                    "completionPricePerMillion": "2",
                } }),
            ),
        })
    }

    async fn cleanup(&self, cleanup: Cleanup, call: &Call, response: &Value) -> anyhow::Result<()> {
        let card = match cleanup {
            Cleanup::None => None,
            Cleanup::RemoveCard(id) => Some(id),
            Cleanup::RemoveReturnedCard => response["data"][call.field]["id"]
                .as_str()
                .map(Uuid::parse_str)
                .transpose()?,
        };
        if let Some(card) = card {
            payments::cards::remove_payment_method(
                &self.t.db,
                &billing::payments::SandboxGateway::new(),
                card,
                Utc::now(),
            )
            .await?;
        }
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.app.stop().await;
        self.t.finish().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_exactly_its_rights_on_every_mutation() -> anyhow::Result<()> {
    let env = Roles::new().await?;
    let mut failures = Vec::new();
    for (op, expected) in MATRIX {
        for (who, expected) in WHO.iter().zip(expected) {
            let mut prepared = env.prepare(*op, *who).await?;
            let before = snapshot(&env.t.db).await?;
            let response = env.gql(*who, prepared.query, prepared.vars.take()).await?;
            let got = outcome(&response, prepared.field);
            if got != *expected {
                failures.push(format!(
                    "{op:?} by {who:?}: expected {expected}, got {got}: {response}"
                ));
            }
            if got != OK {
                let changed = changed_tables(&before, &snapshot(&env.t.db).await?);
                if !changed.is_empty() {
                    failures.push(format!(
                        "{op:?} by {who:?} was refused ({got}) but wrote to {changed:?}"
                    ));
                }
            }
            let cleanup = std::mem::replace(&mut prepared.cleanup, Cleanup::None);
            env.cleanup(cleanup, &prepared, &response).await?;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} calls broke the role rules:\n{}",
        failures.len(),
        MATRIX.len() * WHO.len(),
        failures.join("\n")
    );
    env.finish().await
}

#[derive(Clone, Copy, Debug)]
enum Read {
    Account,
    AccountMembers,
    PaymentMethods,
    Invoices,
    Workspace,
    Project,
    ApiKeys,
    WorkspaceAccount,
    WorkspaceMembers,
    WorkspaceProjects,
}

const READS: &[(Read, [&str; 12])] = &[
    // Columns: platform, owner, acct admin, acct member, A admin, A member, A viewer,
    // B member, A+B admin, key A, key B, stranger.
    (
        Read::Account,
        [OK, OK, OK, OK, OK, OK, OK, OK, OK, NULL, NULL, NULL],
    ),
    (
        Read::AccountMembers,
        [OK, OK, OK, OK, OK, OK, OK, OK, OK, NULL, NULL, NULL],
    ),
    (
        Read::PaymentMethods,
        [OK, OK, OK, F, F, F, F, F, F, NULL, NULL, NULL],
    ),
    (
        Read::Invoices,
        [OK, OK, OK, F, F, F, F, F, F, NULL, NULL, NULL],
    ),
    (
        Read::Workspace,
        [OK, OK, OK, NULL, OK, OK, OK, NULL, OK, OK, NULL, NULL],
    ),
    (
        Read::Project,
        [OK, OK, OK, NULL, OK, OK, OK, NULL, OK, OK, NULL, NULL],
    ),
    (
        Read::ApiKeys,
        [OK, OK, OK, NULL, OK, F, F, NULL, OK, F, NULL, NULL],
    ),
    (
        Read::WorkspaceAccount,
        [OK, OK, OK, NULL, OK, OK, OK, NULL, OK, F, NULL, NULL],
    ),
    (
        Read::WorkspaceMembers,
        [OK, OK, OK, NULL, OK, OK, OK, NULL, OK, F, NULL, NULL],
    ),
    (
        Read::WorkspaceProjects,
        [OK, OK, OK, NULL, OK, OK, OK, NULL, OK, OK, NULL, NULL],
    ),
];

impl Read {
    fn query(self) -> (&'static str, &'static str) {
        match self {
            Read::Account => (
                "account",
                "query($id: ID!) { account(id: $id) { id name totalBalance } }",
            ),
            Read::AccountMembers => (
                "account",
                "query($id: ID!) { account(id: $id) { members { role } } }",
            ),
            Read::PaymentMethods => (
                "account",
                "query($id: ID!) { account(id: $id) { paymentMethods { id last4 } } }",
            ),
            Read::Invoices => (
                "account",
                "query($id: ID!) { account(id: $id) { invoices { edges { node { id } } } } }",
            ),
            Read::Workspace => (
                "workspace",
                "query($id: ID!) { workspace(id: $id) { id balance available } }",
            ),
            Read::Project => ("project", "query($id: ID!) { project(id: $id) { id tag } }"),
            Read::ApiKeys => (
                "workspace",
                "query($id: ID!) { workspace(id: $id) { apiKeys { id } } }",
            ),
            Read::WorkspaceAccount => (
                "workspace",
                "query($id: ID!) { workspace(id: $id) { account { id } } }",
            ),
            Read::WorkspaceMembers => (
                "workspace",
                "query($id: ID!) { workspace(id: $id) { members { role } } }",
            ),
            Read::WorkspaceProjects => (
                "workspace",
                "query($id: ID!) { workspace(id: $id) { projects { tag } } }",
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_reads_follow_the_roles() -> anyhow::Result<()> {
    let env = Roles::new().await?;
    // An invoice, so that `invoices` has a row to hide.
    open_invoice(&env.t.db, env.ws_a).await?;
    let before = snapshot(&env.t.db).await?;
    let mut failures = Vec::new();
    for (read, expected) in READS {
        let (field, query) = read.query();
        let id = match field {
            "account" => env.account,
            "workspace" => env.ws_a,
            _ => env.project_a,
        };
        for (who, expected) in WHO.iter().zip(expected) {
            let response = env
                .gql(*who, query, json!({ "id": id.to_string() }))
                .await?;
            let got = outcome(&response, field);
            if got != *expected {
                failures.push(format!(
                    "{read:?} by {who:?}: expected {expected}, got {got}: {response}"
                ));
            }
        }
    }

    // viewer: who the caller is, and the accounts and workspaces it can see.
    let (account, a, b) = (
        env.account.to_string(),
        env.ws_a.to_string(),
        env.ws_b.to_string(),
    );
    let (stranger, stranger_ws) = (
        env.stranger_account.to_string(),
        env.stranger_ws.to_string(),
    );
    let ours = |workspaces: &[&String]| -> BTreeMap<String, BTreeSet<String>> {
        BTreeMap::from([(
            account.clone(),
            workspaces.iter().map(|w| (*w).clone()).collect(),
        )])
    };
    for who in WHO {
        let expected: BTreeMap<String, BTreeSet<String>> = match who {
            Who::Platform => {
                let mut all = ours(&[&a, &b]);
                all.insert(stranger.clone(), BTreeSet::from([stranger_ws.clone()]));
                all
            }
            Who::Owner | Who::AcctAdmin | Who::AbAdmin => ours(&[&a, &b]),
            Who::AcctMember => ours(&[]),
            Who::AAdmin | Who::AMember | Who::AViewer => ours(&[&a]),
            Who::BMember => ours(&[&b]),
            Who::KeyA | Who::KeyB => BTreeMap::new(),
            Who::Stranger => {
                BTreeMap::from([(stranger.clone(), BTreeSet::from([stranger_ws.clone()]))])
            }
        };
        let response = env
            .gql(
                who,
                "{ viewer { user { id } apiKey { workspace { id } } accounts { id workspaces { id } } } }",
                json!({}),
            )
            .await?;
        let viewer = &response["data"]["viewer"];
        let seen: BTreeMap<String, BTreeSet<String>> = viewer["accounts"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|acct| {
                let workspaces = acct["workspaces"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|w| w["id"].as_str().map(str::to_owned))
                    .collect();
                (
                    acct["id"].as_str().unwrap_or_default().to_owned(),
                    workspaces,
                )
            })
            .collect();
        if seen != expected || response.get("errors").is_some() {
            failures.push(format!(
                "viewer.accounts of {who:?}: expected {expected:?}, got {response}"
            ));
        }
        let user = viewer["user"]["id"].as_str().map(str::to_owned);
        let key_workspace = viewer["apiKey"]["workspace"]["id"]
            .as_str()
            .map(str::to_owned);
        let (expected_user, expected_key) = match who {
            Who::Platform => (None, None),
            Who::KeyA => (None, Some(a.clone())),
            Who::KeyB => (None, Some(b.clone())),
            _ => (Some(env.user(who)?.to_string()), None),
        };
        if user != expected_user || key_workspace != expected_key {
            failures.push(format!("viewer of {who:?}: {response}"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} reads broke the role rules:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        changed_tables(&before, &snapshot(&env.t.db).await?).is_empty(),
        "reads wrote something"
    );
    env.finish().await
}

// --- the cross-account probe ----------------------------------------------------------

/// Account 1 (the caller's: its OWNER's token, workspaces A and B, a project and a
/// card) and account 2 with one of everything: workspaces, a project, an API key, a
/// held reservation, usage, a card, an OPEN invoice and a transfer.
struct Cross {
    t: TestDb,
    app: App,
    owner1_token: String,
    ws_a: Uuid,
    project_a: Uuid,
    account2: Uuid,
    owner2: Uuid,
    w2: Uuid,
    w2b: Uuid,
    p2: Uuid,
    k2: Uuid,
    r2: Uuid,
    pm2: Uuid,
    inv2: Uuid,
}

impl Cross {
    async fn new() -> anyhow::Result<Self> {
        let t = TestDb::new().await?;
        let db = &t.db;
        let now = Utc::now();
        let gw = SandboxGateway::new();
        let f = Fixture::new(db, now).await?;
        fund(db, f.ws_a, "100", now).await?;
        let project_a = accounts::create_project(db, f.ws_a, "Alpha", "alpha", now)
            .await?
            .id;
        payments::cards::add_payment_method(db, &gw, f.account_id, "tok_visa", true, now).await?;
        let owner1_token = accounts::create_user_token(db, f.owner_id, "probe", now).await?;

        let other =
            accounts::create_account(db, "Other Co", "owner2@other.example", "Owner 2", now)
                .await?;
        let account2 = other.account.id;
        let w2 = accounts::create_workspace(db, account2, "W2", now)
            .await?
            .id;
        let w2b = accounts::create_workspace(db, account2, "W2b", now)
            .await?
            .id;
        let p2 = accounts::create_project(db, w2, "Secret", "secret", now)
            .await?
            .id;
        let k2 = accounts::create_api_key(db, w2, "their key", Some(p2), now)
            .await?
            .api_key
            .id;
        fund(db, w2, "100", now).await?;
        fund(db, w2b, "10", now).await?;
        usage::record_usage(
            db,
            UsageRequest {
                workspace_id: w2,
                project: ProjectRef::Id(p2),
                model_id: TEST_MODEL.into(),
                prompt_tokens: 1_000,
                completion_tokens: 500,
                request_id: "their-usage".into(),
                user_id: Some(other.owner.id),
                api_key_id: Some(k2),
            },
            now,
        )
        .await?;
        let r2 = hold(db, w2).await?;
        let pm2 = payments::cards::add_payment_method(db, &gw, account2, "tok_visa", true, now)
            .await?
            .id;
        set_verified(db, account2).await?;
        let inv2 = open_invoice(db, w2).await?;
        transfers::transfer(
            db,
            TransferRequest {
                from_workspace_id: w2,
                to_workspace_id: w2b,
                amount: Credits::parse("1")?,
                memo: Some("theirs".into()),
                idempotency_key: "their-transfer".into(),
                created_by_user_id: Some(other.owner.id),
            },
            now,
        )
        .await?;
        let app = App::start(&t).await?;
        Ok(Self {
            app,
            owner1_token,
            ws_a: f.ws_a,
            project_a,
            account2,
            owner2: other.owner.id,
            w2,
            w2b,
            p2,
            k2,
            r2,
            pm2,
            inv2,
            t,
        })
    }

    async fn gql(&self, query: &str, vars: Value) -> anyhow::Result<Value> {
        self.app.gql(Some(&self.owner1_token), query, vars).await
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.app.stop().await;
        self.t.finish().await
    }
}

/// One call that names an object of the other account: `vars` puts the given id where
/// that object's id goes (the other account's, an unknown one, or a malformed one).
struct Probe {
    name: &'static str,
    field: &'static str,
    query: &'static str,
    theirs: Uuid,
    vars: Box<dyn Fn(&str) -> Value>,
    expected: &'static str,
}

fn probe(
    name: &'static str,
    field: &'static str,
    query: &'static str,
    theirs: Uuid,
    expected: &'static str,
    vars: impl Fn(&str) -> Value + 'static,
) -> Probe {
    Probe {
        name,
        field,
        query,
        theirs,
        vars: Box::new(vars),
        expected,
    }
}

fn usage_item(workspace: &str, user: Option<&str>) -> Value {
    let mut item = json!({
        "workspaceId": workspace,
        "modelId": TEST_MODEL,
        "promptTokens": 10,
        "completionTokens": 10,
        "requestId": format!("probe-{}", fresh_id()),
    });
    if let Some(user) = user {
        item["userId"] = json!(user);
    }
    item
}

fn probes(x: &Cross) -> Vec<Probe> {
    let a = x.ws_a.to_string();
    let a1 = a.clone();
    let a2 = a.clone();
    let a3 = a.clone();
    let a4 = a.clone();
    let a5 = a.clone();
    let a6 = a.clone();
    let a7 = a.clone();
    let a8 = a.clone();
    vec![
        // Queries: null, like an unknown id.
        probe(
            "Query.account",
            "account",
            "query($id: ID!) { account(id: $id) { id name } }",
            x.account2,
            NULL,
            |id| json!({ "id": id }),
        ),
        probe(
            "Query.workspace",
            "workspace",
            "query($id: ID!) { workspace(id: $id) { id balance } }",
            x.w2,
            NULL,
            |id| json!({ "id": id }),
        ),
        probe(
            "Query.project",
            "project",
            "query($id: ID!) { project(id: $id) { id tag } }",
            x.p2,
            NULL,
            |id| json!({ "id": id }),
        ),
        probe(
            "Query.estimateCost(workspaceId)",
            "estimateCost",
            "query($id: ID!) { estimateCost(modelId: \"test/linear\", promptTokens: 1, completionTokens: 1, workspaceId: $id) { total affordable } }",
            x.w2,
            N,
            |id| json!({ "id": id }),
        ),
        // Mutations: NOT_FOUND.
        probe(
            "createUserToken(userId)",
            "createUserToken",
            "mutation($input: CreateUserTokenInput!) { createUserToken(input: $input) { token } }",
            x.owner2,
            N,
            |id| json!({ "input": { "userId": id, "name": "stolen" } }),
        ),
        probe(
            "createWorkspace(accountId)",
            "createWorkspace",
            "mutation($input: CreateWorkspaceInput!) { createWorkspace(input: $input) { id } }",
            x.account2,
            N,
            |id| json!({ "input": { "accountId": id, "name": format!("planted-{}", fresh_id()) } }),
        ),
        probe(
            "createProject(workspaceId)",
            "createProject",
            "mutation($input: CreateProjectInput!) { createProject(input: $input) { id } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "name": "Planted", "tag": format!("planted-{}", fresh_id()) } }),
        ),
        probe(
            "addWorkspaceMember(workspaceId)",
            "addWorkspaceMember",
            "mutation($input: AddWorkspaceMemberInput!) { addWorkspaceMember(input: $input) { role } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "email": "spy@test.example", "role": "ADMIN" } }),
        ),
        probe(
            "createApiKey(workspaceId)",
            "createApiKey",
            "mutation($input: CreateApiKeyInput!) { createApiKey(input: $input) { secret } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "name": "planted" } }),
        ),
        probe(
            "createApiKey(own workspace, their projectId)",
            "createApiKey",
            "mutation($input: CreateApiKeyInput!) { createApiKey(input: $input) { secret } }",
            x.p2,
            N,
            move |id| json!({ "input": { "workspaceId": a1, "name": "planted", "projectId": id } }),
        ),
        probe(
            "revokeApiKey(id)",
            "revokeApiKey",
            "mutation($id: ID!) { revokeApiKey(id: $id) { id } }",
            x.k2,
            N,
            |id| json!({ "id": id }),
        ),
        probe(
            "addPaymentMethod(accountId)",
            "addPaymentMethod",
            "mutation($input: AddPaymentMethodInput!) { addPaymentMethod(input: $input) { id } }",
            x.account2,
            N,
            |id| json!({ "input": { "accountId": id, "token": "tok_visa", "makeDefault": true } }),
        ),
        probe(
            "removePaymentMethod(id)",
            "removePaymentMethod",
            "mutation($id: ID!) { removePaymentMethod(id: $id) }",
            x.pm2,
            N,
            |id| json!({ "id": id }),
        ),
        probe(
            "purchaseCredits(workspaceId)",
            "purchaseCredits",
            "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { id } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "packageId": "pkg_10", "idempotencyKey": fresh_id() } }),
        ),
        probe(
            "purchaseCredits(own workspace, their paymentMethodId)",
            "purchaseCredits",
            "mutation($input: PurchaseCreditsInput!) { purchaseCredits(input: $input) { id } }",
            x.pm2,
            N,
            move |id| json!({ "input": { "workspaceId": a2, "packageId": "pkg_10", "paymentMethodId": id, "idempotencyKey": fresh_id() } }),
        ),
        probe(
            "recordUsage(workspaceId)",
            "recordUsage",
            "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
            x.w2,
            N,
            |id| json!({ "input": usage_item(id, None) }),
        ),
        probe(
            "recordUsage(own workspace, their userId)",
            "recordUsage",
            "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
            x.owner2,
            N,
            move |id| json!({ "input": usage_item(&a3, Some(id)) }),
        ),
        probe(
            "recordUsageBatch(workspaceId)",
            "recordUsageBatch",
            "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { usage { id } errorCode errorMessage } }",
            x.w2,
            N,
            |id| json!({ "inputs": [usage_item(id, None)] }),
        ),
        probe(
            "recordUsageBatch(own workspace, their userId)",
            "recordUsageBatch",
            "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { usage { id } errorCode errorMessage } }",
            x.owner2,
            N,
            move |id| json!({ "inputs": [usage_item(&a4, Some(id))] }),
        ),
        probe(
            "reserveCredits(workspaceId)",
            "reserveCredits",
            "mutation($input: ReserveCreditsInput!) { reserveCredits(input: $input) { id } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "modelId": TEST_MODEL, "maxPromptTokens": 10, "maxCompletionTokens": 10, "requestId": fresh_id() } }),
        ),
        probe(
            "settleReservation(reservationId)",
            "settleReservation",
            "mutation($input: SettleReservationInput!) { settleReservation(input: $input) { id } }",
            x.r2,
            N,
            |id| json!({ "input": { "reservationId": id, "promptTokens": 1, "completionTokens": 1 } }),
        ),
        probe(
            "releaseReservation(id)",
            "releaseReservation",
            "mutation($id: ID!) { releaseReservation(id: $id) { id } }",
            x.r2,
            N,
            |id| json!({ "id": id }),
        ),
        probe(
            "transferCredits(own → theirs)",
            "transferCredits",
            "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { id } }",
            x.w2,
            N,
            move |id| json!({ "input": { "fromWorkspaceId": a5, "toWorkspaceId": id, "amount": "1", "idempotencyKey": fresh_id() } }),
        ),
        probe(
            "transferCredits(theirs → own)",
            "transferCredits",
            "mutation($input: TransferCreditsInput!) { transferCredits(input: $input) { id } }",
            x.w2,
            N,
            move |id| json!({ "input": { "fromWorkspaceId": id, "toWorkspaceId": a6, "amount": "1", "idempotencyKey": fresh_id() } }),
        ),
        probe(
            "setProjectBudget(projectId)",
            "setProjectBudget",
            "mutation($input: SetProjectBudgetInput!) { setProjectBudget(input: $input) { id } }",
            x.p2,
            N,
            |id| json!({ "input": { "projectId": id, "limit": "0", "period": "DAILY" } }),
        ),
        probe(
            "configureAutoReload(workspaceId)",
            "configureAutoReload",
            "mutation($input: ConfigureAutoReloadInput!) { configureAutoReload(input: $input) { enabled } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "enabled": true, "threshold": "50", "amount": "500" } }),
        ),
        probe(
            "configureAutoReload(own workspace, their paymentMethodId)",
            "configureAutoReload",
            "mutation($input: ConfigureAutoReloadInput!) { configureAutoReload(input: $input) { enabled } }",
            x.pm2,
            N,
            move |id| json!({ "input": { "workspaceId": a7, "enabled": true, "threshold": "50", "amount": "500", "paymentMethodId": id } }),
        ),
        probe(
            "setAlertThresholds(workspaceId)",
            "setAlertThresholds",
            "mutation($input: SetAlertThresholdsInput!) { setAlertThresholds(input: $input) { id } }",
            x.w2,
            N,
            |id| json!({ "input": { "workspaceId": id, "thresholds": [] } }),
        ),
        probe(
            "setAlertThresholds(own workspace, their user as recipient)",
            "setAlertThresholds",
            "mutation($input: SetAlertThresholdsInput!) { setAlertThresholds(input: $input) { id } }",
            x.owner2,
            INV,
            move |id| json!({ "input": { "workspaceId": a8, "thresholds": [{ "amount": "5", "severity": "URGENT", "recipientIds": [id] }] } }),
        ),
        // Platform-only calls: FORBIDDEN whatever the id, so no hint either.
        probe(
            "markInvoicePaid(id)",
            "markInvoicePaid",
            "mutation($id: ID!) { markInvoicePaid(id: $id) { status } }",
            x.inv2,
            F,
            |id| json!({ "id": id }),
        ),
        probe(
            "setPricingAgreement(accountId)",
            "setPricingAgreement",
            "mutation($input: SetPricingAgreementInput!) { setPricingAgreement(input: $input) { id } }",
            x.account2,
            F,
            |id| json!({ "input": { "accountId": id, "verified": false, "volumeDiscountPercent": "50", "paymentTermsDays": 0 } }),
        ),
        // The caller's own project, as a control that the probes' shapes are valid.
        probe(
            "control: setProjectBudget(own project)",
            "setProjectBudget",
            "mutation($input: SetProjectBudgetInput!) { setProjectBudget(input: $input) { id } }",
            x.project_a,
            OK,
            |id| json!({ "input": { "projectId": id, "limit": "50", "period": "MONTHLY" } }),
        ),
    ]
}

async fn their_usage_events(db: &DatabaseConnection, workspace_id: Uuid) -> anyhow::Result<u64> {
    Ok(entity::usage_events::Entity::find()
        .filter(entity::usage_events::Column::WorkspaceId.eq(workspace_id))
        .count(db)
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_ids_are_not_found_and_nothing_changes() -> anyhow::Result<()> {
    let x = Cross::new().await?;
    let db = &x.t.db;
    let probes = probes(&x);

    // The control probes change the caller's own account; run them first. They also
    // prove that the snapshot sees a write.
    let before_control = snapshot(db).await?;
    for p in probes.iter().filter(|p| p.expected == OK) {
        let response = x.gql(p.query, (p.vars)(&p.theirs.to_string())).await?;
        assert_eq!(outcome(&response, p.field), OK, "{}: {response}", p.name);
    }
    assert_eq!(
        changed_tables(&before_control, &snapshot(db).await?),
        ["projects"]
    );

    let before = snapshot(db).await?;
    let counts_before = money_row_counts(db).await?;
    let w2_before = reservoir_tests::workspace(db, x.w2).await?;
    let w2b_before = reservoir_tests::workspace(db, x.w2b).await?;
    assert_eq!(their_usage_events(db, x.w2).await?, 1);
    let mut failures = Vec::new();
    for p in probes.iter().filter(|p| p.expected != OK) {
        let unknown = Uuid::now_v7().to_string();
        for (label, id) in [
            ("theirs", p.theirs.to_string()),
            ("unknown", unknown),
            ("malformed", "not-a-uuid".to_owned()),
        ] {
            let response = x.gql(p.query, (p.vars)(&id)).await?;
            let got = outcome(&response, p.field);
            if got != p.expected {
                failures.push(format!(
                    "{} with {label} id: expected {}, got {got}: {response}",
                    p.name, p.expected
                ));
            }
            if p.field == "recordUsageBatch" && response.get("errors").is_some() {
                failures.push(format!(
                    "{} with {label} id: the batch must refuse per item: {response}",
                    p.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cross-account probes misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing changed anywhere, the other account's objects least of all.
    assert_eq!(money_row_counts(db).await?, counts_before);
    let after = snapshot(db).await?;
    assert!(
        changed_tables(&before, &after).is_empty(),
        "refused probes wrote to {:?}",
        changed_tables(&before, &after)
    );
    for (before, id) in [(&w2_before, x.w2), (&w2b_before, x.w2b)] {
        let now = reservoir_tests::workspace(db, id).await?;
        assert_eq!(
            (now.balance_nanos, now.reserved_nanos, now.balance_sequence),
            (
                before.balance_nanos,
                before.reserved_nanos,
                before.balance_sequence
            ),
            "the other account's workspace {} changed",
            before.name
        );
    }
    assert_eq!(their_usage_events(db, x.w2).await?, 1);
    let reservation = entity::reservations::Entity::find_by_id(x.r2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their reservation vanished"))?;
    assert_eq!(reservation.status, entity::enums::ReservationStatus::Held);
    assert_eq!(w2_before.reserved_nanos, reservation.amount_nanos);
    let key = entity::api_keys::Entity::find_by_id(x.k2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their key vanished"))?;
    assert_eq!(key.revoked_at, None, "their API key was revoked");
    let card = entity::payment_methods::Entity::find_by_id(x.pm2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their card vanished"))?;
    assert!(
        card.removed_at.is_none() && card.is_default,
        "their card changed"
    );
    let invoice = entity::invoices::Entity::find_by_id(x.inv2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their invoice vanished"))?;
    assert_eq!(invoice.status, entity::enums::InvoiceStatus::Open);
    let account2 = entity::accounts::Entity::find_by_id(x.account2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their account vanished"))?;
    assert!(account2.verified && account2.volume_discount_bps == 0);
    let project = entity::projects::Entity::find_by_id(x.p2)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("their project vanished"))?;
    assert_eq!(project.budget_limit_nanos, None);
    x.finish().await
}

/// The response with an id replaced by a placeholder, to compare two refusals.
fn without(response: &Value, id: &str) -> String {
    response.to_string().replace(id, "<id>")
}

/// "NOT_FOUND, never a hint that it exists": the refusal for another account's object
/// must be the very same response as for an id that names nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn another_accounts_ids_get_the_same_refusal_as_unknown_ids() -> anyhow::Result<()> {
    let x = Cross::new().await?;
    let mut hints = Vec::new();
    for p in probes(&x).iter().filter(|p| p.expected != OK) {
        let theirs = p.theirs.to_string();
        let unknown = Uuid::now_v7().to_string();
        let for_theirs = x.gql(p.query, (p.vars)(&theirs)).await?;
        let for_unknown = x.gql(p.query, (p.vars)(&unknown)).await?;
        let (for_theirs, for_unknown) = (
            without(&for_theirs, &theirs),
            without(&for_unknown, &unknown),
        );
        if for_theirs != for_unknown {
            hints.push(format!(
                "{}:\n  theirs:  {for_theirs}\n  unknown: {for_unknown}",
                p.name
            ));
        }
    }
    assert!(
        hints.is_empty(),
        "{} refusals tell another account's objects from unknown ids:\n{}",
        hints.len(),
        hints.join("\n")
    );
    x.finish().await
}

/// An API key acts on its workspace's usage and sees nothing about people:
/// Workspace.members (and account, alertThresholds) are FORBIDDEN to it. The same
/// people must not reach it through usage rows grouped by MEMBER or through the
/// `user` of a usage event it records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn api_key_sees_no_people_through_usage() -> anyhow::Result<()> {
    let env = Roles::new().await?;
    let member = env.user(Who::AMember)?;
    let email = "a-member@roles.example";
    let members = env
        .gql(
            Who::KeyA,
            "query($id: ID!) { workspace(id: $id) { members { user { email } } } }",
            json!({ "id": env.ws_a.to_string() }),
        )
        .await?;
    assert_eq!(outcome(&members, "workspace"), F, "{members}");

    let recorded = env
        .gql(
            Who::AMember,
            "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }",
            json!({ "input": env.usage_input(Some(env.ws_a)) }),
        )
        .await?;
    assert_eq!(outcome(&recorded, "recordUsage"), OK, "{recorded}");
    let from = (Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let to = (Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let report = env
        .gql(
            Who::KeyA,
            "query($id: ID!, $from: DateTime!, $to: DateTime!) { workspace(id: $id) { usage(from: $from, to: $to, groupBy: [MEMBER]) { rows { user { email name } cost } } } }",
            json!({ "id": env.ws_a.to_string(), "from": from, "to": to }),
        )
        .await?;
    let attributed = env
        .gql(
            Who::KeyA,
            "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { user { email name } } }",
            json!({ "input": {
                "workspaceId": env.ws_a.to_string(),
                "modelId": TEST_MODEL,
                "promptTokens": 1,
                "completionTokens": 1,
                "requestId": "attributed-by-key",
                "userId": member.to_string(),
            } }),
        )
        .await?;
    for (what, response) in [("usage rows", &report), ("usage event", &attributed)] {
        assert!(
            !response.to_string().contains(email),
            "an API key read a member's e-mail through the {what}: {response}"
        );
    }
    env.finish().await
}
