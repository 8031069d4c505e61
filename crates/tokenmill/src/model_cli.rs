//! `tokenmill model`: the model as another implementation sees it, for
//! checks against one (PyTorch, transformers, llama.cpp):
//!
//! - `random-weights` writes an architecture's seeded random weights as a
//!   Hugging Face directory, so the same model can be loaded elsewhere;
//! - `logits` prints the logits tokenmill computes for a token sequence.

use crate::device::{self, DeviceChoice, ForwardArgs};
use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenmill_models::hf::{self, SafetensorsWeights};
use tokenmill_models::random_weights::RandomWeights;
use tokenmill_models::{DenseWeights, ForwardBatch, Llama, LoadedModel, LogitRows};

/// `tokenmill model ...`
#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Write the seeded random weights of a config.json's architecture as a
    /// Hugging Face directory (config.json + model.safetensors).
    RandomWeights {
        /// A Hugging Face config.json (Llama, Qwen2 or Mistral).
        #[arg(long)]
        config: PathBuf,
        /// The seed (the same as `serve --random-weights --seed`).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stored type: bf16, f16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// The directory to write (created; files in it are replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print, as JSON, the logits of a token sequence fed in one forward.
    Logits {
        /// A .gguf file or a Hugging Face model directory.
        #[arg(long, conflicts_with = "random_weights")]
        model: Option<PathBuf>,
        /// Instead of --model: this config.json's architecture with random
        /// weights of --seed.
        #[arg(long)]
        random_weights: Option<PathBuf>,
        /// Seed of --random-weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Every position's row, or only the last one's.
        #[arg(long)]
        last_only: bool,
        /// Prefill the tokens before this index in one forward, then feed
        /// the rest one per forward (the decode path; default: one prefill).
        #[arg(long)]
        decode_from: Option<usize>,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        #[command(flatten)]
        forward: ForwardArgs,
    },
}

/// Runs a `model` subcommand.
pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::RandomWeights {
            config,
            seed,
            dtype,
            out,
        } => write_random_weights(&config, seed, parse_dtype(&dtype)?, &out),
        ModelCommand::Logits {
            model,
            random_weights,
            seed,
            tokens,
            last_only,
            decode_from,
            device,
            forward,
        } => print_logits(
            model.as_deref(),
            random_weights.as_deref(),
            seed,
            &tokens,
            last_only,
            decode_from,
            (device, forward),
        ),
    }
}

fn parse_dtype(name: &str) -> anyhow::Result<DType> {
    Ok(match name {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => bail!("--dtype {other:?}: expected bf16, f16 or f32"),
    })
}

fn write_random_weights(config: &Path, seed: u64, dtype: DType, out: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg = hf::config_from_json(&text)?;
    let mut weights = RandomWeights::new(&cfg, seed, dtype);
    let names: Vec<String> = weights.names().map(str::to_owned).collect();
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(names.len());
    for name in names {
        let tensor = weights.tensor(&name)?;
        tensors.insert(name, tensor);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("config.json"), &text)
        .with_context(|| format!("writing {}", out.join("config.json").display()))?;
    let file = out.join("model.safetensors");
    // transformers refuses a checkpoint without the "format" metadata.
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(&tensors, Some(metadata), &file)
        .with_context(|| format!("writing {}", file.display()))?;
    println!(
        "{}: {} tensors of {} ({:?}, seed {seed})",
        out.display(),
        tensors.len(),
        cfg.architecture,
        dtype
    );
    Ok(())
}

fn print_logits(
    model: Option<&Path>,
    random_weights: Option<&Path>,
    seed: u64,
    tokens: &[u32],
    last_only: bool,
    decode_from: Option<usize>,
    (choice, forward): (DeviceChoice, ForwardArgs),
) -> anyhow::Result<()> {
    let (device, device_name) = device::open(choice)?;
    let mut network = match (model, random_weights) {
        (_, Some(config)) => {
            let text = std::fs::read_to_string(config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg = hf::config_from_json(&text)?;
            let dtype = if device.is_cpu() {
                DType::F32
            } else {
                DType::BF16
            };
            let mut weights = RandomWeights::new(&cfg, seed, dtype);
            Llama::from_dense(cfg, &mut weights, &device, |_, _| {})?
        }
        (Some(dir), None) if hf::is_model_dir(dir) => {
            let mut weights = SafetensorsWeights::open(&hf::safetensors_files(dir)?)?;
            Llama::from_dense(hf::read_config(dir)?, &mut weights, &device, |_, _| {})?
        }
        (Some(file), None) => LoadedModel::from_gguf_file(file, &device, |_, _| {})?.model,
        (None, None) => bail!("give --model or --random-weights"),
    };
    network.set_forward_options(forward.options(&device))?;
    let context = network.config().context_length;
    if tokens.len() > context {
        bail!(
            "{} tokens exceed the model's context of {context}",
            tokens.len()
        );
    }
    if let Some(bad) = tokens
        .iter()
        .find(|t| **t as usize >= network.config().vocab_size)
    {
        bail!(
            "token {bad} is outside the vocabulary of {}",
            network.config().vocab_size
        );
    }
    let prefill_len = decode_from.unwrap_or(tokens.len());
    if prefill_len == 0 || prefill_len > tokens.len() {
        bail!("--decode-from {prefill_len}: give 1 to {}", tokens.len());
    }
    const BLOCK_SIZE: usize = 16;
    let blocks = tokens.len().div_ceil(BLOCK_SIZE);
    let cache = network.new_kv_cache(BLOCK_SIZE, blocks)?;
    // Blocks in reverse order: the paged attention must follow the table.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let rows = if last_only {
        LogitRows::Last
    } else {
        LogitRows::All
    };
    let run = |chunk: &[u32], context: usize, rows: LogitRows| -> anyhow::Result<Vec<Vec<f32>>> {
        let mut batch = ForwardBatch::default();
        batch.push(chunk, context, table.clone(), rows);
        Ok(network
            .forward(&batch, &cache)?
            .to_dtype(DType::F32)?
            .to_vec2()?)
    };
    let mut logits = run(&tokens[..prefill_len], prefill_len, rows)?;
    for position in prefill_len..tokens.len() {
        let row = run(&tokens[position..=position], position + 1, LogitRows::Last)?;
        if last_only {
            logits = row;
        } else {
            logits.extend(row);
        }
    }
    let out = serde_json::json!({
        "device": device_name,
        "tokens": tokens,
        "positions": if last_only { "last" } else { "all" },
        "logits": logits,
    });
    println!("{out}");
    Ok(())
}
