//! The parameters both endpoints share, and the small rules of each.

use super::fields::{is_empty_object, is_zero, Fields};
use crate::error::ApiError;
use serde_json::Value;
use tokenmill_protocol::{ModelInfo, SamplingParams};

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Most completions per request (OpenAI's limit).
pub const MAX_N: i64 = 128;
/// Most alternatives per token in `logprobs` / `top_logprobs`.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Parameters shared by both endpoints.
pub(super) struct Common {
    pub(super) model: String,
    pub(super) sampling: SamplingParams,
    pub(super) stop_strings: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) continuous_usage: bool,
    pub(super) n: usize,
    pub(super) ignore_eos: bool,
}

/// An output length the client asked for, and the field it came in (so an
/// error about it names that field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MaxTokens {
    pub(super) value: usize,
    pub(super) param: &'static str,
}

pub(super) fn common(fields: &mut Fields, info: &ModelInfo) -> Result<Common, ApiError> {
    let model = fields
        .string("model")?
        .ok_or_else(|| ApiError::invalid("model", "you must provide a model parameter"))?;
    if model != info.name {
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
    let (include_usage, continuous_usage) = stream_options(fields.take("stream_options"), stream)?;
    fields.string("user")?;
    // OpenAI's fields that change nothing here: storing completions, tags
    // and the service tier (one tier).
    fields.bool("store")?;
    fields.string("service_tier")?;
    match fields.take("metadata") {
        None | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "'metadata' must be an object",
            ))
        }
    }
    // vLLM's extension, which its benchmark always sends: only its neutral
    // value until penalties are implemented.
    fields.only_default("repetition_penalty", |v| v.as_f64() == Some(1.0))?;
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
        stop_strings,
        stream,
        include_usage,
        continuous_usage,
        // In 1..=MAX_N, checked above.
        n: n as usize,
        ignore_eos,
    })
}

/// `stream_options`: whether a stream ends with a usage chunk, and whether
/// every chunk carries the usage so far (`continuous_usage_stats`, vLLM's
/// extension, which guidellm sends).
fn stream_options(value: Option<Value>, stream: bool) -> Result<(bool, bool), ApiError> {
    let mut options = match value {
        None => return Ok((false, false)),
        Some(Value::Object(options)) => options,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "'stream_options' must be an object",
            ))
        }
    };
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    let mut flag = |name: &str| match options.remove(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(ApiError::invalid(
            &format!("stream_options.{name}"),
            format!("'{name}' must be a boolean"),
        )),
    };
    let include = flag("include_usage")?;
    let continuous = flag("continuous_usage_stats")?;
    if let Some((name, _)) = options.into_iter().find(|(_, v)| !v.is_null()) {
        return Err(ApiError::UnknownField(format!("stream_options.{name}")));
    }
    Ok((include, continuous))
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
pub(super) fn top_logprobs(fields: &mut Fields, name: &str) -> Result<Option<usize>, ApiError> {
    match fields.integer(name)? {
        None => Ok(None),
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::invalid(
            name,
            format!("{k} is not in [0, {MAX_TOP_LOGPROBS}] - '{name}'"),
        )),
    }
}

/// An output length field: absent, or an integer of at least 1.
pub(super) fn max_tokens(
    fields: &mut Fields,
    name: &'static str,
) -> Result<Option<MaxTokens>, ApiError> {
    match fields.integer(name)? {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(MaxTokens {
            // An i64 of at least 1 fits a usize on the 64-bit targets we
            // build for; saturate anywhere else (the length rule refuses it).
            value: usize::try_from(n).unwrap_or(usize::MAX),
            param: name,
        })),
        Some(n) => Err(ApiError::invalid(
            name,
            format!("{n} is less than the minimum of 1 - '{name}'"),
        )),
    }
}
