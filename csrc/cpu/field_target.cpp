// CPU kernel of the field target (reference-batch posterior mean); method in
// ipfm/field_math.h and ipfm_fast/ops/field_target.py.
//
// Per block of rows of y (one OpenMP task each; 64 rows on the SIMD paths, 32 on the generic):
//   1. screen:   S[i, j] = y_i . x_j in fp32, K chunk by K chunk, into a per-thread [M, rows]
//                scratch (then transposed into the weight rows). The path's micro-kernel
//                (isa.h): AVX-512 / AVX2 pack the block's y chunk as [kc][2 W] panels and
//                compute 2W x NR products per micro-tile in the outer-product form (one fp32
//                chain of kc = 64 products each, the chunk sums added in a chain of N / kc);
//                generic: 2 x 4 tiles of 8-lane dots over chunks of 512.
//   2. finalize: per row, bounds -> candidates -> exact d2 for the candidates that need it
//                -> weights (written over S) and log Z, all in fp64,
//   3. combine:  target_i = sum_j w_ij x_j in fp32 over the nonzero weights only (a 4-row
//                tile skips j when its four weights are all exactly zero), in column panels
//                (96 columns on AVX-512, 24 otherwise), every tile of the block per panel.
// The error bound of step 1 uses the path's chain length (FieldTiles kc, lanes).
// Scratch: the [B, M] fp32 weight matrix (returned for the backward) and O(M) per thread
// (the [M, 64] screening block, the packed y chunk, the tiles' nonzero lists).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "ipfm/field_math.h"
#include "isa.h"
#include "ipfm/registry.h"

#pragma GCC optimize("fp-contract=fast")

namespace ipfm::cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

constexpr int64_t kRowBlock = 32;     // rows of y per task (generic path)
constexpr int64_t kSimdRowBlock = 64;  // rows of y per task (AVX2 / AVX-512: x_ref read once per 64 rows)
constexpr int64_t kPanel = 24;         // output columns per generic combine micro-tile (4 x 3 vectors)

#define IPFM_INLINE inline __attribute__((always_inline))

IPFM_INLINE v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
IPFM_INLINE void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
IPFM_INLINE float hsum8(v8f v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

// out[a * lda + b * ldb] += sum_{k0 <= k < k1} y_a[k] x_b[k]
template <int RA, int RX>
IPFM_INLINE void dot_tile(const float* const* yr, const float* const* xr, int64_t k0, int64_t k1, float* out,
                          int64_t lda, int64_t ldb) {
  v8f acc[RA][RX];
  for (int a = 0; a < RA; ++a)
    for (int b = 0; b < RX; ++b) acc[a][b] = v8f{};
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    v8f xv[RX];
    for (int b = 0; b < RX; ++b) xv[b] = ld8(xr[b] + k);
    for (int a = 0; a < RA; ++a) {
      const v8f yv = ld8(yr[a] + k);
      for (int b = 0; b < RX; ++b) acc[a][b] += yv * xv[b];
    }
  }
  for (int a = 0; a < RA; ++a)
    for (int b = 0; b < RX; ++b) {
      float s = hsum8(acc[a][b]);
      for (int64_t kk = k; kk < k1; ++kk) s += yr[a][kk] * xr[b][kk];
      out[a * lda + b * ldb] += s;
    }
}

// The generic screen of one K chunk: st[j * ldst + i] += y_i . x_j over [k0, k1) in 2 x 4
// tiles of 8-lane dots.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void screen_generic(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t k0,
                    int64_t k1, float* st, int64_t ldst) {
  for (int64_t j = 0; j < m; j += 4) {
    const int64_t jn = std::min<int64_t>(4, m - j);
    const float* xr[4];
    for (int b = 0; b < 4; ++b) xr[b] = x + (j + std::min<int64_t>(b, jn - 1)) * xs;
    for (int64_t i = 0; i < rows; i += 2) {
      const int64_t in = std::min<int64_t>(2, rows - i);
      const float* yr[2] = {y + i * ys, y + (i + in - 1) * ys};
      if (in == 2 && jn == 4) {
        dot_tile<2, 4>(yr, xr, k0, k1, st + j * ldst + i, 1, ldst);
      } else {
        for (int64_t a = 0; a < in; ++a)
          for (int64_t b = 0; b < jn; ++b)
            dot_tile<1, 1>(&yr[a], &xr[b], k0, k1, st + (j + b) * ldst + i + a, 1, ldst);
      }
    }
  }
}

