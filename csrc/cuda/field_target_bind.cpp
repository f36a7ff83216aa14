// Python binding of the CUDA field-target launcher (host compiler; built only with CUDA).
#include "cuda_api.h"
#include "field_target_api.h"
#include "ipfm/registry.h"

namespace ipfm::cuda {
namespace {

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "field_target_cuda",
      [](uintptr_t y, int64_t ys, uintptr_t x, int64_t xs, uintptr_t out, int64_t os, uintptr_t logz, uintptr_t w,
         uintptr_t norms, int64_t rows, int64_t m, int64_t n, uintptr_t sigma, double sigma_scalar, double D,
         double refine_tol, int device, uintptr_t stream) {
        check(field_target(y, ys, x, xs, out, os, logz, w, norms, rows, m, n, sigma, sigma_scalar, D, refine_tol,
                           device, stream),
              "field_target_cuda");
      },
      py::arg("y"), py::arg("y_row_stride"), py::arg("x_ref"), py::arg("x_row_stride"), py::arg("out"),
      py::arg("out_row_stride"), py::arg("logz"), py::arg("weights"), py::arg("norms"), py::arg("rows"),
      py::arg("m"), py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("D"), py::arg("refine_tol"),
      py::arg("device"), py::arg("stream"),
      "CUDA launch of the field target on raw device pointers (see ipfm_fast.ops.field_target)");
});

}  // namespace
}  // namespace ipfm::cuda
