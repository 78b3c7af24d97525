//! Batched reads behind the API's DataLoaders: one statement for a whole batch of
//! keys, so the number of statements of a GraphQL request does not grow with the
//! number of rows it returns. The public `*_by_ids` / `*_by_*` functions of each
//! module are these two shapes applied to that module's tables.

use crate::error::Result;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Value};
use std::collections::HashMap;
use std::hash::Hash;
use uuid::Uuid;

/// Rows whose `column` is one of `keys`, by that key; keys with no row are absent.
pub(crate) async fn by_keys<E, K, C>(
    c: &C,
    column: E::Column,
    keys: &[K],
    key_of: fn(&E::Model) -> K,
) -> Result<HashMap<K, E::Model>>
where
    E: EntityTrait,
    K: Clone + Eq + Hash + Into<Value>,
    C: ConnectionTrait,
{
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = E::find()
        .filter(column.is_in(keys.iter().cloned()))
        .all(c)
        .await?;
    Ok(rows.into_iter().map(|r| (key_of(&r), r)).collect())
}

/// Rows grouped by a parent key (`column`), each group ordered by `order`; every
/// requested key gets a list, empty when it has no rows.
pub(crate) async fn grouped<E, C>(
    c: &C,
    column: E::Column,
    keys: &[Uuid],
    order: E::Column,
    key_of: fn(&E::Model) -> Uuid,
) -> Result<HashMap<Uuid, Vec<E::Model>>>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    let mut out: HashMap<Uuid, Vec<E::Model>> = keys.iter().map(|k| (*k, Vec::new())).collect();
    if keys.is_empty() {
        return Ok(out);
    }
    let rows = E::find()
        .filter(column.is_in(keys.iter().copied()))
        .order_by_asc(order)
        .all(c)
        .await?;
    for row in rows {
        out.entry(key_of(&row)).or_default().push(row);
    }
    Ok(out)
}

/// Defines `pub async fn $name(c, ids)`: the rows of `$table` (an entity module in
/// scope whose primary key is the UUID column `id`) by id, absent ids left out.
macro_rules! rows_by_ids {
    ($(#[$doc:meta])* $name:ident, $table:ident) => {
        $(#[$doc])*
        pub async fn $name<C: sea_orm::ConnectionTrait>(
            c: &C,
            ids: &[uuid::Uuid],
        ) -> crate::error::Result<std::collections::HashMap<uuid::Uuid, $table::Model>> {
            crate::batch::by_keys::<$table::Entity, _, _>(c, $table::Column::Id, ids, |r| r.id)
                .await
        }
    };
}
pub(crate) use rows_by_ids;