// The generic combine of one tile (<= 4 rows) over columns [c0, c1): panels of kPanel
// columns (4 x 3 vectors), the last columns one by one.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void combine_generic(const float* wt, const int32_t* js, int64_t nnz, int64_t rows, const float* x, int64_t xs,
                     int64_t c0, int64_t c1, float* out, int64_t os) {
  int64_t n0 = c0;
  for (; n0 + kPanel <= c1; n0 += kPanel) {
    v8f acc[4][3];
    for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = acc[a][2] = v8f{};
    for (int64_t e = 0; e < nnz; ++e) {
      const float* xr = x + js[e] * xs + n0;
      const v8f x0 = ld8(xr), x1 = ld8(xr + 8), x2 = ld8(xr + 16);
      const float* wv = wt + 4 * e;
      for (int a = 0; a < 4; ++a) {
        const float wa = wv[a];
        const v8f b = {wa, wa, wa, wa, wa, wa, wa, wa};
        acc[a][0] += b * x0;
        acc[a][1] += b * x1;
        acc[a][2] += b * x2;
      }
    }
    for (int64_t a = 0; a < rows; ++a) {
      st8(out + a * os + n0, acc[a][0]);
      st8(out + a * os + n0 + 8, acc[a][1]);
      st8(out + a * os + n0 + 16, acc[a][2]);
    }
  }
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t c = n0; c < c1; ++c) {
      float acc = 0.0f;
      for (int64_t e = 0; e < nnz; ++e) acc += wt[4 * e + a] * x[js[e] * xs + c];
      out[a * os + c] = acc;
    }
}

// sum_k (a_k - b_k)^2 with the differences and squares in fp64: the "exact" distance of
// a refined candidate (relative error ~1e-16 * log n).
__attribute__((target_clones("arch=x86-64-v3", "default")))
double exact_d2(const float* a, const float* b, int64_t n) {
  v4d acc0{}, acc1{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const v8f av = ld8(a + k), bv = ld8(b + k);
    const v4f alo = {av[0], av[1], av[2], av[3]}, ahi = {av[4], av[5], av[6], av[7]};
    const v4f blo = {bv[0], bv[1], bv[2], bv[3]}, bhi = {bv[4], bv[5], bv[6], bv[7]};
    const v4d d0 = __builtin_convertvector(alo, v4d) - __builtin_convertvector(blo, v4d);
    const v4d d1 = __builtin_convertvector(ahi, v4d) - __builtin_convertvector(bhi, v4d);
    acc0 += d0 * d0;
    acc1 += d1 * d1;
  }
  const v4d acc = acc0 + acc1;
  double s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  for (; k < n; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(b[k]);
    s += d * d;
  }
  return s;
}

// Squared row norms in fp64 (exact products, fp64 sums).
__attribute__((target_clones("arch=x86-64-v3", "default")))
double norm2(const float* a, int64_t n) {
  v4d acc0{}, acc1{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const v8f av = ld8(a + k);
    const v4d lo = __builtin_convertvector((v4f{av[0], av[1], av[2], av[3]}), v4d);
    const v4d hi = __builtin_convertvector((v4f{av[4], av[5], av[6], av[7]}), v4d);
    acc0 += lo * lo;
    acc1 += hi * hi;
  }
  const v4d acc = acc0 + acc1;
  double s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  for (; k < n; ++k) s += static_cast<double>(a[k]) * a[k];
  return s;
}

// exp(x) for x in [-87, 0] (Cephes expf: 2^n times a degree-6 polynomial, ~1 ulp), branch-free.
IPFM_INLINE float vexp(float x) {
  x = std::max(x, -87.0f);
  const float fx = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - fx * 0.693359375f) + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  return y * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(fx) + 127) << 23);
}

