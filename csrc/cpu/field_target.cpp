// CPU kernel of the field target (reference-batch posterior mean); method in
// ipfm/field_math.h and ipfm_fast/ops/field_target.py.
//
// Per block of kRowBlock rows of y (one OpenMP task each):
//   1. screen:   S[i, j] = y_i . x_j in fp32 (register tile 2 x 4, K chunks of kChunk so
//                the x tile stays in L1 and the y block in L2),
//   2. finalize: per row, bounds -> candidates -> exact d2 for the candidates that need it
//                -> weights (written over S) and log Z, all in fp64,
//   3. combine:  target_i = sum_j w_ij x_j in fp32 over the nonzero weights only (a 4-row
//                tile skips j when its four weights are all exactly zero).
// Scratch: the [B, M] fp32 weight matrix (returned for the backward) and O(M) per thread.
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
#include "ipfm/registry.h"

#pragma GCC optimize("fp-contract=fast")

namespace ipfm::cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

constexpr int64_t kChunk = 512;    // K chunk of the screening dot products (elements)
constexpr int64_t kRowBlock = 32;  // rows of y per task
constexpr int64_t kPanel = 24;     // output columns per combine micro-tile (4 x 3 vectors)

#define IPFM_INLINE inline __attribute__((always_inline))

IPFM_INLINE v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
IPFM_INLINE void st8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
IPFM_INLINE float hsum8(v8f v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

// out[a * ld + b] += sum_{k0 <= k < k1} y_a[k] x_b[k]
template <int RA, int RX>
IPFM_INLINE void dot_tile(const float* const* yr, const float* const* xr, int64_t k0, int64_t k1, float* out,
                          int64_t ld) {
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
      out[a * ld + b] += s;
    }
}

__attribute__((target_clones("arch=x86-64-v3", "default")))
void screen_block(const float* y, int64_t ys, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t n,
                  float* s) {
  for (int64_t i = 0; i < rows; ++i) std::fill(s + i * m, s + (i + 1) * m, 0.0f);
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t k1 = std::min(n, k0 + kChunk);
    for (int64_t j = 0; j < m; j += 4) {
      const int64_t jn = std::min<int64_t>(4, m - j);
      const float* xr[4];
      for (int b = 0; b < 4; ++b) xr[b] = x + (j + std::min<int64_t>(b, jn - 1)) * xs;
      for (int64_t i = 0; i < rows; i += 2) {
        const int64_t in = std::min<int64_t>(2, rows - i);
        const float* yr[2] = {y + i * ys, y + (i + in - 1) * ys};
        if (in == 2 && jn == 4) {
          dot_tile<2, 4>(yr, xr, k0, k1, s + i * m + j, m);
        } else {
          for (int64_t a = 0; a < in; ++a)
            for (int64_t b = 0; b < jn; ++b) dot_tile<1, 1>(&yr[a], &xr[b], k0, k1, s + (i + a) * m + j + b, m);
        }
      }
    }
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
double finalize_row(const float* yi, double ny, const float* x, int64_t xs, const double* nx, const double* nxr,
                    int64_t m, int64_t n, double D, double sigma, double refine_tol, float* s, RowScratch& rs,
                    int64_t* refined) {
  using namespace ipfm::field;
  const RowParams p = row_params(static_cast<double>(n), D, sigma);
  if (!p.ok) {
    std::fill(s, s + m, std::numeric_limits<float>::quiet_NaN());
    return std::numeric_limits<double>::quiet_NaN();
  }
  rs.q.resize(m);
  rs.err.resize(m);
  const double nyr = std::sqrt(ny);
  const double coef = 2.0 * chain_length(n, kChunk, 8) * kUnit * nyr;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const double lane_chain = static_cast<double>((std::min(n, kChunk) + 7) / 8 + 3 + 7);
  const double coef_stat = stat_coef(n, lane_chain) * nyr;
  const double coef_store = 12.0 * kUnit * std::sqrt(static_cast<double>(chunks));  // fp32 sums of chunk results
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

// out_i = sum_j w_ij x_j for `rows` (<= kRowBlock) rows. Each 4-row tile packs the j whose
// four weights are not all zero (with the weights interleaved), then the output is swept
// in panels of kPanel columns, all tiles per panel, so the x_ref panel (nnz x kPanel
// floats) is reused from L1/L2 by every tile of the block.
__attribute__((target_clones("arch=x86-64-v3", "default")))
void combine_block(const float* w, int64_t rows, const float* x, int64_t xs, int64_t m, int64_t n, float* out,
                   int64_t os, std::vector<int32_t>& js, std::vector<float>& wt) {
  constexpr int64_t kTiles = kRowBlock / 4;
  int64_t start[kTiles + 1];
  const int64_t tiles = (rows + 3) / 4;
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
        any |= v[a] != 0.0f;  // NaN too: NaN rows propagate
      }
      if (!any) continue;
      js.push_back(static_cast<int32_t>(j));
      wt.insert(wt.end(), v, v + 4);
    }
  }
  start[tiles] = static_cast<int64_t>(js.size());
  int64_t n0 = 0;
  for (; n0 + kPanel <= n; n0 += kPanel) {
    for (int64_t t = 0; t < tiles; ++t) {
      v8f acc[4][3];
      for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = acc[a][2] = v8f{};
      for (int64_t e = start[t]; e < start[t + 1]; ++e) {
        const float* xr = x + js[e] * xs + n0;
        const v8f x0 = ld8(xr), x1 = ld8(xr + 8), x2 = ld8(xr + 16);
        const float* wv = wt.data() + 4 * e;
        for (int a = 0; a < 4; ++a) {
          const float wa = wv[a];
          const v8f b = {wa, wa, wa, wa, wa, wa, wa, wa};
          acc[a][0] += b * x0;
          acc[a][1] += b * x1;
          acc[a][2] += b * x2;
        }
      }
      const int64_t i = 4 * t, ra = std::min<int64_t>(4, rows - i);
      for (int64_t a = 0; a < ra; ++a) {
        st8(out + (i + a) * os + n0, acc[a][0]);
        st8(out + (i + a) * os + n0 + 8, acc[a][1]);
        st8(out + (i + a) * os + n0 + 16, acc[a][2]);
      }
    }
  }
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i = 4 * t, ra = std::min<int64_t>(4, rows - i);
    for (int64_t a = 0; a < ra; ++a)
      for (int64_t c = n0; c < n; ++c) {
        float acc = 0.0f;
        for (int64_t e = start[t]; e < start[t + 1]; ++e) acc += wt[4 * e + a] * x[js[e] * xs + c];
        out[(i + a) * os + c] = acc;
      }
  }
}

