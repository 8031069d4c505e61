//! The witness over HTTP: `POST /add-checkpoint`, answered as the
//! tlog-witness protocol says (200 with cosignature lines; 409 with the
//! latest size as `text/x.tlog.size`; 400, 403, 404, 422 with a one-line
//! reason).

use crate::{AddError, Witness};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use std::sync::Arc;

/// Largest request body: 63 proof lines and a checkpoint with a few
/// signatures fit in a few kilobytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The witness's routes.
pub fn router(witness: Arc<Witness>) -> Router {
    Router::new()
        .route("/add-checkpoint", post(add_checkpoint))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(witness)
}

async fn add_checkpoint(State(witness): State<Arc<Witness>>, body: String) -> Response {
    // The check ends with an fsync: off the async workers.
    let result = tokio::task::spawn_blocking(move || witness.add_checkpoint(&body)).await;
    match result {
        Ok(Ok(cosignature)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            cosignature,
        )
            .into_response(),
        Ok(Err(error)) => refusal(&error),
        Err(join) => {
            tracing::error!(error = %join, "add-checkpoint failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

fn refusal(error: &AddError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let AddError::SizeConflict { latest, .. } = error {
        return (
            status,
            [(header::CONTENT_TYPE, "text/x.tlog.size")],
            format!("{latest}\n"),
        )
            .into_response();
    }
    if status.is_server_error() {
        tracing::error!(error = %error, "add-checkpoint refused");
    } else {
        tracing::warn!(error = %error, "add-checkpoint refused");
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{error}\n"),
    )
        .into_response()
}

/// Serves the witness on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    witness: Arc<Witness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(witness))
        .with_graceful_shutdown(shutdown)
        .await
}
