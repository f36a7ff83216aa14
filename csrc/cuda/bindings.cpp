// Python bindings of the CUDA launchers (host compiler; built only with CUDA).
#include <stdexcept>
#include <string>

#include "cuda_api.h"
#include "ipfm/registry.h"

namespace ipfm::cuda {
namespace {

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_device_count", &device_count, "devices visible to the extension's CUDA runtime");
  m.def(
      "perturb_cuda",
      [](uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
         int64_t noise_row_stride, uintptr_t g, int64_t g_row_stride, int dtype, int64_t rows, int64_t n,
         uintptr_t sigma, float sigma_scalar, double alpha, uintptr_t seed, uintptr_t partials, double t_lo,
         double t_hi, int device, uintptr_t stream) {
        check(perturb(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, g, g_row_stride, dtype, rows, n,
                      sigma, sigma_scalar, alpha, seed, partials, t_lo, t_hi, device, stream),
              "perturb_cuda");
      },
      py::arg("x"), py::arg("x_row_stride"), py::arg("y"), py::arg("y_row_stride"), py::arg("noise"),
      py::arg("noise_row_stride"), py::arg("g"), py::arg("g_row_stride"), py::arg("dtype"), py::arg("rows"),
      py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("alpha"), py::arg("seed"),
      py::arg("partials"), py::arg("t_lo"), py::arg("t_hi"), py::arg("device"), py::arg("stream"),
      "CUDA launch of the perturbation on raw device pointers (seed is a device pointer to int64)");
  m.def("perturb_partials_cuda", &perturb_partials,
        "doubles of device scratch the clipped perturbation needs for rows x n (one per block)");
});

}  // namespace
}  // namespace ipfm::cuda
