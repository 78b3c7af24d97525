//! Prometheus metrics of the API process, served at `/metrics`. Label values come from
//! the schema (root field names) and from the fixed error codes, never from client
//! input, so their number is bounded.

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextRequest,
};
use async_graphql::parser::types::{ExecutableDocument, Selection};
use async_graphql::{ServerResult, Variables};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    debits: IntCounterVec,
    subscribers: IntGauge,
    subscription_executions: IntCounterVec,
    shared_feeds: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "reservoir_graphql_requests_total",
                "GraphQL requests by root field and outcome (ok or an error code)",
            ),
            &["operation", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "reservoir_graphql_request_duration_seconds",
                "GraphQL request latency by root field",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["operation"],
        )?;
        let debits = IntCounterVec::new(
            Opts::new(
                "reservoir_usage_debits_total",
                "Usage debits by outcome (admitted, or the refusal's code)",
            ),
            &["outcome"],
        )?;
        let subscribers = IntGauge::new(
            "reservoir_subscribers",
            "Live balance subscribers of this process",
        )?;
        let subscription_executions = IntCounterVec::new(
            Opts::new(
                "reservoir_subscription_executions_total",
                "Balance events handed to async-graphql to resolve and serialise, by \
                 subscription field: once per event and execution (a shared subscription \
                 is one execution for all its subscribers)",
            ),
            &["field"],
        )?;
        let shared_feeds = IntGauge::new(
            "reservoir_shared_subscriptions",
            "Shared balance subscriptions (executions) of this process",
        )?;
        registry.register(Box::new(subscription_executions.clone()))?;
        registry.register(Box::new(shared_feeds.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(debits.clone()))?;
        registry.register(Box::new(subscribers.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            debits,
            subscribers,
            subscription_executions,
            shared_feeds,
        })
    }

    /// Counts one event of a subscription `field` resolved by async-graphql.
    pub fn subscription_execution(&self, field: &str) {
        self.subscription_executions
            .with_label_values(&[field])
            .inc();
    }

    pub fn set_shared_feeds(&self, n: usize) {
        self.shared_feeds.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one usage debit: `admitted`, or the error code that refused it.
    pub fn debit(&self, outcome: &str) {
        self.debits.with_label_values(&[outcome]).inc();
    }

    pub fn set_subscribers(&self, n: usize) {
        self.subscribers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The group-commit writer's counters, in the text format (they live in `billing`,
/// outside the registry).
pub fn render_writer(stats: &billing::debits::writer::WriterStats) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let counters = [
        (
            "reservoir_writer_batches_total",
            "Debit batches committed or failed.",
            stats.batches.load(Relaxed) as f64,
        ),
        (
            "reservoir_writer_ops_total",
            "Operations handed to the debit writer.",
            stats.ops.load(Relaxed) as f64,
        ),
        (
            "reservoir_writer_batches_failed_total",
            "Debit batches that failed as a whole and were re-run one by one.",
            stats.batches_failed.load(Relaxed) as f64,
        ),
        (
            "reservoir_writer_speculations_failed_total",
            "Pipelined debit batches (judged on the previous batch's uncommitted state) that ran again under their locks.",
            stats.speculations_failed.load(Relaxed) as f64,
        ),
        (
            "reservoir_writer_speculations_total",
            "Pipelined debit batches judged on the previous batch's uncommitted state.",
            stats.speculations.load(Relaxed) as f64,
        ),
        (
            "reservoir_writer_wait_seconds_total",
            "Time pipelined batches spent, once judged, waiting for the previous batch's commit before writing.",
            stats.wait_us.load(Relaxed) as f64 / 1e6,
        ),
        (
            "reservoir_writer_load_seconds_total",
            "Time spent beginning batches and reading their rows under the locks.",
            stats.load_us.load(Relaxed) as f64 / 1e6,
        ),
        (
            "reservoir_writer_judge_seconds_total",
            "Time spent judging operations in memory.",
            stats.judge_us.load(Relaxed) as f64 / 1e6,
        ),
        (
            "reservoir_writer_write_seconds_total",
            "Time spent writing batches (inserts, updates, policy checks).",
            stats.write_us.load(Relaxed) as f64 / 1e6,
        ),
        (
            "reservoir_writer_commit_seconds_total",
            "Time spent committing batches.",
            stats.commit_us.load(Relaxed) as f64 / 1e6,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    out
}

/// Times and counts each GraphQL request.
pub struct RequestMetrics(pub Metrics);

impl ExtensionFactory for RequestMetrics {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestMetricsExtension {
            metrics: self.0.clone(),
            operation: Mutex::new(None),
        })
    }
}

struct RequestMetricsExtension {
    metrics: Metrics,
    operation: Mutex<Option<String>>,
}

/// The first root field of the first operation: a schema name, so bounded.
fn root_field(doc: &ExecutableDocument) -> Option<String> {
    let (_, op) = doc.operations.iter().next()?;
    op.node
        .selection_set
        .node
        .items
        .iter()
        .find_map(|item| match &item.node {
            Selection::Field(field) => Some(field.node.name.node.to_string()),
            _ => None,
        })
}

#[async_graphql::async_trait::async_trait]
impl Extension for RequestMetricsExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        if let Ok(mut op) = self.operation.lock() {
            *op = root_field(&doc);
        }
        Ok(doc)
    }

    async fn request(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextRequest<'_>,
    ) -> async_graphql::Response {
        let started = Instant::now();
        let response = next.run(ctx).await;
        let operation = self
            .operation
            .lock()
            .ok()
            .and_then(|op| op.clone())
            .unwrap_or_else(|| "unparsed".into());
        // Known schema fields only; anything else shares one label.
        let registry = &ctx.schema_env.registry;
        let roots = [
            Some(&registry.query_type),
            registry.mutation_type.as_ref(),
            registry.subscription_type.as_ref(),
        ];
        let known = roots
            .into_iter()
            .flatten()
            .filter_map(|root| registry.types.get(root))
            .any(|root| root.field_by_name(&operation).is_some());
        // Known schema fields only; anything else shares one label.
        let operation = if known { operation } else { "other".into() };
        let outcome = response
            .errors
            .first()
            .and_then(|e| e.extensions.as_ref())
            .and_then(|ext| ext.get("code"))
            .map(|code| code.to_string().trim_matches('"').to_owned())
            .unwrap_or_else(|| "ok".into());
        self.metrics
            .requests
            .with_label_values(&[operation.as_str(), outcome.as_str()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[operation.as_str()])
            .observe(started.elapsed().as_secs_f64());
        response
    }
}

