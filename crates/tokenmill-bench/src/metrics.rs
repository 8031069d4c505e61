//! One request's raw measurements, and how they are gathered while its
//! stream is read.
//!
//! Both targets (HTTP and the in-process engine) feed a [`Recorder`] with the
//! same three things: a content chunk arrived at time t, the usage the server
//! reported, the request failed with this kind of error. The recorder turns
//! them into the same [`RequestRecord`], so the two targets are measured by
//! one definition of TTFT, ITL and TPOT.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Where a request's output-token count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The server's `usage.completion_tokens`.
    Usage,
    /// No usage was sent: the number of content chunks received stands in
    /// for it (one token per chunk, which is how servers stream when they
    /// hold nothing back).
    Chunks,
}

/// A failed request: a stable kind for counting, and the detail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestError {
    /// One of the kinds in docs/bench.md: `connect`, `timeout`, `http_<status>`,
    /// `request`, `connection_dropped`, `incomplete_stream`, `no_finish_reason`,
    /// `malformed_sse`, `stream_error`, `engine_rejected`, `engine_error`,
    /// `workload`.
    pub kind: String,
    /// What the client saw (an error body, a transport error).
    pub message: String,
}

/// Everything measured about one request. Times are milliseconds; `start_s`
/// is seconds from the start of the level, so requests can be lined up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The request's number in the workload (the same number gets the same
    /// prompt and output length in every run with the same seed).
    pub index: u64,
    /// Whether the request completed (a full stream ending with `[DONE]`, or
    /// the engine's finish event) without an error.
    pub ok: bool,
    /// Why it failed, when it did.
    pub error: Option<RequestError>,
    /// The response id the server gave (its usage records carry the same id).
    pub response_id: Option<String>,
    /// When the request was sent, in seconds after the level started.
    pub start_s: f64,
    /// Time to the first chunk with non-empty content.
    pub ttft_ms: Option<f64>,
    /// Time to the end of the stream (or to the failure).
    pub e2e_ms: f64,
    /// `(e2e - ttft) / (output_tokens - 1)`: the mean time per token after
    /// the first; absent with fewer than two output tokens.
    pub tpot_ms: Option<f64>,
    /// Every gap between consecutive content chunks, in order.
    pub itl_ms: Vec<f64>,
    /// The prompt's length in the workload's tokenizer, when known.
    pub expected_prompt_tokens: Option<u64>,
    /// The `max_tokens` asked for.
    pub max_tokens: u64,
    /// `usage.prompt_tokens`, when the server sent usage.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`, when the server sent usage.
    pub usage_completion_tokens: Option<u64>,
    /// Output tokens: the usage's count, else the content chunks.
    pub output_tokens: u64,
    /// Which of the two `output_tokens` is.
    pub output_tokens_source: TokenSource,
    /// Chunks received with non-empty content.
    pub content_chunks: u64,
    /// Set when the usage's completion tokens differ from the content chunks
    /// received (a server that batches several tokens per chunk, or that
    /// miscounts), or the usage's prompt tokens from the expected length.
    pub token_mismatch: Option<String>,
    /// The finish reason of the (first) choice, when the server sent one.
    pub finish_reason: Option<String>,
}

impl RequestRecord {
    /// Prompt tokens for throughput: the server's count, else the workload's.
    pub fn prompt_tokens_for_totals(&self) -> u64 {
        self.prompt_tokens
            .or(self.expected_prompt_tokens)
            .unwrap_or(0)
    }
}

/// Gathers one request's observations as its response is read.
#[derive(Debug)]
pub struct Recorder {
    index: u64,
    level_start: Instant,
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl_ms: Vec<f64>,
    content_chunks: u64,
    expected_prompt_tokens: Option<u64>,
    max_tokens: u64,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    response_id: Option<String>,
    finish_reason: Option<String>,
    error: Option<RequestError>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Recorder {
    /// Starts the clock of request `index` now (call it right before sending).
    pub fn start(
        index: u64,
        level_start: Instant,
        expected_prompt_tokens: Option<u64>,
        max_tokens: u64,
    ) -> Self {
        Recorder {
            index,
            level_start,
            sent: Instant::now(),
            first: None,
            last: None,
            itl_ms: Vec::new(),
            content_chunks: 0,
            expected_prompt_tokens,
            max_tokens,
            prompt_tokens: None,
            completion_tokens: None,
            response_id: None,
            finish_reason: None,
            error: None,
        }
    }

    /// A chunk with non-empty content arrived at `at`.
    pub fn content(&mut self, at: Instant) {
        if let Some(last) = self.last {
            self.itl_ms.push(ms(at.saturating_duration_since(last)));
        } else {
            self.first = Some(at);
        }
        self.last = Some(at);
        self.content_chunks += 1;
    }

    /// The server's usage for this request.
    pub fn usage(&mut self, prompt_tokens: Option<u64>, completion_tokens: Option<u64>) {
        self.prompt_tokens = prompt_tokens.or(self.prompt_tokens);
        self.completion_tokens = completion_tokens.or(self.completion_tokens);
    }

    /// The response id, kept from the first chunk that has one.
    pub fn response_id(&mut self, id: &str) {
        if self.response_id.is_none() && !id.is_empty() {
            self.response_id = Some(id.to_owned());
        }
    }

    /// A finish reason, kept from the first chunk that has one.
    pub fn finish_reason(&mut self, reason: &str) {
        if self.finish_reason.is_none() {
            self.finish_reason = Some(reason.to_owned());
        }
    }

    /// The request failed; the first failure is the one reported.
    pub fn fail(&mut self, kind: impl Into<String>, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(RequestError {
                kind: kind.into(),
                message: message.into(),
            });
        }
    }

