// CUDA kernels of the IPFM generator loss and the fake (field-matching) loss (math in
// ipfm/losses_math.h, shared with the CPU kernels).
//
// Forward, two launches: (1) one block per (row, chunk of kChunk elements) reads each
// input once (16-byte vector loads for fp32, 8-byte for 16-bit types when aligned) and
// writes its partial sums, reduced in a fixed shuffle tree; (2) one block sums the chunks
// of each row and the rows of the batch in a fixed order and writes the loss, the saved
// per-row statistics and the masked-row count. No float atomics: the same bits every run.
// Backward, one launch: one block per (row, chunk) reads the needed inputs once and
// writes each needed gradient once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda_api.h"
#include "cuda_common.cuh"
#include "ipfm/losses_math.h"
#include "losses_api.h"

namespace ipfm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 2;
constexpr int64_t kChunk = int64_t{kThreads} * kVecsPerThread * 4;  // 2048 elements per block
constexpr int kFinalThreads = 256;
constexpr int kWarps = kThreads / 32;

// Elements e0 .. e0 + 3 of a row (zeros past n).
template <typename T, bool kAligned>
__device__ __forceinline__ void load4(const T* __restrict__ row, int64_t e0, int64_t n, float v[4]) {
  if (kAligned && e0 + 4 <= n) {
    Vec4<T> in;
    in.v = *reinterpret_cast<const typename Vec4<T>::type*>(row + e0);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_f(in.e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = e0 + j < n ? to_f(row[e0 + j]) : 0.0f;
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store4(T* __restrict__ row, int64_t e0, int64_t n, const float v[4]) {
  if (kAligned && e0 + 4 <= n) {
    Vec4<T> out;
#pragma unroll
    for (int j = 0; j < 4; ++j) out.e[j] = from_f<T>(v[j]);
    *reinterpret_cast<typename Vec4<T>::type*>(row + e0) = out.v;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e0 + j < n) row[e0 + j] = from_f<T>(v[j]);
  }
}

// Fixed-order block sum of K values per thread; the result is valid in thread 0.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float warp_sums[K][kWarps];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) warp_sums[k][warp] = v[k];
  __syncthreads();
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = warp_sums[k][0];
      for (int w = 1; w < kWarps; ++w) s += warp_sums[k][w];
      v[k] = s;
    }
}

// The first element of the vector group `k` of this thread in a chunk.
__device__ __forceinline__ int64_t group_start(int64_t chunk, int k) {
  return chunk * kChunk + (int64_t{k} * kThreads + threadIdx.x) * 4;
}

// ---------------------------------------------------------------------------------------
// generator loss
// ---------------------------------------------------------------------------------------

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
gen_partial_kernel(const T* __restrict__ a, int64_t a_stride, const T* __restrict__ b, int64_t b_stride,
                   const T* __restrict__ x, int64_t x_stride, int64_t n, int64_t chunks, float alpha,
                   float* __restrict__ partials) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const T* ar = a + row * a_stride;
  const T* br = b + row * b_stride;
  const T* xr = x + row * x_stride;
  float acc[kGenPartials] = {0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int64_t e0 = group_start(chunk, k);
    if (e0 >= n) break;
    float av[4], bv[4], xv[4];
    load4<T, kAligned>(ar, e0, n, av);
    load4<T, kAligned>(br, e0, n, bv);
    load4<T, kAligned>(xr, e0, n, xv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[0] += gen_term(av[j], bv[j], xv[j], alpha);
      acc[1] += fabsf(xv[j] - av[j]);
      acc[2] += nonfinite(av[j]) + nonfinite(bv[j]) + nonfinite(xv[j]);
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < kGenPartials; ++k) partials[int64_t{blockIdx.x} * kGenPartials + k] = acc[k];  // 64-bit: > 2^32 / 3 blocks
}

