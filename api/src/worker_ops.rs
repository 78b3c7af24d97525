//! The HTTP face of a worker-only process (`reservoir worker` with
//! `RESERVOIR_WORKER_LISTEN`): `/healthz`, `/readyz` and `/metrics`, nothing else (no
//! GraphQL, no debit writer, no balance hub). It lives here because this crate owns
//! the HTTP server and the metrics' text; it only reads what the worker reports.

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use billing::jobs::WorkerReadiness;
use billing::sea_orm::DatabaseConnection;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

/// The 503 of `/readyz`, with the reason; a probe may ask again in a second.
pub fn unready(why: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((actix_web::http::header::RETRY_AFTER, "1"))
        .body(why.to_owned())
}

#[derive(Clone)]
struct OpsState {
    db: DatabaseConnection,
    readiness: Arc<dyn WorkerReadiness>,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok")
}

/// Ready when every job worker can poll its queue (read from the worker's cached
/// state: this never waits on a database).
async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    match state.readiness.unready() {
        Some(why) => unready(&why),
        None => HttpResponse::Ok().body("ready"),
    }
}

/// Readiness as a gauge, the job backlog and this process's job runs.
async fn metrics(state: web::Data<OpsState>) -> HttpResponse {
    let ready = u8::from(state.readiness.unready().is_none());
    let mut body = format!(
        "# HELP reservoir_worker_ready 1 when every job worker of this process can poll its queue (what /readyz answers).\n\
         # TYPE reservoir_worker_ready gauge\nreservoir_worker_ready {ready}\n"
    );
    crate::metrics::append_jobs(&mut body, &state.db).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

/// Serves on `listener` in the background (one HTTP worker thread: probes and
/// scrapes only) until the handle stops it.
pub fn spawn(
    listener: TcpListener,
    db: DatabaseConnection,
    readiness: Arc<dyn WorkerReadiness>,
) -> std::io::Result<(
    ServerHandle,
    SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let addr = listener.local_addr()?;
    let state = OpsState { db, readiness };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(1)
    .listen(listener)?
    .shutdown_timeout(1)
    .disable_signals()
    .run();
    let handle = server.handle();
    Ok((handle, addr, tokio::spawn(server)))
}
