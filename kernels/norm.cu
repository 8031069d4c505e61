// RMSNorm, alone and fused with the residual add before it. One block per
// row; reference: crates/tokenmill-kernels/src/reference/norm.rs.
#include "common.cuh"

namespace {

template <typename T>
__device__ void normalise(const T* row, const T* weight, T* out, int width, float eps,
                          float sum_squares) {
  __shared__ float scratch[32];
  const float mean_square = tmk::block_sum(sum_squares, scratch) / width;
  const float scale = 1.0f / sqrtf(mean_square + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x)
    out[i] = tmk::from_float<T>(tmk::to_float(row[i]) * scale * tmk::to_float(weight[i]));
}

template <typename T>
__device__ void rms_norm(const T* x, const T* weight, T* out, int width, float eps) {
  const size_t at = (size_t)blockIdx.x * width;
  float sum_squares = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float v = tmk::to_float(x[at + i]);
    sum_squares += v * v;
  }
  normalise(x + at, weight, out + at, width, eps, sum_squares);
}

// residual_out = residual + x (rounded to T, as the next layer reads it),
// then out = the norm of residual_out. Each thread reads back only the
// elements it wrote.
template <typename T>
__device__ void fused_add_rms_norm(const T* x, const T* residual, const T* weight,
                                   T* residual_out, T* out, int width, float eps) {
  const size_t at = (size_t)blockIdx.x * width;
  float sum_squares = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const T sum = tmk::from_float<T>(tmk::to_float(residual[at + i]) + tmk::to_float(x[at + i]));
    residual_out[at + i] = sum;
    const float v = tmk::to_float(sum);
    sum_squares += v * v;
  }
  normalise(residual_out + at, weight, out + at, width, eps, sum_squares);
}

}  // namespace

#define TM_NORM(T, NAME)                                                                      \
  extern "C" __global__ void tm_rms_norm_##NAME(const T* x, const T* weight, T* out, int width, \
                                                float eps) {                                  \
    rms_norm<T>(x, weight, out, width, eps);                                                  \
  }                                                                                           \
  extern "C" __global__ void tm_fused_add_rms_norm_##NAME(                                    \
      const T* x, const T* residual, const T* weight, T* residual_out, T* out, int width,     \
      float eps) {                                                                            \
    fused_add_rms_norm<T>(x, residual, weight, residual_out, out, width, eps);                \
  }
TM_FOR_EACH_TYPE(TM_NORM)
