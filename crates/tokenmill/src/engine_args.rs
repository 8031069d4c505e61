//! The engine's flags, shared by `serve` and `bench engine`, in two steps as
//! the command line is read: [`EngineArgs`] is what the user typed (clap
//! fills it), [`EngineSettings`] what it means once checked (the model file
//! found, the cache sized in blocks). Both commands take the same flags with
//! the same defaults, and a bad value is refused the same way by each.

use crate::device::{self, DeviceChoice, ForwardArgs};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use tokenmill_engine::{EngineConfig, SchedulerConfig};
use tokenmill_models::{catalog, LoadedModel};

/// Flags of the model and the engine.
#[derive(Args, Clone, Debug, Serialize)]
pub struct EngineArgs {
    /// A known model name (smollm2), installed by its script in models/, the
    /// path of a local .gguf file, or a Hugging Face model directory
    /// (config.json, *.safetensors, tokenizer.json) of a Llama, Qwen2 or
    /// Mistral model.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Run the architecture of this Hugging Face config.json with seeded
    /// random weights instead of --model's weights (for speed work where
    /// the real weights are not at hand); --model then only gives the
    /// tokenizer and chat template.
    #[arg(long)]
    pub random_weights: Option<PathBuf>,
    /// Where the model runs: auto (a GPU when built with CUDA and one is
    /// present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// The name clients use in `model` (default: the known name, or the
    /// file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Tokens the KV cache holds across all sequences.
    #[arg(long, default_value_t = 32768)]
    pub kv_cache_tokens: usize,
    /// Most tokens in one forward step.
    #[arg(long, default_value_t = 2048)]
    pub max_batched_tokens: usize,
    /// Most sequences in one forward step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub forward: ForwardArgs,
}

/// The engine's flags, checked and resolved.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// The model file or directory (with random weights: where the
    /// tokenizer and chat template come from).
    pub model_path: PathBuf,
    /// The name clients use in `model`.
    pub served_name: String,
    /// An architecture to run with seeded random weights, and the seed.
    pub random_weights: Option<(PathBuf, u64)>,
    /// Where the model runs.
    pub device: DeviceChoice,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Step limits.
    pub scheduler: SchedulerConfig,
    /// How the forward runs.
    pub forward: ForwardArgs,
}

impl EngineArgs {
    /// Checks the flags and finds the model. `weights_seed` seeds
    /// `--random-weights` (each command names its own flag for it: `bench`
    /// already has a `--seed`, its workload's).
    pub fn settings(&self, weights_seed: u64) -> anyhow::Result<EngineSettings> {
        if self.block_size == 0 || self.kv_cache_tokens < self.block_size {
            bail!("--kv-cache-tokens must hold at least one block of --block-size tokens");
        }
        if self.max_batched_tokens == 0 {
            bail!("--max-batched-tokens must be at least 1");
        }
        if self.max_num_seqs == 0 {
            bail!("--max-num-seqs must be at least 1");
        }
        let (model_path, default_name) = resolve_model(&self.model)?;
        Ok(EngineSettings {
            model_path,
            served_name: self.served_model_name.clone().unwrap_or(default_name),
            random_weights: self
                .random_weights
                .clone()
                .map(|config| (config, weights_seed)),
            device: self.device,
            block_size: self.block_size,
            num_blocks: self.kv_cache_tokens / self.block_size,
            scheduler: SchedulerConfig {
                max_batched_tokens: self.max_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            },
            forward: self.forward,
        })
    }
}

impl EngineSettings {
    /// Opens the device; returns it with its name for logs and capacity
    /// records.
    pub fn open_device(&self) -> anyhow::Result<(Device, String)> {
        device::open(self.device)
    }

    /// Loads the model (or, with random weights, its tokenizer and a random
    /// model of the configured architecture) onto `device`, drawing a
    /// progress bar unless `quiet`.
    pub fn load(&self, device: &Device, quiet: bool) -> anyhow::Result<LoadedModel> {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        };
        let progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        };
        let path = &self.model_path;
        let model = match &self.random_weights {
            Some((config, seed)) => {
                bar.set_message(format!("random weights for {}", config.display()));
                // bf16 is what a GPU serves; the CPU computes in f32 anyway.
                let dtype = if device.is_cpu() {
                    DType::F32
                } else {
                    DType::BF16
                };
                LoadedModel::with_random_weights(config, *seed, dtype, path, device, progress)
                    .with_context(|| format!("building random weights for {}", config.display()))?
            }
            None => {
                bar.set_message(path.display().to_string());
                LoadedModel::load(path, device, progress)
                    .with_context(|| format!("loading {}", path.display()))?
            }
        };
        bar.finish_and_clear();
        let mut model = model;
        model
            .model
            .set_forward_options(self.forward.options(device))
            .context("setting the forward options")?;
        Ok(model)
    }

    /// The engine's configuration on `device_name`, with the limits that
    /// only a server has (a benchmark passes no limit and a long interval).
    pub fn engine_config(
        &self,
        device_name: &str,
        max_in_flight: usize,
        capacity_interval: Duration,
    ) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            scheduler: self.scheduler.clone(),
            max_in_flight,
            capacity_interval,
            device: device_name.to_owned(),
        }
    }

    /// The sizes a benchmark result records.
    pub fn report(&self) -> tokenmill_bench::report::EngineSettings {
        tokenmill_bench::report::EngineSettings {
            block_size: self.block_size,
            kv_cache_tokens: self.block_size * self.num_blocks,
            max_batched_tokens: self.scheduler.max_batched_tokens,
            max_num_seqs: self.scheduler.max_num_seqs,
        }
    }
}

/// Where the model named by `--model` is, and its default served name: a
/// known model's install path and name, or a file's or directory's stem.
pub fn resolve_model(model: &str) -> anyhow::Result<(PathBuf, String)> {
    if let Some(known) = catalog::find(model) {
        let path = known.path();
        if !path.exists() {
            bail!(
                "model {} is not installed at {}: run {}",
                known.name,
                path.display(),
                known.fetch_script
            );
        }
        return Ok((path, known.name.to_owned()));
    }
    let path = PathBuf::from(model);
    if !path.is_file() && !tokenmill_models::hf::is_model_dir(&path) {
        bail!(
            "--model {model}: neither a known model ({}), a .gguf file nor a model directory with a config.json",
            catalog::KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((path, stem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn settings(args: &[&str]) -> anyhow::Result<EngineSettings> {
        let mut argv = vec!["test", "--model"];
        // A path that exists and is a file, so no model needs installing.
        argv.push(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.engine.settings(0)
    }

    #[test]
    fn flags_become_blocks_and_step_limits() {
        let s = settings(&["--block-size", "8", "--kv-cache-tokens", "100"]).unwrap();
        assert_eq!((s.block_size, s.num_blocks), (8, 12));
        assert_eq!(s.scheduler.max_batched_tokens, 2048);
        assert_eq!(s.served_name, "Cargo");
        let named = settings(&["--served-model-name", "m"]).unwrap();
        assert_eq!(named.served_name, "m");
    }

    #[test]
    fn impossible_sizes_and_unknown_models_are_refused() {
        for bad in [
            &["--block-size", "0"][..],
            &["--kv-cache-tokens", "8"],
            &["--max-batched-tokens", "0"],
            &["--max-num-seqs", "0"],
        ] {
            assert!(settings(bad).is_err(), "{bad:?}");
        }
        let err = resolve_model("no-such-model").unwrap_err().to_string();
        assert!(err.contains("neither a known model"), "{err}");
    }
}
