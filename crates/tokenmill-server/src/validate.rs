//! Request validation: the raw JSON of an OpenAI request becomes a
//! [`ValidRequest`], or an [`ApiError`] that names the parameter at fault.
//!
//! We read the body as a JSON object ourselves rather than through serde
//! derive, so that every unknown field and every unsupported value is
//! reported with its name (OpenAI's `param`), and a wrong type is a 400, not
//! a framework's 422. A field set to `null` counts as absent.

use crate::error::ApiError;
use serde_json::{Map, Value};
use tokenmill_protocol::{ChatMessage, EngineClient, SamplingParams, StopConditions};

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// `max_tokens` of a completion request that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// Most completions per request (OpenAI's limit).
pub const MAX_N: i64 = 128;
/// Most alternatives per token in `logprobs` / `top_logprobs`.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A request that passed validation, ready for the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    /// The served model name.
    pub model: String,
    /// Prompt token ids (never empty).
    pub prompt_tokens: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop conditions, `max_tokens` resolved.
    pub stop: StopConditions,
    /// Whether to answer with server-sent events.
    pub stream: bool,
    /// Whether a streamed answer ends with a usage chunk.
    pub include_usage: bool,
    /// Completions to generate.
    pub n: usize,
    /// Alternatives per token to return log probabilities for (`None`: no
    /// log probabilities at all).
    pub logprobs: Option<usize>,
}

/// The fields of a request object; each is taken out as it is read, so that
/// what is left at the end is unknown.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(ApiError::InvalidJson(
                "the body must be a JSON object".to_owned(),
            )),
        }
    }

    /// Takes a field; `null` is the same as absent.
    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a string"),
            )),
        }
    }

    fn bool(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a boolean"),
            )),
        }
    }

    fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        self.numeric(name, "a number", serde_json::Number::as_f64)
    }

    fn integer(&mut self, name: &str) -> Result<Option<i64>, ApiError> {
        self.numeric(name, "an integer", serde_json::Number::as_i64)
    }

    /// A JSON number converted by `convert`; anything else is a 400 saying
    /// the field must be `what`.
    fn numeric<T>(
        &mut self,
        name: &str,
        what: &str,
        convert: impl Fn(&serde_json::Number) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        let wrong = || ApiError::invalid(name, format!("'{name}' must be {what}"));
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => convert(&n).map(Some).ok_or_else(wrong),
            Some(_) => Err(wrong()),
        }
    }

    /// A field we accept only at its default: absent, `null` or a value for
    /// which `is_default` holds.
    fn only_default(
        &mut self,
        name: &str,
        is_default: impl Fn(&Value) -> bool,
    ) -> Result<(), ApiError> {
        match self.take(name) {
            Some(v) if !is_default(&v) => Err(ApiError::unsupported(
                name,
                format!("'{name}' is not supported by this server"),
            )),
            _ => Ok(()),
        }
    }

    /// Fails on the first field nobody read.
    fn finish(self) -> Result<(), ApiError> {
        match self.0.into_iter().next() {
            Some((name, _)) => Err(ApiError::UnknownField(name)),
            None => Ok(()),
        }
    }
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}

/// Parameters shared by both endpoints.
struct Common {
    model: String,
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stop_strings: Vec<String>,
    stream: bool,
    include_usage: bool,
    n: usize,
    ignore_eos: bool,
}

