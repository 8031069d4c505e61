//! What can stop the engine from starting.
//!
//! Once started, the engine does not fail as a whole: a failed step ends the
//! requests in it (each told why through the protocol's `RequestFailure`),
//! and `submit` answers with the protocol's `SubmitError`.

use tokenmill_models::ModelError;

/// Why [`crate::Engine::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot run anything.
    #[error("invalid engine configuration: {0}")]
    Config(&'static str),
    /// The model could not allocate its paged KV cache.
    #[error("cannot allocate the KV cache ({num_blocks} blocks of {block_size} tokens): {source}")]
    KvCache {
        /// Tokens per block asked for.
        block_size: usize,
        /// Blocks asked for.
        num_blocks: usize,
        /// The model's error.
        #[source]
        source: ModelError,
    },
    /// The warm-up forward (which loads the kernels before the first
    /// request) failed: the model cannot run on this device.
    #[error("the warm-up forward failed: {0}")]
    WarmUp(#[source] ModelError),
    /// The operating system would not start the step loop's thread.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[source] std::io::Error),
}
