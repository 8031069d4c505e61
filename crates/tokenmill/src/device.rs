//! `--device`: which device the model runs on.
//!
//! `auto` (the default) is the first GPU when this binary was built with the
//! `cuda` feature and one is present, else the CPU; the server says which at
//! start. Naming `cuda` on a build or machine without one is an error, never a
//! silent fall back to the CPU: a benchmark must not measure the wrong device.

use anyhow::{bail, Context};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;
use tokenmill_models::{ForwardOptions, ForwardPath};

/// The `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A GPU when there is one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device: auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether this binary was built with CUDA support.
pub fn built_with_cuda() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Opens the chosen device; returns it with its name for logs and capacity
/// records (`cpu`, `cuda:0`).
pub fn open(choice: DeviceChoice) -> anyhow::Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "cpu".to_owned())),
        DeviceChoice::Cuda(n) => {
            if !built_with_cuda() {
                bail!("--device {choice}: this binary was built without CUDA (build with --features cuda)");
            }
            let device =
                Device::new_cuda(n).with_context(|| format!("opening --device {choice}"))?;
            Ok((device, format!("cuda:{n}")))
        }
        DeviceChoice::Auto => {
            if built_with_cuda() {
                match Device::new_cuda(0) {
                    Ok(device) => return Ok((device, "cuda:0".to_owned())),
                    Err(e) => tracing::info!(error = %e, "no usable GPU; running on the CPU"),
                }
            }
            Ok((Device::Cpu, "cpu".to_owned()))
        }
    }
}

/// How the forward runs: `--gpu-kernels` and `--cuda-graphs`, shared by
/// `serve`, `bench engine` and `model logits` (and set by
/// `TOKENMILL_GPU_KERNELS` / `TOKENMILL_CUDA_GRAPHS`, which the GPU check
/// script uses for its side-by-side runs).
#[derive(clap::Args, Clone, Copy, Debug, serde::Serialize)]
pub struct ForwardArgs {
    /// On a GPU, run the forward through our CUDA kernels (true) or through
    /// candle's ops (false, a second opinion for comparisons, without
    /// graphs). The CPU always runs its own kernels.
    #[arg(long, env = "TOKENMILL_GPU_KERNELS", default_value_t = true,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub gpu_kernels: bool,
    /// On a GPU with our kernels, replay decode steps as CUDA graphs.
    #[arg(long, env = "TOKENMILL_CUDA_GRAPHS", default_value_t = true,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub cuda_graphs: bool,
}

impl ForwardArgs {
    /// The model's forward options on `device`.
    pub fn options(&self, device: &Device) -> ForwardOptions {
        let path = if device.is_cpu() || self.gpu_kernels {
            ForwardPath::Kernels
        } else {
            ForwardPath::CandleOps
        };
        ForwardOptions {
            path,
            cuda_graphs: self.cuda_graphs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_is_the_cpu_without_cuda_and_cuda_is_refused() {
        if built_with_cuda() {
            return; // this test is about the CPU-only build CI runs
        }
        assert_eq!(open(DeviceChoice::Auto).unwrap().1, "cpu");
        let err = open(DeviceChoice::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("without CUDA"), "{err}");
    }
}
