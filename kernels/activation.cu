// SiLU-and-multiply over fused gate|up rows. One thread per output element;
// reference: crates/tokenmill-kernels/src/reference/activation.rs.
#include "common.cuh"

#define TM_SILU(T, NAME)                                                                   \
  extern "C" __global__ void tm_silu_and_mul_##NAME(const T* gate_up, T* out, int width,   \
                                                    long long elements) {                  \
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                  \
    if (i >= elements) return;                                                             \
    const long long row = i / width, col = i % width;                                      \
    const float g = tmk::to_float(gate_up[row * 2 * width + col]);                          \
    const float u = tmk::to_float(gate_up[row * 2 * width + width + col]);                  \
    out[i] = tmk::from_float<T>(g / (1.0f + expf(-g)) * u);                                 \
  }
TM_FOR_EACH_TYPE(TM_SILU)
