// Host entry points of the CUDA kernels. Plain C++ types only (no CUDA headers), so the
// pybind11 bindings compile with the host compiler. Each launcher returns a cudaError_t
// as int (0 = success); error_string() turns it into a message.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ipfm::cuda {

const char* error_string(int code);
int device_count();

// For the bindings: a launcher's error code as a Python RuntimeError naming the op.
inline void check(int code, const char* op) {
  if (code != 0) throw std::runtime_error(std::string(op) + ": CUDA error: " + error_string(code));
}

// g: a given gaussian (0: drawn). t_lo > 0 or t_hi < inf: the Beta clip, which needs
// `partials` = perturb_partials(rows, n) doubles of device scratch.
int perturb(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
            int64_t noise_row_stride, uintptr_t g, int64_t g_row_stride, int dtype, int64_t rows, int64_t n,
            uintptr_t sigma, float sigma_scalar, double alpha, uintptr_t seed, uintptr_t partials, double t_lo,
            double t_hi, int device, uintptr_t stream);
int64_t perturb_partials(int64_t rows, int64_t n);

#ifdef __CUDACC__
// Makes `device` current for the launch and restores the previous one.
struct DeviceGuard {
  int previous = -1;
  cudaError_t error = cudaSuccess;
  explicit DeviceGuard(int device) {
    error = cudaGetDevice(&previous);
    if (error == cudaSuccess && previous != device) error = cudaSetDevice(device);
    else previous = -1;
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};
#endif

}  // namespace ipfm::cuda
