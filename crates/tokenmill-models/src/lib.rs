//! Llama-family models for tokenmill over candle.
//!
//! A [`LoadedModel`] is everything the engine needs from one model (a GGUF
//! file, a Hugging Face directory, or an architecture with random weights):
//! the network ([`Llama`]), its tokenizer ([`ModelTokenizer`]) and chat
//! template ([`ChatTemplate`]). The network's forward takes a flat
//! [`ForwardBatch`] of tokens from many sequences and keeps keys and values
//! in a [`PagedKvCache`] addressed by block tables; models know nothing of
//! tenants or requests.
//!
//! The crate is in folders by concern:
//! - [`load`]: weights, configurations and the catalog, into a [`Llama`];
//! - [`forward`]: the one architecture and its one forward. The layer code
//!   is written once, over a seam of kernels (norms, the rotary embedding,
//!   cache writes, paged attention, SiLU-and-multiply); a model picks its
//!   kernels once, when it is built, from its device and the
//!   [`ForwardOptions`] its caller gives: our CPU ops ([`cpu`]) on the CPU,
//!   our CUDA kernels (`cuda`, with the `cuda` feature) on a GPU, or, as
//!   a second opinion for comparisons, a forward through candle's ops alone;
//! - [`cpu`] and `cuda`: those kernels, per device; the CUDA graphs that
//!   replay decode steps capture a closure and know nothing of the model;
//! - [`text`]: tokenizers and chat templates.
//!
//! How the model runs is never read from the environment: the binary
//! decides the forward's options. The one variable the crate reads is where
//! the fetch scripts install known models (`TOKENMILL_CACHE`, in
//! [`load::catalog::cache_dir`]), a location the scripts and every tool
//! share.
#![deny(missing_docs)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod forward;
pub mod load;
pub mod text;

pub use error::{ModelError, Result};
pub use forward::batch::{ForwardBatch, LogitRows, SequenceChunk};
pub use forward::kv_cache::PagedKvCache;
pub use forward::llama::{argmax, Llama};
pub use forward::{ForwardOptions, ForwardPath};
pub use load::config::LlamaConfig;
pub use load::dense::DenseWeights;
pub use load::LoadedModel;
// The loaders' modules under their former crate-root names.
pub use load::{catalog, hf, random_weights};
pub use text::chat_template::{ChatTemplate, TemplateMessage};
pub use text::tokenizer::ModelTokenizer;
pub use tokenmill_kernels::reference::sampling::{SampledRow, SamplingParamsRow};
