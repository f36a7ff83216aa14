// The training loops' per-step passes over a network's parameters and gradients
// (ipfm_fast.train.flat), each one bandwidth-bound pass where the torch forms make several.
//
// ema_step: the skip-aware EMA, ema += (src - ema) * w, over two flat float32 buffers, with
// w = (!skip) * weight when a skip flag is given. Each operation rounds to float32 as torch's
// ops (sub, mul_, add_; the flag's float times the weight) round it, so a run's parameters are
// bitwise those of the torch form, which makes three passes, a temporary and two small ops.
//
// grad_norm: the 2-norm of a list of float32 tensors in one parallel pass (torch's foreach
// norm on CPU is one kernel launch per tensor). Squares are summed in double, per chunk of
// CHUNK elements in LANES independent accumulators; the chunk sums are added in a fixed
// order, so the result does not depend on the number of threads. Optionally it also decides
// whether the update is skipped (a non-finite loss or norm, or every row masked): the five
// small torch ops of that decision cost more than the pass itself in the training step.
#pragma GCC optimize("fp-contract=off")  // no fused multiply-add in ema_step: it would round once, not twice

#include <cmath>
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "cpu_common.h"
#include "ipfm/registry.h"

namespace ipfm::cpu {
namespace {

void ema_step(uintptr_t ema_ptr, uintptr_t src_ptr, int64_t n, uintptr_t weight_ptr, double weight,
              uintptr_t skip_ptr, int threads) {
  float* __restrict ema = reinterpret_cast<float*>(ema_ptr);
  const float* __restrict src = reinterpret_cast<const float*>(src_ptr);
  // a 0-dim tensor (decided on the device) or a number (rounded to float32 as torch rounds a scalar operand)
  float w = weight_ptr ? *reinterpret_cast<const float*>(weight_ptr) : static_cast<float>(weight);
  if (skip_ptr) w = (*reinterpret_cast<const bool*>(skip_ptr) ? 0.0f : 1.0f) * w;  // (~skip).float() * w
  const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const float delta = (src[i] - ema[i]) * w;
    ema[i] = ema[i] + delta;
  }
}

constexpr int64_t CHUNK = 16384;
constexpr int LANES = 32;  // independent sums: four AVX-512 vectors of doubles, no add waiting on the last

// The lanes are fixed by the source, not by the vector width, so every clone (and the
// baseline build) sums in the same order and returns the same bits.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double sum_squares(const float* x, int64_t n) {
  double acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  for (int k = 0; i < n; ++i, ++k) acc[k] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

// The update's skip decision, as distill._finish_update's torch ops make it:
// bad = !(isfinite(loss) && isfinite(norm)) || masked_rows >= rows (rows < 0: no mask).
struct SkipInputs {
  uintptr_t loss = 0;    // float32 0-dim; 0: no decision
  uintptr_t masked = 0;  // int64 0-dim masked-row count, or 0
  int64_t rows = -1;
  uintptr_t bad = 0;        // bool 0-dim out
  uintptr_t found_inf = 0;  // float32 0-dim out: bad as 1.0 / 0.0 (the fused Adam's skip flag)
};

void grad_norm(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels, uintptr_t out, int threads,
               const SkipInputs& skip) {
  if (ptrs.size() != numels.size()) throw std::invalid_argument("grad_norm_cpu: one numel per pointer");
  struct Chunk {
    const float* x;
    int64_t n;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < ptrs.size(); ++t) {
    const float* x = reinterpret_cast<const float*>(ptrs[t]);
    for (int64_t s = 0; s < numels[t]; s += CHUNK) chunks.push_back({x + s, numels[t] - s < CHUNK ? numels[t] - s : CHUNK});
    total += numels[t];
  }
  std::vector<double> partial(chunks.size());
  const int nt = threads_for(total, threads);
  const int64_t count = static_cast<int64_t>(chunks.size());
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < count; ++c) partial[c] = sum_squares(chunks[c].x, chunks[c].n);
  double sum = 0.0;
  for (double p : partial) sum += p;
  const float norm = static_cast<float>(std::sqrt(sum));
  *reinterpret_cast<float*>(out) = norm;
  if (skip.loss) {
    bool bad = !(std::isfinite(*reinterpret_cast<const float*>(skip.loss)) && std::isfinite(norm));
    if (skip.masked) bad = bad || *reinterpret_cast<const int64_t*>(skip.masked) >= skip.rows;
    *reinterpret_cast<bool*>(skip.bad) = bad;
    *reinterpret_cast<float*>(skip.found_inf) = bad ? 1.0f : 0.0f;
  }
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("ema_step_cpu", &ema_step, py::arg("ema"), py::arg("src"), py::arg("n"), py::arg("weight_ptr"),
        py::arg("weight"), py::arg("skip"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "ema += (src - ema) * w over n float32 values, w = weight_ptr[0] (or weight if weight_ptr is 0), times "
        "!skip[0] if skip is not 0, rounded as separate float32 ops");
  m.def(
      "grad_norm_cpu",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels, uintptr_t out, int threads,
         uintptr_t loss, uintptr_t masked, int64_t rows, uintptr_t bad, uintptr_t found_inf) {
        grad_norm(ptrs, numels, out, threads, SkipInputs{loss, masked, rows, bad, found_inf});
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("out"), py::arg("threads"), py::arg("loss") = 0,
      py::arg("masked") = 0, py::arg("rows") = -1, py::arg("bad") = 0, py::arg("found_inf") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[0] = the 2-norm of the float32 tensors at ptrs (numels elements each), summed in double; with a loss "
      "pointer also bad[0] = !(isfinite(loss[0]) && isfinite(norm)) || masked[0] >= rows, found_inf[0] = bad");
});

}  // namespace
}  // namespace ipfm::cpu