// s[j] = exp(s_j - s_ref) for the live entries (q[j] finite), 0 for the dropped ones; returns
// the sum in fp64. The offset q - q_ref and its ratio are exact-ish in fp64; log1p and exp
// run in fp32 (relative error a few ulp of the logit gap, i.e. <= 1e-5 at the 40 cutoff,
// ~1e-7 for the weights that matter), vectorized.
__attribute__((target_clones("arch=x86-64-v3", "default")))
double exp_weights(const double* q, int64_t m, double q_ref, bool finite, double k, double inv_2s2, float* s) {
  double z = 0.0;
  if (finite) {
    const float kf = static_cast<float>(k);
    const double inv_ref = 1.0 / q_ref;
    for (int64_t j = 0; j < m; ++j) {
      const double diff = q[j] - q_ref;
      const bool live = diff < 1.0e300;
      const float v = static_cast<float>(live ? diff * inv_ref : 0.0);
      const float w = 1.0f + v;
      const float l1p = w == 1.0f ? v : vlog(w) * (v / (w == 1.0f ? 1.0f : w - 1.0f));
      const float e = live ? vexp(-kf * l1p) : 0.0f;
      s[j] = e;
      z += e;
    }
  } else {
    for (int64_t j = 0; j < m; ++j) {
      const double diff = q[j] - q_ref;
      const bool live = diff < 1.0e300;
      const float e = live ? vexp(static_cast<float>(-diff * inv_2s2)) : 0.0f;
      s[j] = e;
      z += e;
    }
  }
  return z;
}

struct RowScratch {
  std::vector<double> q, err;
};

// Turns row i's dot products s[0..m) into weights (in place) and returns log Z.
// Returns the number of refined entries through *refined.
// Accumulation-chain lengths of the screening dots of a path (see ipfm/field_math.h): the
// worst-case chain L of the bound E and the chain of the statistical estimate E'.
struct Chains {
  double bound;    // chain_length: kc / lanes + 4 + chunks + lanes
  double stat;     // (min(n, kc) + lanes - 1) / lanes + 3 + lanes - 1
  int64_t chunks;  // K chunks (their fp32 sums are the coef_store term)
};

Chains chains_of(const FieldTiles& t, int64_t n) {
  const int64_t kc = t.kc, lanes = t.lanes;
  return Chains{ipfm::field::chain_length(n, kc, lanes),
                static_cast<double>((std::min(n, kc) + lanes - 1) / lanes + 3 + lanes - 1), (n + kc - 1) / kc};
}

double finalize_row(const float* yi, double ny, const float* x, int64_t xs, const double* nx, const double* nxr,
                    int64_t m, int64_t n, double D, double sigma, double refine_tol, const Chains& ch, float* s,
                    RowScratch& rs, int64_t* refined) {
  using namespace ipfm::field;
  const RowParams p = row_params(static_cast<double>(n), D, sigma);
  if (!p.ok) {
    std::fill(s, s + m, std::numeric_limits<float>::quiet_NaN());
    return std::numeric_limits<double>::quiet_NaN();
  }
  rs.q.resize(m);
  rs.err.resize(m);
  const double nyr = std::sqrt(ny);
  const double coef = 2.0 * ch.bound * kUnit * nyr;
  const double coef_stat = stat_coef(n, ch.stat) * nyr;
  const double coef_store = 12.0 * kUnit * std::sqrt(static_cast<double>(ch.chunks));  // fp32 sums of chunk results
  double best_hi = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < m; ++j) {
    const double d = ny + nx[j] - 2.0 * static_cast<double>(s[j]);
    const double err = coef * nxr[j];
    rs.q[j] = d;
    rs.err[j] = err;
    best_hi = std::min(best_hi, q_of(p, d + err));
  }
  const double cut = q_cut(p, best_hi);
  double q_ref = std::numeric_limits<double>::infinity();
  int64_t count = 0;
  for (int64_t j = 0; j < m; ++j) {
    const double d = rs.q[j], err = rs.err[j];
    const double q_lo = q_of(p, std::max(d - err, 0.0));
    if (!(q_lo <= cut)) {
      rs.q[j] = std::numeric_limits<double>::infinity();
      continue;
    }
    double q;
    const double err_stat = std::min(err, coef_stat * nxr[j] + coef_store * std::fabs(s[j]));
    if (logit_err(p, q_lo, err_stat) > refine_tol) {
      q = q_of(p, exact_d2(yi, x + j * xs, n));
      ++count;
    } else {
      q = q_of(p, std::max(d, 0.0));
    }
    rs.q[j] = q;
    q_ref = std::min(q_ref, q);
  }
  *refined += count;
  const double z = exp_weights(rs.q.data(), m, q_ref, p.finite, p.k, p.inv_2s2, s);
  const float inv_z = static_cast<float>(1.0 / z);
  for (int64_t j = 0; j < m; ++j) s[j] *= inv_z;
  return ref_logit(p, q_ref) + std::log(z);
}

