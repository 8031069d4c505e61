//! Answers: a request's engine events become one JSON body or a stream of
//! server-sent events, and a request that did not end normally becomes its
//! error.

use crate::error::ApiError;
use crate::openai::{finish_reason, logprobs_text_len, ChoiceOut, Endpoint, ResponseHeader, Usage};
use crate::telemetry::{RequestTimer, TenantLabels};
use axum::response::sse::{Event, Sse};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use std::convert::Infallible;
use tokenmill_protocol::{FinishReason, GenerationEvent, RequestFailure, TokenLogprob, UsageEvent};
use tokio::sync::mpsc::UnboundedReceiver;

/// A request's latency timer and how to label its tokens.
pub(crate) struct Timing {
    pub(crate) timer: RequestTimer,
    pub(crate) tenant_labels: TenantLabels,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Completions.
    pub(crate) n: usize,
    /// Whether each token comes with its log probabilities.
    pub(crate) logprobs: bool,
    /// Whether a stream ends with a usage chunk.
    pub(crate) include_usage: bool,
    /// With `Some(prompt tokens)`, every chunk carries the usage so far
    /// (`stream_options.continuous_usage_stats`).
    pub(crate) continuous_usage: Option<u64>,
}

/// The error a finished request that did not end normally maps to.
fn failure(usage: &UsageEvent, error: Option<RequestFailure>) -> Option<ApiError> {
    match usage.finish_reason {
        // A drain's deadline cut it: it ends like any other answer, with
        // finish_reason "shutdown" and the usage the ledger holds.
        FinishReason::Stop | FinishReason::Length | FinishReason::Shutdown => None,
        FinishReason::Cancelled => Some(ApiError::Unavailable(
            "the request was cancelled".to_owned(),
        )),
        FinishReason::Error => Some(ApiError::Internal(
            error.map_or_else(|| "generation failed".to_owned(), |e| e.to_string()),
        )),
    }
}

pub(crate) async fn collect_response(
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
    /// Tokens generated so far, over all choices.
    completion_tokens: u64,
}

impl StreamState {
    /// A chunk as sent: with the usage so far when the client asked for it
    /// on every chunk (cached prompt tokens are known only at the end).
    fn chunk_event(&self, mut chunk: serde_json::Value) -> Event {
        if let Some(prompt_tokens) = self.shape.continuous_usage {
            chunk["usage"] = serde_json::json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens,
            });
        }
        sse_json(&chunk)
    }

    /// The SSE events for one engine event, and whether the stream goes on.
    fn on_event(&mut self, event: GenerationEvent) -> (Vec<Event>, bool) {
        if let Some(timing) = &mut self.timing {
            timing.on_event(&event);
        }
        if let GenerationEvent::Text { token_ids, .. } = &event {
            self.completion_tokens += token_ids.len() as u64;
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
                (vec![self.chunk_event(chunk)], true)
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
                (vec![self.chunk_event(chunk)], true)
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
pub(crate) fn stream_response(
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
        completion_tokens: 0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Instant, SystemTime};
    use tokenmill_protocol::{KeyId, RecordError, RequestId, TenantId, TokenCounts};
    use tokio::sync::mpsc::unbounded_channel;

    fn usage(reason: FinishReason) -> UsageEvent {
        UsageEvent {
            request_id: RequestId("cmpl-1".to_owned()),
            tenant: TenantId("acme".to_owned()),
            key_id: KeyId("key".to_owned()),
            model: "m".to_owned(),
            tokens: TokenCounts {
                prompt_tokens: 3,
                cached_prompt_tokens: 1,
                completion_tokens: 2,
            },
            finish_reason: reason,
            device_seconds: 0.0,
            arrived_at: SystemTime::UNIX_EPOCH,
            finished_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_normal_end_is_no_failure() {
        assert_eq!(failure(&usage(FinishReason::Stop), None), None);
        assert_eq!(failure(&usage(FinishReason::Length), None), None);
        // Cut at a drain's deadline: answered with what was made.
        assert_eq!(failure(&usage(FinishReason::Shutdown), None), None);
        assert_eq!(finish_reason(FinishReason::Shutdown), Some("shutdown"));
    }

    #[test]
    fn each_abnormal_end_has_its_error() {
        let error = failure(&usage(FinishReason::Cancelled), None).expect("a failure");
        assert!(matches!(error, ApiError::Unavailable(_)), "{error:?}");
        assert_eq!(error.status(), 503);
        assert_eq!(error.body()["error"]["code"], "unavailable");
        for (cause, words) in [
            (None, "generation failed"),
            (Some(RequestFailure::Model("boom".to_owned())), "boom"),
            (
                Some(RequestFailure::NotRecorded(RecordError::Closed)),
                "usage record",
            ),
            (Some(RequestFailure::EngineStopped), "engine stopped"),
        ] {
            let error = failure(&usage(FinishReason::Error), cause).expect("a failure");
            assert_eq!(error.status(), 500);
            assert_eq!(error.body()["error"]["type"], "server_error");
            assert!(error.to_string().contains(words), "{error}");
        }
    }

    fn header(endpoint: Endpoint) -> ResponseHeader {
        ResponseHeader {
            id: "cmpl-1".to_owned(),
            created: 0,
            model: "m".to_owned(),
            endpoint,
        }
    }

    fn timing(n: usize) -> Timing {
        Timing {
            timer: RequestTimer::new(Endpoint::Completions, "m", Instant::now(), n),
            tenant_labels: TenantLabels::default(),
        }
    }

    fn text(index: usize, text: &str) -> GenerationEvent {
        GenerationEvent::Text {
            index,
            text: text.to_owned(),
            token_ids: vec![1],
            logprobs: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_whole_answer_gathers_each_choice_and_the_usage() {
        let (sender, events) = unbounded_channel();
        for event in [
            text(1, "b"),
            text(0, "a"),
            text(0, "c"),
            GenerationEvent::ChoiceEnd {
                index: 0,
                reason: FinishReason::Stop,
            },
            GenerationEvent::ChoiceEnd {
                index: 1,
                reason: FinishReason::Length,
            },
            GenerationEvent::Finished {
                usage: usage(FinishReason::Length),
                error: None,
            },
        ] {
            sender.send(event).expect("open");
        }
        let shape = Shape {
            n: 2,
            logprobs: false,
            include_usage: false,
            continuous_usage: None,
        };
        let Json(body) = collect_response(header(Endpoint::Completions), events, shape, timing(2))
            .await
            .expect("an answer");
        assert_eq!(body["choices"][0]["text"], "ac");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["choices"][1]["text"], "b");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
        assert_eq!(body["usage"]["total_tokens"], 5);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
    }

    #[tokio::test]
    async fn a_failed_or_dropped_request_is_an_error() {
        let (sender, events) = unbounded_channel();
        sender
            .send(GenerationEvent::Finished {
                usage: usage(FinishReason::Error),
                error: Some(RequestFailure::Model("boom".to_owned())),
            })
            .expect("open");
        let shape = Shape {
            n: 1,
            logprobs: false,
            include_usage: false,
            continuous_usage: None,
        };
        let error = collect_response(header(Endpoint::Chat), events, shape, timing(1))
            .await
            .expect_err("failed");
        assert_eq!(error.status(), 500);
        let (sender, events) = unbounded_channel::<GenerationEvent>();
        drop(sender);
        let error = collect_response(header(Endpoint::Chat), events, shape, timing(1))
            .await
            .expect_err("dropped");
        assert!(error.to_string().contains("dropped"), "{error}");
    }
}
