// The AVX-512 path of the CPU kernels (isa.h): 16 lanes. Compiled for AVX-512 F/DQ/BW/VL +
// FMA by the pragma below and called only when the CPU has them (isa.cpp); the kernels
// themselves are simd_body.inc.
// GCC 12 warns "__Y may be used uninitialized" inside avx512fintrin.h wherever an intrinsic
// built on _mm512_undefined_*() is inlined: a false positive (the value is a don't-care
// operand), silenced for this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")
#pragma GCC optimize("fp-contract=fast")

namespace ipfm::cpu::avx512 {
namespace {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

constexpr int kNR = 12;  // screening: 32 x 12 products per micro-tile (24 accumulators)
constexpr int kNV = 6;   // combining: 4 rows x 96 columns per micro-tile (24 accumulators)
constexpr int kKC = 64;  // screening K chunk: one fp32 chain of 64 products, then the chunk sums

inline __attribute__((always_inline)) vu mul_hilo(vu a, uint32_t m, vu& lo) {
  const __m512i av = (__m512i)a, mv = _mm512_set1_epi32(static_cast<int>(m));
  const __m512i even = _mm512_mul_epu32(av, mv);                         // lanes 0, 2, ..: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);   // lanes 1, 3, ..
  lo = (vu)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return (vu)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline __attribute__((always_inline)) vu xor3(vu a, vu b, vu c) {
  return (vu)_mm512_ternarylogic_epi32((__m512i)a, (__m512i)b, (__m512i)c, 0x96);
}

inline __attribute__((always_inline)) vf vsqrt(vf a) { return (vf)_mm512_sqrt_ps((__m512)a); }

inline __attribute__((always_inline)) vf vfma(vf a, vf b, vf c) {
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
inline __attribute__((always_inline)) void stream(float* p, vf v) { _mm512_stream_ps(p, (__m512)v); }

inline __attribute__((always_inline)) vf bcast_f(float s) { return (vf)_mm512_set1_ps(s); }
inline __attribute__((always_inline)) vu bcast_u(uint32_t s) { return (vu)_mm512_set1_epi32(static_cast<int>(s)); }

// out[4 i + j] = n_j[i]: a 4 x 4 transpose in each 128-bit lane, then of the lanes.
inline __attribute__((always_inline)) void store4(float* out, vf n0, vf n1, vf n2, vf n3) {
  const __m512 t0 = _mm512_unpacklo_ps((__m512)n0, (__m512)n1), t1 = _mm512_unpackhi_ps((__m512)n0, (__m512)n1);
  const __m512 t2 = _mm512_unpacklo_ps((__m512)n2, (__m512)n3), t3 = _mm512_unpackhi_ps((__m512)n2, (__m512)n3);
  const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  // lane L of u_k holds counter 4 L + k
  const __m512 a0 = _mm512_shuffle_f32x4(u0, u1, 0x44), a1 = _mm512_shuffle_f32x4(u0, u1, 0xEE);
  const __m512 a2 = _mm512_shuffle_f32x4(u2, u3, 0x44), a3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(a0, a2, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(a0, a2, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(a1, a3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(a1, a3, 0xDD));
}

}  // namespace

#include "simd_body.inc"

}  // namespace ipfm::cpu::avx512
