// Paged attention over the block tables. References:
// crates/tokenmill-kernels/src/reference/attention.rs; launch geometry:
// crates/tokenmill-kernels/src/geometry.rs.
//
// Decode (flash decoding): one block of 4 warps per (query head, token,
// partition of the context). Warps score positions in turn, lanes splitting
// the head; the block takes the max and the sum of exponentials; thread d
// accumulates output dimension d. With several partitions each writes
// (max, sum, normalised output) and tm_paged_decode_merge combines them.
//
// Prefill: one block per (tile of up to 16 tokens of one sequence, query
// head); each warp owns 4 queries, each lane 1/32 of the head's dimensions.
// Keys and values are staged in shared memory 32 (or 16) positions at a
// time and every query keeps a running max, sum and output (online
// softmax), masking positions after its own.
#include "common.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kQueriesPerWarp = 4;
constexpr int kQueryTile = kWarps * kQueriesPerWarp;  // geometry::PREFILL_QUERY_TILE
constexpr int kMaxDimsPerLane = 8;                    // geometry::MAX_HEAD_DIM / 32

template <typename T>
__device__ void paged_decode(const T* __restrict__ q, int q_row_stride,
                             const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                             const uint32_t* __restrict__ block_tables, int max_blocks,
                             int block_size, const uint32_t* __restrict__ token_seq,
                             const uint32_t* __restrict__ positions, int num_heads,
                             int num_kv_heads, int head_dim, int partition_size,
                             int num_partitions, float scale, T* __restrict__ out,
                             float* __restrict__ partial_out, float* __restrict__ partial_max,
                             float* __restrict__ partial_sum) {
  extern __shared__ float smem[];
  float* query = smem;                        // head_dim
  float* scores = query + head_dim;           // partition_size
  float* scratch = scores + partition_size;   // 2 * warps
  const int head = blockIdx.x, token = blockIdx.y, part = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int kv = head / (num_heads / num_kv_heads);
  const int kv_width = num_kv_heads * head_dim;
  const int context = (int)positions[token] + 1;
  const int start = part * partition_size;
  const int end = min(start + partition_size, context);
  const size_t partial = ((size_t)token * num_heads + head) * num_partitions + part;

  if (start >= end) {
    // This partition lies past the query's context: it adds nothing.
    if (threadIdx.x == 0) {
      partial_max[partial] = -INFINITY;
      partial_sum[partial] = 0.f;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
      partial_out[partial * head_dim + d] = 0.f;
    return;
  }

  const T* q_row = q + (size_t)token * q_row_stride + (size_t)head * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = tmk::to_float(q_row[d]) * scale;
  __syncthreads();

  const uint32_t* table = block_tables + (size_t)token_seq[token] * max_blocks;
  const T* k_head = k_cache + (size_t)kv * head_dim;
  for (int p = start + warp; p < end; p += warps) {
    const T* key = k_head + tmk::slot_of(table, block_size, p) * kv_width;
    float s = 0.f;
    for (int d = lane; d < head_dim; d += 32) s += query[d] * tmk::to_float(key[d]);
    s = tmk::warp_sum(s);
    if (lane == 0) scores[p - start] = s;
  }
  __syncthreads();

  const int n = end - start;
  float max = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) max = fmaxf(max, scores[i]);
  max = tmk::block_max(max, scratch);
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = expf(scores[i] - max);
    scores[i] = e;
    sum += e;
  }
  sum = tmk::block_sum(sum, scratch + warps);  // also makes every exp visible

  const T* v_head = v_cache + (size_t)kv * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int p = start; p < end; ++p)
      acc += scores[p - start] * tmk::to_float(v_head[tmk::slot_of(table, block_size, p) * kv_width + d]);
    acc /= sum;
    if (num_partitions == 1)
      out[(size_t)token * num_heads * head_dim + (size_t)head * head_dim + d] = tmk::from_float<T>(acc);
    else
      partial_out[partial * head_dim + d] = acc;
  }
  if (num_partitions > 1 && threadIdx.x == 0) {
    partial_max[partial] = max;
    partial_sum[partial] = sum;
  }
}

