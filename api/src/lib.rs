#![doc = include_str!("../README.md")]

pub mod credentials;
pub mod dashboard;
pub mod document_cache;
pub mod error;
pub mod events;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod rate_limit;
pub mod scalars;
pub mod schema;
pub mod shared_feed;
pub mod websocket;
pub mod worker_ops;

use actix_web::dev::Server;
pub use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, guard, web};
use billing::sea_orm::DatabaseConnection;
use error::RequestId;
use schema::{Caller, ReservoirSchema};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use schema::build_schema;

/// Settings of the API process.
#[derive(Clone)]
pub struct ApiConfig {
    /// Attaches cards for `addPaymentMethod` (the sandbox unless configured).
    pub gateway: Arc<dyn billing::payments::PaymentGateway>,
    /// Where work is pushed after a commit (the worker's queue; without one, the
    /// worker's sweep picks the rows up).
    pub jobs: Arc<dyn billing::jobs::JobSink>,
    /// The platform admin token; None disables platform-admin calls.
    pub admin_token: Option<String>,
    /// Largest accepted request body.
    pub body_bytes_max: usize,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
    /// Concurrent WebSocket (subscription) connections per process; more are answered
    /// 503 with LIMIT_EXCEEDED.
    pub websocket_connections_max: usize,
    /// The live-balance tailer and its subscriber limits.
    pub balance_hub: events::HubConfig,
    /// The group-commit writer of the usage path (None: the backend's defaults).
    pub writer: Option<billing::debits::writer::WriterConfig>,
    /// How long an authenticated token is trusted without a lookup (0: never cached).
    /// A key revoked through another process keeps working at most this long.
    pub credential_cache_ttl_ms: u64,
    /// Whether `__schema`/`__type` queries are answered (GraphiQL, code generators).
    pub introspection: bool,
    /// Usage events per credential and failed authentications per client address.
    pub rate_limits: rate_limit::RateLimits,
    /// Whether `http://` webhook endpoints are accepted on PostgreSQL.
    pub webhook_urls: billing::webhooks::endpoints::UrlPolicy,
    /// The job workers running in this process (`reservoir serve`): `/readyz` is 503
    /// while they cannot poll. None: no worker here.
    pub worker_readiness: Option<Arc<dyn billing::jobs::WorkerReadiness>>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("body_bytes_max", &self.body_bytes_max)
            .field("workers", &self.workers)
            .field("websocket_connections_max", &self.websocket_connections_max)
            .field("balance_hub", &self.balance_hub)
            .field("writer", &self.writer)
            .field("credential_cache_ttl_ms", &self.credential_cache_ttl_ms)
            .field("introspection", &self.introspection)
            .field("rate_limits", &self.rate_limits)
            .field("webhook_urls", &self.webhook_urls)
            .field("worker_readiness", &self.worker_readiness.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            gateway: Arc::new(billing::payments::SandboxGateway::new()),
            jobs: Arc::new(billing::jobs::NoQueue),
            admin_token: None,
            body_bytes_max: 2 * 1024 * 1024,
            workers: 0,
            websocket_connections_max: 10_000,
            balance_hub: events::HubConfig::default(),
            writer: None,
            credential_cache_ttl_ms: 2_000,
            introspection: true,
            rate_limits: rate_limit::RateLimits::default(),
            webhook_urls: billing::webhooks::endpoints::UrlPolicy::default(),
            worker_readiness: None,
        }
    }
}

#[derive(Clone)]
struct AppState {
    db: DatabaseConnection,
    schema: ReservoirSchema,
    config: ApiConfig,
    /// Open WebSocket connections of this process (all workers).
    ws_connections: Arc<AtomicUsize>,
    hub: Arc<events::BalanceHub>,
    /// Identical balance subscriptions of this process, executed once.
    feeds: Arc<shared_feed::SharedFeeds>,
    metrics: metrics::Metrics,
    credentials: Arc<credentials::CredentialCache>,
    writer: billing::debits::writer::DebitWriter,
    /// Shutdown, as every open WebSocket connection sees it.
    closing: websocket::Closing,
    /// The database's last known health, for `/readyz`.
    health: Arc<health::Health>,
    rate_limiter: Arc<rate_limit::RateLimiter>,
}

