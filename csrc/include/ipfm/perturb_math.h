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
//
// Variants (new flags, the default path unchanged): a given gaussian g (read instead of
// drawn; W still drawn as above), and the Beta clip (clip_factor below), which needs |g|^2
// of the row before its first write: a pre-pass writes per-chunk partial sums.
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

// sqrt(D / W) for one row in fp64, W ~ chi2_D; alpha = D / 2 (inf for D = inf -> exactly 1).
IPFM_HD double chi2_scale64(uint64_t seed, int64_t row, double alpha) {
  if (alpha == static_cast<double>(INFINITY)) return 1.0;
  for (uint32_t attempt = 0;; ++attempt) {
    const double gamma = gamma_candidate(seed, attempt, static_cast<uint32_t>(row), alpha);
    if (gamma >= 0.0) return sqrt(alpha / gamma);
  }
}

// The same, rounded to fp32: what the unclipped kernels apply.
IPFM_HD float chi2_scale(uint64_t seed, int64_t row, double alpha) {
  return static_cast<float>(chi2_scale64(seed, row, alpha));
}

// Optional clip of the PFGM++ recipe's Beta draw (pfgmpp and the IPFM authors' code clip
// B ~ Beta(N/2, D/2) to [lo, hi]). With q = |g|^2 of the row and W its chi-square,
// B / (1 - B) = t = q / W, so clipping B to [lo, hi] is clipping t to
// [t_lo, t_hi] = [lo / (1 - lo), hi / (1 - hi)]; the row's radius is then scaled by
// sqrt(clip(t) / t). scale = sqrt(D / W) = sqrt(alpha / Gamma), so 1 / W = scale^2 / D.
// q <= 0 (an all-zero given gaussian) has no direction to scale: factor 1.
IPFM_HD double clip_factor(double q, double scale, double alpha, double t_lo, double t_hi) {
  if (!(q > 0.0)) return 1.0;
  const double t = q * scale * scale / (2.0 * alpha);
  const double clipped = t < t_lo ? t_lo : (t > t_hi ? t_hi : t);
  return sqrt(clipped / t);
}

// |g|^2 of the first `count` (1..4) normals of randn4(seed, offset) without the sines and
// cosines where all four count: n1^2 + n2^2 = r^2 = -2 ln max(u1, 1e-7) (Box-Muller), so
// a full group costs one Philox call and two logs. The clipped kernels' pre-pass.
IPFM_HD float randn4_sq_norm(uint64_t seed, uint64_t offset, int count) {
  if (count >= 4) {
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(offset & 0xffffffffu),
                                    static_cast<uint32_t>(offset >> 32), 0u, 0u, seed);
    float u0 = uint_to_uniform(r.x[0]), u2 = uint_to_uniform(r.x[2]);
    u0 = u0 > 1.0e-7f ? u0 : 1.0e-7f;
    u2 = u2 > 1.0e-7f ? u2 : 1.0e-7f;
    return -2.0f * (fast_log(u0) + fast_log(u2));
  }
  float g[4];
  randn4(seed, offset, g);
  float s = 0.0f;
  for (int j = 0; j < count; ++j) s += g[j] * g[j];
  return s;
}

// sigma * scale, or NaN when sigma is not a positive finite number (a device tensor
// cannot be checked without a host sync, so a bad row is made loud instead).
IPFM_HD float row_factor(float sigma, float scale) {
  return (sigma > 0.0f && sigma < INFINITY) ? sigma * scale : NAN;
}

}  // namespace ipfm
