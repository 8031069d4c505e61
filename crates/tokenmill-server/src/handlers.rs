//! The HTTP handlers: validate, submit to the engine, answer as JSON or as a
//! stream of server-sent events.

use crate::error::ApiError;
use crate::openai::{finish_reason, logprobs_text_len, ChoiceOut, Endpoint, ResponseHeader, Usage};
use crate::telemetry::{self, RequestTimer, TenantLabels};
use crate::validate::{self, ValidRequest};
use crate::AppState;
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::{self, Stream, StreamExt};
use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokenmill_protocol::{
    Caller, EventSink, FinishReason, GenerateRequest, GenerationEvent, RequestFailure, RequestId,
    SubmitError, TokenLogprob, UsageEvent,
};
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
    let accepted = accept(state, caller, endpoint, request, Instant::now())
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
    arrived: Instant,
) -> Result<Accepted, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::Draining(DRAIN_RETRY_AFTER_SECONDS));
    }
    let limit = state.limits.max_body_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let engine = state.engine.clone();
    // Tokenizing and rendering templates is CPU work: keep it off the
    // reactor threads.
    let valid = tokio::task::spawn_blocking(move || match endpoint {
        Endpoint::Completions => validate::completion(&body, engine.as_ref()),
        Endpoint::Chat => validate::chat(&body, engine.as_ref()),
    })
    .await
    .map_err(|e| ApiError::Internal(format!("validation task failed: {e}")))??;

    let header = ResponseHeader {
        id: format!("{}-{}", endpoint.id_prefix(), uuid::Uuid::new_v4().simple()),
        created: unix_seconds(SystemTime::now()),
        model: valid.model.clone(),
        endpoint,
    };
    let shape = Shape {
        n: valid.n,
        logprobs: valid.logprobs.is_some(),
        include_usage: valid.include_usage,
    };
    if let Some(limit) = state.limits.max_prompt_tokens {
        if valid.prompt_tokens.len() > limit {
            return Err(ApiError::invalid(
                endpoint.prompt_param(),
                format!(
                    "the prompt has {} tokens; this server takes at most {limit}",
                    valid.prompt_tokens.len()
                ),
            ));
        }
    }
    if let Some(limit) = state.limits.max_output_tokens {
        if valid.stop.max_tokens > limit {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{} tokens were asked for; this server makes at most {limit} per request",
                    valid.stop.max_tokens
                ),
            ));
        }
    }
    let stream = valid.stream;
    let timer = Timing {
        timer: RequestTimer::new(endpoint, &header.model, arrived, valid.n),
        tenant_labels: state.tenant_labels.clone(),
    };
    let events = submit(&state, caller, &header, valid)?;
    Ok(Accepted {
        header,
        shape,
        stream,
        events,
        timing: timer,
    })
}

/// A request's latency timer and how to label its tokens.
struct Timing {
    timer: RequestTimer,
    tenant_labels: TenantLabels,
}

impl Timing {
    fn on_event(&mut self, event: &GenerationEvent) {
        if let GenerationEvent::Text {
            index, token_ids, ..
        } = event
        {
            self.timer.tokens(*index, token_ids.len());
        }
    }

    fn finished(self, usage: &UsageEvent) {
        self.timer.finished(usage, &self.tenant_labels);
    }
}

/// What the answer holds besides text.
#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    logprobs: bool,
    include_usage: bool,
}

fn submit(
    state: &AppState,
    caller: Caller,
    header: &ResponseHeader,
    valid: ValidRequest,
) -> Result<UnboundedReceiver<GenerationEvent>, ApiError> {
    let (sender, receiver) = unbounded_channel();
    let request = GenerateRequest {
        id: RequestId(header.id.clone()),
        caller,
        model: valid.model,
        prompt_tokens: valid.prompt_tokens,
        sampling: valid.sampling,
        stop: valid.stop,
        n: valid.n,
        logprobs: valid.logprobs,
        arrived_at: SystemTime::now(),
    };
    state
        .engine
        .submit(request, Box::new(ChannelSink(sender)))
        .map_err(|e| match e {
            SubmitError::Stopped | SubmitError::MeterUnavailable => {
                ApiError::Unavailable(e.to_string())
            }
            SubmitError::Overloaded {
                retry_after_seconds,
            } => ApiError::Overloaded(retry_after_seconds),
            SubmitError::Unschedulable { .. } => ApiError::ContextLengthExceeded {
                message: e.to_string(),
                param: "max_tokens".to_owned(),
            },
        })?;
    Ok(receiver)
}

/// The error a finished request that did not end normally maps to.
fn failure(usage: &UsageEvent, error: Option<RequestFailure>) -> Option<ApiError> {
    match usage.finish_reason {
        FinishReason::Stop | FinishReason::Length => None,
        FinishReason::Cancelled => Some(ApiError::Unavailable(
            "the request was cancelled".to_owned(),
        )),
        FinishReason::Shutdown => Some(ApiError::Unavailable(
            "the server shut down before the request finished".to_owned(),
        )),
        FinishReason::Error => Some(ApiError::Internal(
            error.map_or_else(|| "generation failed".to_owned(), |e| e.to_string()),
        )),
    }
}

