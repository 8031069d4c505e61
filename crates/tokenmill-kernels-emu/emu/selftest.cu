// Kernels that use CUDA correctly and wrongly, for the emulator's own
// tests (tests/emulator.rs): each mistake must be reported, not missed.
#include "common.cuh"

// Correct: the block's sum of `in` (through tmk::block_sum's warp
// shuffles and barriers) and each lane's neighbour through __shfl_sync.
extern "C" __global__ void tm_selftest_sums(const float* in, float* block_sums,
                                            float* neighbours) {
  __shared__ float scratch[32];
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  const float total = tmk::block_sum(v, scratch);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
  neighbours[blockIdx.x * blockDim.x + threadIdx.x] =
      __shfl_sync(tmk::FULL_MASK, v, (threadIdx.x + 1) & 31);
}

// Wrong: thread 0 writes shared memory that the others read without a
// barrier in between.
extern "C" __global__ void tm_selftest_missing_barrier(float* out) {
  extern __shared__ float staged[];
  if (threadIdx.x == 0) staged[0] = 1.0f;
  out[threadIdx.x] = staged[0];
}

// Wrong: half of each warp waits at __syncthreads while the other half
// shuffles with it (on a GPU: a hang or garbage).
extern "C" __global__ void tm_selftest_divergent_barrier(float* out) {
  float v = out[threadIdx.x];
  if (threadIdx.x % 32 < 16)
    __syncthreads();
  else
    v = __shfl_xor_sync(tmk::FULL_MASK, v, 1);
  out[threadIdx.x] = v;
}

// Wrong: lane 0 of every warp has returned when the others shuffle.
extern "C" __global__ void tm_selftest_shuffle_after_exit(float* out) {
  if (threadIdx.x % 32 == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(tmk::FULL_MASK, out[threadIdx.x], 1);
}

// Wrong: writes one float past `floats` of dynamic shared memory.
extern "C" __global__ void tm_selftest_shared_overrun(int floats) {
  extern __shared__ float scratch[];
  if (threadIdx.x == 0) scratch[floats] = 0.0f;
}

// Wrong: writes one element past the `n` of `out`.
extern "C" __global__ void tm_selftest_global_overrun(float* out, int n) {
  if (threadIdx.x == 0) out[n] = 0.0f;
}
