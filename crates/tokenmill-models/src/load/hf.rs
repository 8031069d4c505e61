//! Models in the Hugging Face layout: a directory holding `config.json`, the
//! weights as `*.safetensors` (one file or shards), `tokenizer.json` and
//! `tokenizer_config.json` (special tokens and the chat template).
//!
//! Llama 2/3, Qwen2/2.5 and Mistral share one tensor naming and one rotary
//! layout (pairs `(i, i + d/2)`, "neox"), so one loader serves them all.

use crate::error::{ModelError, Result};
use crate::load::config::{Llama3RopeScaling, LlamaConfig};
use crate::load::dense::DenseWeights;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The architectures (`model_type`) this loader runs.
const SUPPORTED: &[&str] = &["llama", "qwen2", "mistral"];

/// The fields of `config.json` that shape a Llama-family decoder.
#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    vocab_size: usize,
    /// Absent means untied for all three architectures (their config
    /// classes default it to false and `save_pretrained` omits defaults).
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    /// Mistral: attention only over the last `sliding_window` positions.
    sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies at all.
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

/// Parses a `config.json`.
pub fn config_from_json(text: &str) -> Result<LlamaConfig> {
    let hf: HfConfig = serde_json::from_str(text)
        .map_err(|e| ModelError::Metadata(format!("config.json: {e}")))?;
    if !SUPPORTED.contains(&hf.model_type.as_str()) {
        return Err(ModelError::Unsupported(format!(
            "model_type {:?} (supported: {SUPPORTED:?})",
            hf.model_type
        )));
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(ModelError::Unsupported(format!("hidden_act {act:?}")));
    }
    let num_heads = hf.num_attention_heads;
    let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(ModelError::Metadata(format!(
            "{num_heads} query heads cannot be grouped over {num_kv_heads} kv heads"
        )));
    }
    let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / num_heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(ModelError::Metadata(format!(
            "head_dim {head_dim} must be even"
        )));
    }
    // Sliding-window attention equals full attention while the context fits
    // in the window; we do not implement the window, so the context stops
    // there instead of silently attending further than the model would.
    let window = match hf.model_type.as_str() {
        "qwen2" if hf.use_sliding_window != Some(true) => None,
        _ => hf.sliding_window,
    };
    let context_length = window.map_or(hf.max_position_embeddings, |w| {
        w.min(hf.max_position_embeddings)
    });
    Ok(LlamaConfig {
        num_layers: hf.num_hidden_layers,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: hf.rope_theta as f32,
        rope_neox: true,
        rope_scaling: rope_scaling(hf.rope_scaling.as_ref())?,
        rms_norm_eps: hf.rms_norm_eps,
        context_length,
        vocab_size: hf.vocab_size,
        tied_embeddings: hf.tie_word_embeddings,
        architecture: hf.model_type,
    })
}

/// `rope_scaling` of `config.json`: none, or Llama 3.1's.
fn rope_scaling(value: Option<&serde_json::Value>) -> Result<Option<Llama3RopeScaling>> {
    let Some(obj) = value.and_then(|v| v.as_object()) else {
        return Ok(None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let num = |key: &str| {
                obj.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                    ModelError::Metadata(format!("rope_scaling: missing number {key:?}"))
                })
            };
            let scaling = Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_context: num("original_max_position_embeddings")?,
            };
            if scaling.factor <= 0.0 || scaling.high_freq_factor <= scaling.low_freq_factor {
                return Err(ModelError::Metadata(format!(
                    "rope_scaling: invalid llama3 parameters {scaling:?}"
                )));
            }
            Ok(Some(scaling))
        }
        other => Err(ModelError::Unsupported(format!(
            "rope_scaling type {other:?} (supported: llama3)"
        ))),
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    config_from_json(&read_text(&dir.join("config.json"))?)
}

/// Whether `path` looks like a Hugging Face model directory.
pub fn is_model_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// The `*.safetensors` files of a model directory, in name order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Metadata(format!(
            "{} has no .safetensors files",
            dir.display()
        )));
    }
    Ok(files)
}

/// The tensors of one or more safetensors files, mapped into memory and
/// copied to the device one at a time as the model asks for them.
pub struct SafetensorsWeights {
    files: MmapedSafetensors,
}

impl SafetensorsWeights {
    /// Maps the files.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        // SAFETY: the mapping is read while the model loads; it is sound as
        // long as no process changes or truncates the files meanwhile, the
        // same contract as every memory-mapped model loader. Each tensor is
        // copied out (to its device) before loading ends, so nothing keeps
        // pointing into the mapping afterwards.
        let files = unsafe { MmapedSafetensors::multi(files)? };
        Ok(SafetensorsWeights { files })
    }
}