__global__ void __launch_bounds__(kFinalThreads)
gen_finalize_kernel(const float* __restrict__ partials, int64_t rows, int64_t n, int64_t chunks,
                    const float* __restrict__ weight, int reduction, float* __restrict__ loss,
                    int64_t* __restrict__ masked, float* __restrict__ stats) {
  double acc = 0.0;  // fp64 over rows, as the CPU kernel: each thread sums rows / 256 of them
  long long masked_rows = 0;  // an integer: an fp32 count stops being exact past 2^24 rows
  for (int64_t row = threadIdx.x; row < rows; row += kFinalThreads) {
    float su = 0.0f, sabs = 0.0f, sbad = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partials + (row * chunks + c) * kGenPartials;
      su += p[0];
      sabs += p[1];
      sbad += p[2];
    }
    const GenRow r = gen_finalize_row(su, sabs, sbad, n, weight == nullptr, weight ? weight[row] : 0.0f);
    stats[row] = r.w;
    stats[rows + row] = r.u;
    stats[2 * rows + row] = r.keep;
    if (reduction == static_cast<int>(Reduction::kNone)) loss[row] = r.loss;
    acc += r.loss;
    masked_rows += r.keep == 0.0f;
  }
  __shared__ double sums[kFinalThreads];
  __shared__ long long counts[kFinalThreads];
  sums[threadIdx.x] = acc;
  counts[threadIdx.x] = masked_rows;
  __syncthreads();
  for (int width = kFinalThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      sums[threadIdx.x] += sums[threadIdx.x + width];
      counts[threadIdx.x] += counts[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (reduction == static_cast<int>(Reduction::kMean)) loss[0] = static_cast<float>(sums[0] / static_cast<double>(rows));
    if (reduction == static_cast<int>(Reduction::kSum)) loss[0] = static_cast<float>(sums[0]);
    if (masked) *masked = static_cast<int64_t>(counts[0]);
  }
}

template <typename T, bool kAligned, bool kA, bool kB, bool kX>
__global__ void __launch_bounds__(kThreads)
gen_backward_kernel(const float* __restrict__ grad, int64_t grad_stride, const T* __restrict__ a, int64_t a_stride,
                    const T* __restrict__ b, int64_t b_stride, const T* __restrict__ x, int64_t x_stride,
                    int64_t rows, int64_t n, int64_t chunks, const float* __restrict__ stats, float alpha,
                    float scale, T* __restrict__ ga, T* __restrict__ gb, T* __restrict__ gx, int64_t g_stride) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const bool keep = stats[2 * rows + row] != 0.0f;
  const float c = gen_grad_coef(grad[row * grad_stride], scale, stats[row], keep ? 1.0f : 0.0f);
  const float ca = 1.0f - 2.0f * alpha, cb = 2.0f * alpha;
  const T* ar = a + row * a_stride;
  const T* br = b + row * b_stride;
  const T* xr = x + row * x_stride;
  const int64_t off = row * g_stride;
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int64_t e0 = group_start(chunk, k);
    if (e0 >= n) break;
    float av[4] = {}, bv[4] = {}, xv[4] = {}, out_a[4], out_b[4], out_x[4];
    if (keep) {  // a masked row is written with zeros without being read
      load4<T, kAligned>(ar, e0, n, av);
      load4<T, kAligned>(br, e0, n, bv);
      if (kA || kB) load4<T, kAligned>(xr, e0, n, xv);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float d = av[j] - bv[j], e = av[j] - xv[j];
      out_a[j] = c * (e + ca * d);
      out_b[j] = c * (cb * d - e);
      out_x[j] = -c * d;
    }
    if (kA) store4<T, kAligned>(ga + off, e0, n, out_a);
    if (kB) store4<T, kAligned>(gb + off, e0, n, out_b);
    if (kX) store4<T, kAligned>(gx + off, e0, n, out_x);
  }
}

