// Rotary position embedding in place on the first `num_heads` heads of each
// row (q and k side by side in the fused qkv rows). One thread per rotated
// pair; reference: crates/tokenmill-kernels/src/reference/rotary.rs.
#include "common.cuh"

#define TM_ROTARY(T, NAME)                                                                    \
  extern "C" __global__ void tm_rotary_##NAME(T* rows, int row_stride, int num_heads,         \
                                              int head_dim, const uint32_t* positions,        \
                                              const float* cos_table, const float* sin_table, \
                                              int num_tokens, int neox) {                     \
    const int half = head_dim / 2;                                                            \
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                     \
    if (i >= (long long)num_tokens * num_heads * half) return;                                \
    const int pair = i % half;                                                                \
    const int head = (i / half) % num_heads;                                                  \
    const long long token = i / half / num_heads;                                             \
    T* x = rows + token * row_stride + (long long)head * head_dim;                            \
    const int a = neox ? pair : 2 * pair, b = neox ? pair + half : 2 * pair + 1;              \
    const size_t table = (size_t)positions[token] * half + pair;                              \
    const float c = cos_table[table], s = sin_table[table];                                   \
    const float u = tmk::to_float(x[a]), v = tmk::to_float(x[b]);                               \
    x[a] = tmk::from_float<T>(u * c - v * s);                                                  \
    x[b] = tmk::from_float<T>(u * s + v * c);                                                  \
  }
TM_FOR_EACH_TYPE(TM_ROTARY)