// The nonzero lists of a block's 4-row tiles: for tile t, entries start[t] .. start[t + 1] of
// js (the j whose four weights are not all zero: NaN too, so NaN rows propagate) and wt (the
// four weights of each, interleaved). Returns the number of tiles.
int64_t pack_tiles(const float* w, int64_t rows, int64_t m, std::vector<int64_t>& start, std::vector<int32_t>& js,
                   std::vector<float>& wt) {
  const int64_t tiles = (rows + 3) / 4;
  start.assign(tiles + 1, 0);
  js.clear();
  wt.clear();
  for (int64_t t = 0; t < tiles; ++t) {
    start[t] = static_cast<int64_t>(js.size());
    const int64_t i = 4 * t, ra = std::min<int64_t>(4, rows - i);
    for (int64_t j = 0; j < m; ++j) {
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      bool any = false;
      for (int64_t a = 0; a < ra; ++a) {
        v[a] = w[(i + a) * m + j];
        any |= v[a] != 0.0f;
      }
      if (!any) continue;
      js.push_back(static_cast<int32_t>(j));
      wt.insert(wt.end(), v, v + 4);
    }
  }
  start[tiles] = static_cast<int64_t>(js.size());
  return tiles;
}

// Per-thread scratch of one row block.
struct BlockScratch {
  std::vector<float> st, ypack, wt;
  std::vector<int32_t> js;
  std::vector<int64_t> start;
  RowScratch rs;
};

// Steps 1-3 (file comment) for rows i0 .. i0 + nr of y. Returns the refined count.
int64_t field_block(const SimdKernels& K, const float* y, int64_t ys, const float* x, int64_t xs, float* out,
                    int64_t os, float* logz, float* w, int64_t i0, int64_t nr, int64_t m, int64_t n,
                    const float* sigma, double sigma_scalar, double D, double refine_tol, const double* ny,
                    const double* nx, const double* nxr, const Chains& ch, BlockScratch& sc) {
  const FieldTiles& t = K.tiles;
  const int64_t mr = t.screen_mr;
  const int64_t ldst = (nr + mr - 1) / mr * mr;
  sc.st.assign(static_cast<size_t>(m * ldst), 0.0f);
  sc.ypack.resize(static_cast<size_t>(ldst * std::min<int64_t>(t.kc, n)));
  const float* yb = y + i0 * ys;
  for (int64_t k0 = 0; k0 < n; k0 += t.kc)
    K.screen(yb, ys, nr, x, xs, m, k0, std::min<int64_t>(n, k0 + t.kc), sc.st.data(), ldst, sc.ypack.data());
  float* s = w + i0 * m;
  for (int64_t j = 0; j < m; ++j)  // [M, rows] -> the rows of the weight matrix
    for (int64_t r = 0; r < nr; ++r) s[r * m + j] = sc.st[j * ldst + r];
  int64_t refined = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = i0 + r;
    const double sg = sigma ? static_cast<double>(sigma[i]) : sigma_scalar;
    logz[i] = static_cast<float>(finalize_row(y + i * ys, ny[i], x, xs, nx, nxr, m, n, D, sg, refine_tol, ch,
                                              s + r * m, sc.rs, &refined));
  }
  const int64_t tiles = pack_tiles(s, nr, m, sc.start, sc.js, sc.wt);
  const int64_t panel = t.combine_nr;
  for (int64_t c0 = 0; c0 < n; c0 += panel) {  // the x_ref panel (nnz x panel) is reused by every tile
    const int64_t c1 = std::min(n, c0 + panel);
    for (int64_t tt = 0; tt < tiles; ++tt) {
      const int64_t e0 = sc.start[tt], i = 4 * tt;
      K.combine(sc.wt.data() + 4 * e0, sc.js.data() + e0, sc.start[tt + 1] - e0, std::min<int64_t>(4, nr - i), x, xs,
                c0, c1, out + (i0 + i) * os, os);
    }
  }
  return refined;
}

