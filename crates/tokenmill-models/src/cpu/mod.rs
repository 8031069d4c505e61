//! The forward on the CPU: our int8 matmul ([`gemm`], through the linear
//! layers), paged attention and the rotary embedding ([`attention`]), the
//! element-wise glue ([`ops`]), the thread pool they share ([`pool`]), and
//! all of them as the forward's kernels (`kernels::CpuKernels`).

pub mod attention;
pub mod gemm;
pub(crate) mod kernels;
pub mod ops;
pub mod pool;