/// Exports the schema in SDL (what `reservoir export-schema` prints and what
/// `schema.graphql` at the repository root must equal).
pub fn schema_sdl(db: DatabaseConnection) -> String {
    build_schema(db).sdl()
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A response for a request refused before GraphQL ran (bad JSON, bad token).
fn refusal(e: billing::BillingError, http_request_id: &RequestId) -> HttpResponse {
    let mut err = error::to_gql(e, Some(http_request_id)).into_server_error(Default::default());
    err.locations.clear(); // not about any place in the query
    respond(&async_graphql::Response::from_errors(vec![err]))
}

/// A GraphQL response over HTTP (the GraphQL-over-HTTP media type; errors are in the
/// body, so the status is 200), with the cache and extra headers resolvers set.
fn respond(response: &async_graphql::Response) -> HttpResponse {
    let mut builder = HttpResponse::Ok();
    builder.content_type("application/graphql-response+json");
    if response.is_ok()
        && let Some(cache_control) = response.cache_control.value()
    {
        builder.insert_header((actix_web::http::header::CACHE_CONTROL, cache_control));
    }
    // async-graphql's headers are of the `http` crate, actix's of its own: by bytes.
    for (name, value) in &response.http_headers {
        use actix_web::http::header::{HeaderName, HeaderValue};
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            builder.append_header((name, value));
        }
    }
    match serde_json::to_vec(response) {
        Ok(body) => builder.body(body),
        Err(e) => {
            tracing::error!(error = %e, "a GraphQL response did not serialize");
            HttpResponse::InternalServerError().finish()
        }
    }
}

async fn graphql(state: web::Data<AppState>, http: HttpRequest, body: web::Bytes) -> HttpResponse {
    let http_request_id = RequestId(uuid::Uuid::new_v4().simple().to_string());
    // The body arrives through actix's `Bytes` extractor, which enforces the
    // configured size limit (413) before anything is parsed.
    let request: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return refusal(
                billing::BillingError::invalid(format!(
                    "the body is not a GraphQL JSON request: {e}"
                )),
                &http_request_id,
            );
        }
    };
    let mut request = request.data(http_request_id.clone());
    if let Some(token) = bearer(&http) {
        // Behind a proxy this is the proxy's address: the limit then applies to all
        // its clients together, which is the safe side.
        let address = http.peer_addr().map(|a| a.ip());
        if let Err(e) = state.rate_limiter.check_address(address) {
            return refusal(e, &http_request_id);
        }
        match state
            .credentials
            .authenticate(&state.db, token, state.config.admin_token.as_deref())
            .await
        {
            Ok(principal) => {
                let loaders =
                    schema::loaders::LazyLoaders::new(&state.db, &principal, chrono::Utc::now());
                request = request.data(Arc::new(loaders)).data(Caller(principal));
            }
            Err(e) => {
                if e.code() == billing::ErrorCode::Unauthenticated {
                    state.rate_limiter.auth_failed(address);
                }
                return refusal(e, &http_request_id);
            }
        }
    }
    let response = state.schema.execute(request).await;
    if let Some(first) = response.errors.first() {
        let code = first
            .extensions
            .as_ref()
            .and_then(|ext| ext.get("code"))
            .map(ToString::to_string);
        tracing::info!(
            http_request_id = %http_request_id.0,
            errors = response.errors.len(),
            code = code.as_deref().unwrap_or("-"),
            "graphql request refused"
        );
    } else {
        tracing::debug!(http_request_id = %http_request_id.0, "graphql request");
    }
    respond(&response)
}

/// One open WebSocket connection, counted until dropped.
struct WsConnectionSlot(Arc<AtomicUsize>);

impl WsConnectionSlot {
    fn acquire(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(open.clone()))
    }
}