// y [rows, n] (row stride ys), x [m, n] (row stride xs), fp32. Writes out [rows, n],
// logz [rows], weights [rows, m] (dense). sigma: per-row fp32 pointer or 0 (then sigma_scalar).
// Returns the number of refined (exactly recomputed) entries.
int64_t field_target(uintptr_t y_ptr, int64_t ys, uintptr_t x_ptr, int64_t xs, uintptr_t out_ptr, int64_t os,
                     uintptr_t logz_ptr, uintptr_t w_ptr, int64_t rows, int64_t m, int64_t n, uintptr_t sigma_ptr,
                     double sigma_scalar, double D, double refine_tol, int threads) {
  if (rows < 0 || m <= 0 || n <= 0) throw std::invalid_argument("field_target_cpu: bad shape");
  if (m >= (int64_t{1} << 31)) throw std::invalid_argument("field_target_cpu: more than 2^31 reference rows");
  const float* y = reinterpret_cast<const float*>(y_ptr);
  const float* x = reinterpret_cast<const float*>(x_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  float* logz = reinterpret_cast<float*>(logz_ptr);
  float* w = reinterpret_cast<float*>(w_ptr);
  const float* sigma = reinterpret_cast<const float*>(sigma_ptr);
  threads = resolve_threads(threads);
  const SimdKernels& K = simd();
  const Chains ch = chains_of(K.tiles, n);
  std::vector<double> ny(rows), nx(m), nxr(m);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < m + rows; ++j) {
    if (j < m) {
      nx[j] = norm2(x + j * xs, n);
      nxr[j] = std::sqrt(nx[j]);
    } else {
      ny[j - m] = norm2(y + (j - m) * ys, n);
    }
  }
  for (int64_t j = 0; j < m; ++j)
    if (!std::isfinite(nx[j]))
      throw std::invalid_argument("field_target: x_ref must be finite (row " + std::to_string(j) +
                                  " has NaN or Inf, or overflows fp32 squared norms)");
  for (int64_t i = 0; i < rows; ++i)
    if (!std::isfinite(ny[i]))
      throw std::invalid_argument("field_target: y must be finite (row " + std::to_string(i) +
                                  " has NaN or Inf, or overflows fp32 squared norms)");
  const int64_t block = K.isa == Isa::kGeneric ? kRowBlock : kSimdRowBlock;
  const int64_t blocks = (rows + block - 1) / block;
  int64_t refined = 0;
#pragma omp parallel num_threads(std::min<int64_t>(threads, std::max<int64_t>(blocks, 1))) reduction(+ : refined)
  {
    BlockScratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * block;
      refined += field_block(K, y, ys, x, xs, out, os, logz, w, i0, std::min(block, rows - i0), m, n, sigma,
                             sigma_scalar, D, refine_tol, ny.data(), nx.data(), nxr.data(), ch, sc);
    }
  }
  return refined;
}

