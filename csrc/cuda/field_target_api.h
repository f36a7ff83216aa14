// Host entry point of the CUDA field-target kernels (plain C++ types, no CUDA headers, so
// the pybind11 binding compiles with the host compiler). Returns a cudaError_t as int.
#pragma once

#include <cstdint>

namespace ipfm::cuda {

// y [rows, n] (row stride ys), x [m, n] (row stride xs), out [rows, n] (row stride os):
// fp32 device pointers. logz [rows] fp32, w [rows, m] fp32 scratch (the weights on
// return), norms [rows + m] fp64 scratch. sigma: per-row fp32 device pointer or 0 (then
// sigma_scalar). D = +inf for the diffusion limit.
int field_target(uintptr_t y, int64_t ys, uintptr_t x, int64_t xs, uintptr_t out, int64_t os, uintptr_t logz,
                 uintptr_t w, uintptr_t norms, int64_t rows, int64_t m, int64_t n, uintptr_t sigma,
                 double sigma_scalar, double D, double refine_tol, int device, uintptr_t stream);

}  // namespace ipfm::cuda