impl Drop for WsConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// GET /graphql with `Upgrade: websocket`: subscriptions over `graphql-transport-ws`
/// (or the older `graphql-ws`). The client authenticates in `connection_init` with
/// `{"authorization": "Bearer <token>"}`; a bad token closes the connection with the
/// error. Without a token the connection is anonymous and every subscription answers
/// UNAUTHENTICATED, as over HTTP.
async fn graphql_ws(
    state: web::Data<AppState>,
    http: HttpRequest,
    payload: web::Payload,
) -> actix_web::Result<HttpResponse> {
    let Some(slot) = WsConnectionSlot::acquire(
        &state.ws_connections,
        state.config.websocket_connections_max,
    ) else {
        tracing::warn!(
            max = state.config.websocket_connections_max,
            "WebSocket connection refused: limit reached"
        );
        return Ok(HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "errors": [{
                "message": "too many WebSocket connections; try again later",
                "extensions": { "code": billing::ErrorCode::LimitExceeded.as_str() },
            }]
        })));
    };
    let db = state.db.clone();
    let admin_token = state.config.admin_token.clone();
    let credentials = state.credentials.clone();
    websocket::serve(
        &http,
        payload,
        state.schema.clone(),
        move |init| connection_init(db, credentials, admin_token, init),
        state.feeds.clone(),
        state.closing.clone(),
        slot,
    )
}

/// A WebSocket connection's caller and id, as `connection_init` established them.
struct ConnectionSession {
    caller: Option<Caller>,
    http_request_id: RequestId,
}

impl websocket::SessionData for ConnectionSession {
    fn to_data(&self) -> async_graphql::Data {
        let mut data = async_graphql::Data::default();
        if let Some(caller) = &self.caller {
            data.insert(caller.clone());
        }
        data.insert(self.http_request_id.clone());
        data
    }
}

async fn connection_init(
    db: DatabaseConnection,
    credentials: Arc<credentials::CredentialCache>,
    admin_token: Option<String>,
    init: serde_json::Value,
) -> async_graphql::Result<ConnectionSession> {
    let http_request_id = RequestId(uuid::Uuid::new_v4().simple().to_string());
    let mut caller = None;
    let value = init
        .get("authorization")
        .or_else(|| init.get("Authorization"))
        .and_then(serde_json::Value::as_str);
    if let Some(value) = value {
        let token = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or(value, |(_, token)| token)
            .trim();
        let principal = credentials
            .authenticate(&db, token, admin_token.as_deref())
            .await
            .map_err(|e| error::to_gql(e, Some(&http_request_id)))?;
        caller = Some(Caller(principal));
    }
    Ok(ConnectionSession {
        caller,
        http_request_id,
    })
}

/// Prometheus metrics.
async fn metrics_endpoint(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.set_subscribers(state.hub.subscriber_count());
    state.metrics.set_shared_feeds(state.feeds.feed_count());
    let mut body = state.metrics.render();
    body.push_str(&metrics::render_writer(state.writer.stats()));
    metrics::append_jobs(&mut body, &state.db).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

/// `POST /webhooks/stripe`: the payment gateway's signed events. Verification and
/// effects are `billing::payments::webhooks::receive`; a refused request (bad or stale
/// signature, unreadable body, webhooks not configured) is 400 and writes nothing, a
/// database failure is 500 so that Stripe delivers the event again.
async fn stripe_webhook(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let signature = http
        .headers()
        .get("Stripe-Signature")
        .and_then(|v| v.to_str().ok());
    let received = billing::payments::webhooks::receive(
        &state.db,
        state.config.gateway.as_ref(),
        &body,
        signature,
        chrono::Utc::now(),
    )
    .await;
    match received {
        Ok(_) => HttpResponse::Ok().json(serde_json::json!({ "received": true })),
        Err(e) if e.code() == billing::ErrorCode::InvalidInput => {
            tracing::warn!(error = %e, "stripe webhook refused");
            HttpResponse::BadRequest().json(serde_json::json!({ "error": e.to_string() }))
        }
        Err(e) => {
            tracing::error!(error = %e, "stripe webhook failed; Stripe will retry");
            HttpResponse::InternalServerError()
                .json(serde_json::json!({ "error": "internal error" }))
        }
    }
}

/// The process is up.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// The database answered the last health ping, and recently, and the job workers of
/// this process (if any) can poll their queues: read from cached states, so this
/// answers at once even while the database hangs.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if !state.health.is_ready() {
        return worker_ops::unready("database unreachable");
    }
    match state
        .config
        .worker_readiness
        .as_ref()
        .and_then(|w| w.unready())
    {
        Some(why) => worker_ops::unready(&why),
        None => HttpResponse::Ok().body("ready"),
    }
}

/// Time an in-flight HTTP request gets to finish after a graceful stop.
pub const SHUTDOWN_TIMEOUT_SECONDS: u64 = 10;

