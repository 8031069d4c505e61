// Sampling on the device: one CTA per row of logits picks the next token
// (greedy, or temperature + top-k + top-p by Gumbel-max) and reports the
// log-probabilities of the model's own distribution (the chosen token and the
// top alternatives).
//
// The CPU reference, crates/tokenmill-kernels/src/reference/sampling.rs,
// follows this file step for step and is BIT-EXACT with it, not merely close:
//
// - every float operation on the path to a token is an explicit
//   round-to-nearest intrinsic (__fadd_rn, __fmul_rn, ...), so nvcc cannot
//   contract a multiply and an add into an FMA that Rust would not do;
// - exp and log are our own (tm_exp, tm_log: FreeBSD's expf/logf, under one
//   ulp), written with those intrinsics, because CUDA's expf/logf and the
//   host's libm may differ in the last bit;
// - float sums use a fixed order (per-thread strided partials, an xor
//   butterfly in each warp, then the warps in order) that the reference
//   replays; max, argmax and counts do not depend on order at all.
//
// So the same (logits, parameters) give the same token on every GPU and on
// the CPU, and a top-p boundary cannot flip between the two.
//
// Bisection instead of sorting: a vocabulary of 128k floats does not fit in
// shared memory, and sorting it per row would cost more than the whole
// decode step. The top-k and top-p thresholds are found by bisection over the
// order-preserving u32 key of the (scaled) logits; each of at most 32 steps
// is one pass over the row (read from L2) and one block reduction.

#include <cfloat>
#include <cstdint>

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint32_t kWarp = 32;
constexpr uint32_t kMaxWarps = 32;
// The width of the top-logprob outputs per row; rows ask for 0..=20.
constexpr uint32_t kMaxTopLogprobs = 20;
// The id written in unused top-logprob slots (a row asked for fewer, or the
// vocabulary is smaller than the request).
constexpr uint32_t kNoToken = 0xffffffffu;
// The order key of +0.0: the largest key a scaled logit z = (l - max) / T
// (always <= 0) can have.
constexpr uint32_t kKeyOfZero = 0x80000000u;

// Seeds of the counter-based hash (any odd constants; these are the
// fractional bits of sqrt(2) and a splitmix-style multiplier).
constexpr uint64_t kStepSalt = 0x6a09e667f3bcc909ull;
constexpr uint64_t kIndexMul = 0xd1b54a32d192ed03ull;

// One row's parameters, as the host encodes them (8 little-endian u32
// words: see SamplingParamsRow::encode).
struct TmSamplingParams {
    float temperature;      // <= 0: greedy
    uint32_t top_k;         // 0 or >= vocab: off
    float top_p;            // >= 1: off
    uint32_t num_logprobs;  // 0..=20
    uint64_t seed;
    uint64_t step;
};
static_assert(sizeof(TmSamplingParams) == 32, "host encodes 32 bytes per row");

// ---------------------------------------------------------------- hashing

__device__ __forceinline__ uint64_t tm_splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The per-row part of the hash, computed once per row.
__device__ __forceinline__ uint64_t tm_row_key(uint64_t seed, uint64_t step) {
    return seed ^ tm_splitmix64(step ^ kStepSalt);
}

// u in (0, 1) for token `index`: 23 random bits, centred, so that u and 1 - u
// are exactly representable and neither log below sees 0 or 1.
__device__ __forceinline__ float tm_uniform(uint64_t row_key, uint32_t index) {
    const uint64_t x = tm_splitmix64(row_key ^ (uint64_t(index) * kIndexMul));
    const float k = __uint2float_rn(uint32_t(x >> 41));  // < 2^23: exact
    return __fmul_rn(__fadd_rn(k, 0.5f), 1.0f / 8388608.0f);  // exact
}

// ------------------------------------------------------ exact exp and log