/// One backlog gauge's value for a kind at a time.
type BacklogValue = fn(&billing::jobs::ops::Backlog, chrono::DateTime<chrono::Utc>) -> f64;

/// Appends the job backlog's gauges (`render_jobs`) to a scrape, read within 2 s:
/// during a database outage /metrics still answers, without them.
pub async fn append_jobs(body: &mut String, db: &billing::sea_orm::DatabaseConnection) {
    let now = chrono::Utc::now();
    let backlog = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        billing::jobs::ops::backlog(db, now),
    )
    .await;
    match backlog {
        Ok(Ok(backlog)) => body.push_str(&render_jobs(&backlog, now)),
        Ok(Err(e)) => tracing::warn!(error = %e, "job backlog not read for /metrics"),
        Err(_) => tracing::warn!("job backlog not read for /metrics in time"),
    }
}

/// The background work in the text format: the backlog per kind read from the
/// database now (rows due and not done, how long the longest-waiting one has been due,
/// DEAD rows), and this process's job runs by kind and outcome with the time they took
/// (non-zero only where a worker runs in the process: `reservoir serve`).
pub fn render_jobs(
    backlog: &[billing::jobs::ops::Backlog],
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    use billing::jobs::ops::{JOB_STATS, JobOutcome, WorkKind};
    use std::fmt::Write as _;
    let mut out = String::new();
    let gauges: [(&str, &str, BacklogValue); 3] = [
        (
            "reservoir_jobs_waiting",
            "Work due and not done: PENDING purchases, e-mails and webhook deliveries whose attempt is due.",
            |b, _| b.waiting as f64,
        ),
        (
            "reservoir_jobs_oldest_waiting_seconds",
            "How long the longest-waiting due work of a kind has been due (0 when none).",
            |b, now| {
                b.oldest_due_at
                    .map_or(0.0, |at| (now - at).num_milliseconds().max(0) as f64 / 1e3)
            },
        ),
        (
            "reservoir_jobs_dead",
            "E-mails and webhook deliveries whose attempts ran out (DEAD), waiting for a retry on request.",
            |b, _| b.dead as f64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for b in backlog {
            let _ = writeln!(
                out,
                "{name}{{kind=\"{}\"}} {}",
                b.kind.as_str(),
                value(b, now)
            );
        }
    }
    let name = "reservoir_job_runs_total";
    let _ = writeln!(
        out,
        "# HELP {name} Job runs of this process by kind and outcome (done, retry, error).\n# TYPE {name} counter"
    );
    for kind in WorkKind::ALL {
        for outcome in JobOutcome::ALL {
            let runs = JOB_STATS.runs(kind, outcome);
            let _ = writeln!(
                out,
                "{name}{{kind=\"{}\",outcome=\"{}\"}} {runs}",
                kind.as_str(),
                outcome.as_str()
            );
        }
    }
    let name = "reservoir_job_run_seconds_total";
    let _ = writeln!(
        out,
        "# HELP {name} Time this process's job runs took, by kind (divide by the runs for the mean).\n# TYPE {name} counter"
    );
    for kind in WorkKind::ALL {
        let _ = writeln!(
            out,
            "{name}{{kind=\"{}\"}} {}",
            kind.as_str(),
            JOB_STATS.seconds(kind)
        );
    }
    out
}