fn common(fields: &mut Fields, engine: &dyn EngineClient) -> Result<Common, ApiError> {
    let model = fields
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "you must provide a model parameter"))?;
    if model != engine.model_info().name {
        return Err(ApiError::ModelNotFound(model));
    }
    let temperature = fields.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{temperature} is not in [0, 2] - 'temperature'"),
        ));
    }
    let top_p = fields.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("{top_p} is not in (0, 1] - 'top_p'"),
        ));
    }
    // Any 64-bit integer is a seed; negative ones keep their bits.
    let seed = fields.integer("seed")?.map(|s| s as u64);
    let n = fields.integer("n")?.unwrap_or(1);
    if n < 1 {
        return Err(ApiError::invalid(
            "n",
            format!("{n} is less than the minimum of 1 - 'n'"),
        ));
    }
    if n > MAX_N {
        return Err(ApiError::invalid(
            "n",
            format!("{n} is greater than the maximum of {MAX_N} - 'n'"),
        ));
    }
    let stop_strings = stop_strings(fields.take("stop"))?;
    let stream = fields.bool("stream")?.unwrap_or(false);
    let include_usage = match fields.take("stream_options") {
        None => false,
        Some(Value::Object(mut options)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "'stream_options' is only allowed when 'stream' is true",
                ));
            }
            let include = match options.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options.include_usage",
                        "'include_usage' must be a boolean",
                    ))
                }
            };
            if let Some((name, _)) = options.into_iter().find(|(_, v)| !v.is_null()) {
                return Err(ApiError::UnknownField(format!("stream_options.{name}")));
            }
            include
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' must be an object",
            ))
        }
    };
    fields.string("user")?;
    // Not OpenAI's, but the extension vLLM and others accept: benchmarks use
    // it to fix the output length.
    let ignore_eos = fields.bool("ignore_eos")?.unwrap_or(false);
    for name in ["presence_penalty", "frequency_penalty"] {
        fields.only_default(name, is_zero)?;
    }
    fields.only_default("logit_bias", is_empty_object)?;
    Ok(Common {
        model,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
        },
        max_tokens: None,
        stop_strings,
        stream,
        include_usage,
        n: n as usize,
        ignore_eos,
    })
}

fn stop_strings(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop", "'stop' must be a string or a list of strings");
    let strings = match value {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if strings.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop sequences are allowed, got {}",
                strings.len()
            ),
        ));
    }
    Ok(strings)
}

/// A count of alternative tokens, 0 to [`MAX_TOP_LOGPROBS`].
fn top_logprobs(fields: &mut Fields, name: &str) -> Result<Option<usize>, ApiError> {
    match fields.integer(name)? {
        None => Ok(None),
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::invalid(
            name,
            format!("{k} is not in [0, {MAX_TOP_LOGPROBS}] - '{name}'"),
        )),
    }
}

fn max_tokens(fields: &mut Fields, name: &str) -> Result<Option<usize>, ApiError> {
    match fields.integer(name)? {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid(
            name,
            format!("{n} is less than the minimum of 1 - '{name}'"),
        )),
    }
}

/// Resolves `max_tokens` and checks that prompt and output fit the context.
fn finish(
    common: Common,
    prompt_tokens: Vec<u32>,
    prompt_param: &str,
    default_max_tokens: Option<usize>,
    logprobs: Option<usize>,
    engine: &dyn EngineClient,
) -> Result<ValidRequest, ApiError> {
    let context = engine.model_info().context_length;
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    let room = context.saturating_sub(prompt_tokens.len());
    let max_tokens = common.max_tokens.or(default_max_tokens).unwrap_or(room);
    if prompt_tokens.len() + max_tokens > context || room == 0 {
        return Err(ApiError::ContextLengthExceeded {
            message: format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the {prompt_param}, {max_tokens} for the completion). Please reduce the length of the {prompt_param} or the completion.",
                prompt_tokens.len() + max_tokens,
                prompt_tokens.len()
            ),
            param: prompt_param.to_owned(),
        });
    }
    Ok(ValidRequest {
        model: common.model,
        prompt_tokens,
        sampling: common.sampling,
        stop: StopConditions {
            max_tokens,
            stop_strings: common.stop_strings,
            ignore_eos: common.ignore_eos,
        },
        stream: common.stream,
        include_usage: common.include_usage,
        n: common.n,
        logprobs,
    })
}

/// Validates a `/v1/completions` body.
pub fn completion(body: &[u8], engine: &dyn EngineClient) -> Result<ValidRequest, ApiError> {
    let mut fields = Fields::parse(body)?;
    let mut common = common(&mut fields, engine)?;
    common.max_tokens = max_tokens(&mut fields, "max_tokens")?;
    let prompt = fields
        .take("prompt")
        .ok_or_else(|| ApiError::invalid("prompt", "you must provide a prompt"))?;
    let logprobs = top_logprobs(&mut fields, "logprobs")?;
    fields.only_default("echo", is_false)?;
    // best_of = n is plain n; choosing the best of more is not implemented.
    let n = common.n;
    fields.only_default("best_of", |v| v.as_u64() == Some(n as u64))?;
    fields.only_default("suffix", |v| v.as_str() == Some(""))?;
    fields.finish()?;
    let tokens = prompt_tokens(prompt, engine)?;
    finish(
        common,
        tokens,
        "prompt",
        Some(DEFAULT_COMPLETION_MAX_TOKENS),
        logprobs,
        engine,
    )
}

