// CPU kernel for the PFGM++ perturbation y = x + sigma * sqrt(D / W) * g (see
// ipfm/perturb_math.h). One pass: reads x once, writes y (and the noise if asked) once.
// Rows are split across OpenMP threads, long rows also by column chunks; the random
// numbers depend only on (seed, row, column), never on the thread layout.
#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "ipfm/perturb_math.h"
#include "ipfm/registry.h"

namespace ipfm::cpu {
namespace {

constexpr int64_t kGroupsPerChunk = 64;  // 256 elements: one vectorized Philox batch

// Four normals per counter for `count` (<= kGroupsPerChunk) consecutive counters, in
// element order: normals[4 * i + j] = normal j of counter (first + i). Written branch-free
// so GCC vectorizes the Philox rounds and the Box-Muller math across i. Short rows ask for
// fewer counters: a 64-value row needs 16, not a whole chunk.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void randn4_batch(uint64_t seed, uint64_t first, int64_t count, float* __restrict normals) {
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

template <typename T>
void perturb_rows(const T* x, int64_t x_row_stride, T* y, int64_t y_row_stride, T* noise,
                  int64_t noise_row_stride, int64_t rows, int64_t n, const float* sigma,
                  float sigma_scalar, double alpha, uint64_t seed, int threads) {
  const int64_t groups = (n + 3) / 4;
  const int64_t chunks_per_row = (groups + kGroupsPerChunk - 1) / kGroupsPerChunk;
  const int64_t work = rows * chunks_per_row;
#pragma omp parallel num_threads(threads)
  {
    int64_t scale_row = -1;
    float factor = 0.0f, scale = 1.0f;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t row = item / chunks_per_row;
      const int64_t chunk = item % chunks_per_row;
      if (row != scale_row) {  // a thread's items are contiguous: one draw per row
        scale = chi2_scale(seed, row, alpha);
        factor = row_factor(sigma ? sigma[row] : sigma_scalar, scale);
        scale_row = row;
      }
      alignas(64) float normals[4 * kGroupsPerChunk];
      const int64_t g0 = chunk * kGroupsPerChunk;
      randn4_batch(seed, static_cast<uint64_t>(row * groups + g0), std::min(kGroupsPerChunk, groups - g0), normals);
      const int64_t e0 = g0 * 4;
      const int64_t e1 = std::min(n, e0 + 4 * kGroupsPerChunk);
      const int64_t count = e1 - e0;
      T* yr = y + row * y_row_stride + e0;
      if (x) {
        const T* xr = x + row * x_row_stride + e0;
        for (int64_t e = 0; e < count; ++e) yr[e] = from_float<T>(to_float(xr[e]) + factor * normals[e]);
      } else {
        for (int64_t e = 0; e < count; ++e) yr[e] = from_float<T>(factor * normals[e]);
      }
      if (noise) {
        T* nr = noise + row * noise_row_stride + e0;
        for (int64_t e = 0; e < count; ++e) nr[e] = from_float<T>(scale * normals[e]);
      }
    }
  }
}

// x == 0 means "no source": y = sigma * noise (the prior). noise == 0: not written.
void perturb(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
             int64_t noise_row_stride, int dtype, int64_t rows, int64_t n, uintptr_t sigma,
             float sigma_scalar, double alpha, uint64_t seed, int threads) {
  if (rows < 0 || n < 0) throw std::invalid_argument("perturb: negative shape");
  if (rows >= (int64_t{1} << 32)) throw std::invalid_argument("perturb: more than 2^32 rows");
  dispatch_dtype(dtype, [&]<typename T>() {
    perturb_rows<T>(reinterpret_cast<const T*>(x), x_row_stride, reinterpret_cast<T*>(y), y_row_stride,
                    reinterpret_cast<T*>(noise), noise_row_stride, rows, n,
                    reinterpret_cast<const float*>(sigma), sigma_scalar, alpha, seed,
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
        py::arg("y_row_stride"), py::arg("noise"), py::arg("noise_row_stride"), py::arg("dtype"),
        py::arg("rows"), py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("alpha"),
        py::arg("seed"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "y = x + sigma * sqrt(D/W) * g over rows of raw pointers (see ipfm_fast.ops.perturb)");
  m.def("philox4x32_10", &philox_block, "Philox4x32-10 of one counter (tests)");
  m.def("chi2_scale", [](uint64_t seed, int64_t row, double alpha) { return chi2_scale(seed, row, alpha); },
        "sqrt(D / W) of one row, alpha = D / 2 (tests)");
});

}  // namespace
}  // namespace ipfm::cpu
