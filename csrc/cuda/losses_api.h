// Host entry points of the CUDA loss kernels (plain C++ types; see cuda_api.h for the
// conventions: raw device pointers, 0 = absent, the stream as an integer, a cudaError_t
// returned as int).
#pragma once

#include <cstdint>

namespace ipfm::cuda {

// Number of fp32 words the forward launchers need in `workspace` (partial sums).
int64_t gen_loss_workspace(int64_t rows, int64_t n);
int64_t fake_loss_workspace(int64_t rows, int64_t n);

int gen_loss_forward(uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride,
                     int dtype, int64_t rows, int64_t n, uintptr_t weight, float alpha, int reduction, uintptr_t loss,
                     uintptr_t masked, uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream);

int gen_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t a, int64_t a_stride, uintptr_t b,
                      int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows, int64_t n,
                      uintptr_t stats, float alpha, float scale, uintptr_t ga, uintptr_t gb, uintptr_t gx,
                      int64_t g_stride, int device, uintptr_t stream);

int fake_loss_forward(uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows,
                      int64_t n, uintptr_t sigma, float sigma_scalar, float sigma_data, int reduction, uintptr_t loss,
                      uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream);

int fake_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t b, int64_t b_stride, uintptr_t x,
                       int64_t x_stride, int dtype, int64_t rows, int64_t n, uintptr_t stats, float scale,
                       uintptr_t gb, uintptr_t gx, int64_t g_stride, int device, uintptr_t stream);

}  // namespace ipfm::cuda
