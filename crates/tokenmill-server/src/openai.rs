//! OpenAI response bodies and stream chunks.

use serde::Serialize;
use tokenmill_protocol::{FinishReason, UsageEvent};

/// `usage` of a response, built from the request's usage record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
    /// Details of the prompt tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Prompt tokens served from the prefix cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were already cached.
    pub cached_tokens: u64,
}

impl From<&UsageEvent> for Usage {
    fn from(event: &UsageEvent) -> Self {
        Usage {
            prompt_tokens: event.tokens.prompt_tokens,
            completion_tokens: event.tokens.completion_tokens,
            total_tokens: event.tokens.total_tokens(),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: event.tokens.cached_prompt_tokens,
            },
        }
    }
}

/// The OpenAI `finish_reason` of a finished sequence, if the client can see
/// one.
pub fn finish_reason(reason: FinishReason) -> Option<&'static str> {
    match reason {
        FinishReason::Stop => Some("stop"),
        FinishReason::Length => Some("length"),
        FinishReason::Cancelled | FinishReason::Error => None,
    }
}

/// Which endpoint a response belongs to; the two differ only in shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`
    Completions,
    /// `/v1/chat/completions`
    Chat,
}

impl Endpoint {
    /// Prefix of response ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }
}

/// The fields every response and chunk of one request share.
#[derive(Clone, Debug)]
pub struct ResponseHeader {
    /// Response id.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Endpoint.
    pub endpoint: Endpoint,
}

impl ResponseHeader {
    /// The whole (non-streamed) response.
    pub fn full_response(
        &self,
        text: String,
        finish: Option<&str>,
        usage: Usage,
    ) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": null,
        })
    }

    fn chunk(&self, choices: serde_json::Value, usage: Option<Usage>) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion.chunk",
            },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": null,
        })
    }

    /// The first chunk of a chat stream, announcing the assistant role.
    pub fn role_chunk(&self) -> serde_json::Value {
        self.chunk(
            serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    /// A chunk of new text, or the closing chunk with its finish reason.
    pub fn text_chunk(&self, text: &str, finish: Option<&str>) -> serde_json::Value {
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::json!({"content": text})
                };
                serde_json::json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        self.chunk(serde_json::json!([choice]), None)
    }

    /// The final chunk of `stream_options.include_usage`: no choices, usage.
    pub fn usage_chunk(&self, usage: Usage) -> serde_json::Value {
        self.chunk(serde_json::json!([]), Some(usage))
    }
}
