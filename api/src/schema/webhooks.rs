//! Webhook endpoints and deliveries as the API shows them: never the secret, except
//! in the answer of a create or a rotation.

use super::types::PageInfo;
use async_graphql::{Enum, ID, InputObject, SimpleObject};
use billing::webhooks::WebhookEventType as Domain;
use billing::webhooks::delivery::DeliveryView;
use billing::webhooks::endpoints::Endpoint;
use chrono::{DateTime, Utc};

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::webhooks::WebhookEventType")]
pub enum WebhookEventType {
    /// `balance.low`: an alert threshold was crossed downwards.
    BalanceLow,
    /// `balance.recovered`: a fired threshold re-armed as the balance rose back.
    BalanceRecovered,
    /// `purchase.succeeded`
    PurchaseSucceeded,
    /// `purchase.failed`
    PurchaseFailed,
    /// `auto_reload.failed`
    AutoReloadFailed,
    /// `auto_reload.disabled`
    AutoReloadDisabled,
    /// `invoice.created`
    InvoiceCreated,
    /// `invoice.paid`
    InvoicePaid,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "billing::entity::enums::WebhookDeliveryStatus")]
pub enum WebhookDeliveryStatus {
    Pending,
    Delivered,
    Dead,
}

/// A registered receiver of signed webhooks (account OWNER/ADMIN only).
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct WebhookEndpoint {
    pub id: ID,
    pub account_id: ID,
    pub url: String,
    pub events: Vec<WebhookEventType>,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Endpoint> for WebhookEndpoint {
    fn from(e: Endpoint) -> Self {
        Self {
            id: ID(e.id.to_string()),
            account_id: ID(e.account_id.to_string()),
            url: e.url,
            events: e.events.into_iter().map(Into::into).collect(),
            enabled: e.enabled,
            created_at: e.created_at,
            updated_at: e.updated_at,
        }
    }
}

/// One event's delivery to one endpoint.
#[derive(SimpleObject)]
pub struct WebhookDelivery {
    pub id: ID,
    pub endpoint_id: ID,
    /// The event's id: the same in every attempt (receivers deduplicate on it).
    pub event_id: ID,
    pub event_type: Option<WebhookEventType>,
    pub status: WebhookDeliveryStatus,
    pub attempts: i32,
    pub last_response_code: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<DeliveryView> for WebhookDelivery {
    fn from(d: DeliveryView) -> Self {
        Self {
            id: ID(d.id.to_string()),
            endpoint_id: ID(d.endpoint_id.to_string()),
            event_id: ID(d.event_id.to_string()),
            event_type: d.event_type.map(Into::into),
            status: d.status.into(),
            attempts: d.attempts,
            last_response_code: d.last_response_code,
            last_error: d.last_error,
            next_attempt_at: d.next_attempt_at,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
        }
    }
}

#[derive(SimpleObject)]
pub struct WebhookDeliveryEdge {
    pub cursor: String,
    pub node: WebhookDelivery,
}

#[derive(SimpleObject)]
pub struct WebhookDeliveryConnection {
    pub edges: Vec<WebhookDeliveryEdge>,
    pub page_info: PageInfo,
}

#[derive(InputObject)]
pub struct CreateWebhookEndpointInput {
    pub account_id: ID,
    /// `https://…` (`http://` only on the embedded SQLite default, or where the
    /// operator allowed it); no user name or password in it.
    pub url: String,
    pub events: Vec<WebhookEventType>,
}

#[derive(SimpleObject)]
pub struct WebhookEndpointSecretPayload {
    pub endpoint: WebhookEndpoint,
    /// The signing secret: shown only in this answer.
    pub secret: String,
}

pub(crate) fn events_of(events: Vec<WebhookEventType>) -> Vec<Domain> {
    events.into_iter().map(Into::into).collect()
}

#[async_graphql::ComplexObject]
impl WebhookEndpoint {
    /// Deliveries to this endpoint, newest first.
    async fn deliveries(
        &self,
        ctx: &async_graphql::Context<'_>,
        #[graphql(default = 20)] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<WebhookDeliveryConnection> {
        use crate::error::GqlResult;
        let endpoint_id = super::parse_id(ctx, &self.id, "webhook endpoint")?;
        let page =
            billing::reports::history::PageRequest::new(first.unwrap_or(20), after).gql(ctx)?;
        let caller = super::caller(ctx)?;
        let page = billing::webhooks::delivery::deliveries_page(
            super::db(ctx),
            &caller,
            endpoint_id,
            &page,
        )
        .await
        .gql(ctx)?;
        Ok(WebhookDeliveryConnection {
            page_info: PageInfo {
                has_next_page: page.has_next_page,
                end_cursor: page.end_cursor().map(str::to_owned),
            },
            edges: page
                .rows
                .into_iter()
                .map(|(cursor, d)| WebhookDeliveryEdge {
                    cursor,
                    node: d.into(),
                })
                .collect(),
        })
    }
}
