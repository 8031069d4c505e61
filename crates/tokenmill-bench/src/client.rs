//! The HTTP target: streaming requests to an OpenAI-compatible server.
//!
//! Each request asks for `stream: true` and `stream_options.include_usage`,
//! so the server's own token counts come back in the last chunk; the chunks
//! before it are timed as they are read. Nothing the server does stops the
//! run: an error status, a dropped connection, a body that is not SSE, or an
//! error object in the stream is classified into a stable kind and recorded
//! with the request.

use crate::metrics::{Recorder, RequestRecord};
use crate::sse::{SseEvent, SseParser};
use crate::workload::BenchRequest;
use crate::{BenchError, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

/// Which API the requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/completions` with a `prompt`.
    Completions,
    /// `POST /v1/chat/completions` with the prompt as one user message.
    Chat,
}

impl Endpoint {
    /// The path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/completions",
            Endpoint::Chat => "/chat/completions",
        }
    }
}

/// How requests are built, whichever target receives them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestOptions {
    /// The API.
    pub endpoint: Endpoint,
    /// The `model` field.
    pub model: String,
    /// Ask the server to keep generating past end-of-sequence tokens, so
    /// that every request makes exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// Longest a request may take before it is counted as `timeout`.
    pub timeout_s: f64,
}

/// Streams requests to one server.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
    options: RequestOptions,
    extra_body: Map<String, Value>,
}

/// Most bytes of an error body kept in a record.
const ERROR_BODY_LIMIT: usize = 500;

/// The OpenAI API root of `--base-url`: as given when it ends in `/v1`,
/// else with `/v1` added, so that `http://HOST:PORT` (as `vllm bench`
/// users type it) and `http://HOST:PORT/v1` (as OpenAI clients take it)
/// reach the same endpoints.
pub fn api_base(base_url: &str) -> Result<String> {
    let base = base_url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(BenchError::Config(format!(
            "--base-url {base_url:?}: expected http://HOST:PORT or http://HOST:PORT/v1"
        )));
    }
    Ok(if base.ends_with("/v1") {
        base.to_owned()
    } else {
        format!("{base}/v1")
    })
}

