//! Paged, newest-first histories: a workspace's ledger, purchases and transfers, and an
//! account's invoices; and, oldest first, the usage events one ledger transaction posts. Cursors are opaque to clients and encode the last row's key, so
//! pages stay stable while new rows arrive at the top.

use crate::error::{BillingError, Result};
use entity::{invoices, ledger_entries, purchases, transfers, usage_events, webhook_deliveries};
use sea_orm::sea_query::Condition;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

/// Largest page a client may ask for.
pub const PAGE_SIZE_MAX: i32 = 100;

/// One page of rows, newest first; `next_cursor` is Some when more rows follow.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub rows: Vec<(String, T)>,
    pub has_next_page: bool,
}

impl<T> Page<T> {
    pub fn end_cursor(&self) -> Option<&str> {
        self.rows.last().map(|(c, _)| c.as_str())
    }
}

/// A validated page request.
#[derive(Clone, Debug)]
pub struct PageRequest {
    pub first: u64,
    after: Option<String>,
}

impl PageRequest {
    pub fn new(first: i32, after: Option<String>) -> Result<Self> {
        if first < 1 {
            return Err(BillingError::invalid("first must be at least 1"));
        }
        if first > PAGE_SIZE_MAX {
            return Err(BillingError::LimitExceeded(format!(
                "first must be at most {PAGE_SIZE_MAX}"
            )));
        }
        Ok(Self {
            first: first as u64,
            after,
        })
    }

    fn after_key(&self) -> Result<Option<String>> {
        self.after.as_deref().map(decode_cursor).transpose()
    }
}

const CURSOR_PREFIX: &str = "c1:";

fn encode_cursor(key: &str) -> String {
    hex::encode(format!("{CURSOR_PREFIX}{key}"))
}

fn decode_cursor(cursor: &str) -> Result<String> {
    let bad = || BillingError::invalid("after is not a cursor returned by this API");
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix(CURSOR_PREFIX)
        .map(str::to_owned)
        .ok_or_else(bad)
}

fn page_of<T>(mut rows: Vec<T>, first: u64, key: impl Fn(&T) -> String) -> Page<T> {
    let has_next_page = rows.len() as u64 > first;
    rows.truncate(first as usize);
    Page {
        rows: rows
            .into_iter()
            .map(|r| (encode_cursor(&key(&r)), r))
            .collect(),
        has_next_page,
    }
}

fn uuid_key(key: Option<String>) -> Result<Option<Uuid>> {
    key.map(|k| {
        Uuid::parse_str(&k)
            .map_err(|_| BillingError::invalid("after is not a cursor returned by this API"))
    })
    .transpose()
}

/// A workspace's ledger entries, newest first.
pub async fn ledger_page<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    page: &PageRequest,
) -> Result<Page<ledger_entries::Model>> {
    let mut query =
        ledger_entries::Entity::find().filter(ledger_entries::Column::WorkspaceId.eq(workspace_id));
    if let Some(key) = page.after_key()? {
        let id: i64 = key
            .parse()
            .map_err(|_| BillingError::invalid("after is not a cursor returned by this API"))?;
        query = query.filter(ledger_entries::Column::Id.lt(id));
    }
    let rows = query
        .order_by_desc(ledger_entries::Column::Id)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.id.to_string()))
}

/// The usage events a USAGE ledger transaction posts (one, or a debit batch's events
/// of one workspace), in the order they were recorded (ids are time-ordered UUIDv7).
pub async fn posted_usage_page<C: ConnectionTrait>(
    c: &C,
    ledger_transaction_id: i64,
    page: &PageRequest,
) -> Result<Page<usage_events::Model>> {
    let mut query = usage_events::Entity::find()
        .filter(usage_events::Column::LedgerTransactionId.eq(ledger_transaction_id));
    if let Some(after) = uuid_key(page.after_key()?)? {
        query = query.filter(usage_events::Column::Id.gt(after));
    }
    let rows = query
        .order_by_asc(usage_events::Column::Id)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.id.to_string()))
}

/// A workspace's purchases, newest first (ids are time-ordered UUIDv7).
pub async fn purchases_page<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    page: &PageRequest,
) -> Result<Page<purchases::Model>> {
    let mut query =
        purchases::Entity::find().filter(purchases::Column::WorkspaceId.eq(workspace_id));
    if let Some(id) = uuid_key(page.after_key()?)? {
        query = query.filter(purchases::Column::Id.lt(id));
    }
    let rows = query
        .order_by_desc(purchases::Column::Id)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.id.to_string()))
}

/// Transfers into or out of a workspace, newest first.
pub async fn transfers_page<C: ConnectionTrait>(
    c: &C,
    workspace_id: Uuid,
    page: &PageRequest,
) -> Result<Page<transfers::Model>> {
    let mut query = transfers::Entity::find().filter(
        Condition::any()
            .add(transfers::Column::FromWorkspaceId.eq(workspace_id))
            .add(transfers::Column::ToWorkspaceId.eq(workspace_id)),
    );
    if let Some(id) = uuid_key(page.after_key()?)? {
        query = query.filter(transfers::Column::Id.lt(id));
    }
    let rows = query
        .order_by_desc(transfers::Column::Id)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.id.to_string()))
}

/// A webhook endpoint's deliveries, newest first (ids are time-ordered UUIDv7).
pub async fn webhook_deliveries_page<C: ConnectionTrait>(
    c: &C,
    endpoint_id: Uuid,
    page: &PageRequest,
) -> Result<Page<webhook_deliveries::Model>> {
    use webhook_deliveries::Column as D;
    let mut query = webhook_deliveries::Entity::find().filter(D::EndpointId.eq(endpoint_id));
    if let Some(id) = uuid_key(page.after_key()?)? {
        query = query.filter(D::Id.lt(id));
    }
    let rows = query
        .order_by_desc(D::Id)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.id.to_string()))
}

/// An account's invoices, newest first (by their sequential number).
pub async fn invoices_page<C: ConnectionTrait>(
    c: &C,
    account_id: Uuid,
    page: &PageRequest,
) -> Result<Page<invoices::Model>> {
    let mut query = invoices::Entity::find().filter(invoices::Column::AccountId.eq(account_id));
    if let Some(key) = page.after_key()? {
        let sequence: i64 = key
            .parse()
            .map_err(|_| BillingError::invalid("after is not a cursor returned by this API"))?;
        query = query.filter(invoices::Column::Sequence.lt(sequence));
    }
    let rows = query
        .order_by_desc(invoices::Column::Sequence)
        .limit(page.first + 1)
        .all(c)
        .await?;
    Ok(page_of(rows, page.first, |r| r.sequence.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("42");
        assert_eq!(decode_cursor(&c).ok().as_deref(), Some("42"));
        assert!(decode_cursor("zz").is_err());
        assert!(decode_cursor(&hex::encode("other:42")).is_err());
        assert!(PageRequest::new(0, None).is_err());
        assert!(matches!(
            PageRequest::new(101, None),
            Err(BillingError::LimitExceeded(_))
        ));
        let page = page_of(vec![5, 4, 3], 2, |n| n.to_string());
        assert!(page.has_next_page);
        assert_eq!(page.rows.len(), 2);
        assert_eq!(
            page.end_cursor()
                .and_then(|c| decode_cursor(c).ok())
                .as_deref(),
            Some("4")
        );
    }
}
