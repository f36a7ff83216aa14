// CUDA kernel for the PFGM++ perturbation (math in ipfm/perturb_math.h, shared with the
// CPU kernel). One pass: each thread turns one Philox counter into four normals and
// updates four consecutive elements with one 16-byte (fp32) or 8-byte (16-bit) access
// when the row is aligned. Thread 0 of each block draws the row's chi-square scale and
// shares it: a block never spans two rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_api.h"
#include "cuda_common.cuh"
#include "ipfm/perturb_math.h"

namespace ipfm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroupsPerThread = 2;  // two counters in flight per thread
constexpr int64_t kElemsPerBlock = int64_t{kThreads} * kGroupsPerThread * 4;

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
perturb_kernel(const T* __restrict__ x, int64_t x_row_stride, T* __restrict__ y, int64_t y_row_stride,
               T* __restrict__ noise, int64_t noise_row_stride, int64_t n, int64_t blocks_per_row,
               const float* __restrict__ sigma, float sigma_scalar, double alpha,
               const int64_t* __restrict__ seed_ptr) {
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t chunk = blockIdx.x % blocks_per_row;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  __shared__ float shared_scale;
  if (threadIdx.x == 0) shared_scale = chi2_scale(seed, row, alpha);
  __syncthreads();
  const float scale = shared_scale;
  const float factor = row_factor(sigma ? sigma[row] : sigma_scalar, scale);
  const int64_t groups = (n + 3) / 4;
  const T* xr = x ? x + row * x_row_stride : nullptr;
  T* yr = y + row * y_row_stride;
  T* nr = noise ? noise + row * noise_row_stride : nullptr;
#pragma unroll
  for (int k = 0; k < kGroupsPerThread; ++k) {
    const int64_t group = chunk * (kElemsPerBlock / 4) + int64_t{k} * kThreads + threadIdx.x;
    if (group >= groups) break;
    float g[4];
    randn4(seed, static_cast<uint64_t>(row * groups + group), g);
    const int64_t e0 = group * 4;
    if (kAligned && e0 + 4 <= n) {
      Vec4<T> out, nz;
      if (xr) {
        Vec4<T> in;
        in.v = *reinterpret_cast<const typename Vec4<T>::type*>(xr + e0);
#pragma unroll
        for (int j = 0; j < 4; ++j) out.e[j] = from_f<T>(to_f(in.e[j]) + factor * g[j]);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) out.e[j] = from_f<T>(factor * g[j]);
      }
      *reinterpret_cast<typename Vec4<T>::type*>(yr + e0) = out.v;
      if (nr) {
#pragma unroll
        for (int j = 0; j < 4; ++j) nz.e[j] = from_f<T>(scale * g[j]);
        *reinterpret_cast<typename Vec4<T>::type*>(nr + e0) = nz.v;
      }
    } else {
      for (int j = 0; j < 4 && e0 + j < n; ++j) {
        const float base = xr ? to_f(xr[e0 + j]) : 0.0f;
        yr[e0 + j] = from_f<T>(base + factor * g[j]);
        if (nr) nr[e0 + j] = from_f<T>(scale * g[j]);
      }
    }
  }
}

template <typename T>
cudaError_t launch(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
                   int64_t noise_row_stride, int64_t rows, int64_t n, uintptr_t sigma, float sigma_scalar,
                   double alpha, uintptr_t seed, uintptr_t stream) {
  const int64_t blocks_per_row = (n + kElemsPerBlock - 1) / kElemsPerBlock;
  const int64_t blocks = rows * blocks_per_row;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // Vector access needs every row start aligned to 4 elements.
  const uintptr_t bytes4 = 4 * sizeof(T);
  const bool aligned = (x % bytes4 == 0) && (y % bytes4 == 0) && (noise % bytes4 == 0) &&
                       (x_row_stride % 4 == 0) && (y_row_stride % 4 == 0) && (noise_row_stride % 4 == 0);
  auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(x), x_row_stride, reinterpret_cast<T*>(y), y_row_stride,
        reinterpret_cast<T*>(noise), noise_row_stride, n, blocks_per_row, reinterpret_cast<const float*>(sigma),
        sigma_scalar, alpha, reinterpret_cast<const int64_t*>(seed));
  };
  if (aligned) args(perturb_kernel<T, true>);
  else args(perturb_kernel<T, false>);
  return cudaGetLastError();
}

}  // namespace

int perturb(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
            int64_t noise_row_stride, int dtype, int64_t rows, int64_t n, uintptr_t sigma, float sigma_scalar,
            double alpha, uintptr_t seed, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return launch<float>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, rows, n, sigma, sigma_scalar,
                           alpha, seed, stream);
    case DType::kFloat16:
      return launch<__half>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, rows, n, sigma,
                            sigma_scalar, alpha, seed, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, rows, n, sigma,
                                   sigma_scalar, alpha, seed, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ipfm::cuda
