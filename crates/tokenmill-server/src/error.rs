//! The server's one error type and the one table that maps each error to an
//! HTTP status and an OpenAI error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use thiserror::Error;
use tokenmill_protocol::SubmitError;

/// Everything a request can fail with, as the client will see it.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ApiError {
    /// The request is malformed or a value is out of range.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, in words.
        message: String,
        /// The offending parameter.
        param: Option<String>,
    },
    /// A parameter this server does not implement.
    #[error("{message}")]
    Unsupported {
        /// What is not supported.
        message: String,
        /// The parameter.
        param: String,
    },
    /// A field the API does not have.
    #[error("Unrecognized request argument supplied: {0}")]
    UnknownField(String),
    /// The body is not JSON.
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    /// The prompt and the requested output do not fit the context.
    #[error("{message}")]
    ContextLengthExceeded {
        /// The numbers, in words.
        message: String,
        /// "prompt" or "messages", or "max_tokens".
        param: String,
    },
    /// The body is over the size limit.
    #[error("The request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    /// The body is encoded (`Content-Encoding`) in a way this server does
    /// not decode; reading it as plain JSON would misread it.
    #[error("Content-Encoding {0:?} is not supported: send the body uncompressed (identity).")]
    UnsupportedEncoding(String),
    /// More than one `Authorization` header: which key pays would be a guess.
    #[error("The request has more than one Authorization header; send exactly one (Authorization: Bearer YOUR_KEY).")]
    AmbiguousApiKey,
    /// The request has no API key.
    #[error("You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")]
    MissingApiKey,
    /// The API key is not known; the message shows only its ends.
    #[error("Incorrect API key provided: {0}.")]
    InvalidApiKey(String),
    /// No such model is served.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// No such route.
    #[error("Unknown request URL: {method} {path}.")]
    RouteNotFound {
        /// The HTTP method.
        method: String,
        /// The path.
        path: String,
    },
    /// Too many requests are queued; retry after the given seconds.
    #[error("The server is busy: too many requests are queued. Retry after {0} s.")]
    Overloaded(u64),
    /// The server is draining before it stops; another replica should take
    /// the request.
    #[error("The server is shutting down and takes no new requests. Retry after {0} s.")]
    Draining(u64),
    /// Too many requests are in progress at once.
    #[error("The server has too many requests in progress. Retry after {0} s.")]
    TooManyInProgress(u64),
    /// The request took longer than the server allows.
    #[error("The request did not finish within {0} s and was stopped.")]
    Timeout(u64),
    /// The engine cannot take requests now.
    #[error("The server is not able to take requests right now: {0}")]
    Unavailable(String),
    /// The engine failed while serving the request.
    #[error("The server had an error while processing your request: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// Shorthand for an invalid value of `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_owned()),
        }
    }

    /// Shorthand for a parameter we do not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError::Unsupported {
            message: message.into(),
            param: param.to_owned(),
        }
    }

    /// The table: HTTP status, OpenAI error type, parameter and code.
    fn parts(&self) -> (StatusCode, &'static str, Option<&str>, Option<&'static str>) {
        use ApiError::*;
        const INVALID: &str = "invalid_request_error";
        match self {
            InvalidRequest { param, .. } => {
                (StatusCode::BAD_REQUEST, INVALID, param.as_deref(), None)
            }
            Unsupported { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some(param),
                Some("unsupported_parameter"),
            ),
            UnknownField(field) => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some(field),
                Some("unrecognized_argument"),
            ),
            InvalidJson(_) => (StatusCode::BAD_REQUEST, INVALID, None, Some("invalid_json")),
            ContextLengthExceeded { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                Some(param),
                Some("context_length_exceeded"),
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                None,
                Some("payload_too_large"),
            ),
            UnsupportedEncoding(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                INVALID,
                None,
                Some("unsupported_content_encoding"),
            ),
            AmbiguousApiKey => (
                StatusCode::BAD_REQUEST,
                INVALID,
                None,
                Some("multiple_authorization_headers"),
            ),
            MissingApiKey => (StatusCode::UNAUTHORIZED, INVALID, None, None),
            InvalidApiKey(_) => (
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                Some("invalid_api_key"),
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                INVALID,
                Some("model"),
                Some("model_not_found"),
            ),
            RouteNotFound { .. } => (StatusCode::NOT_FOUND, INVALID, None, Some("unknown_url")),
            Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                Some("queue_full"),
            ),
            Draining(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
            ),
            TooManyInProgress(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("too_many_requests_in_progress"),
            ),
            Timeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                None,
                Some("timeout"),
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("unavailable"),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        }
    }

    /// The request outcome this error counts as in metrics.
    pub fn outcome(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidRequest { .. }
            | Unsupported { .. }
            | UnknownField(_)
            | InvalidJson(_)
            | ContextLengthExceeded { .. }
            | UnsupportedEncoding(_)
            | AmbiguousApiKey => "invalid",
            PayloadTooLarge(_) => "too_large",
            MissingApiKey | InvalidApiKey(_) => "unauthorized",
            ModelNotFound(_) | RouteNotFound { .. } => "not_found",
            Overloaded(_) => "overloaded",
            Unavailable(_) | Draining(_) | TooManyInProgress(_) => "unavailable",
            Timeout(_) => "timeout",
            Internal(_) => "error",
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The OpenAI error object, as JSON.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, param, code) = self.parts();
        serde_json::to_value(ErrorBody {
            error: ErrorObject {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        })
        .unwrap_or_default()
    }
}

