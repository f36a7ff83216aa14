// CPU kernel for the PFGM++ perturbation y = x + sigma * sqrt(D / W) * g (see
// ipfm/perturb_math.h). One pass: reads x once, writes y (and the noise if asked) once.
// Rows are split across OpenMP threads, long rows also by column chunks; the random
// numbers depend only on (seed, row, column), never on the thread layout.
// Variants: g given (read instead of drawn) and the Beta clip, which first sums |g|^2 per
// (row, chunk) in a pre-pass (Philox and two logs per four elements, or a read of the
// given g) and reduces each row's partials in chunk order, so results do not depend on
// the thread count either. The random numbers come from the path isa.h chooses (AVX-512,
// AVX2 or generic): the same counters and polynomials, equal up to float rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "isa.h"
#include "ipfm/perturb_math.h"
#include "ipfm/registry.h"

namespace ipfm::cpu {

// The generic path's random-number kernels (isa.h): portable C++ that GCC vectorizes
// itself; the AVX2 / AVX-512 paths (simd_body.inc) compute the same numbers lane by lane.
namespace generic {

// Four normals per counter for `count` (<= kGroupsPerChunk) consecutive counters, in
// element order: normals[4 * i + j] = normal j of counter (first + i). Written branch-free
// so GCC vectorizes the Philox rounds and the Box-Muller math across i. Short rows ask for
// fewer counters: a 64-value row needs 16, not a whole chunk.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void randn4(uint64_t seed, uint64_t first, int64_t count, float* __restrict normals) {
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t ctr = first + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, seed);
    const uint32_t c0 = r.x[0], c1 = r.x[1], c2 = r.x[2], c3 = r.x[3];
    const float u0 = std::max(uint_to_uniform(c0), 1.0e-7f);
    const float u2 = std::max(uint_to_uniform(c2), 1.0e-7f);
    const float r01 = std::sqrt(-2.0f * vlog(u0));
    const float r23 = std::sqrt(-2.0f * vlog(u2));
    float s1, co1, s3, co3;
    vsincos_turns(uint_to_uniform(c1), s1, co1);
    vsincos_turns(uint_to_uniform(c3), s3, co3);
    normals[4 * i + 0] = r01 * co1;
    normals[4 * i + 1] = r01 * s1;
    normals[4 * i + 2] = r23 * co3;
    normals[4 * i + 3] = r23 * s3;
  }
}

// |g|^2 terms of `count` (<= kGroupsPerChunk) full groups of four normals from counter
// `first` on: n1^2 + n2^2 = -2 ln max(u1, 1e-7) per Box-Muller pair (no sqrt, sin or cos),
// computed as randn4_sq computes them (vectorized Philox and logs).
__attribute__((target_clones("arch=x86-64-v3", "default")))
void sq_terms(uint64_t seed, uint64_t first, int64_t count, float* __restrict terms) {
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t ctr = first + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, seed);
    const float u0 = std::max(uint_to_uniform(r.x[0]), 1.0e-7f);
    const float u2 = std::max(uint_to_uniform(r.x[2]), 1.0e-7f);
    const float l0 = vlog(u0), l2 = vlog(u2);
    terms[i] = -2.0f * (l0 + l2);
  }
}

// randn4 (the same normals) plus the sq_terms terms of each counter, for the one-pass
// clip: a row's normals are kept while its |g|^2 is summed, then written.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void randn4_sq(uint64_t seed, uint64_t first, int64_t count, float* __restrict normals, float* __restrict terms) {
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t ctr = first + static_cast<uint64_t>(i);
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, seed);
    const uint32_t c0 = r.x[0], c1 = r.x[1], c2 = r.x[2], c3 = r.x[3];
    const float u0 = std::max(uint_to_uniform(c0), 1.0e-7f);
    const float u2 = std::max(uint_to_uniform(c2), 1.0e-7f);
    const float l0 = vlog(u0), l2 = vlog(u2);
    terms[i] = -2.0f * (l0 + l2);
    const float r01 = std::sqrt(-2.0f * l0);
    const float r23 = std::sqrt(-2.0f * l2);
    float s1, co1, s3, co3;
    vsincos_turns(uint_to_uniform(c1), s1, co1);
    vsincos_turns(uint_to_uniform(c3), s3, co3);
    normals[4 * i + 0] = r01 * co1;
    normals[4 * i + 1] = r01 * s1;
    normals[4 * i + 2] = r23 * co3;
    normals[4 * i + 3] = r23 * s3;
  }
}

void apply_f32(const float* x, float* y, float* noise, const float* normals, int64_t count, float factor,
               float scale) {
  if (x) {
    for (int64_t e = 0; e < count; ++e) y[e] = x[e] + factor * normals[e];
  } else {
    for (int64_t e = 0; e < count; ++e) y[e] = factor * normals[e];
  }
  if (noise)
    for (int64_t e = 0; e < count; ++e) noise[e] = scale * normals[e];
}

}  // namespace generic

