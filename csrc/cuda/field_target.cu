// CUDA kernels of the field target (reference-batch posterior mean); the method is in
// ipfm/field_math.h (shared with the CPU kernel) and ipfm_fast/ops/field_target.py.
//
// Two phases, four launches on the caller's stream, no host sync:
//   norms_kernel     squared row norms of y and x_ref in fp64 (one block per row),
//   screen_kernel    S = y x_ref^T, fp32 FFMA ("ieee": no TF32 rounding), 64x64 tiles,
//                    4x4 outputs per thread, K in steps of 16 through shared memory,
//                    one block per tile on a 1-D grid (gridDim.y would cap the row tiles
//                    at 65535, i.e. B at 4.2M),
//   finalize_kernel  one block per row: best bound (block min), the anchor (the smallest
//                    q that can be the row's minimum), candidates, exact fp64 distances
//                    for the entries that need them (one warp per entry), offsets
//                    q - anchor stored in fp32 over S, log Z (block sum), weights,
//   combine_kernel   target = W x_ref, fp32 FFMA tiles (1-D grid too); a K tile whose
//                    64 x 16 weights are all zero skips its x_ref loads and FMAs
//                    (__syncthreads_or).
// Non-finite inputs are not checked (that would need a host sync): they make the row
// (y) or every row (x_ref) NaN, like the float64 reference.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_api.h"
#include "field_target_api.h"
#include "ipfm/field_math.h"

namespace ipfm::cuda {
namespace {

using field::RowParams;

constexpr int kThreads = 256;
constexpr int kTile = 64;  // output tile (both dims) of the two GEMM-shaped kernels
constexpr int kTileK = 16;
constexpr double kInf = __builtin_huge_val();

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_min(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// acc[p][q] += sum_k a[k][4 ty + p] * b[k][4 tx + q] over one K slab of the shared tiles:
// the 4 x 4 register micro-tile of both GEMM-shaped kernels.
__device__ __forceinline__ void tile_fma(const float (&a_sh)[kTileK][kTile + 4], const float (&b_sh)[kTileK][kTile + 4],
                                         int ty, int tx, float (&acc)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    float a[4], b[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      a[q] = a_sh[kk][ty * 4 + q];
      b[q] = b_sh[kk][tx * 4 + q];
    }
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(a[p], b[q], acc[p][q]);
  }
}

// Writes a thread's 4x4 accumulator to dst[i * ld + j], i = i0 + p, j = j0 + q, inside
// [0, rows) x [0, cols).
__device__ __forceinline__ void store_tile(const float (&acc)[4][4], float* __restrict__ dst, int64_t ld, int64_t i0,
                                           int64_t j0, int64_t rows, int64_t cols) {
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (i0 + p < rows && j0 + q < cols) dst[(i0 + p) * ld + j0 + q] = acc[p][q];
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <bool kMin>
__device__ double block_reduce(double v) {
  __shared__ double partial[32];
  v = kMin ? warp_min(v) : warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // partial[] may still be read by the previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double r = lane < static_cast<int>(blockDim.x >> 5) ? partial[lane] : (kMin ? kInf : 0.0);
    r = kMin ? warp_min(r) : warp_sum(r);
    if (lane == 0) partial[0] = r;
  }
  __syncthreads();
  return partial[0];
}

__global__ void __launch_bounds__(kThreads)
norms_kernel(const float* __restrict__ a, int64_t stride, int64_t n, double* __restrict__ out) {
  const float* r = a + static_cast<int64_t>(blockIdx.x) * stride;
  double acc = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const double v = r[k];
    acc += v * v;
  }
  acc = block_reduce<false>(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// Origin (i0, j0) of this block's output tile on a 1-D grid of row_tiles x col_tiles tiles,
// column tiles fastest (the order of a 2-D grid with the columns on x).
__device__ __forceinline__ void tile_origin(int64_t col_tiles, int64_t& i0, int64_t& j0) {
  const int64_t tile = blockIdx.x;
  i0 = tile / col_tiles * kTile;
  j0 = tile % col_tiles * kTile;
}

// s[i, j] = sum_k y[i, k] x[j, k]; 1-D grid of ceil(rows / 64) * ceil(m / 64) tiles.
__global__ void __launch_bounds__(kThreads)
screen_kernel(const float* __restrict__ y, int64_t ys, const float* __restrict__ x, int64_t xs, float* __restrict__ s,
              int64_t rows, int64_t m, int64_t n, int64_t col_tiles) {
  __shared__ float ya[kTileK][kTile + 4];
  __shared__ float xb[kTileK][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int64_t i0, j0;
  tile_origin(col_tiles, i0, j0);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < n; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int r = e / kTileK, c = e % kTileK;
      const int64_t gk = k0 + c;
      ya[c][r] = (i0 + r < rows && gk < n) ? y[(i0 + r) * ys + gk] : 0.0f;
      xb[c][r] = (j0 + r < m && gk < n) ? x[(j0 + r) * xs + gk] : 0.0f;
    }
    __syncthreads();
    tile_fma(ya, xb, ty, tx, acc);
    __syncthreads();
  }
  store_tile(acc, s, m, i0 + ty * 4, j0 + tx * 4, rows, m);
}

// One block per row: s[row, :] holds y_row . x_j on entry and the weights on return.
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const float* __restrict__ y, int64_t ys, const float* __restrict__ x, int64_t xs, float* s,
                float* __restrict__ logz, const double* __restrict__ ny_all, const double* __restrict__ nx,
                const float* __restrict__ sigma, double sigma_scalar, int64_t m, int64_t n, double D, double coef_l,
                double refine_tol) {
  using namespace ipfm::field;
  const int64_t row = blockIdx.x;
  const RowParams p = row_params(static_cast<double>(n), D, sigma ? static_cast<double>(sigma[row]) : sigma_scalar);
  const double ny = ny_all[row];
  const double coef = 2.0 * coef_l * sqrt(ny);
  const double coef_stat = field::stat_coef(n, static_cast<double>(n)) * sqrt(ny);  // one FFMA chain over K
  float* srow = s + row * m;
  const float* yrow = y + row * ys;

  // sweep 1: best upper bound; a non-finite norm poisons the row
  double best = kInf;
  int bad = !(ny < kInf);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const double d = ny + nx[j] - 2.0 * static_cast<double>(srow[j]);
    bad |= !(nx[j] < kInf);
    best = fmin(best, q_of(p, fmax(d + coef * sqrt(nx[j]), 0.0)));  // >= q_lo of the same entry
  }
  best = block_reduce<true>(best);
  bad = __syncthreads_or(bad);
  const double cut = q_cut(p, best);