template <typename T>
__device__ void paged_decode_merge(const float* __restrict__ partial_out,
                                   const float* __restrict__ partial_max,
                                   const float* __restrict__ partial_sum, T* __restrict__ out,
                                   int num_heads, int head_dim, int num_partitions) {
  extern __shared__ float weights[];  // num_partitions
  const int head = blockIdx.x, token = blockIdx.y;
  const size_t base = ((size_t)token * num_heads + head) * num_partitions;
  float max = -INFINITY;
  for (int p = 0; p < num_partitions; ++p) max = fmaxf(max, partial_max[base + p]);
  for (int p = threadIdx.x; p < num_partitions; p += blockDim.x) {
    const float s = partial_sum[base + p];
    weights[p] = s > 0.f ? s * expf(partial_max[base + p] - max) : 0.f;
  }
  __syncthreads();
  float total = 0.f;
  for (int p = 0; p < num_partitions; ++p) total += weights[p];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < num_partitions; ++p) acc += weights[p] * partial_out[(base + p) * head_dim + d];
    out[(size_t)token * num_heads * head_dim + (size_t)head * head_dim + d] = tmk::from_float<T>(acc / total);
  }
}

template <typename T>
__device__ void paged_prefill(const T* __restrict__ q, int q_row_stride,
                              const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                              const uint32_t* __restrict__ block_tables, int max_blocks,
                              int block_size, const uint32_t* __restrict__ positions,
                              const uint32_t* __restrict__ tile_seq,
                              const uint32_t* __restrict__ tile_first,
                              const uint32_t* __restrict__ tile_len, int num_heads,
                              int num_kv_heads, int head_dim, int kv_tile, float scale,
                              T* __restrict__ out) {
  extern __shared__ float smem[];
  const int key_stride = head_dim + 1;  // padding: lane j reads key j without bank conflicts
  float* queries = smem;                            // kQueryTile * head_dim
  float* keys = queries + kQueryTile * head_dim;    // kv_tile * key_stride
  float* values = keys + kv_tile * key_stride;      // kv_tile * head_dim
  const int tile = blockIdx.x, head = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kv = head / (num_heads / num_kv_heads);
  const int kv_width = num_kv_heads * head_dim;
  const int first = tile_first[tile], len = tile_len[tile];
  const uint32_t* table = block_tables + (size_t)tile_seq[tile] * max_blocks;

  for (int i = threadIdx.x; i < kQueryTile * head_dim; i += blockDim.x) {
    const int qi = i / head_dim, d = i % head_dim;
    queries[i] = qi < len
        ? tmk::to_float(q[(size_t)(first + qi) * q_row_stride + (size_t)head * head_dim + d]) * scale
        : 0.f;
  }

  float acc[kQueriesPerWarp][kMaxDimsPerLane];
  float max[kQueriesPerWarp], sum[kQueriesPerWarp];
  int position[kQueriesPerWarp];
#pragma unroll
  for (int w = 0; w < kQueriesPerWarp; ++w) {
    max[w] = -INFINITY;
    sum[w] = 0.f;
    const int qi = warp * kQueriesPerWarp + w;
    position[w] = qi < len ? (int)positions[first + qi] : -1;
    for (int r = 0; r < kMaxDimsPerLane; ++r) acc[w][r] = 0.f;
  }

  const int tile_context = (int)positions[first + len - 1] + 1;
  for (int start = 0; start < tile_context; start += kv_tile) {
    const int n = min(kv_tile, tile_context - start);
    __syncthreads();  // the previous stage is no longer read (and queries are staged)
    for (int i = threadIdx.x; i < n * head_dim; i += blockDim.x) {
      const int j = i / head_dim, d = i % head_dim;
      const size_t row = tmk::slot_of(table, block_size, start + j) * kv_width + (size_t)kv * head_dim;
      keys[j * key_stride + d] = tmk::to_float(k_cache[row + d]);
      values[j * head_dim + d] = tmk::to_float(v_cache[row + d]);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kQueriesPerWarp; ++w) {
      if (position[w] < 0) continue;  // the same for the whole warp
      const float* query = queries + (warp * kQueriesPerWarp + w) * head_dim;
      float s = -INFINITY;
      if (lane < n && start + lane <= position[w]) {
        s = 0.f;
        for (int d = 0; d < head_dim; ++d) s += query[d] * keys[lane * key_stride + d];
      }
      const float new_max = fmaxf(max[w], tmk::warp_max(s));
      if (new_max == -INFINITY) continue;  // nothing visible yet (warp-uniform)
      const float correction = expf(max[w] - new_max);
      const float e = expf(s - new_max);
      sum[w] = sum[w] * correction + tmk::warp_sum(e);
#pragma unroll
      for (int r = 0; r < kMaxDimsPerLane; ++r) acc[w][r] *= correction;
      for (int j = 0; j < n; ++j) {
        const float weight = __shfl_sync(tmk::FULL_MASK, e, j);
        if (weight == 0.f) continue;
#pragma unroll
        for (int r = 0; r < kMaxDimsPerLane; ++r) {
          const int d = lane + 32 * r;
          if (d < head_dim) acc[w][r] += weight * values[j * head_dim + d];
        }
      }
      max[w] = new_max;
    }
  }

#pragma unroll
  for (int w = 0; w < kQueriesPerWarp; ++w) {
    if (position[w] < 0) continue;
    const int qi = warp * kQueriesPerWarp + w;
    T* o = out + (size_t)(first + qi) * num_heads * head_dim + (size_t)head * head_dim;
#pragma unroll
    for (int r = 0; r < kMaxDimsPerLane; ++r) {
      const int d = lane + 32 * r;
      if (d < head_dim) o[d] = tmk::from_float<T>(acc[w][r] / sum[w]);
    }
  }
}

}  // namespace