// Benchmarks: the screening and combining steps alone over all rows (every weight nonzero
// for the combine), so they can be timed against torch.mm on the same shapes:
// which = 0: s [rows, m] = y x^T (the screen); which = 1: out [rows, n] = w x (the combine).
void field_gemm(int which, uintptr_t a_ptr, int64_t as, uintptr_t x_ptr, int64_t xs, uintptr_t out_ptr, int64_t os,
                int64_t rows, int64_t m, int64_t n, int threads) {
  const SimdKernels& K = simd();
  const FieldTiles& t = K.tiles;
  const float* a = reinterpret_cast<const float*>(a_ptr);
  const float* x = reinterpret_cast<const float*>(x_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  const int64_t block = K.isa == Isa::kGeneric ? kRowBlock : kSimdRowBlock;
  const int64_t blocks = (rows + block - 1) / block;
  threads = resolve_threads(threads);
#pragma omp parallel num_threads(std::min<int64_t>(threads, std::max<int64_t>(blocks, 1)))
  {
    BlockScratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * block, nr = std::min(block, rows - i0);
      if (which == 0) {
        const int64_t ldst = (nr + t.screen_mr - 1) / t.screen_mr * t.screen_mr;
        sc.st.assign(static_cast<size_t>(m * ldst), 0.0f);
        sc.ypack.resize(static_cast<size_t>(ldst * std::min<int64_t>(t.kc, n)));
        for (int64_t k0 = 0; k0 < n; k0 += t.kc)
          K.screen(a + i0 * as, as, nr, x, xs, m, k0, std::min<int64_t>(n, k0 + t.kc), sc.st.data(), ldst,
                   sc.ypack.data());
        for (int64_t j = 0; j < m; ++j)
          for (int64_t r = 0; r < nr; ++r) out[(i0 + r) * os + j] = sc.st[j * ldst + r];
      } else {
        // a: [rows, m] weights with row stride as, packed like field_block's nonzero lists
        std::vector<float> wdense(static_cast<size_t>(nr * m));
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t j = 0; j < m; ++j) wdense[r * m + j] = a[(i0 + r) * as + j];
        const int64_t tiles = pack_tiles(wdense.data(), nr, m, sc.start, sc.js, sc.wt);
        for (int64_t c0 = 0; c0 < n; c0 += t.combine_nr)
          for (int64_t tt = 0; tt < tiles; ++tt) {
            const int64_t e0 = sc.start[tt], i = 4 * tt;
            K.combine(sc.wt.data() + 4 * e0, sc.js.data() + e0, sc.start[tt + 1] - e0, std::min<int64_t>(4, nr - i),
                      x, xs, c0, std::min(n, c0 + t.combine_nr), out + (i0 + i) * os, os);
          }
      }
    }
  }
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("field_target_cpu", &field_target, py::arg("y"), py::arg("y_row_stride"), py::arg("x_ref"),
        py::arg("x_row_stride"), py::arg("out"), py::arg("out_row_stride"), py::arg("logz"), py::arg("weights"),
        py::arg("rows"), py::arg("m"), py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("D"),
        py::arg("refine_tol"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "Field target over raw fp32 pointers (see ipfm_fast.ops.field_target); returns the number of "
        "exactly recomputed distances");
  m.def("field_gemm_cpu", &field_gemm, py::arg("which"), py::arg("a"), py::arg("a_row_stride"), py::arg("x_ref"),
        py::arg("x_row_stride"), py::arg("out"), py::arg("out_row_stride"), py::arg("rows"), py::arg("m"),
        py::arg("n"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "benchmarks: the field target's screening (which=0: out = a x^T) or combining (which=1: out = a x) "
        "step alone, with the path's micro-kernels");
  m.def("field_tiles", []() {
    const FieldTiles& t = simd().tiles;
    return py::make_tuple(t.screen_mr, t.screen_nr, t.combine_nr, t.kc, t.lanes);
  }, "(screen_mr, screen_nr, combine_nr, kc, lanes) of the CPU path in use");
});

}  // namespace

namespace generic {
void screen(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t k0, int64_t k1,
            float* st, int64_t ldst, float* /*ypack*/) {
  screen_generic(y, ys, rows, x, xs, m, k0, k1, st, ldst);
}
void combine(const float* wt, const int32_t* js, int64_t nnz, int64_t rows, const float* x, int64_t xs, int64_t c0,
             int64_t c1, float* out, int64_t os) {
  combine_generic(wt, js, nnz, rows, x, xs, c0, c1, out, os);
}
}  // namespace generic

}  // namespace ipfm::cpu
