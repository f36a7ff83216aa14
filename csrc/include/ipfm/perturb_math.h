// PFGM++ perturbation math shared by the CPU and CUDA kernels (the Triton kernel in
// kernels/perturb.py implements the same steps; tests check that they agree).
//
//   y = x + sigma * g * sqrt(D / W),  g ~ N(0, I_N),  W ~ chi2_D = 2 Gamma(D/2)
//
// so sqrt(D / W) = sqrt(alpha / Gamma(alpha)) with alpha = D / 2.
//
// Random streams (all Philox4x32-10 keyed by the call's 64-bit seed):
//   noise:  element n of row b takes normal (n % 4) of randn4(seed, b * G + n / 4),
//           G = ceil(N / 4): counters (lo, hi, 0, 0).
//   Gamma:  candidate t of row b uses counter (t, b, 1, 0): disjoint from the noise
//           stream because c2 = 1. Outputs 0,1 -> a normal (Box-Muller cos part),
//           2 -> the acceptance uniform, 3 -> the alpha < 1 boost uniform.
// Gamma(alpha) by Marsaglia & Tsang (2000), accepting the first valid candidate in
// counter order; for alpha < 1, Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha). The
// acceptance test runs in fp64: d (1 - v + ln v) cancels badly in fp32 for large D.
#pragma once

#include <cmath>
#include <cstdint>

#include "ipfm/philox.h"

namespace ipfm {

// Marsaglia-Tsang test for one candidate; returns Gamma(alpha) or a negative value
// when rejected.
IPFM_HD double gamma_candidate(uint64_t seed, uint32_t attempt, uint32_t row, double alpha) {
  const Philox4 r = philox4x32_10(attempt, row, 1u, 0u, seed);
  float normal, unused;
  uniform_pair_to_normal(uint_to_uniform(r.x[0]), uint_to_uniform(r.x[1]), normal, unused);
  const bool boost = alpha < 1.0;
  const double a = boost ? alpha + 1.0 : alpha;
  const double d = a - 1.0 / 3.0;
  const double c = 1.0 / sqrt(9.0 * d);
  const double n = static_cast<double>(normal);
  const double base = 1.0 + c * n;
  if (!(base > 0.0)) return -1.0;
  const double v = base * base * base;
  const double u = static_cast<double>(uint_to_uniform(r.x[2]));
  if (!(log(u) < 0.5 * n * n + d - d * v + d * log(v))) return -1.0;
  double gamma = d * v;
  if (boost) gamma *= exp(log(1.0 - static_cast<double>(uint_to_uniform(r.x[3]))) / alpha);
  return gamma;
}

// sqrt(D / W) for one row, W ~ chi2_D; alpha = D / 2 (inf for D = inf -> exactly 1).
IPFM_HD float chi2_scale(uint64_t seed, int64_t row, double alpha) {
  if (alpha == static_cast<double>(INFINITY)) return 1.0f;
  for (uint32_t attempt = 0;; ++attempt) {
    const double gamma = gamma_candidate(seed, attempt, static_cast<uint32_t>(row), alpha);
    if (gamma >= 0.0) return static_cast<float>(sqrt(alpha / gamma));
  }
}

// sigma * scale, or NaN when sigma is not a positive finite number (a device tensor
// cannot be checked without a host sync, so a bad row is made loud instead).
IPFM_HD float row_factor(float sigma, float scale) {
  return (sigma > 0.0f && sigma < INFINITY) ? sigma * scale : NAN;
}

}  // namespace ipfm
