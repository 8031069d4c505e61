//! The shared vocabulary of tokenmill.
//!
//! The HTTP server and the engine meet here and nowhere else: the server turns
//! an OpenAI request into a [`GenerateRequest`], hands it to an
//! [`EngineClient`], and receives [`GenerationEvent`]s through the
//! [`EventSink`] it supplied. Nothing in this crate knows about HTTP, candle or
//! tokio, so either side can be replaced or tested on its own.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::SystemTime;

/// Identifier of one request; it is also the `id` of the OpenAI response the
/// client receives, so a bill can be traced to its response.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub String);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of the tenant a request is billed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TenantId(pub String);

impl TenantId {
    /// The tenant of unauthenticated local development traffic.
    pub fn anonymous() -> Self {
        TenantId("anonymous".to_owned())
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of the API key a request came with (never the key itself), so
/// a tenant's usage can be split by key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub String);

impl KeyId {
    /// The key id of unauthenticated local development traffic.
    pub fn none() -> Self {
        KeyId("none".to_owned())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who pays for a request and how large a share of the engine it is owed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The tenant billed.
    pub tenant: TenantId,
    /// The key the request was authenticated with.
    pub key_id: KeyId,
    /// The tenant's fair-share weight (at least 1): when tenants compete for
    /// admission, each gets computed tokens in proportion to its weight.
    pub weight: u32,
}

impl Caller {
    /// Local development traffic: tenant "anonymous", no key, weight 1.
    pub fn anonymous() -> Self {
        Caller {
            tenant: TenantId::anonymous(),
            key_id: KeyId::none(),
            weight: 1,
        }
    }
}

/// How the next token is drawn from the model's logits.
///
/// Values here are already validated by the server: `temperature` is in
/// `[0, 2]`, `top_p` in `(0, 1]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// mass reaches `top_p`.
    pub top_p: f32,
    /// Seed of the request's random stream; the same seed gives the same
    /// output for the same prompt and parameters.
    pub seed: Option<u64>,
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
        }
    }

    /// Whether these parameters select the argmax deterministically.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// When generation stops, besides the model's own end-of-generation tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation when they appear in the output; they are
    /// matched across token boundaries and removed from the returned text.
    pub stop_strings: Vec<String>,
    /// Keep generating past end-of-generation tokens, so that exactly
    /// `max_tokens` are made (for benchmarks that fix the output length).
    pub ignore_eos: bool,
}

/// One validated generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The request's id (the OpenAI response id).
    pub id: RequestId,
    /// Who is billed, and their fair share.
    pub caller: Caller,
    /// The served model name.
    pub model: String,
    /// Prompt token ids, never empty.
    pub prompt_tokens: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop conditions.
    pub stop: StopConditions,
    /// Completions to generate from the one prompt (at least 1); they share
    /// the prompt's KV blocks and are billed the prompt once.
    pub n: usize,
    /// Log probabilities to return with each generated token: `None` for
    /// none, `Some(k)` for the chosen token's plus the `k` most likely.
    pub logprobs: Option<usize>,
    /// When the server accepted the request.
    pub arrived_at: SystemTime,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The client went away.
    Cancelled,
    /// The engine failed while running the sequence.
    Error,
    /// The server was shutting down and its drain deadline passed.
    Shutdown,
}

impl FinishReason {
    /// The name used in OpenAI responses and usage records.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
            FinishReason::Shutdown => "shutdown",
        }
    }
}

/// Tokens a request used, counted by the engine in the steps that made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Prompt tokens, whether computed or served from the prefix cache.
    pub prompt_tokens: u64,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

impl TokenCounts {
    /// Prompt plus completion tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The one usage record of a finished request; the `usage` a client receives
/// is built from this same value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The request (and OpenAI response) id.
    pub request_id: RequestId,
    /// Who is billed.
    pub tenant: TenantId,
    /// The API key used.
    pub key_id: KeyId,
    /// The served model name.
    pub model: String,
    /// Token counts, over all `n` completions of the request.
    pub tokens: TokenCounts,
    /// Why the request ended: the most severe of its completions' reasons
    /// (error, then shutdown, then cancelled, then length, then stop).
    pub finish_reason: FinishReason,
    /// Device time attributed to this request, in seconds.
    pub device_seconds: f64,
    /// When the request arrived.
    pub arrived_at: SystemTime,
    /// When the sequence ended.
    pub finished_at: SystemTime,
}

