//! Authentication: the bearer key of a request becomes the [`Caller`] it is
//! billed to, or a 401 in OpenAI's error shape.

use crate::error::ApiError;
use crate::tenants::LiveKeys;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use tokenmill_protocol::Caller;

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Every request is the anonymous tenant's: local development only.
    Disabled,
    /// Requests need a key from the registry in force.
    Keys(Arc<LiveKeys>),
}

/// Middleware: puts the request's [`Caller`] into its extensions, or answers
/// 401.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if request.headers().get_all(AUTHORIZATION).iter().count() > 1 {
        return Err(ApiError::AmbiguousApiKey);
    }
    let caller = match &state.auth {
        Auth::Disabled => Caller::anonymous(),
        Auth::Keys(registry) => {
            let key = bearer_key(&request).ok_or(ApiError::MissingApiKey)?;
            registry
                .current()
                .authenticate(key)
                .cloned()
                .ok_or_else(|| ApiError::InvalidApiKey(redact(key)))?
        }
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// The key of an `Authorization: Bearer KEY` header, if there is one.
fn bearer_key(request: &Request) -> Option<&str> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// A key as error messages may show it: its first and last few characters.
fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 10 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}***{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redaction_never_shows_a_short_key_and_only_the_ends_of_a_long_one() {
        assert_eq!(redact("short"), "*****");
        assert_eq!(redact("sk-tm-abcdefghijklmnop"), "sk-tm-***mnop");
    }
}
