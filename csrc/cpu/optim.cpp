// The training loops' per-step passes over a network's parameters and gradients
// (ipfm_fast.train.flat), each one bandwidth-bound pass where the torch forms make several.
//
// ema_step: the skip-aware EMA, ema += (src - ema) * w, over two flat float32 buffers, with
// w = (!skip) * weight when a skip flag is given. Each operation rounds to float32 as torch's
// ops (sub, mul_, add_; the flag's float times the weight) round it, so a run's parameters are
// bitwise those of the torch form, which makes three passes, a temporary and two small ops.
//
// grad_norm: the 2-norm of a list of float32 tensors in one parallel pass (torch's foreach
// norm on CPU is one kernel launch per tensor). Squares are summed in double, per chunk of
// CHUNK elements in LANES independent accumulators; the chunk sums are added in a fixed
// order, so the result does not depend on the number of threads. Optionally it also decides
// whether the update is skipped (a non-finite loss or norm, or every row masked): the five
// small torch ops of that decision cost more than the pass itself in the training step.
//
// adam_beta1_zero: Adam with beta1 = 0 (the distillation's optimizer) computing exactly what
// torch's CPU fused Adam (torch._fused_adam_, float32) computes, in fewer bytes: with beta1 = 0
// the first moment is the gradient (fma(0, g - m, g): the old m matters only for the sign of
// a zero), so m is read only for the vectors that hold a zero or huge gradient and written
// with non-temporal stores (no read for ownership); optionally the EMA of the updated
// parameters in the same pass. torch's kernel rounds its last numel % 8 elements of each
// tensor with other formulas (a scalar tail); this one follows both, element for element
// (ipfm_fast.train.flat checks the two against each other at run time before using this one).
#pragma GCC optimize("fp-contract=off")  // no fused multiply-add but the written ones: each rounding as torch's

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "cpu_common.h"
#include "ipfm/registry.h"
#include "isa.h"

namespace ipfm::cpu {
namespace {

void ema_step(uintptr_t ema_ptr, uintptr_t src_ptr, int64_t n, uintptr_t weight_ptr, double weight,
              uintptr_t skip_ptr, int threads) {
  float* __restrict ema = reinterpret_cast<float*>(ema_ptr);
  const float* __restrict src = reinterpret_cast<const float*>(src_ptr);
  // a 0-dim tensor (decided on the device) or a number (rounded to float32 as torch rounds a scalar operand)
  float w = weight_ptr ? *reinterpret_cast<const float*>(weight_ptr) : static_cast<float>(weight);
  if (skip_ptr) w = (*reinterpret_cast<const bool*>(skip_ptr) ? 0.0f : 1.0f) * w;  // (~skip).float() * w
  const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const float delta = (src[i] - ema[i]) * w;
    ema[i] = ema[i] + delta;
  }
}

constexpr int64_t CHUNK = 16384;
constexpr int LANES = 32;  // independent sums: four AVX-512 vectors of doubles, no add waiting on the last

// The lanes are fixed by the source, not by the vector width, so every clone (and the
// baseline build) sums in the same order and returns the same bits.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double sum_squares(const float* x, int64_t n) {
  double acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  for (int k = 0; i < n; ++i, ++k) acc[k] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  return acc[0];
}

// The update's skip decision, as distill._finish_update's torch ops make it:
// bad = !(isfinite(loss) && isfinite(norm)) || masked_rows >= rows (rows < 0: no mask).
struct SkipInputs {
  uintptr_t loss = 0;    // float32 0-dim; 0: no decision
  uintptr_t masked = 0;  // int64 0-dim masked-row count, or 0
  int64_t rows = -1;
  uintptr_t bad = 0;        // bool 0-dim out
  uintptr_t found_inf = 0;  // float32 0-dim out: bad as 1.0 / 0.0 (the fused Adam's skip flag)
};

void grad_norm(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels, uintptr_t out, int threads,
               const SkipInputs& skip) {
  if (ptrs.size() != numels.size()) throw std::invalid_argument("grad_norm_cpu: one numel per pointer");
  struct Chunk {
    const float* x;
    int64_t n;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < ptrs.size(); ++t) {
    const float* x = reinterpret_cast<const float*>(ptrs[t]);
    for (int64_t s = 0; s < numels[t]; s += CHUNK) chunks.push_back({x + s, numels[t] - s < CHUNK ? numels[t] - s : CHUNK});
    total += numels[t];
  }
  std::vector<double> partial(chunks.size());
  const int nt = threads_for(total, threads);
  const int64_t count = static_cast<int64_t>(chunks.size());
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < count; ++c) partial[c] = sum_squares(chunks[c].x, chunks[c].n);
  double sum = 0.0;
  for (double p : partial) sum += p;
  const float norm = static_cast<float>(std::sqrt(sum));
  *reinterpret_cast<float*>(out) = norm;
  if (skip.loss) {
    bool bad = !(std::isfinite(*reinterpret_cast<const float*>(skip.loss)) && std::isfinite(norm));
    if (skip.masked) bad = bad || *reinterpret_cast<const int64_t*>(skip.masked) >= skip.rows;
    *reinterpret_cast<bool*>(skip.bad) = bad;
    *reinterpret_cast<float*>(skip.found_inf) = bad ? 1.0f : 0.0f;
  }
}


