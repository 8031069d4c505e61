//! The models layer's error type.

use thiserror::Error;

/// Why loading or running a model failed.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The model file could not be opened or read.
    #[error("cannot read model file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The GGUF metadata lacks a key or holds a value of the wrong kind.
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    /// The model uses something this build does not support.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A forward batch that does not fit the model or its KV cache.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
