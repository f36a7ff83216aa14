// The AVX2 path of the CPU kernels (isa.h): 8 lanes. Compiled for AVX2 + FMA by the pragma
// below and called only when the CPU has them (isa.cpp); the kernels are simd_body.inc.
#include <immintrin.h>

#include <cstdint>

#include "isa.h"

#pragma GCC target("avx2,fma,bmi2")
#pragma GCC optimize("fp-contract=fast")

namespace ipfm::cpu::avx2 {
namespace {

constexpr int W = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));

constexpr int kNR = 6;   // screening: 16 x 6 products per micro-tile (12 accumulators)
constexpr int kNV = 3;   // combining: 4 rows x 24 columns per micro-tile (12 accumulators)
constexpr int kKC = 64;  // screening K chunk: one fp32 chain of 64 products, then the chunk sums

inline __attribute__((always_inline)) vu mul_hilo(vu a, uint32_t m, vu& lo) {
  const __m256i av = (__m256i)a, mv = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(av, mv);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  lo = (vu)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return (vu)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __attribute__((always_inline)) vu xor3(vu a, vu b, vu c) { return a ^ b ^ c; }

inline __attribute__((always_inline)) vf vsqrt(vf a) { return (vf)_mm256_sqrt_ps((__m256)a); }

inline __attribute__((always_inline)) vf vfma(vf a, vf b, vf c) {
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
inline __attribute__((always_inline)) void stream(float* p, vf v) { _mm256_stream_ps(p, (__m256)v); }

inline __attribute__((always_inline)) vf bcast_f(float s) { return (vf)_mm256_set1_ps(s); }
inline __attribute__((always_inline)) vu bcast_u(uint32_t s) { return (vu)_mm256_set1_epi32(static_cast<int>(s)); }

// out[4 i + j] = n_j[i]: a 4 x 4 transpose in each 128-bit lane, then of the two lanes.
inline __attribute__((always_inline)) void store4(float* out, vf n0, vf n1, vf n2, vf n3) {
  const __m256 t0 = _mm256_unpacklo_ps((__m256)n0, (__m256)n1), t1 = _mm256_unpackhi_ps((__m256)n0, (__m256)n1);
  const __m256 t2 = _mm256_unpacklo_ps((__m256)n2, (__m256)n3), t3 = _mm256_unpackhi_ps((__m256)n2, (__m256)n3);
  const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  // lane L of u_k holds counter 4 L + k
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

}  // namespace

#include "simd_body.inc"

}  // namespace ipfm::cpu::avx2
