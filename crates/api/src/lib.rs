//! The API process: GraphQL over HTTP on actix-web, with
//! bearer-token authentication and health endpoints. Built by [`build_server`] so
//! that the launcher and the tests start exactly the same app (tests bind port 0).

pub mod error;
pub mod scalars;
pub mod schema;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use async_graphql::http::GraphiQLSource;
use async_graphql_actix_web::{GraphQLRequest, GraphQLResponse};
use billing::auth;
use billing::sea_orm::{ConnectionTrait, DatabaseConnection};
use error::RequestId;
use schema::{Caller, ReservoirSchema};
use std::net::{SocketAddr, TcpListener};

pub use schema::build_schema;

/// Settings of the API process.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The platform admin token; None disables platform-admin calls.
    pub admin_token: Option<String>,
    /// Largest accepted request body.
    pub body_bytes_max: usize,
    /// HTTP worker threads (0: one per core).
    pub workers: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admin_token: None,
            body_bytes_max: 2 * 1024 * 1024,
            workers: 0,
        }
    }
}

#[derive(Clone)]
struct AppState {
    db: DatabaseConnection,
    schema: ReservoirSchema,
    config: ApiConfig,
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
    value.strip_prefix("Bearer ").map(str::trim)
}

async fn graphql(
    state: web::Data<AppState>,
    http: HttpRequest,
    body: GraphQLRequest,
) -> GraphQLResponse {
    let request_id = RequestId(uuid::Uuid::new_v4().simple().to_string());
    let mut request = body.into_inner().data(request_id.clone());
    if let Some(token) = bearer(&http) {
        match auth::authenticate(
            &state.db,
            token,
            state.config.admin_token.as_deref(),
            chrono::Utc::now(),
        )
        .await
        {
            Ok(principal) => request = request.data(Caller(principal)),
            Err(e) => {
                let mut err =
                    error::to_gql(e, Some(&request_id)).into_server_error(Default::default());
                err.locations.clear(); // not about any place in the query
                return async_graphql::Response::from_errors(vec![err]).into();
            }
        }
    }
    state.schema.execute(request).await.into()
}

async fn graphiql() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(GraphiQLSource::build().endpoint("/graphql").finish())
}

/// The process is up.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// The database answers.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.db.execute_unprepared("SELECT 1").await {
        Ok(_) => HttpResponse::Ok().body("ready"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable().body("database unreachable")
        }
    }
}

/// Builds the HTTP server on an already bound listener; the returned server runs when
/// awaited (or spawned), and its handle stops it.
pub fn build_server(
    listener: TcpListener,
    db: DatabaseConnection,
    config: ApiConfig,
) -> std::io::Result<(Server, SocketAddr)> {
    let addr = listener.local_addr()?;
    let state = AppState {
        schema: build_schema(db.clone()),
        db,
        config: config.clone(),
    };
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .app_data(web::PayloadConfig::new(state.config.body_bytes_max))
            .app_data(web::JsonConfig::default().limit(state.config.body_bytes_max))
            .route("/", web::get().to(graphiql))
            .route("/graphql", web::post().to(graphql))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
    })
    .listen(listener)?
    .disable_signals();
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    Ok((server.run(), addr))
}

/// Starts the server in the background (tests, and `serve` next to the worker).
pub fn spawn(
    listener: TcpListener,
    db: DatabaseConnection,
    config: ApiConfig,
) -> std::io::Result<(
    ServerHandle,
    SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let (server, addr) = build_server(listener, db, config)?;
    let handle = server.handle();
    let join = tokio::spawn(server);
    Ok((handle, addr, join))
}
