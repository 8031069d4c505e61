//! OpenAI response bodies and stream chunks.

use serde::Serialize;
use tokenmill_protocol::{FinishReason, TokenLogprob, TopLogprob, UsageEvent};

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
        // Cut by a drain's deadline: the answer ends like any other, with
        // the text made so far and the usage billed for it, and says why.
        FinishReason::Shutdown => Some("shutdown"),
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
    /// The request field that holds the prompt.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Completions => "prompt",
            Endpoint::Chat => "messages",
        }
    }

    /// Prefix of response ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }
}

/// One finished choice of a non-streamed response.
#[derive(Clone, Debug, Default)]
pub struct ChoiceOut {
    /// The generated text.
    pub text: String,
    /// Its finish reason.
    pub finish: Option<&'static str>,
    /// Its tokens' log probabilities, when asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
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
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The whole (non-streamed) response.
    pub fn full_response(&self, choices: &[ChoiceOut], usage: Usage) -> serde_json::Value {
        let choices: Vec<serde_json::Value> = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = c
                    .logprobs
                    .as_deref()
                    .map(|l| logprobs_json(self.endpoint, l, 0));
                match self.endpoint {
                    Endpoint::Completions => serde_json::json!({
                        "index": index, "text": c.text, "logprobs": logprobs,
                        "finish_reason": c.finish,
                    }),
                    Endpoint::Chat => serde_json::json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": c.finish,
                    }),
                }
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": null,
        })
    }

    fn chunk(&self, choices: serde_json::Value, usage: Option<Usage>) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": null,
        })
    }

    /// The first chunk of choice `index` of a chat stream, announcing the
    /// assistant role.
    pub fn role_chunk(&self, index: usize) -> serde_json::Value {
        self.chunk(
            serde_json::json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    /// A chunk of new text of choice `index` (with the log probabilities of
    /// its tokens; `text_offset` is where the first of them starts in the
    /// choice's text), or the closing chunk with its finish reason.
    pub fn text_chunk(
        &self,
        index: usize,
        text: &str,
        finish: Option<&str>,
        logprobs: Option<(&[TokenLogprob], usize)>,
    ) -> serde_json::Value {
        let logprobs = logprobs.map(|(l, offset)| logprobs_json(self.endpoint, l, offset));
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::json!({"content": text})
                };
                serde_json::json!({"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish})
            }
        };
        self.chunk(serde_json::json!([choice]), None)
    }

    /// The final chunk of `stream_options.include_usage`: no choices, usage.
    pub fn usage_chunk(&self, usage: Usage) -> serde_json::Value {
        self.chunk(serde_json::json!([]), Some(usage))
    }
}

/// A token as text: its bytes, with a partial UTF-8 character shown as the
/// replacement character (the chat format also gives the exact bytes).
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `logprobs` object of a choice or chunk, in the endpoint's shape:
/// chat's `content` list with `bytes` and `top_logprobs` (exactly the number
/// asked for), or the completions API's parallel lists, whose
/// `top_logprobs` also hold the chosen token (as OpenAI's do) and whose
/// `text_offset` (in characters of the choice's text) starts at
/// `text_offset`.
pub fn logprobs_json(
    endpoint: Endpoint,
    logprobs: &[TokenLogprob],
    text_offset: usize,
) -> serde_json::Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |t: &TopLogprob| {
                serde_json::json!({"token": token_text(&t.bytes), "logprob": t.logprob,
                    "bytes": t.bytes})
            };
            let content: Vec<serde_json::Value> = logprobs
                .iter()
                .map(|l| {
                    let mut value = entry(&l.chosen);
                    value["top_logprobs"] = l.top.iter().map(entry).collect();
                    value
                })
                .collect();
            serde_json::json!({"content": content, "refusal": null})
        }
        Endpoint::Completions => {
            let mut offsets = Vec::with_capacity(logprobs.len());
            let mut offset = text_offset;
            for l in logprobs {
                offsets.push(offset);
                offset += token_text(&l.chosen.bytes).chars().count();
            }
            let top: Vec<serde_json::Value> = logprobs
                .iter()
                .map(|l| {
                    let mut map = serde_json::Map::new();
                    for t in l.top.iter().chain(std::iter::once(&l.chosen)) {
                        map.entry(token_text(&t.bytes))
                            .or_insert_with(|| serde_json::json!(t.logprob));
                    }
                    serde_json::Value::Object(map)
                })
                .collect();
            serde_json::json!({
                "tokens": logprobs.iter().map(|l| token_text(&l.chosen.bytes)).collect::<Vec<_>>(),
                "token_logprobs": logprobs.iter().map(|l| l.chosen.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// Length in characters of the tokens' text, as `text_offset` counts it.
pub fn logprobs_text_len(logprobs: &[TokenLogprob]) -> usize {
    logprobs
        .iter()
        .map(|l| token_text(&l.chosen.bytes).chars().count())
        .sum()
}