namespace {

constexpr int64_t kGroupsPerChunk = 64;  // 256 elements: one vectorized Philox batch

// |g|^2 of the drawn normals of one chunk, `count` elements from counter first_ctr on,
// given the sq_terms of its full groups: the terms in order, then the partial last
// group's squares (drawn on their own, so that both clip paths sum the same floats).
float drawn_chunk_sq(const SimdKernels& K, const float* terms, uint64_t seed, uint64_t first_ctr, int64_t count) {
  const int64_t full = count / 4;
  float s = 0.0f;
  for (int64_t i = 0; i < full; ++i) s += terms[i];
  if (count % 4) {
    alignas(16) float tail[4];
    K.randn4(seed, first_ctr + static_cast<uint64_t>(full), 1, tail);
    for (int64_t j = 0; j < count % 4; ++j) s += tail[j] * tail[j];
  }
  return s;
}

// |g|^2 of elements [e0, e0 + count) of one row: of the given g (eight running sums, so
// the loop vectorizes), or of the drawn normals (sq_terms, no sin/cos).
template <typename T>
double chunk_sq_norm(const SimdKernels& K, const T* gr, uint64_t seed, uint64_t first_ctr, int64_t e0, int64_t count) {
  if (gr) {
    float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t e = 0;
    for (; e + 8 <= count; e += 8) {
      for (int j = 0; j < 8; ++j) {
        const float v = to_float(gr[e0 + e + j]);
        lanes[j] += v * v;
      }
    }
    double s = 0.0;
    for (int j = 0; j < 8; ++j) s += lanes[j];
    for (; e < count; ++e) {
      const float v = to_float(gr[e0 + e]);
      s += v * v;
    }
    return s;
  }
  alignas(64) float terms[kGroupsPerChunk];
  K.sq_terms(seed, first_ctr, count / 4, terms);
  return drawn_chunk_sq(K, terms, seed, first_ctr, count);
}

constexpr int64_t kMaxBufferedRow = int64_t{1} << 20;  // one-pass clip: a thread keeps a row (4 MiB)

// y[e] = x[e] + factor * normals[e] (x null: the prior), noise[e] = scale * normals[e] (if
// asked) for e < count: fp32 through the path's vector loop, fp16 / bf16 converted here.
template <typename T>
void apply_row(const SimdKernels& K, const T* xr, T* yr, T* nr, const float* normals, int64_t count, float factor,
               float scale) {
  if constexpr (std::is_same_v<T, float>) {
    K.apply_f32(xr, yr, nr, normals, count, factor, scale);
  } else {
    if (xr) {
      for (int64_t e = 0; e < count; ++e) yr[e] = from_float<T>(to_float(xr[e]) + factor * normals[e]);
    } else {
      for (int64_t e = 0; e < count; ++e) yr[e] = from_float<T>(factor * normals[e]);
    }
    if (nr)
      for (int64_t e = 0; e < count; ++e) nr[e] = from_float<T>(scale * normals[e]);
  }
}

template <typename T>
void perturb_rows(const T* x, int64_t x_row_stride, T* y, int64_t y_row_stride, T* noise,
                  int64_t noise_row_stride, const T* g, int64_t g_row_stride, int64_t rows, int64_t n,
                  const float* sigma, float sigma_scalar, double alpha, uint64_t seed, double t_lo, double t_hi,
                  int threads) {
  const SimdKernels& K = simd();
  const int64_t groups = (n + 3) / 4;
  const int64_t chunks_per_row = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
  const int64_t work = rows * chunks_per_row;
  const bool clip = t_lo > 0.0 || t_hi < INFINITY;
  // Drawn g with the clip: each thread draws whole rows once, keeping a row's normals while
  // its |g|^2 is summed (one Philox pass), when that balances the threads within 1.5x;
  // otherwise (few or huge rows, or a given g) a pre-pass over (row, chunk) items. Both sum
  // the same floats in the same order, so the result does not depend on the path.
  const int64_t per_thread = (rows + threads - 1) / threads;
  if (clip && !g && n <= kMaxBufferedRow && 2 * per_thread * threads <= 3 * rows) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> buffer(static_cast<size_t>(chunks_per_row * 4 * kGroupsPerChunk));
#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        double q = 0.0;
        for (int64_t chunk = 0; chunk < chunks_per_row; ++chunk) {
          alignas(64) float terms[kGroupsPerChunk];
          const int64_t g0 = chunk * kGroupsPerChunk;
          const int64_t e0 = g0 * 4;
          const uint64_t ctr = static_cast<uint64_t>(row * groups + g0);
          K.randn4_sq(seed, ctr, std::min(kGroupsPerChunk, groups - g0), buffer.data() + e0, terms);
          q += drawn_chunk_sq(K, terms, seed, ctr, std::min(n, e0 + 4 * kGroupsPerChunk) - e0);
        }
        const double s64 = chi2_scale64(seed, row, alpha);
        const float scale = static_cast<float>(s64 * clip_factor(q, s64, alpha, t_lo, t_hi));
        const float factor = row_factor(sigma ? sigma[row] : sigma_scalar, scale);
        apply_row<T>(K, x ? x + row * x_row_stride : nullptr, y + row * y_row_stride,
                     noise ? noise + row * noise_row_stride : nullptr, buffer.data(), n, factor, scale);
      }
    }
    return;
  }
  std::vector<double> partial(clip ? work : 0);  // |g|^2 per (row, chunk)
  if (clip) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t row = item / chunks_per_row;
      const int64_t g0 = (item % chunks_per_row) * kGroupsPerChunk;
      const int64_t e0 = g0 * 4;
      partial[item] = chunk_sq_norm<T>(K, g ? g + row * g_row_stride : nullptr, seed,
                                       static_cast<uint64_t>(row * groups + g0), e0,
                                       std::min(n, e0 + 4 * kGroupsPerChunk) - e0);
    }
  }
