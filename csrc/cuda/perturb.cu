// CUDA kernel for the PFGM++ perturbation (math in ipfm/perturb_math.h, shared with the
// CPU kernel). One pass: each thread turns one Philox counter into four normals and
// updates four consecutive elements with one 16-byte (fp32) or 8-byte (16-bit) access
// when the row is aligned. Thread 0 of each block draws the row's chi-square scale and
// shares it: a block never spans two rows.
// Variants: kGiven reads the gaussian from g instead of drawing it; with the Beta clip a
// pre-pass (sq_norm_kernel, same blocks) writes |g|^2 per block, and warp 0 of each block
// of the main kernel reduces its row's partials in a fixed order (deterministic).
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

// sqrt(D / W) of the block's row, times the clip factor when partials (|g|^2 per block of
// the row, from sq_norm_kernel) are given: warp 0 sums them lane-strided then by a fixed
// shuffle tree, so every block of a row gets the same value.
__device__ __forceinline__ float block_scale(uint64_t seed, int64_t row, double alpha, const double* partials,
                                             int64_t blocks_per_row, double t_lo, double t_hi) {
  __shared__ float shared_scale;
  if (partials == nullptr) {
    if (threadIdx.x == 0) shared_scale = chi2_scale(seed, row, alpha);
  } else if (threadIdx.x < 32) {
    double q = 0.0;
    for (int64_t c = threadIdx.x; c < blocks_per_row; c += 32) q += partials[row * blocks_per_row + c];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) q += __shfl_down_sync(0xffffffffu, q, offset);
    if (threadIdx.x == 0) {
      const double s64 = chi2_scale64(seed, row, alpha);
      shared_scale = static_cast<float>(s64 * clip_factor(q, s64, alpha, t_lo, t_hi));
    }
  }
  __syncthreads();
  return shared_scale;
}

template <typename T, bool kAligned, bool kGiven>
__global__ void __launch_bounds__(kThreads)
perturb_kernel(const T* __restrict__ x, int64_t x_row_stride, T* __restrict__ y, int64_t y_row_stride,
               T* __restrict__ noise, int64_t noise_row_stride, const T* __restrict__ gin, int64_t g_row_stride,
               int64_t n, int64_t blocks_per_row, const float* __restrict__ sigma, float sigma_scalar, double alpha,
               const int64_t* __restrict__ seed_ptr, const double* __restrict__ partials, double t_lo, double t_hi) {
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t chunk = blockIdx.x % blocks_per_row;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const float scale = block_scale(seed, row, alpha, partials, blocks_per_row, t_lo, t_hi);
  const float factor = row_factor(sigma ? sigma[row] : sigma_scalar, scale);
  const int64_t groups = (n + 3) / 4;
  const T* xr = x ? x + row * x_row_stride : nullptr;
  const T* gr = kGiven ? gin + row * g_row_stride : nullptr;
  T* yr = y + row * y_row_stride;
  T* nr = noise ? noise + row * noise_row_stride : nullptr;
#pragma unroll
  for (int k = 0; k < kGroupsPerThread; ++k) {
    const int64_t group = chunk * (kElemsPerBlock / 4) + int64_t{k} * kThreads + threadIdx.x;
    if (group >= groups) break;
    float g[4];
    const int64_t e0 = group * 4;
    if (kGiven) {
      if (kAligned && e0 + 4 <= n) {
        Vec4<T> in;
        in.v = *reinterpret_cast<const typename Vec4<T>::type*>(gr + e0);
#pragma unroll
        for (int j = 0; j < 4; ++j) g[j] = to_f(in.e[j]);
      } else {
        for (int j = 0; j < 4; ++j) g[j] = e0 + j < n ? to_f(gr[e0 + j]) : 0.0f;
      }
    } else {
      randn4(seed, static_cast<uint64_t>(row * groups + group), g);
    }
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

// |g|^2 of the elements one perturb_kernel block covers (drawn: Philox and two logs per
// full group; or read from the given g), block-reduced in a fixed order into partials.
template <typename T, bool kGiven>
__global__ void __launch_bounds__(kThreads)
sq_norm_kernel(const T* __restrict__ gin, int64_t g_row_stride, int64_t n, int64_t blocks_per_row,
               const int64_t* __restrict__ seed_ptr, double* __restrict__ partials) {
  const int64_t row = blockIdx.x / blocks_per_row;
  const int64_t chunk = blockIdx.x % blocks_per_row;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t groups = (n + 3) / 4;
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < kGroupsPerThread; ++k) {
    const int64_t group = chunk * (kElemsPerBlock / 4) + int64_t{k} * kThreads + threadIdx.x;
    if (group >= groups) break;
    const int64_t e0 = group * 4;
    const int count = static_cast<int>(n - e0 < 4 ? n - e0 : 4);
    if (kGiven) {
      const T* gr = gin + row * g_row_stride;
      for (int j = 0; j < count; ++j) {
        const float v = to_f(gr[e0 + j]);
        s += v * v;
      }
    } else {
      s += randn4_sq_norm(seed, static_cast<uint64_t>(row * groups + group), count);
    }
  }
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    partials[blockIdx.x] = total;
  }
}

