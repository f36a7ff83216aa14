// IPFM distillation losses: per-element terms and per-row finalization shared by the CPU
// and CUDA kernels (kernels/losses.py implements the same steps in Triton).
//
// Generator loss, a = teacher_out, b = fake_out, x = generator output, d = a - b, e = a - x:
//   loss_i = w_i * u_i,   u_i = sum_n d * (e - alpha * d)
//   w_i    = 1 / max(mean_n |x - a|, 1e-5)  ("adaptive", no gradient)  or a given weight
//   dl/da = c_i [e + (1 - 2 alpha) d],  dl/db = c_i [2 alpha d - e],  dl/dx = -c_i d,
//   c_i = grad_i * scale * w_i   (scale = 1/B for reduction "mean", else 1)
// A row with a NaN/Inf in a, b or x is masked: w = u = loss = 0, keep = 0, gradients 0.
//
// Both losses are returned in fp32 (and their incoming gradient is fp32) whatever the
// input dtype; the input gradients are written in the input dtype.
//
// Fake (field-matching) loss, b = fake_out, x = target:
//   loss_i = lambda_i * S_i,  S_i = sum_n (b - x)^2,
//   lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2   (NaN for a bad sigma)
//   dl/db = 2 c_i (b - x) = -dl/dx,  c_i = grad_i * scale * lambda_i
//
// Per-row sums are taken as per-chunk partial sums (fixed chunking, fixed order inside a
// chunk), then the chunks of a row and the rows of the batch are summed in a fixed order
// by one small finalization: no float atomics, the same bits on every run.
#pragma once

#include <cmath>
#include <cstdint>

#include "ipfm/common.h"

namespace ipfm {

enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

constexpr float kAdaptiveWeightFloor = 1e-5f;
// sum of d (e - alpha d), sum |x - a|, and a non-finite marker: 0 for a finite row, else
// non-zero (a count on the GPU, NaN on the CPU)
constexpr int kGenPartials = 3;
constexpr int kFakePartials = 1;  // sum (b - x)^2
constexpr int kGenStats = 3;      // saved per row for backward: w, u, keep ([3, B], fp32)
constexpr int kFakeStats = 2;     // lambda, S ([2, B], fp32)

// 1 if v is NaN or +-Inf, else 0, without branches (vectorizes).
IPFM_HD float nonfinite(float v) { return (fabsf(v) < INFINITY) ? 0.0f : 1.0f; }

IPFM_HD float gen_term(float a, float b, float x, float alpha) {
  const float d = a - b;
  return d * ((a - x) - alpha * d);
}

struct GenRow {
  float w, u, keep, loss;
};

// One row of the generator loss from its summed partials (bad: the non-finite marker). given_weight is ignored when
// adaptive.
IPFM_HD GenRow gen_finalize_row(float sum_u, float sum_abs, float bad, int64_t n, bool adaptive,
                                float given_weight) {
  GenRow r;
  const bool keep = bad == 0.0f;
  const float w = adaptive ? 1.0f / fmaxf(sum_abs / static_cast<float>(n), kAdaptiveWeightFloor) : given_weight;
  r.keep = keep ? 1.0f : 0.0f;
  r.w = keep ? w : 0.0f;
  r.u = keep ? sum_u : 0.0f;
  r.loss = keep ? w * sum_u : 0.0f;
  return r;
}

// Backward coefficient of one row; 0 for a masked row whatever the incoming gradient.
IPFM_HD float gen_grad_coef(float grad, float scale, float w, float keep) {
  return keep != 0.0f ? grad * scale * w : 0.0f;
}

IPFM_HD float fake_weight(float sigma, float sigma_data) {
  if (!(sigma > 0.0f && sigma < INFINITY)) return NAN;  // a device tensor is not checked on the host
  const float sd2 = sigma_data * sigma_data;
  const float s2 = sigma * sigma;
  return (s2 + sd2) / (s2 * sd2);
}

IPFM_HD float reduction_scale(int reduction, int64_t rows) {
  return reduction == static_cast<int>(Reduction::kMean) ? 1.0f / static_cast<float>(rows) : 1.0f;
}

}  // namespace ipfm