// ---------------------------------------------------------------------------------------
// fake loss
// ---------------------------------------------------------------------------------------

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
fake_partial_kernel(const T* __restrict__ b, int64_t b_stride, const T* __restrict__ x, int64_t x_stride,
                    int64_t n, int64_t chunks, float* __restrict__ partials) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const T* br = b + row * b_stride;
  const T* xr = x + row * x_stride;
  float acc[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int64_t e0 = group_start(chunk, k);
    if (e0 >= n) break;
    float bv[4], xv[4];
    load4<T, kAligned>(br, e0, n, bv);
    load4<T, kAligned>(xr, e0, n, xv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float r = bv[j] - xv[j];
      acc[0] += r * r;
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

__global__ void __launch_bounds__(kFinalThreads)
fake_finalize_kernel(const float* __restrict__ partials, int64_t rows, int64_t chunks,
                     const float* __restrict__ sigma, float sigma_scalar, float sigma_data, int reduction,
                     float* __restrict__ loss, float* __restrict__ stats) {
  double acc = 0.0;  // fp64 over rows, as the CPU kernel
  for (int64_t row = threadIdx.x; row < rows; row += kFinalThreads) {
    float s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) s += partials[row * chunks + c];
    const float lam = fake_weight(sigma ? sigma[row] : sigma_scalar, sigma_data);
    const float l = lam * s;
    stats[row] = lam;
    stats[rows + row] = s;
    if (reduction == static_cast<int>(Reduction::kNone)) loss[row] = l;
    acc += l;
  }
  __shared__ double sums[kFinalThreads];
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kFinalThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (reduction == static_cast<int>(Reduction::kMean)) loss[0] = static_cast<float>(sums[0] / static_cast<double>(rows));
    if (reduction == static_cast<int>(Reduction::kSum)) loss[0] = static_cast<float>(sums[0]);
  }
}

template <typename T, bool kAligned, bool kB, bool kX>
__global__ void __launch_bounds__(kThreads)
fake_backward_kernel(const float* __restrict__ grad, int64_t grad_stride, const T* __restrict__ b, int64_t b_stride,
                     const T* __restrict__ x, int64_t x_stride, int64_t n, int64_t chunks,
                     const float* __restrict__ stats, float scale, T* __restrict__ gb, T* __restrict__ gx,
                     int64_t g_stride) {
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const float c2 = 2.0f * grad[row * grad_stride] * scale * stats[row];
  const T* br = b + row * b_stride;
  const T* xr = x + row * x_stride;
  const int64_t off = row * g_stride;
#pragma unroll
  for (int k = 0; k < kVecsPerThread; ++k) {
    const int64_t e0 = group_start(chunk, k);
    if (e0 >= n) break;
    float bv[4], xv[4], out_b[4], out_x[4];
    load4<T, kAligned>(br, e0, n, bv);
    load4<T, kAligned>(xr, e0, n, xv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out_b[j] = c2 * (bv[j] - xv[j]);
      out_x[j] = -out_b[j];
    }
    if (kB) store4<T, kAligned>(gb + off, e0, n, out_b);
    if (kX) store4<T, kAligned>(gx + off, e0, n, out_x);
  }
}

// ---------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------

int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Vector access needs every row start aligned to 4 elements.
template <typename T>
bool aligned4(std::initializer_list<uintptr_t> pointers, std::initializer_list<int64_t> strides) {
  for (uintptr_t p : pointers)
    if (p % (4 * sizeof(T)) != 0) return false;
  for (int64_t s : strides)
    if (s % 4 != 0) return false;
  return true;
}

cudaError_t check_grid(int64_t blocks) {
  return blocks > 0x7fffffff ? cudaErrorInvalidConfiguration : cudaSuccess;
}

template <typename T>
cudaError_t gen_forward(uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride,
                        int64_t rows, int64_t n, uintptr_t weight, float alpha, int reduction, uintptr_t loss,
                        uintptr_t masked, uintptr_t stats, uintptr_t workspace, cudaStream_t stream) {
  const int64_t chunks = chunks_of(n), blocks = rows * chunks;
  if (const cudaError_t err = check_grid(blocks)) return err;
  float* partials = reinterpret_cast<float*>(workspace);
  if (blocks > 0) {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          reinterpret_cast<const T*>(a), a_stride, reinterpret_cast<const T*>(b), b_stride,
          reinterpret_cast<const T*>(x), x_stride, n, chunks, alpha, partials);
    };
    if (aligned4<T>({a, b, x}, {a_stride, b_stride, x_stride})) launch(gen_partial_kernel<T, true>);
    else launch(gen_partial_kernel<T, false>);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  gen_finalize_kernel<<<1, kFinalThreads, 0, stream>>>(
      partials, rows, n, chunks, reinterpret_cast<const float*>(weight), reduction, reinterpret_cast<float*>(loss),
      reinterpret_cast<int64_t*>(masked), reinterpret_cast<float*>(stats));
  return cudaGetLastError();
}

