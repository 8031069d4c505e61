//! Llama-family models for tokenmill over candle.
//!
//! A [`LoadedModel`] is everything the engine needs from one model file: the
//! network ([`Llama`]), its tokenizer ([`ModelTokenizer`]) and chat template
//! ([`ChatTemplate`]). The network's forward takes a flat [`ForwardBatch`] of
//! tokens from many sequences and keeps keys and values in a
//! [`PagedKvCache`] addressed by block tables; models know nothing of tenants
//! or requests.
#![deny(missing_docs)]

pub mod batch;
pub mod catalog;
pub mod chat_template;
pub mod config;
pub mod cpu_attention;
pub mod cpu_gemm;
pub mod cpu_ops;
pub mod cpu_pool;
pub mod error;
pub mod kv_cache;
pub mod llama;
pub mod tokenizer;

pub use batch::{ForwardBatch, LogitRows, SequenceChunk};
pub use chat_template::{ChatTemplate, TemplateMessage};
pub use config::LlamaConfig;
pub use error::{ModelError, Result};
pub use kv_cache::PagedKvCache;
pub use llama::Llama;
pub use tokenizer::ModelTokenizer;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use config::Metadata;
use std::path::Path;

/// A model file loaded: network, tokenizer and chat template.
pub struct LoadedModel {
    /// The network.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: ModelTokenizer,
    /// Its chat template.
    pub chat_template: ChatTemplate,
}

impl LoadedModel {
    /// Loads a `.gguf` file. `on_layer(done, total)` reports progress.
    pub fn from_gguf_file(
        path: &Path,
        device: &Device,
        on_layer: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let io_error = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let mut reader = std::io::BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| {
            ModelError::Metadata(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        let tokenizer = ModelTokenizer::from_gguf(&content)?;
        let template_source = Metadata(&content).string("tokenizer.chat_template").ok();
        let chat_template =
            ChatTemplate::new(template_source, tokenizer.bos_text(), tokenizer.eos_text())?;
        let model = Llama::from_gguf(&content, &mut reader, device, on_layer)?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(ModelError::Metadata(format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        Ok(LoadedModel {
            model,
            tokenizer,
            chat_template,
        })
    }
}