// ---------------------------------------------------------------------------------------
// Adam, beta1 = 0
// ---------------------------------------------------------------------------------------

struct AdamCoef {
  float lr, b2, c2, bc2s, eps;  // lr / (1 - 0^t) = lr, beta2, 1 - beta2, sqrt(1 - beta2^t), eps: float32 as torch casts them
  float ema_w;                  // the EMA weight (0 when the update is skipped)
};

// A gradient whose first moment needs the old one: a zero (the sign of the result depends on
// it) or one so large that g - m could overflow (then 0 * (g - m) is not a zero). Larger
// moments are tracked (big_m) so that the next step reads them too.
constexpr float kBigGrad = 8.5e37f;  // < FLT_MAX / 2 + margin: |g - m| stays finite below it

// torch's vector body: exp_avg = fma(w - 1, g - m, g) with w = 1 - beta1 = 1 (its lerp),
// exp_avg_sq = fma(c2 g, g, v b2), p -= (lr m) / (sqrt(v) / bc2s + eps)
inline void body_element(float* p, const float* g, float* m, float* v, float* ema, int64_t i, const AdamCoef& c) {
  const float gi = g[i];
  const float mi = std::fma(0.0f, gi - m[i], gi);
  const float vi = std::fma(c.c2 * gi, gi, v[i] * c.b2);
  const float den = std::sqrt(vi) / c.bc2s + c.eps;
  const float pi = p[i] - (c.lr * mi) / den;
  p[i] = pi, m[i] = mi, v[i] = vi;
  if (ema) ema[i] = ema[i] + (pi - ema[i]) * c.ema_w;
}

// torch's scalar tail: exp_avg = g - (g - m) * (1 - w) (its scalar lerp), exp_avg_sq =
// fma(v, b2, (c2 g) g), the same parameter update
inline void tail_element(float* p, const float* g, float* m, float* v, float* ema, int64_t i, const AdamCoef& c) {
  const float gi = g[i];
  const float mi = gi - (gi - m[i]) * 0.0f;
  const float vi = std::fma(v[i], c.b2, (c.c2 * gi) * gi);
  const float den = std::sqrt(vi) / c.bc2s + c.eps;
  const float pi = p[i] - (c.lr * mi) / den;
  p[i] = pi, m[i] = mi, v[i] = vi;
  if (ema) ema[i] = ema[i] + (pi - ema[i]) * c.ema_w;
}

// Elements [i0, i1) of a tensor's body, 16 at a time (i0, i1 multiples of 16; m 64-byte
// aligned); returns whether a huge moment was written.
__attribute__((target("avx512f,avx512dq,fma"))) bool body_avx512(float* p, const float* g, float* m, float* v,
                                                                 float* ema, int64_t i0, int64_t i1,
                                                                 const AdamCoef& c, bool read_m) {
  const __m512 lr = _mm512_set1_ps(c.lr), b2 = _mm512_set1_ps(c.b2), c2 = _mm512_set1_ps(c.c2);
  const __m512 bc2s = _mm512_set1_ps(c.bc2s), eps = _mm512_set1_ps(c.eps), w = _mm512_set1_ps(c.ema_w);
  const __m512 zero = _mm512_setzero_ps(), big = _mm512_set1_ps(kBigGrad);
  __mmask16 huge = 0;
  for (int64_t i = i0; i < i1; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __mmask16 h = _mm512_cmp_ps_mask(_mm512_abs_ps(gv), big, _CMP_NLE_UQ);  // huge or NaN
    const __mmask16 need = read_m ? __mmask16(0xFFFF) : __mmask16(_mm512_cmp_ps_mask(gv, zero, _CMP_EQ_OQ) | h);
    huge |= h;
    __m512 mv = gv;
    if (need) mv = _mm512_mask_mov_ps(gv, need, _mm512_fmadd_ps(zero, _mm512_sub_ps(gv, _mm512_load_ps(m + i)), gv));
    const __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(c2, gv), gv, _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
    const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2s), eps);
    const __m512 pv = _mm512_sub_ps(_mm512_loadu_ps(p + i), _mm512_div_ps(_mm512_mul_ps(lr, mv), den));
    _mm512_storeu_ps(p + i, pv);
    _mm512_storeu_ps(v + i, vv);
    _mm512_stream_ps(m + i, mv);
    if (ema) {
      const __m512 e = _mm512_loadu_ps(ema + i);
      _mm512_storeu_ps(ema + i, _mm512_add_ps(e, _mm512_mul_ps(_mm512_sub_ps(pv, e), w)));
    }
  }
  return huge != 0;
}

