// CPU-only helpers: element types, branch-free float math that GCC vectorizes, threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ipfm/common.h"

namespace ipfm::cpu {

struct bf16 {
  uint16_t bits;
};
using fp16 = _Float16;

inline float to_float(float v) { return v; }
inline float to_float(fp16 v) { return static_cast<float>(v); }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline fp16 from_float<fp16>(float v) { return static_cast<fp16>(v); }
// Round to nearest even, NaN kept quiet; branch-free so loops that store bf16 vectorize.
template <>
inline bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return bf16{static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded)};
}

// Calls f.template operator()<T>() with T the element type named by dtype.
template <typename F>
inline void dispatch_dtype(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f.template operator()<float>(); break;
    case DType::kFloat16: f.template operator()<fp16>(); break;
    case DType::kBFloat16: f.template operator()<bf16>(); break;
    default: throw std::invalid_argument("ipfm_fast._C: unsupported dtype code " + std::to_string(dtype));
  }
}

inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Threads worth waking for `elements` elements: a second thread costs a wake-up and a
// barrier (milliseconds when the machine is busy), so each gets at least 32k elements
// (ATen's grain size).
inline int threads_for(int64_t elements, int requested) {
  const int64_t useful = elements / 32768 > 1 ? elements / 32768 : 1;
  const int limit = resolve_threads(requested);
  return static_cast<int>(useful < limit ? useful : limit);
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Natural log for positive normal floats (Cephes logf polynomial, ~1 ulp); branch-free
// so that loops calling it vectorize.
inline float vlog(float x) {
  const uint32_t bits = float_to_bits(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

// sin and cos of 2*pi*u for u in [0, 1), reduced in turns (exact) then Cephes
// polynomials on [-pi/4, pi/4].
inline void vsincos_turns(float u, float& s_out, float& c_out) {
  const float q = static_cast<float>(static_cast<int>(4.0f * u + 0.5f));  // round(4u) for u >= 0
  const float x = (u - 0.25f * q) * 6.283185307179586f;
  const float z = x * x;
  const float s = x + x * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * z +
                  z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const int quadrant = static_cast<int>(q) & 3;
  const float sa = (quadrant & 1) ? c : s;
  const float ca = (quadrant & 1) ? s : c;
  s_out = (quadrant & 2) ? -sa : sa;
  c_out = ((quadrant + 1) & 2) ? -ca : ca;
}

}  // namespace ipfm::cpu
