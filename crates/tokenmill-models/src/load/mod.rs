//! Loading a model: its weights from a GGUF file (`gguf`), a Hugging Face
//! directory ([`hf`], through [`dense`]) or a seeded random draw
//! ([`random_weights`]); its configuration ([`config`]); the catalog of
//! known local models ([`catalog`]); and [`LoadedModel`], the network with
//! its tokenizer and chat template.

pub mod catalog;
pub mod config;
pub mod dense;
pub(crate) mod gguf;
pub mod hf;
pub mod random_weights;

use crate::error::{ModelError, Result};
use crate::forward::llama::Llama;
use crate::text::chat_template::ChatTemplate;
use crate::text::tokenizer::ModelTokenizer;
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
    /// Loads a model from `path`: a Hugging Face model directory
    /// (`config.json`, `*.safetensors`, `tokenizer.json`) or a `.gguf` file.
    pub fn load(path: &Path, device: &Device, on_layer: impl FnMut(usize, usize)) -> Result<Self> {
        if hf::is_model_dir(path) {
            Self::from_hf_dir(path, device, on_layer)
        } else {
            Self::from_gguf_file(path, device, on_layer)
        }
    }

    /// Loads a Hugging Face model directory. The weights keep their stored
    /// type on a GPU (bf16 or f16) and become f32 on the CPU.
    pub fn from_hf_dir(
        dir: &Path,
        device: &Device,
        on_layer: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = hf::read_config(dir)?;
        let (tokenizer, chat_template) = Self::read_tokenizer(dir)?;
        let mut weights = hf::SafetensorsWeights::open(&hf::safetensors_files(dir)?)?;
        let model = Llama::from_dense(cfg, &mut weights, device, on_layer)?;
        Self::assemble(model, tokenizer, chat_template)
    }

    /// A model of the architecture in `config` (a Hugging Face `config.json`)
    /// with seeded random weights ([`random_weights`]) stored as `dtype`,
    /// speaking through the tokenizer and chat template of the model at
    /// `tokenizer_from` (a directory or a `.gguf` file), whose vocabulary
    /// must fit the configuration's.
    pub fn with_random_weights(
        config: &Path,
        seed: u64,
        dtype: candle_core::DType,
        tokenizer_from: &Path,
        device: &Device,
        on_layer: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let text = std::fs::read_to_string(config).map_err(|source| ModelError::Io {
            path: config.display().to_string(),
            source,
        })?;
        let cfg = hf::config_from_json(&text)?;
        let (tokenizer, chat_template) = Self::read_tokenizer(tokenizer_from)?;
        let mut weights = random_weights::RandomWeights::new(&cfg, seed, dtype);
        let model = Llama::from_dense(cfg, &mut weights, device, on_layer)?;
        Self::assemble(model, tokenizer, chat_template)
    }

    /// The tokenizer and chat template of a model directory or `.gguf` file,
    /// without its weights.
    pub fn read_tokenizer(path: &Path) -> Result<(ModelTokenizer, ChatTemplate)> {
        if hf::is_model_dir(path) {
            let tokenizer = ModelTokenizer::from_hf_dir(path)?;
            let source = hf::TokenizerConfig::read(path)?.chat_template;
            let template = ChatTemplate::new(
                source.as_deref(),
                tokenizer.bos_text(),
                tokenizer.eos_text(),
            )?;
            return Ok((tokenizer, template));
        }
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut std::io::BufReader::new(file))
            .map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
        let tokenizer = ModelTokenizer::from_gguf(&content)?;
        let source = Metadata(&content).string("tokenizer.chat_template").ok();
        let template = ChatTemplate::new(source, tokenizer.bos_text(), tokenizer.eos_text())?;
        Ok((tokenizer, template))
    }

    /// Checks that the tokenizer's ids fit the network's vocabulary.
    fn assemble(
        model: Llama,
        tokenizer: ModelTokenizer,
        chat_template: ChatTemplate,
    ) -> Result<Self> {
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
        Self::assemble(model, tokenizer, chat_template)
    }
}
