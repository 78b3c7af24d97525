//! One-dimension daily rollups: usage per (workspace, day, dimension value) for each of
//! project, member, model and API key. A dashboard's breakdown by one dimension reads a
//! few rows per day from here instead of aggregating `usage_daily`, whose rows multiply
//! across every dimension at once. Backfilled from `usage_daily`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000004_usage_daily_by"
    }
}

/// (dimension name, the `usage_daily` column holding its value).
const DIMENSIONS: [(&str, &str); 4] = [
    ("project", "project_id"),
    ("member", "user_id"),
    ("api_key", "api_key_id"),
    ("model", "model_id"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // `dim_uuid` holds a project, member or key id (the nil UUID for "none", as in
        // `usage_daily`, and for model rows); `dim_model` holds a model id ('' otherwise).
        m.create_table(
            Table::create()
                .table("usage_daily_by")
                .col(big_integer("id").auto_increment().primary_key())
                .col(uuid("workspace_id"))
                .col(string_len("dimension", 16))
                .col(date("day"))
                .col(uuid("dim_uuid"))
                .col(string("dim_model"))
                .col(big_integer("requests").default(0))
                .col(big_integer("prompt_tokens").default(0))
                .col(big_integer("completion_tokens").default(0))
                .col(big_integer("cost_nanos").default(0))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_usage_daily_by_workspace_id")
                        .from("usage_daily_by", "workspace_id")
                        .to("workspaces", "id"),
                )
                .check(Expr::cust(
                    "dimension IN ('project', 'member', 'api_key', 'model') AND requests >= 0 \
                     AND prompt_tokens >= 0 AND completion_tokens >= 0 AND cost_nanos >= 0",
                ))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("ux_usage_daily_by")
                .table("usage_daily_by")
                .col("workspace_id")
                .col("dimension")
                .col("day")
                .col("dim_uuid")
                .col("dim_model")
                .unique()
                .to_owned(),
        )
        .await?;
        let nil = match m.get_database_backend() {
            sea_orm::DbBackend::Postgres => "'00000000-0000-0000-0000-000000000000'::uuid",
            // sqlx stores a UUID as a 16-byte blob on SQLite.
            _ => "X'00000000000000000000000000000000'",
        };
        let db = m.get_connection();
        for (dimension, column) in DIMENSIONS {
            let (dim_uuid, dim_model) = if dimension == "model" {
                (nil.to_owned(), column.to_owned())
            } else {
                (column.to_owned(), "''".to_owned())
            };
            db.execute_unprepared(&format!(
                "INSERT INTO usage_daily_by (workspace_id, dimension, day, dim_uuid, dim_model, \
                     requests, prompt_tokens, completion_tokens, cost_nanos) \
                 SELECT workspace_id, '{dimension}', day, {dim_uuid}, {dim_model}, \
                     SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nanos) \
                 FROM usage_daily GROUP BY workspace_id, day, {column}"
            ))
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table("usage_daily_by").to_owned())
            .await
    }
}