impl HttpTarget {
    /// A target at `base_url` (e.g. `http://127.0.0.1:8000/v1`). Fields of
    /// `extra_body` are added to every request body (and win over ours).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        options: RequestOptions,
        extra_body: Map<String, Value>,
    ) -> Result<Self> {
        let base = api_base(base_url)?;
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            // Idle connections are kept, so each client of a concurrency
            // level reuses its connection and no request pays a handshake.
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| BenchError::Config(format!("cannot make the HTTP client: {e}")))?;
        Ok(HttpTarget {
            client,
            url: format!("{base}{}", options.endpoint.path()),
            api_key,
            options,
            extra_body,
        })
    }

    /// The request body for `request`.
    pub fn body(&self, request: &BenchRequest) -> Value {
        let mut body = json!({
            "model": self.options.model,
            "max_tokens": request.max_tokens,
            "temperature": self.options.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(map) = body.as_object_mut() {
            match self.options.endpoint {
                Endpoint::Completions => {
                    map.insert("prompt".to_owned(), json!(request.prompt));
                }
                Endpoint::Chat => {
                    map.insert(
                        "messages".to_owned(),
                        json!([{"role": "user", "content": request.prompt}]),
                    );
                }
            }
            if self.options.ignore_eos {
                map.insert("ignore_eos".to_owned(), json!(true));
            }
            for (k, v) in &self.extra_body {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }

    /// Sends `request` and measures it; never fails, whatever the server
    /// does: failures are in the record.
    pub async fn send(&self, request: &BenchRequest, level_start: Instant) -> RequestRecord {
        let body = self.body(request);
        let mut rec = Recorder::start(
            request.index,
            level_start,
            request.expected_prompt_tokens,
            request.max_tokens,
        );
        let limit = Duration::from_secs_f64(self.options.timeout_s);
        if tokio::time::timeout(limit, self.exchange(&body, &mut rec))
            .await
            .is_err()
        {
            rec.fail(
                "timeout",
                format!("no complete response within {} s", self.options.timeout_s),
            );
        }
        rec.finish()
    }

    async fn exchange(&self, body: &Value, rec: &mut Recorder) {
        let mut req = self.client.post(&self.url).json(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_connect() {
                    "connect"
                } else if e.is_timeout() {
                    "timeout"
                } else {
                    "request"
                };
                rec.fail(kind, error_chain(&e));
                return;
            }
        };
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            rec.fail(format!("http_{}", status.as_u16()), error_message(&text));
            return;
        }
        let mut parser = SseParser::new();
        let mut stream = response.bytes_stream();
        let mut done = false;
        while let Some(item) = stream.next().await {
            let bytes = match item {
                Ok(b) => b,
                Err(e) => {
                    rec.fail("connection_dropped", error_chain(&e));
                    return;
                }
            };
            let at = Instant::now();
            for event in parser.push(&bytes) {
                if self.on_event(event, at, rec) {
                    done = true;
                }
                if rec.failed() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        if !done {
            let at = Instant::now();
            for event in parser.finish() {
                done |= self.on_event(event, at, rec);
                if rec.failed() {
                    return;
                }
            }
        }
        if !done {
            rec.fail(
                "incomplete_stream",
                "the stream ended without data: [DONE]".to_owned(),
            );
        } else if !rec.has_finish_reason() {
            // Every choice of a complete OpenAI stream ends with a finish
            // reason; a [DONE] without one means the server cut the answer
            // short (llama-cpp-python does this to a stream when another
            // request arrives, unless started with --interrupt_requests False).
            rec.fail(
                "no_finish_reason",
                "data: [DONE] came before any finish_reason: the server cut the stream short",
            );
        }
    }

    /// Handles one event; true when it is the closing `[DONE]`.
    fn on_event(&self, event: SseEvent, at: Instant, rec: &mut Recorder) -> bool {
        let data = match event {
            SseEvent::Data(d) => d,
            SseEvent::Invalid(reason) => {
                rec.fail("malformed_sse", reason);
                return false;
            }
        };
        if data.trim() == "[DONE]" {
            return true;
        }
        let chunk: Value = match serde_json::from_str(&data) {
            Ok(v) => v,
            Err(e) => {
                rec.fail(
                    "malformed_sse",
                    format!("data is not JSON ({e}): {}", clip(&data)),
                );
                return false;
            }
        };
        if let Some(err) = chunk.get("error") {
            rec.fail("stream_error", error_message(&err.to_string()));
            return false;
        }
        if !chunk.is_object() {
            rec.fail(
                "malformed_sse",
                format!("data is not an object: {}", clip(&data)),
            );
            return false;
        }
        if let Some(id) = chunk.get("id").and_then(Value::as_str) {
            rec.response_id(id);
        }
        if let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            let content = match self.options.endpoint {
                Endpoint::Completions => choice.get("text"),
                Endpoint::Chat => choice.get("delta").and_then(|d| d.get("content")),
            };
            if content
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                rec.content(at);
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                rec.finish_reason(reason);
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            rec.usage(
                usage.get("prompt_tokens").and_then(Value::as_u64),
                usage.get("completion_tokens").and_then(Value::as_u64),
            );
        }
        false
    }
}

/// The message of an OpenAI error body, else the body itself, shortened.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.get("error")
            .unwrap_or(v)
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    clip(&message.unwrap_or_else(|| body.to_owned()))
}

fn clip(s: &str) -> String {
    if s.len() <= ERROR_BODY_LIMIT {
        return s.to_owned();
    }
    let mut end = ERROR_BODY_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// An error with its causes, which hold the useful part ("connection
/// refused") for transport errors.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    clip(&out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_base_url_is_the_same_with_or_without_v1() {
        for given in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
        ] {
            assert_eq!(
                api_base(given).unwrap(),
                "http://127.0.0.1:8000/v1",
                "{given}"
            );
        }
        assert!(api_base("127.0.0.1:8000").is_err());
    }
    use super::*;

    fn target(endpoint: Endpoint, ignore_eos: bool) -> HttpTarget {
        let mut extra = Map::new();
        extra.insert("top_p".to_owned(), json!(0.5));
        HttpTarget::new(
            "http://127.0.0.1:1/v1/",
            None,
            RequestOptions {
                endpoint,
                model: "m".to_owned(),
                ignore_eos,
                temperature: 0.0,
                timeout_s: 5.0,
            },
            extra,
        )
        .unwrap()
    }

    fn request() -> BenchRequest {
        BenchRequest {
            index: 0,
            prompt: "hello".to_owned(),
            expected_prompt_tokens: Some(1),
            max_tokens: 7,
        }
    }

    #[test]
    fn bodies_ask_for_streamed_usage() {
        let t = target(Endpoint::Completions, true);
        assert_eq!(t.url, "http://127.0.0.1:1/v1/completions");
        let b = t.body(&request());
        assert_eq!(b["prompt"], "hello");
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["top_p"], 0.5);
        let c = target(Endpoint::Chat, false).body(&request());
        assert_eq!(c["messages"][0]["content"], "hello");
        assert!(c.get("ignore_eos").is_none());
        assert!(HttpTarget::new(
            "localhost:8000",
            None,
            RequestOptions {
                endpoint: Endpoint::Chat,
                model: String::new(),
                ignore_eos: false,
                temperature: 0.0,
                timeout_s: 1.0
            },
            Map::new()
        )
        .is_err());
    }

    #[test]
    fn events_are_classified() {
        let t = target(Endpoint::Chat, false);
        let level = Instant::now();
        let mut rec = Recorder::start(0, level, None, 7);
        let now = Instant::now();
        let ev = |s: &str| SseEvent::Data(s.to_owned());
        // The role chunk has empty content: not a token.
        assert!(!t.on_event(
            ev(r#"{"id":"c1","choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            now,
            &mut rec
        ));
        assert!(!t.on_event(
            ev(r#"{"id":"c1","choices":[{"delta":{"content":"Hi"}}]}"#),
            now,
            &mut rec
        ));
        assert!(!t.on_event(
            ev(r#"{"id":"c1","choices":[{"delta":{},"finish_reason":"length"}]}"#),
            now,
            &mut rec
        ));
        assert!(!t.on_event(
            ev(r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#),
            now,
            &mut rec
        ));
        assert!(t.on_event(ev("[DONE]"), now, &mut rec));
        let r = rec.finish();
        assert!(r.ok);
        assert_eq!(r.response_id.as_deref(), Some("c1"));
        assert_eq!(
            (r.content_chunks, r.output_tokens, r.prompt_tokens),
            (1, 1, Some(3))
        );
        assert_eq!(r.finish_reason.as_deref(), Some("length"));

        for (data, kind) in [
            ("{not json", "malformed_sse"),
            ("[1,2]", "malformed_sse"),
            (
                r#"{"error":{"message":"boom","type":"server_error"}}"#,
                "stream_error",
            ),
        ] {
            let mut rec = Recorder::start(0, level, None, 7);
            t.on_event(ev(data), now, &mut rec);
            let r = rec.finish();
            assert_eq!(r.error.map(|e| e.kind).as_deref(), Some(kind), "{data}");
        }
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(r#"{"error":{"message":"queue full","type":"x"}}"#),
            "queue full"
        );
        assert_eq!(error_message("plain"), "plain");
        assert!(error_message(&"é".repeat(400)).ends_with("..."));
    }
}