// y [rows, n] (row stride ys), x [m, n] (row stride xs), fp32. Writes out [rows, n],
// logz [rows], weights [rows, m] (dense). sigma: per-row fp32 pointer or 0 (then sigma_scalar).
// Returns the number of refined (exactly recomputed) entries.
int64_t field_target(uintptr_t y_ptr, int64_t ys, uintptr_t x_ptr, int64_t xs, uintptr_t out_ptr, int64_t os,
                     uintptr_t logz_ptr, uintptr_t w_ptr, int64_t rows, int64_t m, int64_t n, uintptr_t sigma_ptr,
                     double sigma_scalar, double D, double refine_tol, int threads) {
  if (rows < 0 || m <= 0 || n <= 0) throw std::invalid_argument("field_target_cpu: bad shape");
  const float* y = reinterpret_cast<const float*>(y_ptr);
  const float* x = reinterpret_cast<const float*>(x_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  float* logz = reinterpret_cast<float*>(logz_ptr);
  float* w = reinterpret_cast<float*>(w_ptr);
  const float* sigma = reinterpret_cast<const float*>(sigma_ptr);
  threads = resolve_threads(threads);
  std::vector<double> ny(rows), nx(m), nxr(m);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < m + rows; ++j) {
    if (j < m) {
      nx[j] = norm2(x + j * xs, n);
      nxr[j] = std::sqrt(nx[j]);
    }
    else ny[j - m] = norm2(y + (j - m) * ys, n);
  }
  for (int64_t j = 0; j < m; ++j)
    if (!std::isfinite(nx[j]))
      throw std::invalid_argument("field_target: x_ref must be finite (row " + std::to_string(j) +
                                  " has NaN or Inf, or overflows fp32 squared norms)");
  for (int64_t i = 0; i < rows; ++i)
    if (!std::isfinite(ny[i]))
      throw std::invalid_argument("field_target: y must be finite (row " + std::to_string(i) +
                                  " has NaN or Inf, or overflows fp32 squared norms)");
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  int64_t refined = 0;
#pragma omp parallel num_threads(threads) reduction(+ : refined)
  {
    RowScratch rs;
    std::vector<int32_t> js;
    std::vector<float> wt;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kRowBlock;
      const int64_t nr = std::min(kRowBlock, rows - i0);
      float* s = w + i0 * m;
      screen_block(y + i0 * ys, ys, nr, x, xs, m, n, s);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        const double sg = sigma ? static_cast<double>(sigma[i]) : sigma_scalar;
        const double lz = finalize_row(y + i * ys, ny[i], x, xs, nx.data(), nxr.data(), m, n, D, sg, refine_tol,
                                       s + r * m, rs,
                                             &refined);
        logz[i] = static_cast<float>(lz);
      }
      combine_block(s, nr, x, xs, m, n, out + i0 * os, os, js, wt);
    }
  }
  return refined;
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("field_target_cpu", &field_target, py::arg("y"), py::arg("y_row_stride"), py::arg("x_ref"),
        py::arg("x_row_stride"), py::arg("out"), py::arg("out_row_stride"), py::arg("logz"), py::arg("weights"),
        py::arg("rows"), py::arg("m"), py::arg("n"), py::arg("sigma"), py::arg("sigma_scalar"), py::arg("D"),
        py::arg("refine_tol"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "Field target over raw fp32 pointers (see ipfm_fast.ops.field_target); returns the number of "
        "exactly recomputed distances");
});

}  // namespace
}  // namespace ipfm::cpu