// e^x, FreeBSD's expf (under one ulp) without its special cases for small
// |x|, which the general path computes as well. Subnormal results are kept.
__device__ float tm_exp(float x) {
    if (x != x) return x;
    if (x > __uint_as_float(0x42b17180u)) return INFINITY;   // overflow
    if (x < __uint_as_float(0xc2cff1b5u)) return 0.0f;       // underflow
    const float ln2_hi = __uint_as_float(0x3f317200u);
    const float ln2_lo = __uint_as_float(0x35bfbe8eu);
    const float inv_ln2 = __uint_as_float(0x3fb8aa3bu);
    const float p1 = __uint_as_float(0x3e2aaaa8u);
    const float p2 = __uint_as_float(0xbb355215u);
    const float nearest = x < 0.0f ? -0.5f : 0.5f;
    const int k = __float2int_rz(__fadd_rn(__fmul_rn(inv_ln2, x), nearest));
    const float t = __int2float_rn(k);
    const float hi = __fsub_rn(x, __fmul_rn(t, ln2_hi));  // exact
    const float lo = __fmul_rn(t, ln2_lo);
    const float r = __fsub_rn(hi, lo);
    const float rr = __fmul_rn(r, r);
    const float c = __fsub_rn(r, __fmul_rn(rr, __fadd_rn(p1, __fmul_rn(rr, p2))));
    const float q = __fdiv_rn(__fmul_rn(r, c), __fsub_rn(2.0f, c));
    const float y = __fsub_rn(1.0f, __fsub_rn(__fsub_rn(lo, q), hi));
    if (k >= -125) {
        if (k == 128) return __fmul_rn(__fmul_rn(y, 2.0f), __uint_as_float(0x7f000000u));
        return __fmul_rn(y, __uint_as_float(uint32_t(0x7f + k) << 23));
    }
    // Subnormal result: scale in two steps so that only the last rounds.
    const float up = __fmul_rn(y, __uint_as_float(uint32_t(0x7f + k + 100) << 23));
    return __fmul_rn(up, __uint_as_float(0x0d800000u));  // 2^-100
}

// ln x, FreeBSD's logf (under one ulp).
__device__ float tm_log(float x) {
    uint32_t ix = __float_as_uint(x);
    int k = 0;
    if (ix == 0u || ix == 0x80000000u) return -INFINITY;
    if (ix >> 31) return __int_as_float(0x7fc00000);   // negative: NaN
    if (ix >= 0x7f800000u) return x;                  // +inf or NaN
    if (ix < 0x00800000u) {                           // subnormal: scale up
        k = -25;
        ix = __float_as_uint(__fmul_rn(x, 33554432.0f));  // 2^25
    }
    // Reduce x to m * 2^k with m in [sqrt(2)/2, sqrt(2)).
    ix += 0x3f800000u - 0x3f3504f3u;
    k += int(ix >> 23) - 0x7f;
    ix = (ix & 0x007fffffu) + 0x3f3504f3u;
    const float f = __fsub_rn(__uint_as_float(ix), 1.0f);
    const float lg1 = __uint_as_float(0x3f2aaaaau);
    const float lg2 = __uint_as_float(0x3eccce13u);
    const float lg3 = __uint_as_float(0x3e91e9eeu);
    const float lg4 = __uint_as_float(0x3e789e26u);
    const float ln2_hi = __uint_as_float(0x3f317180u);
    const float ln2_lo = __uint_as_float(0x3717f7d1u);
    const float s = __fdiv_rn(f, __fadd_rn(2.0f, f));
    const float z = __fmul_rn(s, s);
    const float w = __fmul_rn(z, z);
    const float t1 = __fmul_rn(w, __fadd_rn(lg2, __fmul_rn(w, lg4)));
    const float t2 = __fmul_rn(z, __fadd_rn(lg1, __fmul_rn(w, lg3)));
    const float r = __fadd_rn(t2, t1);
    const float hfsq = __fmul_rn(__fmul_rn(0.5f, f), f);
    const float dk = __int2float_rn(k);
    float acc = __fmul_rn(s, __fadd_rn(hfsq, r));
    acc = __fadd_rn(acc, __fmul_rn(dk, ln2_lo));
    acc = __fsub_rn(acc, hfsq);
    acc = __fadd_rn(acc, f);
    return __fadd_rn(acc, __fmul_rn(dk, ln2_hi));
}

// Gumbel noise -ln(-ln u) for token `index`.
__device__ __forceinline__ float tm_gumbel(uint64_t row_key, uint32_t index) {
    const float u = tm_uniform(row_key, index);
    return -tm_log(-tm_log(u));
}

// ------------------------------------------------------------ ordering

