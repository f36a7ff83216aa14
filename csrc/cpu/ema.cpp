// The skip-aware EMA step of the training loops, ema += (src - ema) * w, in one pass over
// two flat float32 buffers (ipfm_fast.train.flat.ema_step_). Each operation rounds to float32
// as torch's three ops (sub, mul_, add_) round it, so a run's parameters are bitwise those
// of the torch form; the torch form makes three passes and a temporary, ~3x the memory
// traffic of this loop, which is bandwidth-bound.
#pragma GCC optimize("fp-contract=off")  // no fused multiply-add: it would round once, not twice

#include <cstdint>

#include "cpu_common.h"
#include "ipfm/registry.h"

namespace ipfm::cpu {
namespace {

void ema_step(uintptr_t ema_ptr, uintptr_t src_ptr, int64_t n, uintptr_t weight_ptr, int threads) {
  float* __restrict ema = reinterpret_cast<float*>(ema_ptr);
  const float* __restrict src = reinterpret_cast<const float*>(src_ptr);
  const float w = *reinterpret_cast<const float*>(weight_ptr);  // a 0-dim tensor: decided on the device
  const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const float delta = (src[i] - ema[i]) * w;
    ema[i] = ema[i] + delta;
  }
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("ema_step_cpu", &ema_step, py::arg("ema"), py::arg("src"), py::arg("n"), py::arg("weight"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "ema += (src - ema) * weight[0] over n float32 values, rounded as three separate float32 ops");
});

}  // namespace
}  // namespace ipfm::cpu
