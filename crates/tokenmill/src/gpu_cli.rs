//! `tokenmill gpu`: checks that need a GPU, for scripts/gpu-check.sh.
//!
//! `gpu kernels` runs each of our CUDA kernels (kernels/) on fresh random
//! inputs of several shapes and types and compares it with its CPU
//! reference in tokenmill-kernels; it prints one line per check (or JSON)
//! and fails if any check does.

use crate::device::DeviceChoice;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `tokenmill gpu ...`
#[derive(Args, Debug)]
pub struct GpuArgs {
    #[command(subcommand)]
    command: GpuCommand,
}

#[derive(Subcommand, Debug)]
enum GpuCommand {
    /// Every kernel against its CPU reference on fresh random inputs.
    Kernels(KernelsArgs),
}

#[derive(Args, Debug)]
struct KernelsArgs {
    /// The GPU to check.
    #[arg(long, default_value = "cuda:0")]
    device: DeviceChoice,
    /// Seed of the random inputs (default: drawn, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the reports as a JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Runs `tokenmill gpu`.
pub fn run(args: GpuArgs) -> anyhow::Result<()> {
    match args.command {
        GpuCommand::Kernels(args) => kernels(args),
    }
}

#[cfg(not(feature = "cuda"))]
fn kernels(args: KernelsArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "tokenmill gpu kernels --device {}: this binary was built without CUDA (build with --features cuda)",
        args.device
    )
}

#[cfg(feature = "cuda")]
fn kernels(args: KernelsArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tokenmill_kernels::cuda::{check, Kernels};

    let (device, name) = crate::device::open(args.device)?;
    let candle_core::Device::Cuda(cuda) = &device else {
        anyhow::bail!("tokenmill gpu kernels needs a CUDA device, not {name}");
    };
    let seed = args.seed.unwrap_or_else(rand_seed);
    let kernels = Kernels::new(cuda);
    let started = std::time::Instant::now();
    let loaded = kernels.preload().context("loading the kernels")?;
    eprintln!(
        "{loaded} kernel modules loaded in {:.1} ms; inputs from seed {seed}",
        started.elapsed().as_secs_f64() * 1e3
    );
    // Every kernel against its reference (the sampler to the bit).
    let reports = check::check_all(&kernels, seed).context("running the kernel checks")?;
    let failed = reports.iter().filter(|r| !r.passed).count();
    for r in &reports {
        println!("{r}");
    }
    if let Some(path) = args.json {
        let body: Vec<String> = reports.iter().map(|r| r.to_json()).collect();
        std::fs::write(&path, format!("[{}]\n", body.join(",\n")))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{} checks, {failed} failed (seed {seed})", reports.len());
    if failed > 0 {
        anyhow::bail!("{failed} kernel checks failed");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}