// A u32 whose unsigned order is the float order (-0.0 and +0.0 equal): flip
// the sign bit of positives, every bit of negatives. Never given NaN.
__device__ __forceinline__ uint32_t tm_order_key(float x) {
    uint32_t bits = __float_as_uint(x);
    if (bits == 0x80000000u) bits = 0u;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Logits as the sampler sees them: NaN is an impossible token (-inf), +inf
// the largest finite float, so that no NaN reaches a comparison or a sum;
// -0.0 is +0.0, so that the row's max does not depend on the order in which
// equal zeros are met.
__device__ __forceinline__ float tm_sanitize(float l) {
    if (l != l) return -INFINITY;
    if (l == INFINITY) return FLT_MAX;
    if (l == 0.0f) return 0.0f;
    return l;
}

// ----------------------------------------------------- block reductions
//
// Every thread gets the result. The block is a whole number of warps; the
// scratch is reused, so each reduction ends with a barrier.

struct TmArg {
    float value;
    uint32_t index;
};

// The better of two candidates: larger value, then lower index. Commutative,
// so the butterfly leaves the same winner in every lane.
__device__ __forceinline__ TmArg tm_better(TmArg a, TmArg b) {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

struct TmScratch {
    float value[kMaxWarps];
    uint32_t index[kMaxWarps];
};

__device__ __forceinline__ uint32_t tm_warps() { return blockDim.x / kWarp; }

// The sum in the order the reference replays: the caller's per-thread
// partial, then an xor butterfly (a + b == b + a, so all lanes agree), then
// the warps' sums in warp order.
__device__ float tm_block_sum(float v, TmScratch& s) {
    for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, off));
    if (threadIdx.x % kWarp == 0) s.value[threadIdx.x / kWarp] = v;
    __syncthreads();
    float total = s.value[0];
    for (uint32_t w = 1; w < tm_warps(); ++w) total = __fadd_rn(total, s.value[w]);
    __syncthreads();
    return total;
}

__device__ float tm_block_max(float v, TmScratch& s) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    if (threadIdx.x % kWarp == 0) s.value[threadIdx.x / kWarp] = v;
    __syncthreads();
    float best = s.value[0];
    for (uint32_t w = 1; w < tm_warps(); ++w) best = fmaxf(best, s.value[w]);
    __syncthreads();
    return best;
}

__device__ uint32_t tm_block_count(uint32_t v, TmScratch& s) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    if (threadIdx.x % kWarp == 0) s.index[threadIdx.x / kWarp] = v;
    __syncthreads();
    uint32_t total = 0;
    for (uint32_t w = 0; w < tm_warps(); ++w) total += s.index[w];
    __syncthreads();
    return total;
}

__device__ TmArg tm_block_argmax(TmArg a, TmScratch& s) {
    for (int off = 16; off > 0; off >>= 1) {
        const TmArg b{__shfl_xor_sync(kFullMask, a.value, off),
                      __shfl_xor_sync(kFullMask, a.index, off)};
        a = tm_better(a, b);
    }
    if (threadIdx.x % kWarp == 0) {
        s.value[threadIdx.x / kWarp] = a.value;
        s.index[threadIdx.x / kWarp] = a.index;
    }
    __syncthreads();
    TmArg best{s.value[0], s.index[0]};
    for (uint32_t w = 1; w < tm_warps(); ++w) best = tm_better(best, TmArg{s.value[w], s.index[w]});
    __syncthreads();
    return best;
}

// The largest key K in [lo, hi] with pred(K), given pred(lo) and pred
// monotone (true up to some K, false above). At most 32 steps; `pred` is a
// block reduction, so every thread takes the same branch.
template <class Pred>
__device__ uint32_t tm_bisect(uint32_t lo, uint32_t hi, Pred pred) {
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1u) / 2u;  // hi <= 2^31: no overflow
        if (pred(mid)) {
            lo = mid;
        } else {
            hi = mid - 1u;
        }
    }
    return lo;
}

}  // namespace

