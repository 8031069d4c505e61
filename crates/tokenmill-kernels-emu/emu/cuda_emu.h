// What a kernel sees when kernels/*.cu are compiled as host C++ for the
// emulator: CUDA's qualifiers, built-in indices, barriers, warp shuffles
// and float intrinsics, mapped onto the runtime in runtime.cpp.
//
// Every CUDA thread of a block is a fiber on one OS thread. A fiber runs
// until it reaches __syncthreads or a warp exchange, and the scheduler
// releases a barrier only when every live thread of the block (or lane of
// the warp) waits at it, so a divergent barrier is reported instead of
// hanging. Threads that have returned do not hold a __syncthreads up (as
// on Volta and later); a shuffle needs all 32 lanes. Threads run in a fresh random order between barriers, so a
// missing barrier shows up as a wrong result.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
// Static shared memory: one copy per OS thread (each runs one launch at a
// time; its blocks run one after another).
#define __shared__ static thread_local

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace tm_emu {

// The emulated CUDA thread the fiber now running stands for.
struct Thread {
  dim3 index;
  unsigned lane;
  unsigned warp;
};

extern thread_local const Thread* current;
extern thread_local dim3 block_index, block_dim, grid_dim;
extern thread_local unsigned char* dynamic_shared_base;

// The block's dynamic shared memory (`extern __shared__ T name[];` is
// rewritten to a call of this by build.rs).
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_shared_base);
}

// Waits until every live thread of the block calls it.
void sync_block();
// Waits until all 32 lanes of the caller's warp call it.
void sync_warp();
// The exchange slots of the caller's warp for its next exchange (32
// words). A warp alternates between two banks, so one barrier per exchange
// suffices: a lane cannot write a bank again before every lane has passed
// the next exchange's barrier, and so has read this one.
uint64_t* next_warp_slots();
// Ends the launch with an error (a use of CUDA the emulator checks).
[[noreturn]] void fail(const char* what);

// One warp exchange: every lane publishes `value` and reads lane `from`'s.
template <class T>
T exchange(unsigned mask, T value, int from) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a shuffle of a word");
  if (mask != 0xffffffffu) fail("a warp shuffle with a partial mask");
  uint64_t* slots = next_warp_slots();
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof value);
  slots[current->lane] = word;
  sync_warp();
  const uint64_t got = slots[unsigned(from) & 31u];
  T out;
  std::memcpy(&out, &got, sizeof out);
  return out;
}

}  // namespace tm_emu

#define threadIdx (::tm_emu::current->index)
#define blockIdx (::tm_emu::block_index)
#define blockDim (::tm_emu::block_dim)
#define gridDim (::tm_emu::grid_dim)

inline void __syncthreads() { ::tm_emu::sync_block(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int = 32) {
  return ::tm_emu::exchange(mask, value, int(::tm_emu::current->lane) ^ lane_mask);
}

template <class T>
T __shfl_sync(unsigned mask, T value, int src_lane, int = 32) {
  return ::tm_emu::exchange(mask, value, src_lane);
}

// CUDA's integer min and max (device overloads of the same name).
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}

// Round-to-nearest float intrinsics: the host rounds every operation to
// nearest (the emulator is compiled with -ffp-contract=off, so nothing is
// fused), which is what the _rn forms guarantee on the device.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __int2float_rn(int x) { return float(x); }
inline int __float2int_rz(float x) { return int(x); }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline int __float_as_int(float x) { return int(__float_as_uint(x)); }
inline float __int_as_float(int i) { return __uint_as_float(unsigned(i)); }

// ------------------------------------------------------------ registry

extern "C" {
// A kernel as the Rust side finds it: its name, one code per parameter
// (p pointer, i int, l long long, u unsigned, f float) and a trampoline
// that calls it with cuLaunchKernel's argument convention (an array of
// pointers to each argument).
struct tm_emu_kernel {
  const char* name;
  const char* signature;
  void (*trampoline)(void** args);
};
}

namespace tm_emu {

template <class T>
constexpr char parameter_code() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, int>) return 'i';
  else if constexpr (std::is_same_v<T, long long>) return 'l';
  else if constexpr (std::is_same_v<T, unsigned>) return 'u';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else static_assert(sizeof(T) == 0, "a kernel parameter type the emulator does not know");
}

template <class... A>
struct Signature {
  static constexpr char value[] = {parameter_code<std::remove_cv_t<A>>()..., '\0'};
};

template <class... A>
constexpr const char* signature_of(void (*)(A...)) {
  return Signature<std::remove_cv_t<A>...>::value;
}

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
void call(void (*kernel)(A...), void** args) {
  call(kernel, args, std::index_sequence_for<A...>{});
}

template <auto Kernel>
void trampoline(void** args) {
  call(Kernel, args);
}

}  // namespace tm_emu
