// Philox4x32-10 and the uniform -> normal mapping of Triton's `tl.randint4x` /
// `tl.randn4x`, written once for the CPU and CUDA kernels so that every backend draws the
// same numbers for the same (seed, counter).
//
// Triton's conventions reproduced here:
//   key      = (lo32(seed), hi32(seed))
//   counter  = (lo32(offset), hi32(offset), 0, 0) for `randint4x(seed, offset)`
//   uniform  = int32(bits) mapped to [0, 1): x < 0 ? -x - 1 : x, times 4.6566127342e-10f
//   normal   = Box-Muller on a pair (u1, u2): r = sqrt(-2 ln max(1e-7, u1)),
//              (r cos 2*pi*u2, r sin 2*pi*u2)
#pragma once

#include <cmath>
#include <cstdint>

#include "ipfm/common.h"

namespace ipfm {

struct Philox4 {
  uint32_t x[4];
};

IPFM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

IPFM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                              uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(kRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

IPFM_HD float uint_to_uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v ^= v >> 31;  // v < 0 -> -v - 1 (= ~v), branch-free so CPU loops vectorize
  return static_cast<float>(v) * 4.6566127342e-10f;
}

IPFM_HD float fast_log(float v) {
#if defined(__CUDA_ARCH__)
  return logf(v);
#else
  return std::log(v);
#endif
}

// Box-Muller on one uniform pair, as Triton's pair_uniform_to_normal.
IPFM_HD void uniform_pair_to_normal(float u1, float u2, float& n1, float& n2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float theta = 6.283185307179586f * u2;
  const float r = sqrtf(-2.0f * fast_log(u1));
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(theta, &s, &c);
  n1 = r * c;
  n2 = r * s;
#else
  n1 = r * std::cos(theta);
  n2 = r * std::sin(theta);
#endif
}

// Four standard normals for one 64-bit counter, as Triton's randn4x(seed, offset).
IPFM_HD void randn4(uint64_t seed, uint64_t offset, float out[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(offset & 0xffffffffu),
                                  static_cast<uint32_t>(offset >> 32), 0u, 0u, seed);
  uniform_pair_to_normal(uint_to_uniform(r.x[0]), uint_to_uniform(r.x[1]), out[0], out[1]);
  uniform_pair_to_normal(uint_to_uniform(r.x[2]), uint_to_uniform(r.x[3]), out[2], out[3]);
}

}  // namespace ipfm
