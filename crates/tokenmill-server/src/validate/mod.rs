//! Request validation, in one place: the raw JSON of an OpenAI request
//! becomes a [`ValidRequest`], which carries the very [`GenerateRequest`] the
//! engine takes, or an [`ApiError`] that names the parameter at fault.
//!
//! The [`Validator`] holds everything a rule needs: the model's facts
//! ([`ModelInfo`]: name, vocabulary, context length, KV capacity), its
//! tokenizer and chat template (through the [`EngineClient`]), and the
//! operator's [`Limits`] on prompt and output tokens. Every rule about a
//! request's content is checked here, so the engine never sees a request it
//! could not schedule; the handlers only read bodies and answer.
//!
//! Parts: [`fields`] reads the JSON object field by field; [`params`] holds
//! the rules of the shared parameters; [`prompt`] turns a prompt or chat
//! messages into tokens; [`length`] fits prompt and output into the limits.

mod fields;
mod length;
mod params;
mod prompt;
#[cfg(test)]
mod tests;

use crate::error::ApiError;
use crate::openai::Endpoint;
use crate::Limits;
use fields::{is_false, Fields};
use length::LengthRules;
use params::{Common, MaxTokens};
use std::sync::Arc;
use std::time::SystemTime;
use tokenmill_protocol::{
    Caller, EngineClient, GenerateRequest, ModelInfo, RequestId, StopConditions,
};

pub use params::{MAX_N, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS};

/// `max_tokens` of a completion request that gives none (OpenAI's default),
/// cut to the room the prompt leaves.
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// What the server knows of a request besides its body: who sent it, when,
/// and the id it answers under.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    /// The request's id (the OpenAI response id).
    pub id: RequestId,
    /// Who is billed.
    pub caller: Caller,
    /// When the server received the request.
    pub arrived_at: SystemTime,
}

/// A request that passed validation: the engine's [`GenerateRequest`],
/// built once, and how the client wants the answer.
///
/// Only the [`Validator`] makes one, so a value of this type is proof that
/// every rule held.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
}

impl ValidRequest {
    /// The request the engine will get.
    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    /// Whether to answer with server-sent events.
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.include_usage
    }

    /// Whether every streamed chunk carries the usage so far.
    pub fn continuous_usage(&self) -> bool {
        self.continuous_usage
    }

    /// The request, for [`EngineClient::submit`].
    pub fn into_request(self) -> GenerateRequest {
        self.request
    }
}

/// Checks requests against the model and the server's limits.
pub struct Validator {
    engine: Arc<dyn EngineClient>,
    info: ModelInfo,
    lengths: LengthRules,
}

/// What an endpoint read besides the shared parameters.
struct Parsed {
    common: Common,
    max_tokens: Option<MaxTokens>,
    logprobs: Option<usize>,
}

impl Validator {
    /// A validator for the model `engine` serves, under the token limits of
    /// `limits` (its other limits are the HTTP layer's).
    pub fn new(engine: Arc<dyn EngineClient>, limits: &Limits) -> Self {
        let info = engine.model_info().clone();
        let lengths = LengthRules::new(&info, limits.max_prompt_tokens, limits.max_output_tokens);
        Validator {
            engine,
            info,
            lengths,
        }
    }

    /// Validates a body sent to `endpoint`.
    pub fn validate(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        meta: RequestMeta,
    ) -> Result<ValidRequest, ApiError> {
        match endpoint {
            Endpoint::Completions => self.completion(body, meta),
            Endpoint::Chat => self.chat(body, meta),
        }
    }

    /// Validates a `/v1/completions` body.
    pub fn completion(&self, body: &[u8], meta: RequestMeta) -> Result<ValidRequest, ApiError> {
        let mut fields = Fields::parse(body)?;
        let common = params::common(&mut fields, &self.info)?;
        let max_tokens = params::max_tokens(&mut fields, "max_tokens")?;
        let prompt = fields
            .take("prompt")
            .ok_or_else(|| ApiError::invalid("prompt", "you must provide a prompt"))?;
        let logprobs = params::top_logprobs(&mut fields, "logprobs")?;
        fields.only_default("echo", is_false)?;
        // best_of = n is plain n; choosing the best of more is not implemented.
        let n = common.n as u64;
        fields.only_default("best_of", |v| v.as_u64() == Some(n))?;
        fields.only_default("suffix", |v| v.as_str() == Some(""))?;
        fields.finish()?;
        let tokens = prompt::completion_tokens(prompt, self.engine.as_ref(), self.info.vocab_size)?;
        let parsed = Parsed {
            common,
            max_tokens,
            logprobs,
        };
        self.finish(
            parsed,
            tokens,
            Endpoint::Completions,
            Some(DEFAULT_COMPLETION_MAX_TOKENS),
            meta,
        )
    }

    /// Validates a `/v1/chat/completions` body.
    pub fn chat(&self, body: &[u8], meta: RequestMeta) -> Result<ValidRequest, ApiError> {
        let mut fields = Fields::parse(body)?;
        let common = params::common(&mut fields, &self.info)?;
        let legacy = params::max_tokens(&mut fields, "max_tokens")?;
        let max_tokens = params::max_tokens(&mut fields, "max_completion_tokens")?.or(legacy);
        let messages = fields
            .take("messages")
            .ok_or_else(|| ApiError::invalid("messages", "you must provide messages"))?;
        let logprobs = fields.bool("logprobs")?.unwrap_or(false);
        let top = params::top_logprobs(&mut fields, "top_logprobs")?;
        if top.is_some() && !logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs' set to true",
            ));
        }
        let logprobs = logprobs.then(|| top.unwrap_or(0));
        for name in [
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "response_format",
            "parallel_tool_calls",
            "audio",
            "modalities",
            "prediction",
        ] {
            fields.only_default(name, |_| false)?;
        }
        fields.finish()?;
        let tokens = prompt::chat_tokens(messages, self.engine.as_ref())?;
        let parsed = Parsed {
            common,
            max_tokens,
            logprobs,
        };
        // Without a length a chat answer may take the rest of the sequence.
        self.finish(parsed, tokens, Endpoint::Chat, None, meta)
    }

    /// Fits the prompt and output into the limits and builds the request.
    fn finish(
        &self,
        parsed: Parsed,
        prompt_tokens: Vec<u32>,
        endpoint: Endpoint,
        default_max_tokens: Option<usize>,
        meta: RequestMeta,
    ) -> Result<ValidRequest, ApiError> {
        let Parsed {
            common,
            max_tokens,
            logprobs,
        } = parsed;
        let max_tokens = self.lengths.max_tokens(
            prompt_tokens.len(),
            endpoint.prompt_param(),
            max_tokens,
            default_max_tokens,
        )?;
        let RequestMeta {
            id,
            caller,
            arrived_at,
        } = meta;
        Ok(ValidRequest {
            request: GenerateRequest {
                id,
                caller,
                model: common.model,
                prompt_tokens,
                sampling: common.sampling,
                stop: StopConditions {
                    max_tokens,
                    stop_strings: common.stop_strings,
                    ignore_eos: common.ignore_eos,
                },
                n: common.n,
                logprobs,
                arrived_at,
            },
            stream: common.stream,
            include_usage: common.include_usage,
            continuous_usage: common.continuous_usage,
        })
    }
}
