//! Reads for the API's balance-event tailer (`api::events`). It follows the
//! `balance_events` table by id, and on PostgreSQL ids are not commit order, so it
//! asks for the newest id, the ids present just below it, the rows of the ids it is
//! still missing, and the rows after the highest id it has delivered.

use super::BALANCE_EVENTS_CHANNEL;
use crate::error::Result;
use entity::balance_events::{Column, Entity, Model};
use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

/// The highest balance-event id committed so far (None: no event yet).
pub async fn latest_event_id<C: ConnectionTrait>(c: &C) -> Result<Option<i64>> {
    Ok(Entity::find()
        .select_only()
        .column(Column::Id)
        .order_by_desc(Column::Id)
        .limit(1)
        .into_tuple()
        .one(c)
        .await?)
}

/// The ids of the committed events with an id above `above`.
pub async fn event_ids_above<C: ConnectionTrait>(c: &C, above: i64) -> Result<Vec<i64>> {
    Ok(Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.gt(above))
        .into_tuple()
        .all(c)
        .await?)
}

/// The committed events among `ids` (in no particular order).
pub async fn events_by_ids<C: ConnectionTrait>(c: &C, ids: &[i64]) -> Result<Vec<Model>> {
    Ok(Entity::find()
        .filter(Column::Id.is_in(ids.iter().copied()))
        .all(c)
        .await?)
}

/// At most `limit` committed events with an id above `after`, in id order.
pub async fn events_after<C: ConnectionTrait>(c: &C, after: i64, limit: u64) -> Result<Vec<Model>> {
    Ok(Entity::find()
        .filter(Column::Id.gt(after))
        .order_by_asc(Column::Id)
        .limit(limit)
        .all(c)
        .await?)
}

/// PostgreSQL: a listener on [`BALANCE_EVENTS_CHANNEL`] over a dedicated connection
/// (not one of the pool's, which would be held forever), with the pool's settings.
pub async fn listen(
    db: &DatabaseConnection,
) -> std::result::Result<PgListener, sea_orm::sqlx::Error> {
    let options = db.get_postgres_connection_pool().connect_options();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with((*options).clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(BALANCE_EVENTS_CHANNEL).await?;
    Ok(listener)
}
