//! The prompt of each endpoint: a completion's `prompt` (text or token ids)
//! and a chat's `messages`, turned into prompt tokens.

use crate::error::ApiError;
use serde_json::Value;
use tokenmill_protocol::{ChatMessage, EngineClient};

/// A completion prompt: a string, token ids, or a list holding one of those.
pub(super) fn completion_tokens(
    prompt: Value,
    engine: &dyn EngineClient,
    vocab_size: usize,
) -> Result<Vec<u32>, ApiError> {
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
            let vocab = vocab_size;
            items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|id| *id < vocab as u64)
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "prompt",
                                format!("token id {v} is not in the vocabulary (0..{vocab})"),
                            )
                        })
                })
                .collect()
        }
        Value::Array(mut items) if items.len() == 1 => {
            completion_tokens(items.remove(0), engine, vocab_size)
        }
        Value::Array(items) if items.len() > 1 => Err(ApiError::unsupported(
            "prompt",
            "only one prompt per request is supported",
        )),
        _ => Err(bad()),
    }
}

/// Chat messages, rendered with the model's template and tokenized.
pub(super) fn chat_tokens(
    messages: Value,
    engine: &dyn EngineClient,
) -> Result<Vec<u32>, ApiError> {
    let messages = chat_messages(messages)?;
    engine
        .tokenize_chat(&messages)
        .map_err(|e| ApiError::invalid("messages", format!("cannot apply the chat template: {e}")))
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
