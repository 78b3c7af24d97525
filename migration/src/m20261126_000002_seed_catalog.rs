//! The starting catalog: the credit packages on sale and a realistic set of current
//! models with list prices per million tokens. Later price changes are made by the
//! platform admin at runtime (models keep their history), not by editing this step.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000002_seed_catalog"
    }
}

const NANOS_PER_CREDIT: i64 = 1_000_000_000;
/// Hundredths of a credit (cents) to nanocredits.
const NANOS_PER_CENT: i64 = 10_000_000;

/// (id, credits bought, bonus credits); the price equals the credits bought.
const PACKAGES: &[(&str, i64, i64)] = &[
    ("pkg_10", 10, 0),
    ("pkg_25", 25, 0),
    ("pkg_50", 50, 5),
    ("pkg_100", 100, 15),
    ("pkg_250", 250, 50),
    ("pkg_500", 500, 125),
];

/// (id, name, prompt cents per million tokens, completion cents per million tokens).
const MODELS: &[(&str, &str, i64, i64)] = &[
    ("openai/gpt-5", "GPT-5", 125, 1000),
    ("openai/gpt-5-mini", "GPT-5 mini", 25, 200),
    ("openai/gpt-4.1", "GPT-4.1", 200, 800),
    ("openai/gpt-4.1-mini", "GPT-4.1 mini", 40, 160),
    ("openai/gpt-4o", "GPT-4o", 250, 1000),
    ("openai/gpt-4o-mini", "GPT-4o mini", 15, 60),
    ("openai/o3", "o3", 200, 800),
    ("openai/o4-mini", "o4-mini", 110, 440),
    ("anthropic/claude-opus-4.1", "Claude Opus 4.1", 1500, 7500),
    (
        "anthropic/claude-sonnet-4.5",
        "Claude Sonnet 4.5",
        300,
        1500,
    ),
    ("anthropic/claude-haiku-4.5", "Claude Haiku 4.5", 100, 500),
    ("google/gemini-2.5-pro", "Gemini 2.5 Pro", 125, 1000),
    ("google/gemini-2.5-flash", "Gemini 2.5 Flash", 30, 250),
    ("mistralai/mistral-large", "Mistral Large", 200, 600),
    (
        "meta-llama/llama-3.3-70b-instruct",
        "Llama 3.3 70B Instruct",
        13,
        40,
    ),
    ("deepseek/deepseek-chat", "DeepSeek V3", 27, 110),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let mut packages = Query::insert();
        packages.into_table("credit_packages").columns([
            "id",
            "amount_nanos",
            "price_nanos",
            "bonus_nanos",
            "active",
            "position",
        ]);
        for (position, (id, credits, bonus)) in PACKAGES.iter().enumerate() {
            let position = <i32 as TryFrom<usize>>::try_from(position)
                .map_err(|e| DbErr::Custom(e.to_string()))?;
            packages.values_panic([
                (*id).into(),
                (credits * NANOS_PER_CREDIT).into(),
                (credits * NANOS_PER_CREDIT).into(),
                (bonus * NANOS_PER_CREDIT).into(),
                true.into(),
                position.into(),
            ]);
        }
        m.exec_stmt(packages).await?;

        let now = chrono::Utc::now();
        let mut models = Query::insert();
        models.into_table("models").columns([
            "id",
            "name",
            "prompt_price_per_million_nanos",
            "completion_price_per_million_nanos",
            "active",
            "created_at",
            "updated_at",
        ]);
        for (id, name, prompt_cents, completion_cents) in MODELS {
            models.values_panic([
                (*id).into(),
                (*name).into(),
                (prompt_cents * NANOS_PER_CENT).into(),
                (completion_cents * NANOS_PER_CENT).into(),
                true.into(),
                now.into(),
                now.into(),
            ]);
        }
        m.exec_stmt(models).await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.exec_stmt(Query::delete().from_table("models").to_owned())
            .await?;
        m.exec_stmt(Query::delete().from_table("credit_packages").to_owned())
            .await?;
        Ok(())
    }
}