template <typename T>
cudaError_t launch(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
                   int64_t noise_row_stride, uintptr_t g, int64_t g_row_stride, int64_t rows, int64_t n,
                   uintptr_t sigma, float sigma_scalar, double alpha, uintptr_t seed, uintptr_t partials,
                   double t_lo, double t_hi, uintptr_t stream) {
  const int64_t blocks_per_row = (n + kElemsPerBlock - 1) / kElemsPerBlock;
  const int64_t blocks = rows * blocks_per_row;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool clip = t_lo > 0.0 || t_hi < INFINITY;
  if (clip && (partials == 0 || !(alpha < INFINITY))) return cudaErrorInvalidValue;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (clip) {  // partials: `blocks` doubles, one per perturb_kernel block
    auto norm = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(
          reinterpret_cast<const T*>(g), g_row_stride, n, blocks_per_row, reinterpret_cast<const int64_t*>(seed),
          reinterpret_cast<double*>(partials));
    };
    if (g) norm(sq_norm_kernel<T, true>);
    else norm(sq_norm_kernel<T, false>);
  }
  // Vector access needs every row start aligned to 4 elements.
  const uintptr_t bytes4 = 4 * sizeof(T);
  const bool aligned = (x % bytes4 == 0) && (y % bytes4 == 0) && (noise % bytes4 == 0) && (g % bytes4 == 0) &&
                       (x_row_stride % 4 == 0) && (y_row_stride % 4 == 0) && (noise_row_stride % 4 == 0) &&
                       (g_row_stride % 4 == 0);
  auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, cuda_stream>>>(
        reinterpret_cast<const T*>(x), x_row_stride, reinterpret_cast<T*>(y), y_row_stride,
        reinterpret_cast<T*>(noise), noise_row_stride, reinterpret_cast<const T*>(g), g_row_stride, n,
        blocks_per_row, reinterpret_cast<const float*>(sigma), sigma_scalar, alpha,
        reinterpret_cast<const int64_t*>(seed), clip ? reinterpret_cast<const double*>(partials) : nullptr, t_lo,
        t_hi);
  };
  if (g) {
    if (aligned) args(perturb_kernel<T, true, true>);
    else args(perturb_kernel<T, false, true>);
  } else {
    if (aligned) args(perturb_kernel<T, true, false>);
    else args(perturb_kernel<T, false, false>);
  }
  return cudaGetLastError();
}

}  // namespace

int perturb(uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t y_row_stride, uintptr_t noise,
            int64_t noise_row_stride, uintptr_t g, int64_t g_row_stride, int dtype, int64_t rows, int64_t n,
            uintptr_t sigma, float sigma_scalar, double alpha, uintptr_t seed, uintptr_t partials, double t_lo,
            double t_hi, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return launch<float>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, g, g_row_stride, rows, n,
                           sigma, sigma_scalar, alpha, seed, partials, t_lo, t_hi, stream);
    case DType::kFloat16:
      return launch<__half>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, g, g_row_stride, rows, n,
                            sigma, sigma_scalar, alpha, seed, partials, t_lo, t_hi, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, x_row_stride, y, y_row_stride, noise, noise_row_stride, g, g_row_stride,
                                   rows, n, sigma, sigma_scalar, alpha, seed, partials, t_lo, t_hi, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t perturb_partials(int64_t rows, int64_t n) {
  return rows * ((n + kElemsPerBlock - 1) / kElemsPerBlock);
}

}  // namespace ipfm::cuda