/// A completion prompt: a string, token ids, or a list holding one of those.
fn prompt_tokens(prompt: Value, engine: &dyn EngineClient) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "'prompt' must be a string, a list of token ids, or a list holding one of those",
        )
    };
    match prompt {
        Value::String(text) => engine
            .tokenize(&text)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e}"))),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let vocab = engine.model_info().vocab_size;
            items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|id| (*id as usize) < vocab)
                        .map(|id| id as u32)
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "prompt",
                                format!("token id {v} is not in the vocabulary (0..{vocab})"),
                            )
                        })
                })
                .collect()
        }
        Value::Array(mut items) if items.len() == 1 => prompt_tokens(items.remove(0), engine),
        Value::Array(items) if items.len() > 1 => Err(ApiError::unsupported(
            "prompt",
            "only one prompt per request is supported",
        )),
        _ => Err(bad()),
    }
}

/// Validates a `/v1/chat/completions` body.
pub fn chat(body: &[u8], engine: &dyn EngineClient) -> Result<ValidRequest, ApiError> {
    let mut fields = Fields::parse(body)?;
    let mut common = common(&mut fields, engine)?;
    let legacy = max_tokens(&mut fields, "max_tokens")?;
    common.max_tokens = max_tokens(&mut fields, "max_completion_tokens")?.or(legacy);
    let messages = fields
        .take("messages")
        .ok_or_else(|| ApiError::invalid("messages", "you must provide messages"))?;
    let logprobs = fields.bool("logprobs")?.unwrap_or(false);
    let top = top_logprobs(&mut fields, "top_logprobs")?;
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
    let messages = chat_messages(messages)?;
    let tokens = engine.tokenize_chat(&messages).map_err(|e| {
        ApiError::invalid("messages", format!("cannot apply the chat template: {e}"))
    })?;
    finish(common, tokens, "messages", None, logprobs, engine)
}

fn chat_messages(value: Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid("messages", "'messages' must be a list"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must hold at least one message",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| chat_message(i, item))
        .collect()
}

fn chat_message(index: usize, item: Value) -> Result<ChatMessage, ApiError> {
    let param = |field: &str| format!("messages.[{index}].{field}");
    let Value::Object(mut map) = item else {
        return Err(ApiError::invalid(
            &format!("messages.[{index}]"),
            "a message must be an object",
        ));
    };
    let role = match map.remove("role") {
        Some(Value::String(r))
            if matches!(r.as_str(), "system" | "developer" | "user" | "assistant") =>
        {
            // "developer" is the newer name of the system role.
            if r == "developer" {
                "system".to_owned()
            } else {
                r
            }
        }
        Some(Value::String(r)) => {
            return Err(ApiError::unsupported(
                &param("role"),
                format!("role '{r}' is not supported (system, developer, user, assistant)"),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                &param("role"),
                "a message needs a 'role' string",
            ))
        }
    };
    let content = match map.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(parts, &param("content"))?,
        _ => {
            return Err(ApiError::invalid(
                &param("content"),
                "a message needs a 'content' string",
            ))
        }
    };
    map.remove("name");
    if let Some((name, _)) = map.into_iter().find(|(_, v)| !v.is_null()) {
        return Err(ApiError::UnknownField(param(&name)));
    }
    Ok(ChatMessage { role, content })
}

/// Joins `[{"type": "text", "text": ...}]` content parts.
fn text_parts(parts: Vec<Value>, param: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for part in parts {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (Some(kind), _) if kind != "text" => {
                return Err(ApiError::unsupported(
                    param,
                    format!("content parts of type '{kind}' are not supported"),
                ))
            }
            _ => return Err(ApiError::invalid(param, "a text content part needs 'text'")),
        }
    }
    Ok(text)
}