/// Builds the HTTP server on an already bound listener; the returned server runs when
/// awaited (or spawned), and [`CloseAll`](websocket::CloseAll) ends its WebSocket
/// connections (what [`ApiHandle::stop`] does first).
pub fn build_server(
    listener: TcpListener,
    db: DatabaseConnection,
    config: ApiConfig,
) -> std::io::Result<(Server, SocketAddr, websocket::CloseAll)> {
    let addr = listener.local_addr()?;
    let (close_all, closing) = websocket::closing();
    let rate_limiter = Arc::new(rate_limit::RateLimiter::new(config.rate_limits));
    // One tailer per process; it stops when the last schema clone is dropped.
    let hub = events::BalanceHub::start(db.clone(), config.balance_hub.clone());
    let metrics = metrics::Metrics::new().map_err(std::io::Error::other)?;
    let writer_config = config.writer.unwrap_or_else(|| {
        billing::debits::writer::WriterConfig::for_backend(db.get_database_backend())
    });
    let writer = billing::debits::writer::DebitWriter::start(
        db.clone(),
        writer_config,
        Some(config.jobs.clone()),
    )
    .map_err(std::io::Error::other)?;
    let seen = writer.clone();
    let credentials = Arc::new(credentials::CredentialCache::new(
        config.credential_cache_ttl_ms,
        Box::new(move || seen.config_version()),
    ));
    let health = health::Health::start(db.clone());
    let state = AppState {
        schema: schema_of(&db, &config, &metrics, &hub, &writer, &credentials)
            .data(rate_limiter.clone())
            .finish(),
        feeds: shared_feed::SharedFeeds::new(config.balance_hub.subscriber_buffer),
        hub,
        metrics,
        db,
        config: config.clone(),
        ws_connections: Arc::new(AtomicUsize::new(0)),
        credentials,
        writer,
        closing,
        health,
        rate_limiter,
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(web::PayloadConfig::new(state.config.body_bytes_max))
            .app_data(web::JsonConfig::default().limit(state.config.body_bytes_max))
            .configure(dashboard::routes)
            .route("/graphql", web::post().to(graphql))
            .route(
                "/graphql",
                web::get()
                    .guard(guard::Header("upgrade", "websocket"))
                    .to(graphql_ws),
            )
            .route("/webhooks/stripe", web::post().to(stripe_webhook))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_endpoint))
    })
    .listen(listener)?
    .shutdown_timeout(SHUTDOWN_TIMEOUT_SECONDS)
    .disable_signals();
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    Ok((server.run(), addr, close_all))
}

/// The schema with the process's shared data (before `finish`); introspection as
/// configured.
fn schema_of(
    db: &DatabaseConnection,
    config: &ApiConfig,
    metrics: &metrics::Metrics,
    hub: &Arc<events::BalanceHub>,
    writer: &billing::debits::writer::DebitWriter,
    credentials: &Arc<credentials::CredentialCache>,
) -> async_graphql::SchemaBuilder<schema::QueryRoot, schema::MutationRoot, schema::SubscriptionRoot>
{
    let builder = schema::schema_builder(db.clone(), config.gateway.clone(), Some(metrics.clone()))
        .data(hub.clone())
        .data(writer.clone())
        .data(credentials.clone())
        .data(config.jobs.clone())
        .data(config.webhook_urls);
    match config.introspection {
        true => builder,
        false => builder
            .disable_introspection()
            .data(limits::IntrospectionOff),
    }
}

/// Stops a running API: WebSocket connections first (each gets its close frame; a
/// graceful stop would otherwise wait for them until the drain timeout), then the
/// HTTP server.
#[derive(Clone)]
pub struct ApiHandle {
    server: ServerHandle,
    close_all: Arc<websocket::CloseAll>,
}

impl ApiHandle {
    pub async fn stop(&self, graceful: bool) {
        self.close_all.close_all();
        self.server.stop(graceful).await;
    }
}

/// Starts the server in the background (tests, and `serve` next to the worker).
pub fn spawn(
    listener: TcpListener,
    db: DatabaseConnection,
    config: ApiConfig,
) -> std::io::Result<(
    ApiHandle,
    SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let (server, addr, close_all) = build_server(listener, db, config)?;
    let handle = ApiHandle {
        server: server.handle(),
        close_all: Arc::new(close_all),
    };
    let join = tokio::spawn(server);
    Ok((handle, addr, join))
}