template <typename T, bool kAligned>
void gen_backward_launch(bool na, bool nb, bool nx, dim3 grid, cudaStream_t stream, const float* grad,
                         int64_t grad_stride, const T* a, int64_t a_stride, const T* b, int64_t b_stride, const T* x,
                         int64_t x_stride, int64_t rows, int64_t n, int64_t chunks, const float* stats, float alpha,
                         float scale, T* ga, T* gb, T* gx, int64_t g_stride) {
#define IPFM_GEN_BWD(A, B, X)                                                                              \
  gen_backward_kernel<T, kAligned, A, B, X><<<grid, kThreads, 0, stream>>>(                                \
      grad, grad_stride, a, a_stride, b, b_stride, x, x_stride, rows, n, chunks, stats, alpha, scale, ga, gb, gx, \
      g_stride)
  switch ((na ? 4 : 0) | (nb ? 2 : 0) | (nx ? 1 : 0)) {
    case 1: IPFM_GEN_BWD(false, false, true); break;
    case 2: IPFM_GEN_BWD(false, true, false); break;
    case 3: IPFM_GEN_BWD(false, true, true); break;
    case 4: IPFM_GEN_BWD(true, false, false); break;
    case 5: IPFM_GEN_BWD(true, false, true); break;
    case 6: IPFM_GEN_BWD(true, true, false); break;
    case 7: IPFM_GEN_BWD(true, true, true); break;
    default: break;
  }
#undef IPFM_GEN_BWD
}

template <typename T>
cudaError_t gen_backward(uintptr_t grad, int64_t grad_stride, uintptr_t a, int64_t a_stride, uintptr_t b,
                         int64_t b_stride, uintptr_t x, int64_t x_stride, int64_t rows, int64_t n, uintptr_t stats,
                         float alpha, float scale, uintptr_t ga, uintptr_t gb, uintptr_t gx, int64_t g_stride,
                         cudaStream_t stream) {
  const int64_t chunks = chunks_of(n), blocks = rows * chunks;
  if (const cudaError_t err = check_grid(blocks)) return err;
  if (blocks == 0 || (!ga && !gb && !gx)) return cudaSuccess;
  const bool aligned = aligned4<T>({a, b, x, ga, gb, gx}, {a_stride, b_stride, x_stride, g_stride});
  auto args = [&](auto aligned_tag) {
    gen_backward_launch<T, decltype(aligned_tag)::value>(
        ga != 0, gb != 0, gx != 0, dim3(static_cast<unsigned>(blocks)), stream, reinterpret_cast<const float*>(grad),
        grad_stride, reinterpret_cast<const T*>(a), a_stride, reinterpret_cast<const T*>(b), b_stride,
        reinterpret_cast<const T*>(x), x_stride, rows, n, chunks, reinterpret_cast<const float*>(stats), alpha, scale,
        reinterpret_cast<T*>(ga), reinterpret_cast<T*>(gb), reinterpret_cast<T*>(gx), g_stride);
  };
  if (aligned) args(std::true_type{});
  else args(std::false_type{});
  return cudaGetLastError();
}

template <typename T>
cudaError_t fake_forward(uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int64_t rows, int64_t n,
                         uintptr_t sigma, float sigma_scalar, float sigma_data, int reduction, uintptr_t loss,
                         uintptr_t stats, uintptr_t workspace, cudaStream_t stream) {
  const int64_t chunks = chunks_of(n), blocks = rows * chunks;
  if (const cudaError_t err = check_grid(blocks)) return err;
  float* partials = reinterpret_cast<float*>(workspace);
  if (blocks > 0) {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          reinterpret_cast<const T*>(b), b_stride, reinterpret_cast<const T*>(x), x_stride, n, chunks, partials);
    };
    if (aligned4<T>({b, x}, {b_stride, x_stride})) launch(fake_partial_kernel<T, true>);
    else launch(fake_partial_kernel<T, false>);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  fake_finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials, rows, chunks, reinterpret_cast<const float*>(sigma),
                                                        sigma_scalar, sigma_data, reduction,
                                                        reinterpret_cast<float*>(loss), reinterpret_cast<float*>(stats));
  return cudaGetLastError();
}

