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

#include <immintrin.h>  // _mm_sfence

#include <cmath>
#include <cstdint>
#include <vector>

#include <pybind11/stl.h>

#include "cpu_common.h"
#include "ipfm/registry.h"
#include "isa.h"

namespace ipfm::cpu {
namespace {

// One EMA element, each operation rounded to float32: (src - ema) * w, then the sum.
inline float ema_toward(float ema, float src, float w) {
  const float delta = (src - ema) * w;
  return ema + delta;
}

void ema_step(uintptr_t ema_ptr, uintptr_t src_ptr, int64_t n, uintptr_t weight_ptr, double weight,
              uintptr_t skip_ptr, int threads) {
  float* __restrict ema = reinterpret_cast<float*>(ema_ptr);
  const float* __restrict src = reinterpret_cast<const float*>(src_ptr);
  // a 0-dim tensor (decided on the device) or a number (rounded to float32 as torch rounds a scalar operand)
  float w = weight_ptr ? *reinterpret_cast<const float*>(weight_ptr) : static_cast<float>(weight);
  if (skip_ptr) w = (*reinterpret_cast<const bool*>(skip_ptr) ? 0.0f : 1.0f) * w;  // (~skip).float() * w
  const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) ema[i] = ema_toward(ema[i], src[i], w);
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

// The parameter update from the new moments, p -= (lr m) / (sqrt(v) / bc2s + eps) (body and
// tail alike), and the EMA towards it.
inline void update_element(float* p, float* m, float* v, float* ema, int64_t i, float mi, float vi,
                           const AdamCoef& c) {
  const float pi = p[i] - (c.lr * mi) / (std::sqrt(vi) / c.bc2s + c.eps);
  p[i] = pi, m[i] = mi, v[i] = vi;
  if (ema) ema[i] = ema_toward(ema[i], pi, c.ema_w);
}

// torch's vector body: exp_avg = fma(w - 1, g - m, g) with w = 1 - beta1 = 1 (its lerp),
// exp_avg_sq = fma(c2 g, g, v b2)
inline void body_element(float* p, const float* g, float* m, float* v, float* ema, int64_t i, const AdamCoef& c) {
  const float gi = g[i];
  update_element(p, m, v, ema, i, std::fma(0.0f, gi - m[i], gi), std::fma(c.c2 * gi, gi, v[i] * c.b2), c);
}

// torch's scalar tail: exp_avg = g - (g - m) * (1 - w) (its scalar lerp), exp_avg_sq = fma(v, b2, (c2 g) g)
inline void tail_element(float* p, const float* g, float* m, float* v, float* ema, int64_t i, const AdamCoef& c) {
  const float gi = g[i];
  update_element(p, m, v, ema, i, gi - (gi - m[i]) * 0.0f, std::fma(v[i], c.b2, (c.c2 * gi) * gi), c);
}

constexpr int64_t kAdamPiece = 16384;  // elements per work item (a multiple of 16)

// One step over the tensors of a flat layout: p, m, v (and ema) are flat buffers, each
// tensor at offsets[t] with numels[t] elements; grads[t] its gradient. found_inf[0] == 1
// skips the update (the EMA still runs, with weight 0, as the unfused loop runs it); else
// steps[0] += 1 first (torch.optim.Adam's t). big_m[0]: a huge moment was written (the next
// step reads every moment: a gradient at or above kAdamBigGrad was seen). The vector body runs on
// the CPU kernels' instruction-set path (isa.h simd()), the rest element by element.
void adam_beta1_zero(const std::vector<uintptr_t>& grads, const std::vector<int64_t>& offsets,
                     const std::vector<int64_t>& numels, uintptr_t p_ptr, uintptr_t m_ptr, uintptr_t v_ptr,
                     uintptr_t ema_ptr, uintptr_t ema_weight_ptr, double ema_weight, uintptr_t found_inf_ptr,
                     uintptr_t steps_ptr, uintptr_t big_m_ptr, double lr, double beta2, double eps, int threads) {
  if (grads.size() != offsets.size() || grads.size() != numels.size())
    throw std::invalid_argument("adam_beta1_zero_cpu: one offset and numel per gradient");
  float* p = reinterpret_cast<float*>(p_ptr);
  float* m = reinterpret_cast<float*>(m_ptr);
  float* v = reinterpret_cast<float*>(v_ptr);
  float* ema = reinterpret_cast<float*>(ema_ptr);
  const bool skip = found_inf_ptr && *reinterpret_cast<const float*>(found_inf_ptr) == 1.0f;
  float w = ema_weight_ptr ? *reinterpret_cast<const float*>(ema_weight_ptr) : static_cast<float>(ema_weight);
  w = (skip ? 0.0f : 1.0f) * w;  // as the unfused EMA: (~skip).float() * weight
  if (skip) {  // no update: the EMA pass alone (weight 0), as the unfused loop makes it
    if (ema)
      for (size_t t = 0; t < grads.size(); ++t)
        ema_step(ema_ptr + 4 * offsets[t], p_ptr + 4 * offsets[t], numels[t], 0, w, 0, threads);
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
  const SimdKernels& K = simd();
  const int width = K.width;
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
        huge = K.adam_body(pt, gt, mt, vt, et, i, vend, c, read_m) || huge;
        i = vend;
      }
    }
    for (; i < std::min(pc.i1, n8); ++i) {
      huge = huge || !(std::fabs(gt[i]) <= kAdamBigGrad);
      body_element(pt, gt, mt, vt, et, i, c);
    }
    for (; i < pc.i1; ++i) {
      huge = huge || !(std::fabs(gt[i]) <= kAdamBigGrad);
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
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "One Adam step with beta1 = 0 over a flat layout, the rounding of torch's CPU fused Adam, optionally the EMA "
        "of the updated parameters in the same pass (see csrc/cpu/optim.cpp)");
});

}  // namespace
}  // namespace ipfm::cpu
