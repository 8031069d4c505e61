//! tokenmill's own GPU kernels and everything about them that a CPU can check.
//!
//! The CUDA sources live in the repository's `kernels/` directory; with the
//! `cuda` feature, build.rs compiles them with nvcc into fatbins (sm_90a
//! SASS plus PTX) that the `cuda` module embeds, loads through cudarc and
//! launches on candle's stream. Without the feature this crate is pure Rust:
//!
//! - [`reference`](mod@reference): a CPU implementation of every kernel, following the
//!   kernel's algorithm step for step (the same partitions, tiles, online
//!   softmax and f32 accumulation), and tested against plain formulations;
//!   the GPU check compares each kernel with it on fresh random inputs.
//! - [`paged`]: the per-step metadata the attention and cache kernels read
//!   (block tables, context lengths, slot mapping), built on the host.
//! - [`geometry`]: how each kernel is launched (grids, blocks, shared
//!   memory, flash-decoding partitions, prefill tiles), as plain functions.
//! - [`check`]: the suite that runs every kernel against its reference,
//!   on any backend that executes the kernels' code: the GPU, or the CPU
//!   emulator of `kernels/*.cu` (the tokenmill-kernels-emu crate) in CI.
#![deny(missing_docs)]

pub mod check;
pub mod element;
pub mod geometry;
pub mod paged;
pub mod reference;
pub mod testing;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use element::Element;

/// Why a kernel call was refused before launch.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Inputs whose sizes or contents do not fit the call.
    #[error("invalid kernel input: {0}")]
    Invalid(String),
    /// A shape the kernels do not implement (say, a head width over 256).
    #[error("unsupported by the kernels: {0}")]
    Unsupported(String),
    /// The CUDA driver or a launch failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A check backend that is not a GPU (the CPU emulator of the kernels,
    /// `tokenmill-kernels-emu`) could not run a launch: a kernel it does not
    /// have, an argument list that does not match the kernel's, or a misuse
    /// it caught while running it (a divergent barrier, a write past shared
    /// memory).
    #[error("{backend}: {source}")]
    Backend {
        /// The backend, in words (`kernel emulator`).
        backend: &'static str,
        /// The backend's own error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// This crate's results.
pub type Result<T> = std::result::Result<T, KernelError>;