template <typename T>
cudaError_t fake_backward(uintptr_t grad, int64_t grad_stride, uintptr_t b, int64_t b_stride, uintptr_t x,
                          int64_t x_stride, int64_t rows, int64_t n, uintptr_t stats, float scale, uintptr_t gb,
                          uintptr_t gx, int64_t g_stride, cudaStream_t stream) {
  const int64_t chunks = chunks_of(n), blocks = rows * chunks;
  if (const cudaError_t err = check_grid(blocks)) return err;
  if (blocks == 0 || (!gb && !gx)) return cudaSuccess;
  const bool aligned = aligned4<T>({b, x, gb, gx}, {b_stride, x_stride, g_stride});
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const float*>(grad), grad_stride, reinterpret_cast<const T*>(b), b_stride,
        reinterpret_cast<const T*>(x), x_stride, n, chunks, reinterpret_cast<const float*>(stats), scale,
        reinterpret_cast<T*>(gb), reinterpret_cast<T*>(gx), g_stride);
  };
  const int which = (gb ? 2 : 0) | (gx ? 1 : 0);
  if (aligned) {
    if (which == 3) launch(fake_backward_kernel<T, true, true, true>);
    else if (which == 2) launch(fake_backward_kernel<T, true, true, false>);
    else launch(fake_backward_kernel<T, true, false, true>);
  } else {
    if (which == 3) launch(fake_backward_kernel<T, false, true, true>);
    else if (which == 2) launch(fake_backward_kernel<T, false, true, false>);
    else launch(fake_backward_kernel<T, false, false, true>);
  }
  return cudaGetLastError();
}

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}) with the CUDA element type T of dtype (nvcc builds as C++17).
template <typename F>
cudaError_t dispatch(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return f(Type<float>{});
    case DType::kFloat16: return f(Type<__half>{});
    case DType::kBFloat16: return f(Type<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t gen_loss_workspace(int64_t rows, int64_t n) { return rows * chunks_of(n) * kGenPartials; }
int64_t fake_loss_workspace(int64_t rows, int64_t n) { return rows * chunks_of(n) * kFakePartials; }

int gen_loss_forward(uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride,
                     int dtype, int64_t rows, int64_t n, uintptr_t weight, float alpha, int reduction, uintptr_t loss,
                     uintptr_t masked, uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gen_forward<T>(a, a_stride, b, b_stride, x, x_stride, rows, n, weight, alpha, reduction, loss, masked,
                          stats, workspace, reinterpret_cast<cudaStream_t>(stream));
  });
}

int gen_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t a, int64_t a_stride, uintptr_t b,
                      int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows, int64_t n,
                      uintptr_t stats, float alpha, float scale, uintptr_t ga, uintptr_t gb, uintptr_t gx,
                      int64_t g_stride, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gen_backward<T>(grad, grad_stride, a, a_stride, b, b_stride, x, x_stride, rows, n, stats, alpha, scale, ga,
                           gb, gx, g_stride, reinterpret_cast<cudaStream_t>(stream));
  });
}

int fake_loss_forward(uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows,
                      int64_t n, uintptr_t sigma, float sigma_scalar, float sigma_data, int reduction, uintptr_t loss,
                      uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fake_forward<T>(b, b_stride, x, x_stride, rows, n, sigma, sigma_scalar, sigma_data, reduction, loss, stats,
                           workspace, reinterpret_cast<cudaStream_t>(stream));
  });
}

int fake_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t b, int64_t b_stride, uintptr_t x,
                       int64_t x_stride, int dtype, int64_t rows, int64_t n, uintptr_t stats, float scale,
                       uintptr_t gb, uintptr_t gx, int64_t g_stride, int device, uintptr_t stream) {
  const DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return guard.error;
  return dispatch(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fake_backward<T>(grad, grad_stride, b, b_stride, x, x_stride, rows, n, stats, scale, gb, gx, g_stride,
                            reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace ipfm::cuda
