// The CPU kernels' instruction-set paths, chosen at run time (never -march=native: one
// build runs on any x86-64 and uses what the CPU has):
//
//   avx512   AVX-512 F/DQ/BW/VL + FMA: 16 Philox counters per instruction, 32 x 12 screening
//            and 4 x 96 combining micro-kernels (csrc/cpu/simd_avx512.cpp)
//   avx2     AVX2 + FMA: 8 counters per instruction, 16 x 6 and 4 x 24 micro-kernels
//            (csrc/cpu/simd_avx2.cpp)
//   generic  portable C++ that GCC vectorizes itself (target_clones for x86-64-v3), the
//            path the kernels had before the hand-written ones (perturb.cpp, field_target.cpp)
//
// Default: the widest the CPU supports. IPFM_FAST_CPU_ISA=avx512|avx2|generic (read once, at
// the first kernel call) asks for a path; one the CPU lacks falls back to the widest it has,
// and `ipfm-fast info` says which path runs and why. Every path draws the same random
// numbers up to float rounding (the same Philox counters, the same polynomials) and
// computes the field target with the same accumulation-chain bound.
//
// The SIMD translation units include only <immintrin.h>, <cstdint> and this header, so no
// inline function of a shared header is ever compiled there with wider instructions (the
// linker could otherwise pick that copy for code that runs on any CPU).
#pragma once

#include <cstdint>

namespace ipfm::cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Shapes of one path's field-target micro-kernels (see field_target.cpp).
struct FieldTiles {
  int screen_mr;   // rows of y per screening micro-tile (a multiple of the vector width)
  int screen_nr;   // rows of x_ref per screening micro-tile
  int combine_nr;  // output columns per combining micro-tile (4 rows of y each)
  int kc;          // K chunk of the screening dot products (elements)
  int lanes;       // fp32 chains per dot product within a chunk: 8 (generic: 8-lane dots), 1 (SIMD:
                   // one chain per product, the outer-product form); field_target.cpp turns these
                   // into the accumulation-chain length of the error bound
};

// Adam with beta1 = 0 (optim.cpp): the float32 coefficients, as torch's fused Adam casts them.
struct AdamCoef {
  float lr, b2, c2, bc2s, eps;  // lr / (1 - 0^t) = lr, beta2, 1 - beta2, sqrt(1 - beta2^t), eps
  float ema_w;                  // weight of the EMA moved in the same pass (0 when the update is skipped)
};

struct SimdKernels {
  Isa isa;
  const char* name;
  // normals[4 i + j] = normal j of randn4(seed, first + i), i < count (<= 64)
  void (*randn4)(uint64_t seed, uint64_t first, int64_t count, float* normals);
  // the same, plus terms[i] = -2 (ln max(u0, 1e-7) + ln max(u2, 1e-7)) (|g|^2 of the counter)
  void (*randn4_sq)(uint64_t seed, uint64_t first, int64_t count, float* normals, float* terms);
  // only the terms (no sin, cos or sqrt)
  void (*sq_terms)(uint64_t seed, uint64_t first, int64_t count, float* terms);
  // fp32 rows: y[e] = x[e] + factor * normals[e] (x null: factor * normals[e]); noise[e] =
  // scale * normals[e] when noise is not null; e < count
  void (*apply_f32)(const float* x, float* y, float* noise, const float* normals, int64_t count, float factor,
                    float scale);
  // Field target. Screening: st[j * ldst + i] += sum_{k0 <= k < k1} y[i * ys + k] x[j * xs + k]
  // for i < rows (<= screen_mr * 2), j < m; ypack: screen_mr * (k1 - k0) floats of scratch.
  // Each product accumulates in one fp32 chain over k0..k1 (see field_target.cpp).
  void (*screen)(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t k0,
                 int64_t k1, float* st, int64_t ldst, float* ypack);
  // Combining: out[a * os + c] = sum_e wt[4 e + a] x[js[e] * xs + c] for a < rows (<= 4),
  // c0 <= c < c1 (c1 - c0 a multiple of combine_nr, or the last columns); sums in e order.
  void (*combine)(const float* wt, const int32_t* js, int64_t nnz, int64_t rows, const float* x, int64_t xs,
                  int64_t c0, int64_t c1, float* out, int64_t os);
  FieldTiles tiles;
  // Adam, beta1 = 0, torch's vector-body rounding on elements [i0, i1) (multiples of width; m
  // aligned to a vector): the first moment read only where read_m or a gradient is zero or
  // huge, written non-temporally; ema (may be null) moved towards the new parameters.
  // Returns whether a huge gradient was seen. Null on the generic path.
  bool (*adam_body)(float* p, const float* g, float* m, float* v, float* ema, int64_t i0, int64_t i1,
                    const AdamCoef& c, bool read_m);
  int width;  // floats per vector (0: generic)
};

// Gradients at or above this magnitude (or NaN) make the Adam kernels read the old first
// moment: below it g - m stays finite, so fma(0, g - m, g) is g but for the sign of a zero.
constexpr float kAdamBigGrad = 8.5e37f;

// The path in use (decided at the first call: IPFM_FAST_CPU_ISA, then what the CPU has).
const SimdKernels& simd();
// Tests: switch paths in-process ("avx512", "avx2", "generic", or "" for the default); returns
// false when the CPU lacks the path (nothing changes then).
bool set_isa(const char* name);

// The generic path's entry points (perturb.cpp, field_target.cpp) and the SIMD ones
// (simd_avx2.cpp, simd_avx512.cpp).
namespace generic {
void randn4(uint64_t seed, uint64_t first, int64_t count, float* normals);
void randn4_sq(uint64_t seed, uint64_t first, int64_t count, float* normals, float* terms);
void sq_terms(uint64_t seed, uint64_t first, int64_t count, float* terms);
void apply_f32(const float* x, float* y, float* noise, const float* normals, int64_t count, float factor,
               float scale);
void screen(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t k0, int64_t k1,
            float* st, int64_t ldst, float* ypack);
void combine(const float* wt, const int32_t* js, int64_t nnz, int64_t rows, const float* x, int64_t xs, int64_t c0,
             int64_t c1, float* out, int64_t os);
}  // namespace generic

#define IPFM_DECLARE_SIMD(ns)                                                                                      \
  namespace ns {                                                                                                   \
  void randn4(uint64_t seed, uint64_t first, int64_t count, float* normals);                                       \
  void randn4_sq(uint64_t seed, uint64_t first, int64_t count, float* normals, float* terms);                      \
  void sq_terms(uint64_t seed, uint64_t first, int64_t count, float* terms);                                       \
  void apply_f32(const float* x, float* y, float* noise, const float* normals, int64_t count, float factor,        \
                 float scale);                                                                                     \
  void screen(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t k0,         \
              int64_t k1, float* st, int64_t ldst, float* ypack);                                                  \
  void combine(const float* wt, const int32_t* js, int64_t nnz, int64_t rows, const float* x, int64_t xs,          \
               int64_t c0, int64_t c1, float* out, int64_t os);                                                    \
  bool adam_body(float* p, const float* g, float* m, float* v, float* ema, int64_t i0, int64_t i1,                 \
                 const AdamCoef& c, bool read_m);                                                                  \
  extern const FieldTiles kTiles;                                                                                  \
  }
IPFM_DECLARE_SIMD(avx2)
IPFM_DECLARE_SIMD(avx512)
#undef IPFM_DECLARE_SIMD

}  // namespace ipfm::cpu