/// One alternative token and its log probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// Token id.
    pub token: u32,
    /// The token's bytes (a token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    /// Natural log of its probability under the model (before temperature
    /// and top-p).
    pub logprob: f32,
}

/// The log probability of a generated token, and of the most likely
/// alternatives at its step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The generated token.
    pub chosen: TopLogprob,
    /// The most likely tokens at this step, most likely first.
    pub top: Vec<TopLogprob>,
}

/// What the engine tells the submitter of a request, in order: `Text` and
/// `ChoiceEnd` events of its completions (interleaved when `n > 1`), one
/// `ChoiceEnd` per completion, then exactly one `Finished`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerationEvent {
    /// New output text of completion `index` (already cut at a stop string)
    /// and the tokens that produced it.
    Text {
        /// Which completion (0..n).
        index: usize,
        /// Decoded text to append to the output; may be empty when a token
        /// only completes part of a UTF-8 character or a possible stop string.
        text: String,
        /// Token ids generated since the previous event.
        token_ids: Vec<u32>,
        /// Their log probabilities, when the request asked for them (the
        /// end-of-generation token has none: it is not part of the output).
        logprobs: Vec<TokenLogprob>,
    },
    /// Completion `index` ended.
    ChoiceEnd {
        /// Which completion.
        index: usize,
        /// Why it ended.
        reason: FinishReason,
    },
    /// The request ended; `usage` is its usage record.
    Finished {
        /// Usage record.
        usage: UsageEvent,
        /// What went wrong when the reason is [`FinishReason::Error`].
        error: Option<RequestFailure>,
    },
}

/// Why a request ended with [`FinishReason::Error`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestFailure {
    /// A forward step or the sampler failed; the message is the model's.
    #[error("model error: {0}")]
    Model(String),
    /// The request's usage record could not be kept, so its output is
    /// withheld (never unbilled tokens).
    #[error("the usage record could not be kept: {0}")]
    NotRecorded(RecordError),
    /// The engine let go of the request without finishing it (its step loop
    /// stopped).
    #[error("the engine stopped before the request finished")]
    EngineStopped,
}

/// Receives a request's events from the engine.
pub trait EventSink: Send {
    /// Delivers one event. Returns `false` when the receiver is gone (the
    /// client disconnected), which cancels the request.
    fn send(&self, event: GenerationEvent) -> bool;

    /// Whether the receiver is gone, checked every step so that a request
    /// whose client left stops even before it produces a token.
    fn is_closed(&self) -> bool;
}

/// Device time over one interval: what was sold (busy) and what sat idle.
///
/// Intervals of one device follow each other without gaps, so their wall
/// seconds add up to the time the engine ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityRecord {
    /// The device the engine runs on (e.g. "cpu", "cuda:0").
    pub device: String,
    /// Start of the interval.
    pub start: SystemTime,
    /// End of the interval.
    pub end: SystemTime,
    /// Length of the interval.
    pub wall_seconds: f64,
    /// Time spent in steps that had work.
    pub busy_seconds: f64,
    /// Tokens computed (prompt tokens computed plus tokens generated).
    pub tokens: u64,
    /// The busy time and tokens of each tenant, split by tokens per step.
    pub tenants: Vec<TenantCapacity>,
}

/// One tenant's share of a [`CapacityRecord`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantCapacity {
    /// The tenant.
    pub tenant: TenantId,
    /// Busy seconds attributed to it.
    pub busy_seconds: f64,
    /// Tokens computed for it.
    pub tokens: u64,
}

/// Why a usage record could not be kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The sink tried to write or sync the record and failed; the message
    /// is the underlying error's.
    #[error("the record could not be written: {0}")]
    Write(String),
    /// The sink has stopped taking records (its writer is gone).
    #[error("the usage sink is closed")]
    Closed,
}

/// Called once a usage record is durable (`Ok`) or could not be kept
/// (`Err`, with the reason).
pub type OnRecorded = Box<dyn FnOnce(Result<(), RecordError>) + Send>;