impl DenseWeights for SafetensorsWeights {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(ModelError::Metadata(format!("missing tensor {name}")));
        }
        Ok(self.files.load(name, &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }
}

/// What `tokenizer_config.json` says about special tokens and chat.
#[derive(Default)]
pub struct TokenizerConfig {
    /// The BOS token's text.
    pub bos_token: Option<String>,
    /// The EOS token's text.
    pub eos_token: Option<String>,
    /// Whether a BOS token starts every prompt.
    pub add_bos_token: Option<bool>,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`; a missing file is an empty config.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(TokenizerConfig::default());
        }
        let value: serde_json::Value = serde_json::from_str(&read_text(&path)?)
            .map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
        // A special token is a string or an object with its `content`.
        let token = |key: &str| match value.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj.get("content")?.as_str().map(str::to_owned),
            None => None,
        };
        // The template is a string, or a list of named templates of which
        // "default" is the one for plain chat.
        let chat_template = match value.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: value.get("add_bos_token").and_then(|v| v.as_bool()),
            chat_template,
        })
    }
}

/// End-of-sequence token ids listed in `dir/generation_config.json`
/// (Llama 3 ends turns with a second id besides its EOS).
pub fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(&read_text(&path)?)
        .map_err(|e| ModelError::Metadata(format!("{}: {e}", path.display())))?;
    let ids = match value.get("eos_token_id") {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => Vec::new(),
    };
    Ok(ids
        .into_iter()
        .filter_map(|id: u64| u32::try_from(id).ok())
        .collect())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_8B: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "vocab_size": 128256,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": false
    }"#;

    #[test]
    fn reads_llama3_8b() {
        let cfg = config_from_json(LLAMA3_8B).unwrap();
        assert_eq!(cfg.architecture, "llama");
        assert_eq!((cfg.num_layers, cfg.hidden_size), (32, 4096));
        assert_eq!(
            (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            (32, 8, 128)
        );
        assert_eq!(cfg.context_length, 8192);
        assert!(cfg.rope_neox && !cfg.tied_embeddings && cfg.rope_scaling.is_none());
        assert_eq!(cfg.rope_theta, 500_000.0);
    }

    #[test]
    fn mistral_context_stops_at_its_sliding_window() {
        let text = LLAMA3_8B
            .replace("\"llama\"", "\"mistral\"")
            .replace("\"vocab_size\"", "\"sliding_window\": 4096, \"vocab_size\"");
        assert_eq!(config_from_json(&text).unwrap().context_length, 4096);
        // Qwen2 ignores the window unless it is switched on.
        let text = text.replace("\"mistral\"", "\"qwen2\"");
        assert_eq!(config_from_json(&text).unwrap().context_length, 8192);
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_others_refused() {
        let scaled = LLAMA3_8B.replace(
            "\"vocab_size\"",
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "vocab_size""#,
        );
        let s = config_from_json(&scaled).unwrap().rope_scaling.unwrap();
        assert_eq!(s.factor, 8.0);
        // Fast pairs keep their frequency, slow ones are divided by the factor.
        assert_eq!(s.scale(1.0), 1.0);
        let slow = 2.0 * std::f64::consts::PI / 100_000.0;
        assert!((s.scale(slow) - slow / 8.0).abs() < 1e-15);
        let yarn = LLAMA3_8B.replace(
            "\"vocab_size\"",
            r#""rope_scaling": {"type": "yarn", "factor": 4.0}, "vocab_size""#,
        );
        assert!(matches!(
            config_from_json(&yarn),
            Err(ModelError::Unsupported(m)) if m.contains("yarn")
        ));
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let gemma = LLAMA3_8B.replace("\"llama\"", "\"gemma\"");
        assert!(
            matches!(config_from_json(&gemma), Err(ModelError::Unsupported(m)) if m.contains("gemma"))
        );
        let heads = LLAMA3_8B.replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5");
        assert!(matches!(
            config_from_json(&heads),
            Err(ModelError::Metadata(_))
        ));
        let gelu = LLAMA3_8B.replace("\"silu\"", "\"gelu\"");
        assert!(matches!(
            config_from_json(&gelu),
            Err(ModelError::Unsupported(_))
        ));
        assert!(config_from_json("{}").is_err());
    }
}
