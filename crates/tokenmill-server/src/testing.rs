//! A stand-in engine for unit tests, so that validation and handlers are
//! tested without a model file.
//!
//! Its tokenizer makes one token per whitespace-separated word (the word's
//! length in bytes); its chat template makes one token for each message's
//! role, the words of its content, and one token that opens the assistant's
//! turn. Text holding [`FAIL`] makes the tokenizer or the template fail. A
//! submitted request is recorded and answered at once: each completion gets
//! the text "ok" of one token, then the request finishes with reason
//! `length`.

use std::sync::Mutex;
use std::time::SystemTime;
use tokenmill_protocol::{
    ChatMessage, EngineClient, EventSink, FinishReason, GenerateRequest, GenerationEvent,
    ModelInfo, SubmitError, TokenCounts, TokenizeError, UsageEvent,
};

/// Text that the fake tokenizer and chat template refuse.
pub(crate) const FAIL: &str = "<fail>";

/// The served model name.
pub(crate) const MODEL: &str = "fake-model";

/// Token ids of the chat roles.
pub(crate) fn role_token(role: &str) -> u32 {
    match role {
        "system" => 1,
        "user" => 2,
        "assistant" => 3,
        _ => 4,
    }
}

/// The engine double.
pub(crate) struct FakeEngine {
    info: ModelInfo,
    refusal: Option<SubmitError>,
    submitted: Mutex<Vec<GenerateRequest>>,
}

impl FakeEngine {
    /// A model of 1,000 token ids whose context and KV cache are given.
    pub(crate) fn new(context_length: usize, kv_capacity_tokens: usize) -> Self {
        FakeEngine {
            info: ModelInfo {
                name: MODEL.to_owned(),
                context_length,
                vocab_size: 1000,
                kv_capacity_tokens,
            },
            refusal: None,
            submitted: Mutex::new(Vec::new()),
        }
    }

    /// An engine that refuses every request with `refusal`.
    pub(crate) fn refusing(mut self, refusal: SubmitError) -> Self {
        self.refusal = Some(refusal);
        self
    }

    /// The requests submitted so far.
    pub(crate) fn submitted(&self) -> Vec<GenerateRequest> {
        self.submitted.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn words(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_whitespace()
        .map(|w| u32::try_from(w.len()).unwrap_or(u32::MAX))
}

impl EngineClient for FakeEngine {
    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        if text.contains(FAIL) {
            return Err(TokenizeError::Tokenizer("refused".to_owned()));
        }
        Ok(words(text).collect())
    }

    fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizeError> {
        let mut tokens = Vec::new();
        for m in messages {
            if m.content.contains(FAIL) {
                return Err(TokenizeError::ChatTemplate("refused".to_owned()));
            }
            tokens.push(role_token(&m.role));
            tokens.extend(words(&m.content));
        }
        tokens.push(role_token("assistant"));
        Ok(tokens)
    }

    fn submit(
        &self,
        request: GenerateRequest,
        sink: Box<dyn EventSink>,
    ) -> Result<(), SubmitError> {
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        if let Ok(mut submitted) = self.submitted.lock() {
            submitted.push(request.clone());
        }
        for index in 0..request.n {
            sink.send(GenerationEvent::Text {
                index,
                text: "ok".to_owned(),
                token_ids: vec![2],
                logprobs: Vec::new(),
            });
            sink.send(GenerationEvent::ChoiceEnd {
                index,
                reason: FinishReason::Length,
            });
        }
        sink.send(GenerationEvent::Finished {
            usage: UsageEvent {
                request_id: request.id.clone(),
                tenant: request.caller.tenant.clone(),
                key_id: request.caller.key_id.clone(),
                model: request.model.clone(),
                tokens: TokenCounts {
                    prompt_tokens: request.prompt_tokens.len() as u64,
                    cached_prompt_tokens: 0,
                    completion_tokens: request.n as u64,
                },
                finish_reason: FinishReason::Length,
                device_seconds: 0.0,
                arrived_at: request.arrived_at,
                finished_at: SystemTime::now(),
            },
            error: None,
        });
        Ok(())
    }
}
