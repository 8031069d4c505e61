//! Serving benchmarks for tokenmill and any other OpenAI-compatible server.
//!
//! A benchmark is a [`workload::Workload`] (which prompts, how many output
//! tokens, all fixed by a seed) sent to a [`run::Target`] (a server over HTTP,
//! [`client`], or the engine in-process, [`engine_target`]) under a
//! [`load::Load`] (a fixed number of clients, or Poisson arrivals). Every
//! request leaves one [`metrics::RequestRecord`] with its raw timings;
//! [`summary`] turns a level's records into percentiles, throughput and
//! goodput, [`report`] prints and saves them, [`plot`] draws them, and
//! [`sweep`] runs several load levels in turn.
//!
//! The measurements are the client's: a request's clock starts just before
//! its bytes are handed to the connection and every chunk is timed when it is
//! read, so the figures include what a user of the server would see (queueing,
//! HTTP, SSE framing), and comparing them with the engine's own run shows what
//! the server adds.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod engine_target;
pub mod load;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod run;
pub mod sse;
pub mod summary;
pub mod sweep;
pub mod workload;

/// What can stop a benchmark before it sends anything, or while it writes
/// its results. Failures of single requests are never this: they are counted
/// in the request's record.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag or option that cannot be used as given.
    #[error("{0}")]
    Config(String),
    /// The workload cannot be built (prompt file, tokenizer, lengths).
    #[error("workload: {0}")]
    Workload(String),
    /// The workload's tokenizer failed on a prompt's text (counting its
    /// tokens, or encoding it to check a length).
    #[error("workload: tokenizing a prompt: {source}")]
    Tokenize {
        /// The tokenizer's own error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The engine could not be started.
    #[error("engine: {0}")]
    Engine(String),
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The image file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A results file could not be read back.
    #[error("results {path}: {message}")]
    Results {
        /// The JSON file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl BenchError {
    /// A [`BenchError::Tokenize`] from a tokenizer's error.
    pub fn tokenize(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BenchError::Tokenize {
            source: source.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        BenchError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