async fn collect_response(
    header: ResponseHeader,
    mut events: UnboundedReceiver<GenerationEvent>,
    shape: Shape,
    mut timing: Timing,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut choices = vec![
        ChoiceOut {
            logprobs: shape.logprobs.then(Vec::new),
            ..ChoiceOut::default()
        };
        shape.n
    ];
    while let Some(event) = events.recv().await {
        timing.on_event(&event);
        match event {
            GenerationEvent::Text {
                index,
                text,
                logprobs,
                ..
            } => {
                if let Some(choice) = choices.get_mut(index) {
                    choice.text.push_str(&text);
                    if let Some(all) = &mut choice.logprobs {
                        all.extend(logprobs);
                    }
                }
            }
            GenerationEvent::ChoiceEnd { index, reason } => {
                if let Some(choice) = choices.get_mut(index) {
                    choice.finish = finish_reason(reason);
                }
            }
            GenerationEvent::Finished { usage, error } => {
                timing.finished(&usage);
                if let Some(err) = failure(&usage, error) {
                    return Err(err);
                }
                return Ok(Json(header.full_response(&choices, Usage::from(&usage))));
            }
        }
    }
    Err(ApiError::Internal(
        "the engine dropped the request".to_owned(),
    ))
}

fn sse_json(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// A streamed choice's log probabilities not yet sent (their tokens made no
/// text yet), and where the next ones start in its text.
#[derive(Clone, Default)]
struct PendingLogprobs {
    tokens: Vec<TokenLogprob>,
    text_offset: usize,
}

impl PendingLogprobs {
    /// Takes the held tokens for a chunk, with their starting offset.
    fn take(&mut self) -> (Vec<TokenLogprob>, usize) {
        let tokens = std::mem::take(&mut self.tokens);
        let offset = self.text_offset;
        self.text_offset += logprobs_text_len(&tokens);
        (tokens, offset)
    }
}

/// The state of a stream between engine events.
struct StreamState {
    events: UnboundedReceiver<GenerationEvent>,
    header: ResponseHeader,
    shape: Shape,
    pending: Vec<PendingLogprobs>,
    timing: Option<Timing>,
}

impl StreamState {
    /// The SSE events for one engine event, and whether the stream goes on.
    fn on_event(&mut self, event: GenerationEvent) -> (Vec<Event>, bool) {
        if let Some(timing) = &mut self.timing {
            timing.on_event(&event);
        }
        match event {
            GenerationEvent::Text {
                index,
                text,
                logprobs,
                ..
            } => {
                let Some(pending) = self.pending.get_mut(index) else {
                    return (Vec::new(), true);
                };
                pending.tokens.extend(logprobs);
                if text.is_empty() {
                    return (Vec::new(), true);
                }
                let logprobs = self.shape.logprobs.then(|| pending.take());
                let chunk = self.header.text_chunk(
                    index,
                    &text,
                    None,
                    logprobs.as_ref().map(|(l, o)| (l.as_slice(), *o)),
                );
                (vec![sse_json(&chunk)], true)
            }
            GenerationEvent::ChoiceEnd { index, reason } => {
                let Some(finish) = finish_reason(reason) else {
                    // Cancelled or failed: the request's end says so.
                    return (Vec::new(), true);
                };
                let Some(pending) = self.pending.get_mut(index) else {
                    return (Vec::new(), true);
                };
                let logprobs =
                    (self.shape.logprobs && !pending.tokens.is_empty()).then(|| pending.take());
                let chunk = self.header.text_chunk(
                    index,
                    "",
                    Some(finish),
                    logprobs.as_ref().map(|(l, o)| (l.as_slice(), *o)),
                );
                (vec![sse_json(&chunk)], true)
            }
            GenerationEvent::Finished { usage, error } => {
                if let Some(timing) = self.timing.take() {
                    timing.finished(&usage);
                }
                let mut out = Vec::new();
                match failure(&usage, error) {
                    Some(err) => out.push(sse_json(&err.body())),
                    None if self.shape.include_usage => {
                        out.push(sse_json(&self.header.usage_chunk(Usage::from(&usage))))
                    }
                    None => {}
                }
                out.push(Event::default().data("[DONE]"));
                (out, false)
            }
        }
    }
}

/// Streams the request's events as SSE chunks, then `[DONE]`. Dropping the
/// stream (the client left) drops the receiver, which cancels the request.
fn stream_response(
    header: ResponseHeader,
    events: UnboundedReceiver<GenerationEvent>,
    shape: Shape,
    timing: Timing,
    deadline: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let opening: Vec<Event> = match header.endpoint {
        Endpoint::Chat => (0..shape.n)
            .map(|index| sse_json(&header.role_chunk(index)))
            .collect(),
        Endpoint::Completions => Vec::new(),
    };
    let state = StreamState {
        events,
        header,
        shape,
        pending: vec![PendingLogprobs::default(); shape.n],
        timing: Some(timing),
    };
    let body = stream::unfold(Some(state), move |state| async move {
        let mut state = state?;
        let Ok(event) = tokio::time::timeout_at(deadline, state.events.recv()).await else {
            // Dropping the state drops the receiver: the generation stops.
            let err = ApiError::Timeout(timeout.as_secs());
            return Some((
                vec![sse_json(&err.body()), Event::default().data("[DONE]")],
                None,
            ));
        };
        let Some(event) = event else {
            let err = ApiError::Internal("the engine dropped the request".to_owned());
            return Some((
                vec![sse_json(&err.body()), Event::default().data("[DONE]")],
                None,
            ));
        };
        let (out, more) = state.on_event(event);
        Some((out, more.then_some(state)))
    });
    let all = stream::iter(opening)
        .chain(body.flat_map(stream::iter))
        .map(Ok::<_, Infallible>);
    Sse::new(all)
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