// The same 8 at a time (i0, i1 multiples of 8; m 32-byte aligned).
__attribute__((target("avx2,fma"))) bool body_avx2(float* p, const float* g, float* m, float* v, float* ema,
                                                   int64_t i0, int64_t i1, const AdamCoef& c, bool read_m) {
  const __m256 lr = _mm256_set1_ps(c.lr), b2 = _mm256_set1_ps(c.b2), c2 = _mm256_set1_ps(c.c2);
  const __m256 bc2s = _mm256_set1_ps(c.bc2s), eps = _mm256_set1_ps(c.eps), w = _mm256_set1_ps(c.ema_w);
  const __m256 zero = _mm256_setzero_ps(), big = _mm256_set1_ps(kBigGrad);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int huge = 0;
  for (int64_t i = i0; i < i1; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 h = _mm256_cmp_ps(_mm256_and_ps(gv, abs_mask), big, _CMP_NLE_UQ);
    const __m256 need = read_m ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                               : _mm256_or_ps(_mm256_cmp_ps(gv, zero, _CMP_EQ_OQ), h);
    huge |= _mm256_movemask_ps(h);
    __m256 mv = gv;
    if (_mm256_movemask_ps(need))
      mv = _mm256_blendv_ps(gv, _mm256_fmadd_ps(zero, _mm256_sub_ps(gv, _mm256_load_ps(m + i)), gv), need);
    const __m256 vv = _mm256_fmadd_ps(_mm256_mul_ps(c2, gv), gv, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2s), eps);
    const __m256 pv = _mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_div_ps(_mm256_mul_ps(lr, mv), den));
    _mm256_storeu_ps(p + i, pv);
    _mm256_storeu_ps(v + i, vv);
    _mm256_stream_ps(m + i, mv);
    if (ema) {
      const __m256 e = _mm256_loadu_ps(ema + i);
      _mm256_storeu_ps(ema + i, _mm256_add_ps(e, _mm256_mul_ps(_mm256_sub_ps(pv, e), w)));
    }
  }
  return huge != 0;
}

constexpr int64_t kAdamPiece = 16384;  // elements per work item (a multiple of 16)

