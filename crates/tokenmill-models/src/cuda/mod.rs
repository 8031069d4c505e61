//! The forward on a CUDA device: our kernels as the forward's
//! [`StepKernels`](crate::forward::step_kernels) ([`ops`]) and decode steps
//! replayed as CUDA graphs ([`graphs`]).

pub(crate) mod graphs;
pub mod ops;
