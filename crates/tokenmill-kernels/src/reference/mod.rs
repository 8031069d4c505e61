//! CPU references of the kernels. Each follows its kernel's algorithm (the
//! same partitions, tiles and f32 accumulation) so that a kernel and its
//! reference differ only by the order of f32 sums and the device's rounding;
//! each is itself tested here against a plain formulation of the maths.

pub mod activation;
pub mod attention;
pub mod cache;
pub mod norm;
pub mod rotary;
pub mod sampling;
