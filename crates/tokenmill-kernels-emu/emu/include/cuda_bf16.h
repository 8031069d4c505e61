// Host stand-in for CUDA's cuda_bf16.h: the bf16 type and the two
// conversions the kernels use, with the device's rounding (to nearest,
// ties to even; NaN stays NaN).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t word = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return {uint16_t((word >> 16) | 0x40u)};  // quiet NaN
  word += 0x7fffu + ((word >> 16) & 1u);
  return {uint16_t(word >> 16)};
}
