// Host stand-in for CUDA's cuda_fp16.h: the f16 type and the two
// conversions the kernels use. The compiler's _Float16 rounds to nearest,
// ties to even, as __float2half_rn does.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, sizeof h);
  return float(h);
}

inline __half __float2half_rn(float f) {
  const _Float16 h = _Float16(f);
  __half x;
  std::memcpy(&x.bits, &h, sizeof h);
  return x;
}
