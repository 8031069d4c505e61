//! The fields of a request body, read one by one with their types checked.
//!
//! We read the body as a JSON object ourselves rather than through serde
//! derive, so that every unknown field and every unsupported value is
//! reported with its name (OpenAI's `param`), and a wrong type is a 400, not
//! a framework's 422. A field set to `null` counts as absent.

use crate::error::ApiError;
use serde_json::{Map, Value};

/// The fields of a request object; each is taken out as it is read, so that
/// what is left at the end is unknown.
pub(super) struct Fields(Map<String, Value>);

impl Fields {
    /// The body as a JSON object.
    pub(super) fn parse(body: &[u8]) -> Result<Self, ApiError> {
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
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    pub(super) fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a string"),
            )),
        }
    }

    pub(super) fn bool(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a boolean"),
            )),
        }
    }

    pub(super) fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        self.numeric(name, "a number", serde_json::Number::as_f64)
    }

    pub(super) fn integer(&mut self, name: &str) -> Result<Option<i64>, ApiError> {
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
    pub(super) fn only_default(
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
    pub(super) fn finish(self) -> Result<(), ApiError> {
        match self.0.into_iter().next() {
            Some((name, _)) => Err(ApiError::UnknownField(name)),
            None => Ok(()),
        }
    }
}

pub(super) fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

pub(super) fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}

pub(super) fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(Map::is_empty)
}
