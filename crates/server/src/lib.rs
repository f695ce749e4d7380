//! silica-server: the axum application. The only crate that knows HTTP, JSON wire types and
//! the OpenAI schema.
//!
//! - [`app`] builds the router over an [`AppState`] (the [`ModelPool`] and settings);
//!   [`serve`] runs it on a listener until a shutdown signal, then drains within a deadline.
//! - Handlers turn wire requests into engine requests once (`convert`), ask the pool for a
//!   model (`silica_router`), submit, and turn the engine's events into JSON, SSE chunks or
//!   WebSocket messages (`handlers`). Generation runs on the engines' own threads; no
//!   forward pass or tokenization runs on a tokio worker.
//! - Every error is an [`ApiError`]: OpenAI's body and the right status.

pub mod config;
pub mod convert;
pub mod error;
pub mod extract;
mod handlers;
mod openapi;
pub mod tools;
pub mod wire;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use silica_router::ModelPool;

pub use config::ServerConfig;
pub use error::ApiError;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub pool: Arc<ModelPool>,
    pub cfg: Arc<ServerConfig>,
    pub started: Instant,
    /// Set once shutdown begins: new generations are refused with 503.
    pub draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(pool: Arc<ModelPool>, cfg: ServerConfig) -> Self {
        AppState { pool, cfg: Arc::new(cfg), started: Instant::now(), draining: Arc::new(AtomicBool::new(false)) }
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// The application: every route, the body limit, and OpenAI-shaped 404s.
pub fn app(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/generate", post(handlers::native::generate))
        .route("/ws/stream", get(handlers::ws::upgrade))
        .route("/models", get(handlers::info::models))
        .route("/performance", get(handlers::info::performance))
        .route("/health", get(handlers::info::health))
        .route("/metrics", get(handlers::info::metrics))
        .route("/openapi.json", get(openapi::spec))
        .route("/v1/chat/completions", post(handlers::openai::chat))
        .route("/v1/completions", post(handlers::openai::completions))
        .route("/v1/models", get(handlers::info::openai_models))
        .route("/v1/models/{id}", get(handlers::info::openai_model))
        .fallback(handlers::info::not_found)
        .method_not_allowed_fallback(handlers::info::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serve `state` on `listener` until `signal` resolves; then stop accepting, give running
/// requests `shutdown_grace` to finish, end whatever is still streaming (each stream gets an
/// error event and its proper end), stop the engines and return.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState, signal: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = app(state.clone());
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .into_future(),
    );
    tokio::select! {
        r = &mut server => return r.map_err(std::io::Error::other)?,
        _ = signal => {}
    }
    tracing::info!(grace_s = state.cfg.shutdown_grace_seconds, "shutting down: no new requests; waiting for running ones");
    state.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(());
    let grace = Duration::from_secs_f64(state.cfg.shutdown_grace_seconds);
    let result = match tokio::time::timeout(grace, &mut server).await {
        Ok(r) => r.map_err(std::io::Error::other)?,
        Err(_) => {
            tracing::warn!("grace period over: ending the requests still running");
            let pool = state.pool.clone();
            let _ = tokio::task::spawn_blocking(move || pool.shutdown()).await;
            match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
                Ok(r) => r.map_err(std::io::Error::other)?,
                Err(_) => {
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    let pool = state.pool.clone();
    let _ = tokio::task::spawn_blocking(move || pool.shutdown()).await;
    tracing::info!("server stopped");
    result
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
