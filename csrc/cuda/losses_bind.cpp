// Python bindings of the CUDA loss launchers (host compiler; built only with CUDA).
#include <stdexcept>
#include <string>

#include "cuda_api.h"
#include "ipfm/registry.h"
#include "losses_api.h"

namespace ipfm::cuda {
namespace {

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gen_loss_workspace_cuda", &gen_loss_workspace, py::arg("rows"), py::arg("n"),
        "fp32 words of workspace gen_loss_forward_cuda needs");
  m.def("fake_loss_workspace_cuda", &fake_loss_workspace, py::arg("rows"), py::arg("n"),
        "fp32 words of workspace fake_loss_forward_cuda needs");
  m.def(
      "gen_loss_forward_cuda",
      [](uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype,
         int64_t rows, int64_t n, uintptr_t weight, float alpha, int reduction, uintptr_t loss, uintptr_t masked,
         uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream) {
        check(gen_loss_forward(a, a_stride, b, b_stride, x, x_stride, dtype, rows, n, weight, alpha, reduction, loss,
                               masked, stats, workspace, device, stream),
              "gen_loss_forward_cuda");
      },
      py::arg("a"), py::arg("a_stride"), py::arg("b"), py::arg("b_stride"), py::arg("x"), py::arg("x_stride"),
      py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("weight"), py::arg("alpha"), py::arg("reduction"),
      py::arg("loss"), py::arg("masked"), py::arg("stats"), py::arg("workspace"), py::arg("device"),
      py::arg("stream"), "IPFM generator loss forward on raw device pointers (see ipfm_fast.ops.losses)");
  m.def(
      "gen_loss_backward_cuda",
      [](uintptr_t grad, int64_t grad_stride, uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride,
         uintptr_t x, int64_t x_stride, int dtype, int64_t rows, int64_t n, uintptr_t stats, float alpha, float scale,
         uintptr_t ga, uintptr_t gb, uintptr_t gx, int64_t g_stride, int device, uintptr_t stream) {
        check(gen_loss_backward(grad, grad_stride, a, a_stride, b, b_stride, x, x_stride, dtype, rows, n, stats,
                                alpha, scale, ga, gb, gx, g_stride, device, stream),
              "gen_loss_backward_cuda");
      },
      py::arg("grad"), py::arg("grad_stride"), py::arg("a"), py::arg("a_stride"), py::arg("b"), py::arg("b_stride"),
      py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("stats"),
      py::arg("alpha"), py::arg("scale"), py::arg("ga"), py::arg("gb"), py::arg("gx"), py::arg("g_stride"),
      py::arg("device"), py::arg("stream"), "IPFM generator loss backward (gradients 0 = not needed)");
  m.def(
      "fake_loss_forward_cuda",
      [](uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows, int64_t n,
         uintptr_t sigma, float sigma_scalar, float sigma_data, int reduction, uintptr_t loss, uintptr_t stats,
         uintptr_t workspace, int device, uintptr_t stream) {
        check(fake_loss_forward(b, b_stride, x, x_stride, dtype, rows, n, sigma, sigma_scalar, sigma_data, reduction,
                                loss, stats, workspace, device, stream),
              "fake_loss_forward_cuda");
      },
      py::arg("b"), py::arg("b_stride"), py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("rows"),
      py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("sigma_data"), py::arg("reduction"),
      py::arg("loss"), py::arg("stats"), py::arg("workspace"), py::arg("device"), py::arg("stream"),
      "IPFM fake loss forward on raw device pointers");
  m.def(
      "fake_loss_backward_cuda",
      [](uintptr_t grad, int64_t grad_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype,
         int64_t rows, int64_t n, uintptr_t stats, float scale, uintptr_t gb, uintptr_t gx, int64_t g_stride,
         int device, uintptr_t stream) {
        check(fake_loss_backward(grad, grad_stride, b, b_stride, x, x_stride, dtype, rows, n, stats, scale, gb, gx,
                                 g_stride, device, stream),
              "fake_loss_backward_cuda");
      },
      py::arg("grad"), py::arg("grad_stride"), py::arg("b"), py::arg("b_stride"), py::arg("x"), py::arg("x_stride"),
      py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("stats"), py::arg("scale"), py::arg("gb"),
      py::arg("gx"), py::arg("g_stride"), py::arg("device"), py::arg("stream"),
      "IPFM fake loss backward (gradients 0 = not needed)");
});

}  // namespace
}  // namespace ipfm::cuda