/// The engine's refusals. `Unschedulable` cannot reach a client through the
/// handlers: the validator refuses every request too long for the model's
/// sequence limit first, so the engine refusing one means the two disagree
/// about the limit, which is the server's fault (500), not the client's.
impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Stopped | SubmitError::MeterUnavailable => {
                ApiError::Unavailable(e.to_string())
            }
            SubmitError::Overloaded {
                retry_after_seconds,
            } => ApiError::Overloaded(retry_after_seconds),
            SubmitError::Unschedulable { .. } => {
                tracing::error!(error = %e, "the engine refused a validated request");
                ApiError::Internal(format!(
                    "the engine refused a request the validator accepted: {e}"
                ))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let ApiError::Overloaded(seconds)
        | ApiError::Draining(seconds)
        | ApiError::TooManyInProgress(seconds) = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_openai_shape() {
        let body = ApiError::invalid("temperature", "too hot").body();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "too hot", "type": "invalid_request_error",
                "param": "temperature", "code": null}})
        );
        assert_eq!(
            ApiError::ModelNotFound("x".into()).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::UnknownField("foo".into()).body()["error"]["param"],
            "foo"
        );
    }

    #[test]
    fn a_full_queue_is_429_with_retry_after() {
        let response = ApiError::Overloaded(3).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            ApiError::Overloaded(3).body()["error"]["code"],
            "queue_full"
        );
    }

    #[test]
    fn engine_refusals_map_to_their_status_and_code() {
        for (refusal, status, code) in [
            (SubmitError::Stopped, 503, Some("unavailable")),
            (SubmitError::MeterUnavailable, 503, Some("unavailable")),
            (
                SubmitError::Overloaded {
                    retry_after_seconds: 4,
                },
                429,
                Some("queue_full"),
            ),
            (
                SubmitError::Unschedulable {
                    tokens: 10,
                    limit: 8,
                },
                500,
                None,
            ),
        ] {
            let error = ApiError::from(refusal);
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.body()["error"]["code"], serde_json::json!(code));
            assert_eq!(error.body()["error"]["param"], serde_json::Value::Null);
        }
        assert_eq!(
            ApiError::from(SubmitError::Overloaded {
                retry_after_seconds: 4
            }),
            ApiError::Overloaded(4)
        );
    }

    #[test]
    fn every_validation_error_is_a_400_invalid_request() {
        for (error, param, code) in [
            (ApiError::invalid("n", "x"), Some("n"), None),
            (
                ApiError::unsupported("echo", "x"),
                Some("echo"),
                Some("unsupported_parameter"),
            ),
            (
                ApiError::UnknownField("foo".into()),
                Some("foo"),
                Some("unrecognized_argument"),
            ),
            (
                ApiError::InvalidJson("x".into()),
                None,
                Some("invalid_json"),
            ),
            (
                ApiError::ContextLengthExceeded {
                    message: "x".into(),
                    param: "messages".into(),
                },
                Some("messages"),
                Some("context_length_exceeded"),
            ),
        ] {
            assert_eq!(error.status(), StatusCode::BAD_REQUEST);
            assert_eq!(error.outcome(), "invalid");
            let body = error.body();
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert_eq!(body["error"]["param"], serde_json::json!(param));
            assert_eq!(body["error"]["code"], serde_json::json!(code));
        }
    }
}
