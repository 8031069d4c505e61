//! The architecture hyper-parameters of a Llama-family model, read from GGUF
//! metadata (here) or from a Hugging Face `config.json` ([`crate::load::hf`]).

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};

/// Hyper-parameters of a Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` ("llama", "qwen2", ...).
    pub architecture: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than query heads under grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f32,
    /// Whether rotary pairs are (i, i + d/2) ("neox") rather than (2i, 2i+1).
    pub rope_neox: bool,
    /// Llama 3.1's rescaling of the rotary frequencies for long contexts, if
    /// the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Most positions the model was trained for.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the output projection reuses the token embedding matrix.
    pub tied_embeddings: bool,
}

/// Llama 3.1's rotary frequency rescaling ("rope_type": "llama3"): slow
/// frequencies (wavelengths longer than the original context over
/// `low_freq_factor`) are divided by `factor`, fast ones (shorter than the
/// original context over `high_freq_factor`) are kept, and those in between
/// are interpolated between the two.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// How much longer a context the model is stretched to.
    pub factor: f64,
    /// Wavelengths above `original_context / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_context / high_freq_factor` are not scaled.
    pub high_freq_factor: f64,
    /// The context the model was first trained for.
    pub original_context: f64,
}

impl Llama3RopeScaling {
    /// The rescaled frequency (radians per position) of one rotary pair.
    pub fn scale(&self, freq: f64) -> f64 {
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let low_freq_wavelen = self.original_context / self.low_freq_factor;
        let high_freq_wavelen = self.original_context / self.high_freq_factor;
        if wavelen < high_freq_wavelen {
            freq
        } else if wavelen > low_freq_wavelen {
            freq / self.factor
        } else {
            let smooth = (self.original_context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * freq / self.factor + smooth * freq
        }
    }
}

/// Typed access to GGUF metadata with errors that name the missing key.
pub(crate) struct Metadata<'a>(pub &'a Content);

impl<'a> Metadata<'a> {
    pub fn get(&self, key: &str) -> Result<&'a Value> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Metadata(format!("missing key {key}")))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(ModelError::Metadata(format!(
                    "{key}: expected an unsigned integer, found {other:?}"
                )))
            }
        };
        usize::try_from(n).map_err(|_| ModelError::Metadata(format!("{key}: {n} too large")))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            other => Err(ModelError::Metadata(format!(
                "{key}: expected a float, found {other:?}"
            ))),
        }
    }

    pub fn string(&self, key: &str) -> Result<&'a str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(ModelError::Metadata(format!(
                "{key}: expected a string, found {other:?}"
            ))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.metadata.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(ModelError::Metadata(format!(
                "{key}: expected a bool, found {other:?}"
            ))),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(ModelError::Metadata(format!(
                        "{key}: expected strings, found {other:?}"
                    ))),
                })
                .collect(),
            other => Err(ModelError::Metadata(format!(
                "{key}: expected an array, found {other:?}"
            ))),
        }
    }

    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    other => Err(ModelError::Metadata(format!(
                        "{key}: expected integers, found {other:?}"
                    ))),
                })
                .collect(),
            other => Err(ModelError::Metadata(format!(
                "{key}: expected an array, found {other:?}"
            ))),
        }
    }
}

/// Architectures whose GGUF tensors follow llama.cpp's "llama" naming and that
/// this crate runs.
const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral"];

/// Architectures whose rotary pairs are split in halves (llama.cpp's NEOX
/// rope type); llama.cpp permutes Llama's q/k weights at conversion so Llama
/// itself uses interleaved pairs.
const NEOX_ROPE: &[&str] = &["qwen2"];

impl LlamaConfig {
    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = Metadata(content);
        let arch = md.string("general.architecture")?.to_owned();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture {arch:?} (supported: {SUPPORTED:?})"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = md.usize(&key("embedding_length"))?;
        let num_heads = md.usize(&key("attention.head_count"))?;
        let num_kv_heads = md
            .usize(&key("attention.head_count_kv"))
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ModelError::Metadata(format!(
                "{num_heads} query heads cannot be grouped over {num_kv_heads} kv heads"
            )));
        }
        let head_dim = md
            .usize(&key("attention.key_length"))
            .unwrap_or(hidden_size / num_heads);
        let rope_dim = md.usize(&key("rope.dimension_count")).unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embedding ({rope_dim} of {head_dim} dims)"
            )));
        }
        let vocab_size = match md.usize(&key("vocab_size")) {
            Ok(v) => v,
            Err(_) => md.strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(LlamaConfig {
            num_layers: md.usize(&key("block_count"))?,
            hidden_size,
            intermediate_size: md.usize(&key("feed_forward_length"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: md.f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_neox: NEOX_ROPE.contains(&arch.as_str()),
            rope_scaling: None,
            rms_norm_eps: md.f32(&key("attention.layer_norm_rms_epsilon"))? as f64,
            context_length: md.usize(&key("context_length"))?,
            vocab_size,
            tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
            architecture: arch,
        })
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of the key (or value) vectors of one token in one layer.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