    /// Whether a finish reason has arrived.
    pub fn has_finish_reason(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// Whether a failure has been recorded.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// The request ended now.
    pub fn finish(self) -> RequestRecord {
        self.finish_at(Instant::now())
    }

    /// The request ended at `end`.
    pub fn finish_at(self, end: Instant) -> RequestRecord {
        let e2e_ms = ms(end.saturating_duration_since(self.sent));
        let ttft_ms = self
            .first
            .map(|f| ms(f.saturating_duration_since(self.sent)));
        let (output_tokens, output_tokens_source) = match self.completion_tokens {
            Some(n) => (n, TokenSource::Usage),
            None => (self.content_chunks, TokenSource::Chunks),
        };
        let tpot_ms = match ttft_ms {
            Some(ttft) if output_tokens > 1 && self.error.is_none() => {
                Some((e2e_ms - ttft) / (output_tokens - 1) as f64)
            }
            _ => None,
        };
        let mut mismatches = Vec::new();
        if let Some(n) = self.completion_tokens {
            if n != self.content_chunks {
                mismatches.push(format!(
                    "usage.completion_tokens is {n} but {} content chunks arrived",
                    self.content_chunks
                ));
            }
        }
        if let (Some(got), Some(want)) = (self.prompt_tokens, self.expected_prompt_tokens) {
            if got != want {
                mismatches.push(format!(
                    "usage.prompt_tokens is {got} but the prompt is {want} tokens in the workload's tokenizer"
                ));
            }
        }
        let ok = self.error.is_none();
        RequestRecord {
            index: self.index,
            ok,
            error: self.error,
            response_id: self.response_id,
            start_s: self
                .sent
                .saturating_duration_since(self.level_start)
                .as_secs_f64(),
            ttft_ms,
            e2e_ms,
            tpot_ms,
            itl_ms: self.itl_ms,
            expected_prompt_tokens: self.expected_prompt_tokens,
            max_tokens: self.max_tokens,
            prompt_tokens: self.prompt_tokens,
            usage_completion_tokens: self.completion_tokens,
            output_tokens,
            output_tokens_source,
            content_chunks: self.content_chunks,
            token_mismatch: (!mismatches.is_empty()).then(|| mismatches.join("; ")),
            finish_reason: self.finish_reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ttft_itl_and_tpot_come_from_chunk_times() {
        let level = Instant::now();
        let mut r = Recorder::start(3, level, Some(10), 4);
        let t0 = r.sent;
        r.content(t0 + Duration::from_millis(100));
        r.content(t0 + Duration::from_millis(130));
        r.content(t0 + Duration::from_millis(150));
        r.content(t0 + Duration::from_millis(190));
        r.usage(Some(10), Some(4));
        let rec = r.finish_at(t0 + Duration::from_millis(190));
        assert!(rec.ok);
        assert_eq!(rec.index, 3);
        assert!((rec.ttft_ms.unwrap() - 100.0).abs() < 1e-6);
        let itl: Vec<i64> = rec.itl_ms.iter().map(|x| x.round() as i64).collect();
        assert_eq!(itl, vec![30, 20, 40]);
        // (190 - 100) / (4 - 1)
        assert!((rec.tpot_ms.unwrap() - 30.0).abs() < 1e-6);
        assert_eq!(rec.output_tokens_source, TokenSource::Usage);
        assert_eq!(rec.token_mismatch, None);
    }

    #[test]
    fn without_usage_chunks_are_counted_and_mismatches_are_reported() {
        let mut r = Recorder::start(0, Instant::now(), None, 8);
        let t0 = r.sent;
        r.content(t0 + Duration::from_millis(5));
        r.content(t0 + Duration::from_millis(9));
        let rec = r.finish_at(t0 + Duration::from_millis(10));
        assert_eq!(rec.output_tokens, 2);
        assert_eq!(rec.output_tokens_source, TokenSource::Chunks);

        let mut r = Recorder::start(0, Instant::now(), Some(12), 8);
        let t0 = r.sent;
        r.content(t0 + Duration::from_millis(5));
        r.usage(Some(13), Some(2));
        let rec = r.finish_at(t0 + Duration::from_millis(10));
        let m = rec.token_mismatch.unwrap();
        assert!(m.contains("completion_tokens is 2 but 1"), "{m}");
        assert!(m.contains("prompt_tokens is 13"), "{m}");
    }

    #[test]
    fn a_failed_request_keeps_its_first_error_and_has_no_tpot() {
        let mut r = Recorder::start(0, Instant::now(), None, 8);
        let t0 = r.sent;
        r.content(t0 + Duration::from_millis(5));
        r.content(t0 + Duration::from_millis(9));
        r.fail("connection_dropped", "reset");
        r.fail("incomplete_stream", "later");
        let rec = r.finish_at(t0 + Duration::from_millis(10));
        assert!(!rec.ok);
        assert_eq!(rec.error.unwrap().kind, "connection_dropped");
        assert_eq!(rec.tpot_ms, None);
    }
}
