// The paged KV cache: new keys (or values) into their slots (one block per
// token; keys and values are separate tensors, one launch each), and whole-block copies (one block per pair). Reference:
// crates/tokenmill-kernels/src/reference/cache.rs.
#include "common.cuh"

#define TM_CACHE(T, NAME)                                                                      \
  extern "C" __global__ void tm_write_cache_##NAME(const T* src, int src_stride, T* cache,     \
                                                   const uint32_t* slot_mapping, int width) {  \
    const long long token = blockIdx.x;                                                        \
    const uint32_t slot = slot_mapping[token];                                                 \
    if (slot == 0xffffffffu) return; /* a padding row of a CUDA graph's batch */               \
    const size_t dst = (size_t)slot * width;                                                   \
    const long long from = token * src_stride;                                                 \
    for (int i = threadIdx.x; i < width; i += blockDim.x) cache[dst + i] = src[from + i];      \
  }                                                                                            \
  extern "C" __global__ void tm_copy_blocks_##NAME(T* cache, const uint32_t* pairs,            \
                                                   long long block_elems) {                    \
    const size_t src = (size_t)pairs[2 * blockIdx.x] * block_elems;                           \
    const size_t dst = (size_t)pairs[2 * blockIdx.x + 1] * block_elems;                        \
    for (long long i = threadIdx.x; i < block_elems; i += blockDim.x)                          \
      cache[dst + i] = cache[src + i];                                                         \
  }
TM_FOR_EACH_TYPE(TM_CACHE)