// One step over the tensors of a flat layout: p, m, v (and ema) are flat buffers, each
// tensor at offsets[t] with numels[t] elements; grads[t] its gradient. found_inf[0] == 1
// skips the update (the EMA still runs, with weight 0, as the unfused loop runs it); else
// steps[0] += 1 first (torch.optim.Adam's t). big_m[0]: a huge moment was written (the next
// step reads every moment). isa: 2 AVX-512, 1 AVX2, 0 scalar.
void adam_beta1_zero(const std::vector<uintptr_t>& grads, const std::vector<int64_t>& offsets,
                     const std::vector<int64_t>& numels, uintptr_t p_ptr, uintptr_t m_ptr, uintptr_t v_ptr,
                     uintptr_t ema_ptr, uintptr_t ema_weight_ptr, double ema_weight, uintptr_t found_inf_ptr,
                     uintptr_t steps_ptr, uintptr_t big_m_ptr, double lr, double beta2, double eps, int isa,
                     int threads) {
  if (grads.size() != offsets.size() || grads.size() != numels.size())
    throw std::invalid_argument("adam_beta1_zero_cpu: one offset and numel per gradient");
  float* p = reinterpret_cast<float*>(p_ptr);
  float* m = reinterpret_cast<float*>(m_ptr);
  float* v = reinterpret_cast<float*>(v_ptr);
  float* ema = reinterpret_cast<float*>(ema_ptr);
  const bool skip = found_inf_ptr && *reinterpret_cast<const float*>(found_inf_ptr) == 1.0f;
  float w = ema_weight_ptr ? *reinterpret_cast<const float*>(ema_weight_ptr) : static_cast<float>(ema_weight);
  w = (skip ? 0.0f : 1.0f) * w;  // as the unfused EMA: (~skip).float() * weight
  if (skip) {  // no update: the EMA pass alone, as ema_step
    if (ema) {
      for (size_t t = 0; t < grads.size(); ++t)
        for (int64_t i = offsets[t]; i < offsets[t] + numels[t]; ++i) ema[i] = ema[i] + (p[i] - ema[i]) * w;
    }
    return;
  }
  float* steps = reinterpret_cast<float*>(steps_ptr);
  *steps += 1.0f;
  const double step = *steps;
  // torch's: step_size = lr / (1 - beta1^t) = lr; bias_correction2_sqrt = sqrt(1 - beta2^t), in double, then float
  const AdamCoef c{static_cast<float>(lr), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                   static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step))), static_cast<float>(eps), w};
  bool* big_m = reinterpret_cast<bool*>(big_m_ptr);
  const bool read_m = *big_m;
  struct Piece {
    int64_t t, i0, i1;
  };
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    for (int64_t s = 0; s < numels[t]; s += kAdamPiece)
      pieces.push_back({static_cast<int64_t>(t), s, std::min(numels[t], s + kAdamPiece)});
    total += numels[t];
  }
  const int width = isa == 2 ? 16 : isa == 1 ? 8 : 0;
  bool huge = false;
  const int nt = threads_for(total, threads);
  const int64_t count = static_cast<int64_t>(pieces.size());
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|| : huge) if (nt > 1)
  for (int64_t k = 0; k < count; ++k) {
    const Piece& pc = pieces[k];
    const int64_t off = offsets[pc.t], n = numels[pc.t];
    float* pt = p + off;
    float* mt = m + off;
    float* vt = v + off;
    float* et = ema ? ema + off : nullptr;
    const float* gt = reinterpret_cast<const float*>(grads[pc.t]);
    const int64_t n8 = n - n % 8;  // torch's vector body; the rest is its scalar tail
    int64_t i = pc.i0;
    if (width && reinterpret_cast<uintptr_t>(mt) % (4 * width) == 0) {
      const int64_t vend = std::min(pc.i1, n8 - n8 % width);
      if (vend > i) {
        huge = (width == 16 ? body_avx512(pt, gt, mt, vt, et, i, vend, c, read_m)
                            : body_avx2(pt, gt, mt, vt, et, i, vend, c, read_m)) || huge;
        i = vend;
      }
    }
    for (; i < std::min(pc.i1, n8); ++i) {
      huge = huge || !(std::fabs(gt[i]) <= kBigGrad);
      body_element(pt, gt, mt, vt, et, i, c);
    }
    for (; i < pc.i1; ++i) {
      huge = huge || !(std::fabs(gt[i]) <= kBigGrad);
      tail_element(pt, gt, mt, vt, et, i, c);
    }
    if (width) _mm_sfence();  // the non-temporal stores are seen before anything reads m
  }
  *big_m = huge;
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("ema_step_cpu", &ema_step, py::arg("ema"), py::arg("src"), py::arg("n"), py::arg("weight_ptr"),
        py::arg("weight"), py::arg("skip"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "ema += (src - ema) * w over n float32 values, w = weight_ptr[0] (or weight if weight_ptr is 0), times "
        "!skip[0] if skip is not 0, rounded as separate float32 ops");
  m.def(
      "grad_norm_cpu",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels, uintptr_t out, int threads,
         uintptr_t loss, uintptr_t masked, int64_t rows, uintptr_t bad, uintptr_t found_inf) {
        grad_norm(ptrs, numels, out, threads, SkipInputs{loss, masked, rows, bad, found_inf});
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("out"), py::arg("threads"), py::arg("loss") = 0,
      py::arg("masked") = 0, py::arg("rows") = -1, py::arg("bad") = 0, py::arg("found_inf") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "out[0] = the 2-norm of the float32 tensors at ptrs (numels elements each), summed in double; with a loss "
      "pointer also bad[0] = !(isfinite(loss[0]) && isfinite(norm)) || masked[0] >= rows, found_inf[0] = bad");
  m.def("adam_beta1_zero_cpu", &adam_beta1_zero, py::arg("grads"), py::arg("offsets"), py::arg("numels"), py::arg("p"),
        py::arg("m"), py::arg("v"), py::arg("ema"), py::arg("ema_weight_ptr"), py::arg("ema_weight"),
        py::arg("found_inf"), py::arg("steps"), py::arg("big_m"), py::arg("lr"), py::arg("beta2"), py::arg("eps"),
        py::arg("isa"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "One Adam step with beta1 = 0 over a flat layout, the rounding of torch's CPU fused Adam, optionally the EMA "
        "of the updated parameters in the same pass (see csrc/cpu/optim.cpp)");
  m.def("adam_isa_cpu", []() { return static_cast<int>(simd().isa); },
        "the instruction-set path adam_beta1_zero_cpu should take: 2 AVX-512, 1 AVX2, 0 scalar");
});

}  // namespace
}  // namespace ipfm::cpu
