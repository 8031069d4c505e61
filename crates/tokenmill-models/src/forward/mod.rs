//! One architecture, one forward: the Llama-family network ([`Llama`]), its
//! input ([`batch`]), its paged KV cache ([`kv_cache`]) and the seam its
//! layer code runs over (`step_kernels`), whose implementation a model
//! chooses once, when it is built, from its device and [`ForwardOptions`].
//!
//! [`Llama`]: llama::Llama

pub mod batch;
pub(crate) mod candle_ops;
pub mod kv_cache;
pub(crate) mod linear;
pub mod llama;
pub(crate) mod step_kernels;

#[cfg(test)]
mod tests;

/// Which code runs a model's forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardPath {
    /// tokenmill's own kernels: its CPU ops on the CPU, its CUDA kernels on
    /// a GPU (candle's ops on a device it has none for). What a server runs.
    #[default]
    Kernels,
    /// candle's ops alone, on any device: a second opinion on our kernels
    /// for comparisons (slower; no CUDA graphs).
    CandleOps,
}

/// How a model runs its forward, given by the binary (the library reads no
/// environment). Set with [`llama::Llama::set_forward_options`] before the
/// first step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Which code runs the forward.
    pub path: ForwardPath,
    /// Whether decode steps on a GPU replay CUDA graphs (with our kernels
    /// only; without the `cuda` feature it changes nothing).
    pub cuda_graphs: bool,
}

impl Default for ForwardOptions {
    /// Our kernels, with CUDA graphs.
    fn default() -> Self {
        ForwardOptions {
            path: ForwardPath::Kernels,
            cuda_graphs: true,
        }
    }
}