  // Screened d2 and q lower bound of entry j, whether its logit error estimate asks for an
  // exact distance, and its q (one warp per entry: every lane returns the same value, and
  // one entry gives the same q in both sweeps below).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  auto screened = [&](int64_t j, double& d, double& q_lo) {
    d = ny + nx[j] - 2.0 * static_cast<double>(srow[j]);
    const double err = coef * sqrt(nx[j]);
    q_lo = q_of(p, fmax(d - err, 0.0));
    return logit_err(p, q_lo, fmin(err, coef_stat * sqrt(nx[j]))) > refine_tol;
  };
  auto q_entry = [&](int64_t j, double d, bool exact) {
    if (!exact) return q_of(p, fmax(d, 0.0));
    const float* xrow = x + j * xs;
    double acc = 0.0;
    for (int64_t k = lane; k < n; k += 32) {
      const double t = static_cast<double>(yrow[k]) - static_cast<double>(xrow[k]);
      acc += t * t;
    }
    return q_of(p, warp_sum(acc));
  };

  // sweep 2: the anchor, the smallest q of the entries that can be the row's minimum
  // (q_lo <= best). The stored offsets are taken from it; from the upper bound `best`,
  // whose slack (~E) can be thousands of logits at small sigma, their fp32 rounding would
  // cost u * slack of a logit.
  double anchor = kInf;
  for (int64_t j = warp; j < m; j += warps) {
    double d, q_lo;
    const bool needs_exact = screened(j, d, q_lo);
    if (q_lo <= best) anchor = fmin(anchor, q_entry(j, d, needs_exact));
  }
  anchor = block_reduce<true>(anchor);

  // sweep 3: candidates, exact distances where needed, offsets q - anchor stored in fp32
  double dmin = kInf;
  for (int64_t j = warp; j < m; j += warps) {
    double d, q_lo;
    const bool needs_exact = screened(j, d, q_lo);
    const float delta = q_lo <= cut ? static_cast<float>(q_entry(j, d, needs_exact) - anchor)
                                    : static_cast<float>(kInf);
    __syncwarp();
    if (lane == 0) srow[j] = delta;
    dmin = fmin(dmin, static_cast<double>(delta));
  }
  dmin = block_reduce<true>(dmin);
  const double q_ref = anchor + dmin;

  // sweep 4: normaliser
  double z = 0.0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const double delta = srow[j];
    if (delta < kInf) z += exp(rel_logit(p, delta - dmin, q_ref));
  }
  z = block_reduce<false>(z);
  const bool ok = p.ok && !bad;
  const double inv_z = ok ? 1.0 / z : __builtin_nan("");

  // sweep 5: weights
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const double delta = srow[j];
    const double w = delta < kInf ? exp(rel_logit(p, delta - dmin, q_ref)) * inv_z : 0.0 * inv_z;
    srow[j] = static_cast<float>(w);
  }
  if (threadIdx.x == 0) logz[row] = ok ? static_cast<float>(ref_logit(p, q_ref) + log(z)) : __builtin_nanf("");
}

