// Field target (reference-batch posterior mean): the per-row selection and weighting shared
// by the CPU and CUDA kernels. See ipfm_fast/ops/field_target.py for the method.
//
//   s_ij = -k log(d2_ij + c_i),  k = (N + D) / 2,  c_i = D sigma_i^2      (finite D)
//   s_ij = -d2_ij / (2 sigma_i^2)                                         (D = inf)
//
// A first pass computes d2 from fp32 dot products, d2~ = |y|^2 + |x|^2 - 2 y.x, with the
// row norms in fp64 and an error bound E_ij = 2 L u |y_i| |x_j| (L = length of the fp32
// accumulation chain, u = 2^-24). An entry is a *candidate* when, with every error
// against it, it could still be within kCutoff of the row's best logit; the others get
// weight exactly 0 (they weigh less than e^-40 of the best). A candidate whose logit
// error estimate k E' / q exceeds refine_tol is *refined*: its d2 is recomputed from exact
// pairwise differences. E' (stat_coef) is a statistical estimate, not the worst case: the
// roundings of an fp32 accumulation chain of length L are independent; when all products
// have one sign (partial sums grow linearly, the worst case for the statistics) the dot's
// error has a standard deviation of about 0.17 u |y| |x| L / sqrt(n); E' is 6 of those
// (times 2 for the -2 y.x), about 70x below the worst-case bound E for N = 3072.
// Logits are taken relative to the row's best q: the ratio (q - q_ref) / q_ref in fp64, then
// log1p of it, so no large logit is ever rounded to fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "ipfm/common.h"

namespace ipfm::field {

constexpr double kUnit = 5.9604644775390625e-08;  // 2^-24, fp32 unit roundoff
constexpr double kCutoff = 40.0;                   // logit gap below which weights are dropped
constexpr double kStatCoef = 2.0;                  // 2 * 6 standard deviations * 0.17

struct RowParams {
  bool finite;     // D finite
  double k;        // (N + D) / 2
  double c;        // D sigma^2 (finite D)
  double inv_2s2;  // 1 / (2 sigma^2) (D = inf)
  bool ok;         // sigma positive and finite
};

IPFM_HD RowParams row_params(double n, double D, double sigma) {
  RowParams p;
  p.finite = !(D > 1.0e300);
  p.k = p.finite ? 0.5 * (n + D) : 0.0;
  p.c = p.finite ? D * sigma * sigma : 0.0;
  p.inv_2s2 = 0.5 / (sigma * sigma);
  p.ok = sigma > 0.0 && sigma < 1.0e300;
  return p;
}

// "Distance-like" value whose order gives the logit order: q = d2 + c (finite D) or d2.
IPFM_HD double q_of(const RowParams& p, double d2) { return p.finite ? d2 + p.c : d2; }

// Candidate threshold on q: entries with q_lo <= threshold may be within kCutoff of the best.
IPFM_HD double q_cut(const RowParams& p, double best_q_hi) {
  return p.finite ? best_q_hi * exp(kCutoff / p.k) : best_q_hi + kCutoff / p.inv_2s2;
}

// Logit error bound of an entry whose d2 carries an absolute error bound err.
IPFM_HD double logit_err(const RowParams& p, double q_lo, double err) {
  return p.finite ? p.k * err / q_lo : err * p.inv_2s2;
}

// Logit of q = q_ref + diff relative to the row's reference q_ref (<= 0 when diff >= 0).
IPFM_HD double rel_logit(const RowParams& p, double diff, double q_ref) {
  return p.finite ? -p.k * log1p(diff / q_ref) : -diff * p.inv_2s2;
}

// Absolute logit of the reference: s_ref = -k log(q_ref) or -q_ref / (2 sigma^2).
IPFM_HD double ref_logit(const RowParams& p, double q_ref) {
  return p.finite ? -p.k * log(q_ref) : -q_ref * p.inv_2s2;
}

// Coefficient c of the statistical screening-error estimate E' = c |y| |x| for dots of n
// terms accumulated in fp32 chains of length lane_chain (see the header comment).
IPFM_HD double stat_coef(int64_t n, double lane_chain) {
  return kStatCoef * kUnit * lane_chain / sqrt(static_cast<double>(n));
}

// Accumulation-chain length of a dot product of n terms computed as 8-lane fp32 partial
// sums over chunks of `chunk` elements, reduced per chunk and summed over chunks in fp32.
IPFM_HD double chain_length(int64_t n, int64_t chunk, int64_t lanes) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  return static_cast<double>(chunk / lanes + 4 + chunks + lanes);
}

}  // namespace ipfm::field