#pragma omp parallel num_threads(threads)
  {
    int64_t scale_row = -1;
    float factor = 0.0f, scale = 1.0f;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t row = item / chunks_per_row;
      const int64_t chunk = item % chunks_per_row;
      if (row != scale_row) {  // a thread's items are contiguous: one draw per row
        if (clip) {
          double q = 0.0;
          for (int64_t c = 0; c < chunks_per_row; ++c) q += partial[row * chunks_per_row + c];
          const double s64 = chi2_scale64(seed, row, alpha);
          scale = static_cast<float>(s64 * clip_factor(q, s64, alpha, t_lo, t_hi));
        } else {
          scale = chi2_scale(seed, row, alpha);
        }
        factor = row_factor(sigma ? sigma[row] : sigma_scalar, scale);
        scale_row = row;
      }
      alignas(64) float normals[4 * kGroupsPerChunk];
      const int64_t g0 = chunk * kGroupsPerChunk;
      const int64_t e0 = g0 * 4;
      const int64_t e1 = std::min(n, e0 + 4 * kGroupsPerChunk);
      const int64_t count = e1 - e0;
      if (g) {
        const T* gr = g + row * g_row_stride + e0;
        for (int64_t e = 0; e < count; ++e) normals[e] = to_float(gr[e]);
      } else {
        K.randn4(seed, static_cast<uint64_t>(row * groups + g0), std::min(kGroupsPerChunk, groups - g0), normals);
      }
      apply_row<T>(K, x ? x + row * x_row_stride + e0 : nullptr, y + row * y_row_stride + e0,
                   noise ? noise + row * noise_row_stride + e0 : nullptr, normals, count, factor, scale);
    }
  }
}

// x == 0 means "no source": y = sigma * noise (the prior). noise == 0: not written.
// g != 0: the gaussian is read from g (same row layout) instead of drawn. t_lo > 0 or
// t_hi < inf: the Beta clip (ipfm/perturb_math.h clip_factor), finite D only.
void perturb(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
             int64_t noise_row_stride, uintptr_t g, int64_t g_row_stride, int dtype, int64_t rows, int64_t n,
             uintptr_t sigma, float sigma_scalar, double alpha, uint64_t seed, double t_lo, double t_hi,
             int threads) {
  if (rows < 0 || n < 0) throw std::invalid_argument("perturb: negative shape");
  if (rows >= (int64_t{1} << 32)) throw std::invalid_argument("perturb: more than 2^32 rows");
  if ((t_lo > 0.0 || t_hi < INFINITY) && !(alpha < INFINITY))
    throw std::invalid_argument("perturb: the Beta clip needs a finite D");
  dispatch_dtype(dtype, [&]<typename T>() {
    perturb_rows<T>(reinterpret_cast<const T*>(x), x_row_stride, reinterpret_cast<T*>(y), y_row_stride,
                    reinterpret_cast<T*>(noise), noise_row_stride, reinterpret_cast<const T*>(g), g_row_stride,
                    rows, n, reinterpret_cast<const float*>(sigma), sigma_scalar, alpha, seed, t_lo, t_hi,
                    threads_for(rows * n, threads));
  });
}

// Exposed for tests: the Philox block and the per-row scale, to compare with Triton.
pybind11::tuple philox_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  const Philox4 r = philox4x32_10(c0, c1, c2, c3, seed);
  return pybind11::make_tuple(r.x[0], r.x[1], r.x[2], r.x[3]);
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("perturb_cpu", &perturb, py::arg("x"), py::arg("x_row_stride"), py::arg("y"),
        py::arg("y_row_stride"), py::arg("noise"), py::arg("noise_row_stride"), py::arg("g"),
        py::arg("g_row_stride"), py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("sigma"),
        py::arg("sigma_scalar"), py::arg("alpha"), py::arg("seed"), py::arg("t_lo"), py::arg("t_hi"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "y = x + sigma * sqrt(D/W) * g over rows of raw pointers (see ipfm_fast.ops.perturb)");
  m.def("philox4x32_10", &philox_block, "Philox4x32-10 of one counter (tests)");
  m.def("chi2_scale", [](uint64_t seed, int64_t row, double alpha) { return chi2_scale(seed, row, alpha); },
        "sqrt(D / W) of one row, alpha = D / 2 (tests)");
});

}  // namespace
}  // namespace ipfm::cpu