#define TM_ATTENTION(T, NAME)                                                                    \
  extern "C" __global__ void tm_paged_decode_##NAME(                                             \
      const T* q, int q_row_stride, const T* k_cache, const T* v_cache,                          \
      const uint32_t* block_tables, int max_blocks, int block_size, const uint32_t* token_seq,   \
      const uint32_t* positions, int num_heads, int num_kv_heads, int head_dim,                  \
      int partition_size, int num_partitions, float scale, T* out, float* partial_out,           \
      float* partial_max, float* partial_sum) {                                                  \
    paged_decode<T>(q, q_row_stride, k_cache, v_cache, block_tables, max_blocks, block_size,     \
                    token_seq, positions, num_heads, num_kv_heads, head_dim, partition_size,     \
                    num_partitions, scale, out, partial_out, partial_max, partial_sum);          \
  }                                                                                              \
  extern "C" __global__ void tm_paged_decode_merge_##NAME(                                       \
      const float* partial_out, const float* partial_max, const float* partial_sum, T* out,      \
      int num_heads, int head_dim, int num_partitions) {                                         \
    paged_decode_merge<T>(partial_out, partial_max, partial_sum, out, num_heads, head_dim,       \
                          num_partitions);                                                       \
  }                                                                                              \
  extern "C" __global__ void tm_paged_prefill_##NAME(                                            \
      const T* q, int q_row_stride, const T* k_cache, const T* v_cache,                          \
      const uint32_t* block_tables, int max_blocks, int block_size, const uint32_t* positions,   \
      const uint32_t* tile_seq, const uint32_t* tile_first, const uint32_t* tile_len,            \
      int num_heads, int num_kv_heads, int head_dim, int kv_tile, float scale, T* out) {         \
    paged_prefill<T>(q, q_row_stride, k_cache, v_cache, block_tables, max_blocks, block_size,    \
                     positions, tile_seq, tile_first, tile_len, num_heads, num_kv_heads,         \
                     head_dim, kv_tile, scale, out);                                             \
  }
TM_FOR_EACH_TYPE(TM_ATTENTION)
