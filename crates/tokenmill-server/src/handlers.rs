//! The HTTP handlers: read the body, have the [`Validator`] check it,
//! submit the [`ValidRequest`] to the engine, and answer (the answer's shape
//! is [`crate::respond`]'s). No rule about a request's content lives here.
//!
//! [`Validator`]: crate::validate::Validator

use crate::error::ApiError;
use crate::openai::{Endpoint, ResponseHeader};
use crate::respond::{collect_response, stream_response, Shape, Timing};
use crate::telemetry::{self, RequestTimer};
use crate::validate::{RequestMeta, ValidRequest};
use crate::AppState;
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::StreamExt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokenmill_protocol::{Caller, EngineClient, EventSink, GenerationEvent, RequestId};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Delivers engine events into a request's channel; the handler (or the SSE
/// body) holds the receiver, so a client that goes away closes it.
struct ChannelSink(UnboundedSender<GenerationEvent>);

impl EventSink for ChannelSink {
    fn send(&self, event: GenerationEvent) -> bool {
        self.0.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// `GET /health`, `GET /health/live`: the process is up.
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /health/ready`: whether to send this server traffic; 503 while it
/// drains, so a load balancer stops routing here before it stops.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.lifecycle.is_draining() {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(serde_json::json!({"status": "ready"})).into_response()
    }
}

fn model_object(state: &AppState) -> serde_json::Value {
    serde_json::json!({
        "id": state.engine.model_info().name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "tokenmill",
    })
}

/// Middleware: at most `max_concurrent_requests` API requests in progress;
/// the place is held until the response body (a stream, perhaps) is sent.
pub async fn limit_requests_in_progress(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let permit = state
        .requests_in_progress
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyInProgress(1))?;
    let response = next.run(request).await;
    Ok(response.map(|body| {
        let guarded = body.into_data_stream().map(move |chunk| {
            let _held = &permit;
            chunk
        });
        axum::body::Body::from_stream(guarded)
    }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::RouteNotFound {
            method: "GET".to_owned(),
            path: "/metrics".to_owned(),
        }
        .into_response(),
    }
}

/// `GET /v1/models`
pub async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [model_object(&state)]}))
}

/// `GET /v1/models/{id}`
pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if id == state.engine.model_info().name {
        Ok(Json(model_object(&state)))
    } else {
        Err(ApiError::ModelNotFound(id))
    }
}

/// `POST /v1/completions`
pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Result<Response, ApiError> {
    generate(state, caller, Endpoint::Completions, request).await
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Result<Response, ApiError> {
    generate(state, caller, Endpoint::Chat, request).await
}

/// Any other route.
pub async fn not_found(method: Method, request: Request) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: request.uri().path().to_owned(),
    }
}

async fn generate(
    state: AppState,
    caller: Caller,
    endpoint: Endpoint,
    request: Request,
) -> Result<Response, ApiError> {
    let model = state.engine.model_info().name.clone();
    let timeout = state.limits.request_timeout;
    let accepted = accept(state, caller, endpoint, request)
        .await
        .inspect_err(|e| telemetry::refused(endpoint, &model, e.outcome()))?;
    let Accepted {
        header,
        shape,
        stream,
        events,
        timing,
    } = accepted;
    let deadline = tokio::time::Instant::now() + timeout;
    if stream {
        Ok(stream_response(header, events, shape, timing, deadline, timeout).into_response())
    } else {
        // Past the deadline the receiver is dropped, which cancels the
        // generation; it is billed for what it made.
        tokio::time::timeout_at(deadline, collect_response(header, events, shape, timing))
            .await
            .map_err(|_| ApiError::Timeout(timeout.as_secs()))?
            .map(IntoResponse::into_response)
    }
}

/// `Retry-After` of requests refused while draining: long enough for the
/// load balancer to notice readiness failing.
const DRAIN_RETRY_AFTER_SECONDS: u64 = 5;

/// A request the engine took.
struct Accepted {
    header: ResponseHeader,
    shape: Shape,
    stream: bool,
    events: UnboundedReceiver<GenerationEvent>,
    timing: Timing,
}

/// Reads, validates and submits a request.
async fn accept(
    state: AppState,
    caller: Caller,
    endpoint: Endpoint,
    request: Request,
) -> Result<Accepted, ApiError> {
    let arrived = Instant::now();
    let meta = RequestMeta {
        id: RequestId(format!(
            "{}-{}",
            endpoint.id_prefix(),
            uuid::Uuid::new_v4().simple()
        )),
        caller,
        arrived_at: SystemTime::now(),
    };
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining(DRAIN_RETRY_AFTER_SECONDS));
    }
    if let Some(encoding) = request.headers().get(axum::http::header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes())
            .trim()
            .to_owned();
        if !encoding.eq_ignore_ascii_case("identity") {
            return Err(ApiError::UnsupportedEncoding(encoding));
        }
    }
    let limit = state.limits.max_body_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let validator = state.validator.clone();
    // Tokenizing and rendering templates is CPU work: keep it off the
    // reactor threads.
    let valid = tokio::task::spawn_blocking(move || validator.validate(endpoint, &body, meta))
        .await
        .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))??;

    let request = valid.request();
    let header = ResponseHeader {
        id: request.id.0.clone(),
        created: unix_seconds(SystemTime::now()),
        model: request.model.clone(),
        endpoint,
    };
    let shape = Shape {
        n: request.n,
        logprobs: request.logprobs.is_some(),
        include_usage: valid.include_usage(),
        continuous_usage: valid
            .continuous_usage()
            .then_some(request.prompt_tokens.len() as u64),
    };
    let timing = Timing {
        timer: RequestTimer::new(endpoint, &header.model, arrived, request.n),
        tenant_labels: state.tenant_labels.clone(),
    };
    let stream = valid.stream();
    let events = submit(state.engine.as_ref(), valid)?;
    Ok(Accepted {
        header,
        shape,
        stream,
        events,
        timing,
    })
}

/// Hands a validated request to the engine; its events come back through
/// the returned channel.
fn submit(
    engine: &dyn EngineClient,
    valid: ValidRequest,
) -> Result<UnboundedReceiver<GenerationEvent>, ApiError> {
    let (sender, receiver) = unbounded_channel();
    engine.submit(valid.into_request(), Box::new(ChannelSink(sender)))?;
    Ok(receiver)
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeEngine, MODEL};
    use crate::{Auth, Limits};
    use axum::body::Body;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tokenmill_protocol::{KeyId, SubmitError, TenantId};

    fn caller() -> Caller {
        Caller {
            tenant: TenantId("acme".to_owned()),
            key_id: KeyId("key-1".to_owned()),
            weight: 2,
        }
    }

    fn state_over(engine: &Arc<FakeEngine>, limits: Limits) -> AppState {
        AppState::new(engine.clone(), limits, Auth::Disabled)
    }

    fn post(body: &Value) -> Request {
        Request::builder()
            .method("POST")
            .body(Body::from(body.to_string()))
            .expect("a request")
    }

    async fn body_bytes(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body")
            .to_vec()
    }

    async fn call(state: AppState, endpoint: Endpoint, body: &Value) -> Result<Response, ApiError> {
        let request = post(body);
        match endpoint {
            Endpoint::Completions => completions(State(state), Extension(caller()), request).await,
            Endpoint::Chat => chat_completions(State(state), Extension(caller()), request).await,
        }
    }

    fn completion() -> Value {
        json!({"model": MODEL, "prompt": "hello there", "max_tokens": 4})
    }

    fn chat() -> Value {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    }

    #[tokio::test]
    async fn a_valid_request_reaches_the_engine_once_with_its_caller_and_id() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let state = state_over(&engine, Limits::default());
        let response = call(state.clone(), Endpoint::Completions, &completion())
            .await
            .expect("answered");
        assert_eq!(response.status(), 200);
        let body: Value = serde_json::from_slice(&body_bytes(response).await).expect("JSON");
        let submitted = engine.submitted();
        assert_eq!(submitted.len(), 1);
        assert_eq!(submitted[0].caller, caller());
        assert_eq!(submitted[0].prompt_tokens, vec![5, 5]);
        assert_eq!(submitted[0].stop.max_tokens, 4);
        assert_eq!(body["id"], json!(submitted[0].id.0));
        assert!(submitted[0].id.0.starts_with("cmpl-"));
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "ok");
        assert_eq!(body["usage"]["prompt_tokens"], 2);

        let response = call(state, Endpoint::Chat, &chat())
            .await
            .expect("answered");
        let body: Value = serde_json::from_slice(&body_bytes(response).await).expect("JSON");
        let submitted = engine.submitted();
        assert_eq!(submitted.len(), 2);
        assert!(submitted[1].id.0.starts_with("chatcmpl-"));
        assert_eq!(body["id"], json!(submitted[1].id.0));
        assert_eq!(body["choices"][0]["message"]["content"], "ok");
        // No max_tokens: the rest of the context (3 prompt tokens).
        assert_eq!(submitted[1].stop.max_tokens, 61);
    }

    #[tokio::test]
    async fn a_streamed_request_ends_with_usage_and_done() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let mut body = chat();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = call(
            state_over(&engine, Limits::default()),
            Endpoint::Chat,
            &body,
        )
        .await
        .expect("answered");
        assert_eq!(response.status(), 200);
        let text = String::from_utf8(body_bytes(response).await).expect("UTF-8");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let usage: Value = serde_json::from_str(data[data.len() - 2]).expect("a usage chunk");
        assert_eq!(usage["usage"]["completion_tokens"], 1);
        assert!(text.contains("\"content\":\"ok\""), "{text}");
    }

    #[tokio::test]
    async fn a_refused_request_never_reaches_the_engine() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let limits = Limits {
            max_prompt_tokens: Some(10),
            max_output_tokens: Some(20),
            ..Limits::default()
        };
        let state = state_over(&engine, limits);
        let long = "w ".repeat(11);
        let too_long = "w ".repeat(64);
        for (endpoint, change, param) in [
            (
                Endpoint::Completions,
                json!({"temperature": 9}),
                "temperature",
            ),
            (Endpoint::Completions, json!({"foo": 1}), "foo"),
            (Endpoint::Completions, json!({"prompt": too_long}), "prompt"),
            (Endpoint::Completions, json!({"prompt": long}), "prompt"),
            (
                Endpoint::Completions,
                json!({"max_tokens": 21}),
                "max_tokens",
            ),
            (
                Endpoint::Chat,
                json!({"max_completion_tokens": 61}),
                "max_completion_tokens",
            ),
            (Endpoint::Chat, json!({"messages": []}), "messages"),
        ] {
            let mut body = match endpoint {
                Endpoint::Completions => completion(),
                Endpoint::Chat => chat(),
            };
            if let (Some(map), Some(change)) = (body.as_object_mut(), change.as_object()) {
                map.extend(change.clone());
            }
            let error = call(state.clone(), endpoint, &body)
                .await
                .expect_err("refused");
            assert_eq!(error.status(), 400, "{error}");
            assert_eq!(error.body()["error"]["param"], param, "{error}");
        }
        assert!(engine.submitted().is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let limits = Limits {
            max_body_bytes: 20,
            ..Limits::default()
        };
        let error = call(
            state_over(&engine, limits),
            Endpoint::Completions,
            &completion(),
        )
        .await
        .expect_err("refused");
        assert_eq!(error, ApiError::PayloadTooLarge(20));
        assert_eq!(error.status(), 413);
    }

    #[tokio::test]
    async fn a_draining_server_refuses_with_503() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let state = state_over(&engine, Limits::default());
        state.lifecycle().start_draining();
        let error = call(state, Endpoint::Chat, &chat())
            .await
            .expect_err("refused");
        assert_eq!(error, ApiError::Draining(DRAIN_RETRY_AFTER_SECONDS));
        assert!(engine.submitted().is_empty());
    }

    #[tokio::test]
    async fn an_engine_refusal_is_answered_by_the_error_table() {
        for (refusal, status, code) in [
            (SubmitError::Stopped, 503, json!("unavailable")),
            (SubmitError::MeterUnavailable, 503, json!("unavailable")),
            (
                SubmitError::Overloaded {
                    retry_after_seconds: 2,
                },
                429,
                json!("queue_full"),
            ),
            (
                SubmitError::Unschedulable {
                    tokens: 70,
                    limit: 64,
                },
                500,
                Value::Null,
            ),
        ] {
            let engine = Arc::new(FakeEngine::new(64, 64).refusing(refusal));
            let error = call(
                state_over(&engine, Limits::default()),
                Endpoint::Completions,
                &completion(),
            )
            .await
            .expect_err("refused");
            assert_eq!(error.status(), status, "{error}");
            assert_eq!(error.body()["error"]["code"], code, "{error}");
        }
    }

    #[tokio::test]
    async fn models_are_listed_and_found() {
        let engine = Arc::new(FakeEngine::new(64, 64));
        let state = state_over(&engine, Limits::default());
        let Json(list) = list_models(State(state.clone())).await;
        assert_eq!(list["data"][0]["id"], MODEL);
        let Json(model) = get_model(State(state.clone()), Path(MODEL.to_owned()))
            .await
            .expect("served");
        assert_eq!(model["object"], "model");
        let error = get_model(State(state), Path("other".to_owned()))
            .await
            .expect_err("not served");
        assert_eq!(error.status(), 404);
    }
}
