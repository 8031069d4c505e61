//! The OpenAI-compatible HTTP front end of tokenmill.
//!
//! Requests are checked by one [`validate::Validator`] (the model's facts
//! and the server's [`Limits`]) into [`validate::ValidRequest`]s, which carry
//! the engine's request; only those are submitted to the [`EngineClient`].
//! Answers are JSON or server-sent events. Every error goes through the one
//! table in [`error`].
#![deny(missing_docs)]

pub mod auth;
pub mod error;
mod handlers;
pub mod openai;
mod respond;
pub mod telemetry;
pub mod tenants;
#[cfg(test)]
mod testing;
pub mod validate;

pub use auth::Auth;

use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use telemetry::TenantLabels;
use tokenmill_protocol::EngineClient;
use validate::Validator;

pub use error::ApiError;

/// Limits that protect the server; each breach is answered with its own
/// OpenAI error and status.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Most prompt tokens per request (400 beyond); `None`: as many as the
    /// model's sequence limit leaves room for.
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` a request may ask for (400 beyond); a request
    /// that gives none gets at most this many.
    pub max_output_tokens: Option<usize>,
    /// Longest a request may take, queueing included (504 beyond; the
    /// generation is cancelled and billed for the work done).
    pub request_timeout: std::time::Duration,
    /// Most API requests in progress at once, streams included (503
    /// beyond).
    pub max_concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_prompt_tokens: None,
            max_output_tokens: None,
            request_timeout: std::time::Duration::from_secs(600),
            max_concurrent_requests: 4096,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    engine: Arc<dyn EngineClient>,
    validator: Arc<Validator>,
    limits: Limits,
    auth: Auth,
    metrics: Option<PrometheusHandle>,
    tenant_labels: TenantLabels,
    lifecycle: Arc<Lifecycle>,
    requests_in_progress: Arc<tokio::sync::Semaphore>,
    started_at: u64,
}

/// Whether the server is taking requests or draining before it stops.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
}

impl Lifecycle {
    /// From now on new requests get 503 and readiness fails; requests
    /// already accepted go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

impl AppState {
    /// State over `engine`.
    pub fn new(engine: Arc<dyn EngineClient>, limits: Limits, auth: Auth) -> Self {
        AppState {
            validator: Arc::new(Validator::new(engine.clone(), &limits)),
            engine,
            requests_in_progress: Arc::new(tokio::sync::Semaphore::new(
                limits.max_concurrent_requests.max(1),
            )),
            limits,
            auth,
            metrics: None,
            tenant_labels: TenantLabels::default(),
            lifecycle: Arc::default(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

impl AppState {
    /// The server's lifecycle, for the code that handles signals.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        self.lifecycle.clone()
    }

    /// Serves `/metrics` from `handle` (the installed Prometheus recorder),
    /// labelling token counters by tenant as `tenant_labels` says.
    pub fn with_metrics(mut self, handle: PrometheusHandle, tenant_labels: TenantLabels) -> Self {
        self.metrics = Some(handle);
        self.tenant_labels = tenant_labels;
        self
    }
}

/// The routes of the API; everything under /v1 needs a key (unless
/// authentication is disabled), /health does not.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::limit_requests_in_progress,
        ));
    Router::new()
        .route("/health", get(handlers::health))
        .route("/health/live", get(handlers::health))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .merge(api)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving the OpenAI API");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