// out[i, c] = sum_j w[i, j] x[j, c]; 1-D grid of ceil(rows / 64) * ceil(n / 64) tiles.
__global__ void __launch_bounds__(kThreads)
combine_kernel(const float* __restrict__ w, const float* __restrict__ x, int64_t xs, float* __restrict__ out,
               int64_t os, int64_t rows, int64_t m, int64_t n, int64_t col_tiles) {
  __shared__ float wa[kTileK][kTile + 4];
  __shared__ float xb[kTileK][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int64_t i0, c0;
  tile_origin(col_tiles, i0, c0);
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < m; k0 += kTileK) {
    int nonzero = 0;
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int r = e / kTileK, c = e % kTileK;
      const float v = (i0 + r < rows && k0 + c < m) ? w[(i0 + r) * m + k0 + c] : 0.0f;
      wa[c][r] = v;
      nonzero |= v != 0.0f;  // NaN too: NaN rows propagate
    }
    if (!__syncthreads_or(nonzero)) continue;  // the whole tile's weights are zero
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      xb[r][c] = (k0 + r < m && c0 + c < n) ? x[(k0 + r) * xs + c0 + c] : 0.0f;
    }
    __syncthreads();
    tile_fma(wa, xb, ty, tx, acc);
    __syncthreads();
  }
  store_tile(acc, out, os, i0 + ty * 4, c0 + tx * 4, rows, n);
}

}  // namespace

int field_target(uintptr_t y, int64_t ys, uintptr_t x, int64_t xs, uintptr_t out, int64_t os, uintptr_t logz,
                 uintptr_t w, uintptr_t norms, int64_t rows, int64_t m, int64_t n, uintptr_t sigma,
                 double sigma_scalar, double D, double refine_tol, int device, uintptr_t stream) {
  if (rows <= 0) return 0;
  if (m <= 0 || n <= 0) return static_cast<int>(cudaErrorInvalidValue);
  // One block per row of y and of x_ref, one per output tile: each a 1-D grid, whose
  // gridDim.x is at most 2^31 - 1 (ipfm_fast.ops.field_target rejects larger inputs first).
  constexpr int64_t kMaxBlocks = 0x7fffffff;
  const int64_t row_tiles = (rows + kTile - 1) / kTile, m_tiles = (m + kTile - 1) / kTile,
                n_tiles = (n + kTile - 1) / kTile;
  if (rows > kMaxBlocks || m > kMaxBlocks || m_tiles > kMaxBlocks / row_tiles || n_tiles > kMaxBlocks / row_tiles)
    return static_cast<int>(cudaErrorInvalidConfiguration);
  DeviceGuard guard(device);
  if (guard.error != cudaSuccess) return static_cast<int>(guard.error);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const auto* yp = reinterpret_cast<const float*>(y);
  const auto* xp = reinterpret_cast<const float*>(x);
  auto* wp = reinterpret_cast<float*>(w);
  auto* ny = reinterpret_cast<double*>(norms);
  double* nx = ny + rows;
  norms_kernel<<<static_cast<unsigned>(rows), kThreads, 0, st>>>(yp, ys, n, ny);
  norms_kernel<<<static_cast<unsigned>(m), kThreads, 0, st>>>(xp, xs, n, nx);
  screen_kernel<<<static_cast<unsigned>(row_tiles * m_tiles), kThreads, 0, st>>>(yp, ys, xp, xs, wp, rows, m, n,
                                                                                m_tiles);
  // FFMA chain over all of K per output: the error-bound chain length is n (+ slack).
  const double coef_l = (static_cast<double>(n) + 16.0) * field::kUnit;
  finalize_kernel<<<static_cast<unsigned>(rows), kThreads, 0, st>>>(
      yp, ys, xp, xs, wp, reinterpret_cast<float*>(logz), ny, nx, reinterpret_cast<const float*>(sigma), sigma_scalar,
      m, n, D, coef_l, refine_tol);
  combine_kernel<<<static_cast<unsigned>(row_tiles * n_tiles), kThreads, 0, st>>>(
      wp, xp, xs, reinterpret_cast<float*>(out), os, rows, m, n, n_tiles);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ipfm::cuda