/// Where the engine hands its usage and capacity records.
///
/// The client is told a request finished only from the usage record's
/// [`OnRecorded`] callback, so no client sees a usage that was not recorded
/// first. A sink may call it at once (nothing to wait for) or later, from
/// another thread (after an fsync); the engine never waits for it.
pub trait MeterSink: Send + Sync {
    /// Records the usage of one finished request, then calls `then`.
    fn record_usage(&self, usage: &UsageEvent, then: OnRecorded);

    /// Records the capacity of one interval.
    fn record_capacity(&self, capacity: &CapacityRecord);

    /// Whether records can be kept now; when not, the engine refuses new
    /// requests (fail closed: no unmetered tokens).
    fn is_healthy(&self) -> bool {
        true
    }
}

/// A [`MeterSink`] that keeps nothing (tests and tools that only need the
/// client's copy of the usage).
pub struct DiscardMeter;

impl MeterSink for DiscardMeter {
    fn record_usage(&self, _: &UsageEvent, then: OnRecorded) {
        then(Ok(()));
    }
    fn record_capacity(&self, _: &CapacityRecord) {}
}

/// Why the engine would not take a request.
///
/// Requests reach the engine validated (the server's validator checks them
/// against [`ModelInfo`]): these are the refusals only the engine can make,
/// from its state at the moment of submission.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The engine's step loop has stopped (shut down or failed).
    #[error("the engine has stopped")]
    Stopped,
    /// Usage cannot be recorded right now, so no tokens may be made
    /// (fail closed: never unmetered tokens).
    #[error("usage cannot be recorded right now")]
    MeterUnavailable,
    /// The queue is full; try again after this many seconds.
    #[error("queue full, retry after {retry_after_seconds} s")]
    Overloaded {
        /// A hint for the client's `Retry-After`.
        retry_after_seconds: u64,
    },
    /// A request that breaks [`ModelInfo`]'s limits (an empty prompt, or
    /// more tokens than one sequence may hold). The validator refuses these
    /// first; the engine checks again because such a sequence could never
    /// be scheduled and would wait forever.
    #[error("request of {tokens} tokens cannot be scheduled (at most {limit}, prompt not empty)")]
    Unschedulable {
        /// Prompt tokens plus the most output tokens.
        tokens: usize,
        /// The most one sequence may hold.
        limit: usize,
    },
}

/// Why text could not be turned into prompt tokens.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenizeError {
    /// The tokenizer failed on the text; the message is the tokenizer's.
    #[error("the tokenizer failed: {0}")]
    Tokenizer(String),
    /// The chat template could not render the messages; the message is the
    /// template engine's.
    #[error("the chat template failed: {0}")]
    ChatTemplate(String),
}

/// Facts about the loaded model that the server needs to validate requests.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The served model name (the `model` field clients send).
    pub name: String,
    /// Most tokens (prompt plus output) one sequence may hold.
    pub context_length: usize,
    /// Token ids run from 0 to `vocab_size - 1`.
    pub vocab_size: usize,
    /// Most tokens one sequence can hold in the engine's KV cache (it can be
    /// less than the context when the cache is small).
    pub kv_capacity_tokens: usize,
}

impl ModelInfo {
    /// Most tokens (prompt plus output) one sequence may hold: the context
    /// or the KV cache, whichever is smaller.
    pub fn max_sequence_tokens(&self) -> usize {
        self.context_length.min(self.kv_capacity_tokens)
    }
}

/// The server's handle on an engine.
pub trait EngineClient: Send + Sync {
    /// The loaded model.
    fn model_info(&self) -> &ModelInfo;

    /// Tokenizes a completion prompt (special tokens in the text are parsed).
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizeError>;

    /// Renders chat messages with the model's chat template and tokenizes the
    /// result, ready for an assistant turn.
    fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizeError>;

    /// Queues a request; its events go to `sink`.
    fn submit(&self, request: GenerateRequest, sink: Box<dyn EventSink>)
        -> Result<(), SubmitError>;
}

/// One chat message, as handed to the chat template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text of the message.
    pub content: String,
}