// Samples one token per row of `logits` [rows, vocab] (f32, row-major).
//
// Launch: grid (rows), block (32..=1024 threads, a multiple of 32), no
// dynamic shared memory (reference::sampling::sampling_geometry).
// Outputs: tokens[rows], token_logprobs[rows], top_ids[rows, 20] and
// top_logprobs[rows, 20]; slots past a row's num_logprobs (or past the
// vocabulary) hold id 0xffffffff and -inf.
extern "C" __global__ void __launch_bounds__(1024)
tm_sample_f32(const float* __restrict__ logits, uint32_t rows, uint32_t vocab,
              const TmSamplingParams* __restrict__ params, uint32_t* __restrict__ tokens,
              float* __restrict__ token_logprobs, uint32_t* __restrict__ top_ids,
              float* __restrict__ top_logprobs) {
    __shared__ TmScratch scratch;
    const uint32_t row = blockIdx.x;
    if (row >= rows) return;
    const float* x = logits + size_t(row) * vocab;
    const TmSamplingParams p = params[row];
    const uint32_t tid = threadIdx.x;
    const uint32_t threads = blockDim.x;

    // 1. The largest logit. A row with no finite or +inf logit (all -inf or
    //    NaN) is treated as uniform: every logit 0.
    float m = -INFINITY;
    for (uint32_t i = tid; i < vocab; i += threads) m = fmaxf(m, tm_sanitize(x[i]));
    m = tm_block_max(m, scratch);
    const bool uniform = (m == -INFINITY);
    if (uniform) m = 0.0f;
    auto logit = [&](uint32_t i) { return uniform ? 0.0f : tm_sanitize(x[i]); };

    // 2. The log-softmax normaliser of the unscaled logits: ln sum e^(l - m).
    float partial = 0.0f;
    for (uint32_t i = tid; i < vocab; i += threads)
        partial = __fadd_rn(partial, tm_exp(__fsub_rn(logit(i), m)));
    const float log_norm = tm_log(tm_block_sum(partial, scratch));

    // 3. The token.
    TmArg chosen;
    if (!(p.temperature > 0.0f)) {
        TmArg best{-INFINITY, kNoToken};
        for (uint32_t i = tid; i < vocab; i += threads) best = tm_better(best, TmArg{logit(i), i});
        chosen = tm_block_argmax(best, scratch);
    } else {
        const float temperature = p.temperature;
        auto scaled = [&](uint32_t i) { return __fdiv_rn(__fsub_rn(logit(i), m), temperature); };
        // Tokens whose key is below `cut` are dropped; 0 keeps everything.
        uint32_t cut = 0u;
        if (p.top_k > 0u && p.top_k < vocab) {
            // The k-th largest z: the largest key that at least k keys reach.
            cut = tm_bisect(0u, kKeyOfZero, [&](uint32_t key) {
                uint32_t count = 0;
                for (uint32_t i = tid; i < vocab; i += threads) count += tm_order_key(scaled(i)) >= key;
                return tm_block_count(count, scratch) >= p.top_k;
            });
        }
        if (p.top_p < 1.0f) {
            // The mass of the kept tokens at or above `key`.
            auto mass = [&](uint32_t key) {
                float part = 0.0f;
                for (uint32_t i = tid; i < vocab; i += threads) {
                    const float z = scaled(i);
                    if (tm_order_key(z) >= key) part = __fadd_rn(part, tm_exp(z));
                }
                return tm_block_sum(part, scratch);
            };
            const float target = __fmul_rn(p.top_p, mass(cut));
            // The highest threshold whose nucleus still holds top_p of it.
            cut = tm_bisect(cut, kKeyOfZero, [&](uint32_t key) { return mass(key) >= target; });
        }
        // Gumbel-max: argmax of z + g over the kept tokens is a draw from
        // softmax(z) restricted to them.
        const uint64_t row_key = tm_row_key(p.seed, p.step);
        TmArg best{-INFINITY, kNoToken};
        for (uint32_t i = tid; i < vocab; i += threads) {
            const float z = scaled(i);
            if (tm_order_key(z) >= cut)
                best = tm_better(best, TmArg{__fadd_rn(z, tm_gumbel(row_key, i)), i});
        }
        chosen = tm_block_argmax(best, scratch);
    }
    if (tid == 0) {
        tokens[row] = chosen.index;
        // Never kNoToken (the row's max is always kept), but never read past
        // the row either.
        token_logprobs[row] = chosen.index == kNoToken
                                  ? -INFINITY
                                  : __fsub_rn(__fsub_rn(logit(chosen.index), m), log_norm);
    }

    // 4. The top alternatives: round r takes the best (logit, index) below
    //    the one round r - 1 took, so nothing needs marking.
    const uint32_t wanted = p.num_logprobs < kMaxTopLogprobs ? p.num_logprobs : kMaxTopLogprobs;
    TmArg previous{INFINITY, kNoToken};
    bool exhausted = false;
    for (uint32_t r = 0; r < kMaxTopLogprobs; ++r) {
        TmArg found{-INFINITY, kNoToken};
        if (r < wanted && !exhausted) {
            TmArg best{-INFINITY, kNoToken};
            for (uint32_t i = tid; i < vocab; i += threads) {
                const float v = logit(i);
                const bool below = r == 0 || v < previous.value ||
                                   (v == previous.value && i > previous.index);
                if (below) best = tm_better(best, TmArg{v, i});
            }
            found = tm_block_argmax(best, scratch);
            exhausted = found.index == kNoToken;
            previous = found;
        }
        if (tid == 0) {
            const size_t slot = size_t(row) * kMaxTopLogprobs + r;
            top_ids[slot] = found.index;
            top_logprobs[slot] = found.index == kNoToken
                                     ? -INFINITY
                                     : __fsub_rn(__fsub_rn(found.value, m), log_norm);
        }
    }
}
