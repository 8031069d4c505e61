//! How long a request may be: its prompt against the model's sequence limit
//! and the server's prompt limit, its output against what room is left and
//! the server's output limit.
//!
//! Each refusal names the field at fault: a prompt that leaves no room for
//! any output is the prompt's (`prompt` or `messages`); a prompt that fits
//! with an explicit `max_tokens` that does not is `max_tokens`'s (or
//! `max_completion_tokens`'s). A request that gives no length gets the rest
//! of the sequence (chat) or the endpoint's default, cut to what is left
//! (completions), as vLLM does: it is never refused for a length it did not
//! ask for.

use super::params::MaxTokens;
use crate::error::ApiError;
use tokenmill_protocol::ModelInfo;

/// The length limits of one server: the model's and the operator's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LengthRules {
    /// The model's context length.
    context_length: usize,
    /// Most tokens the KV cache holds for one sequence.
    kv_capacity_tokens: usize,
    /// Most prompt tokens the operator allows.
    max_prompt_tokens: Option<usize>,
    /// Most output tokens per completion the operator allows.
    max_output_tokens: Option<usize>,
}

impl LengthRules {
    pub(super) fn new(
        info: &ModelInfo,
        max_prompt_tokens: Option<usize>,
        max_output_tokens: Option<usize>,
    ) -> Self {
        LengthRules {
            context_length: info.context_length,
            kv_capacity_tokens: info.kv_capacity_tokens,
            max_prompt_tokens,
            max_output_tokens,
        }
    }

    /// Most tokens, prompt and output, one sequence may hold (as
    /// [`ModelInfo::max_sequence_tokens`]).
    fn sequence_limit(&self) -> usize {
        self.context_length.min(self.kv_capacity_tokens)
    }

    /// The opening of a context-length message: the limit and where it comes
    /// from.
    fn limit_in_words(&self) -> String {
        if self.kv_capacity_tokens < self.context_length {
            format!(
                "This server holds at most {} tokens per sequence in its KV cache (the model's context length is {})",
                self.kv_capacity_tokens, self.context_length
            )
        } else {
            format!(
                "This model's maximum context length is {} tokens",
                self.context_length
            )
        }
    }

    /// The most tokens to generate for a prompt of `prompt` tokens (held in
    /// the field `prompt_param`), given what the client `asked` for and the
    /// endpoint's `default` when it asked for nothing (`None`: the rest of
    /// the sequence).
    pub(super) fn max_tokens(
        &self,
        prompt: usize,
        prompt_param: &str,
        asked: Option<MaxTokens>,
        default: Option<usize>,
    ) -> Result<usize, ApiError> {
        if prompt == 0 {
            return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
        }
        let limit = self.sequence_limit();
        if prompt >= limit {
            let asked_words = asked.map_or(String::new(), |a| {
                format!(", and '{}' asks for {} more", a.param, a.value)
            });
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "{}. However, the {prompt_param} alone has {prompt} tokens{asked_words}, which leaves no room for the completion. Please reduce the length of the {prompt_param}.",
                    self.limit_in_words()
                ),
                param: prompt_param.to_owned(),
            });
        }
        if let Some(most) = self.max_prompt_tokens {
            if prompt > most {
                return Err(ApiError::invalid(
                    prompt_param,
                    format!(
                        "the prompt has {prompt} tokens; this server takes at most {most} prompt tokens per request"
                    ),
                ));
            }
        }
        let room = limit - prompt;
        let Some(asked) = asked else {
            let wanted = default.unwrap_or(room).min(room);
            return Ok(self
                .max_output_tokens
                .map_or(wanted, |most| wanted.min(most)));
        };
        if asked.value > room {
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "{}. However, you requested {} tokens ({prompt} in the {prompt_param}, {} in '{}'). Please reduce the length of the {prompt_param} or '{}' (at most {room} with this {prompt_param}).",
                    self.limit_in_words(),
                    prompt.saturating_add(asked.value),
                    asked.value,
                    asked.param,
                    asked.param,
                ),
                param: asked.param.to_owned(),
            });
        }
        if let Some(most) = self.max_output_tokens {
            if asked.value > most {
                return Err(ApiError::invalid(
                    asked.param,
                    format!(
                        "'{}' is {}; this server makes at most {most} tokens per completion",
                        asked.param, asked.value
                    ),
                ));
            }
        }
        Ok(asked.value)
    }
}
