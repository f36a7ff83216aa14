"""The random numbers of the fused perturb / sample_prior written down independently, in
NumPy float64: Philox4x32-10, Triton's uniform -> normal mapping, the counter layout and
the Marsaglia-Tsang chi-square draw of csrc/include/ipfm/perturb_math.h. The fused
backends must give these numbers (up to float rounding) for the seed they draw, so tests
can check any row of any call, however large, without running the kernel again.

    noise of element n of row b = normal (n % 4) of randn4(seed, b * ceil(N / 4) + n // 4)
    chi-square scale of row b   = sqrt(alpha / Gamma), Gamma from candidates (t, b, 1, 0)
"""

import math

import numpy as np

M32 = np.uint64(0xFFFFFFFF)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_TWO_PI_F32 = np.float32(6.283185307179586)
_U_SCALE_F32 = np.float32(4.6566127342e-10)
# bound on the fp32 rounding of a Box-Muller normal n in the kernels: |dn| <= _NORMAL_ULPS * (1 + |n|)
_NORMAL_ULPS = 4e-7


def seed_of(generator, device="cpu"):
    """The 64-bit Philox key a fused op draws from ``generator`` next (drawn from a copy)."""
    import torch

    from ipfm_fast.ops import _launch

    copy = torch.Generator(device=device)
    copy.set_state(generator.get_state())
    return int(_launch.draw_seed(copy, device).item()) & 0xFFFFFFFFFFFFFFFF


def philox(c0, c1, c2, c3, seed):
    """Philox4x32-10 of counters (c0, c1, c2, c3) (arrays, broadcast) under the 64-bit key."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) & M32 for c in (c0, c1, c2, c3)))
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        hi_b, hi_a = _ROUND_B * c2, _ROUND_A * c0  # exact: 32 x 32 bits fit in 64
        c0, c2 = (hi_b >> np.uint64(32)) ^ c1 ^ k0, (hi_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = hi_b & M32, hi_a & M32
        k0, k1 = (k0 + _KEY_A) & M32, (k1 + _KEY_B) & M32
    return c0, c1, c2, c3


def uniform(bits):
    """Triton's uint_to_uniform_float: int32(bits), negative -> -x - 1, times 4.6566127342e-10 (fp32)."""
    v = (np.asarray(bits, dtype=np.uint64) & M32).astype(np.uint32).view(np.int32).astype(np.int64)
    v = np.where(v < 0, -v - 1, v)
    return v.astype(np.float32) * _U_SCALE_F32


def box_muller(u1, u2):
    """(r cos th, r sin th), r = sqrt(-2 ln max(u1, 1e-7)), th = 2 pi u2 in fp32 (as the kernels)."""
    u1 = np.maximum(u1, np.float32(1e-7)).astype(np.float64)
    theta = (_TWO_PI_F32 * u2).astype(np.float64)
    r = np.sqrt(-2.0 * np.log(u1))
    return r * np.cos(theta), r * np.sin(theta)


def normals(seed, rows, n):
    """The gaussians g [len(rows), n] (float64) of the given rows of an N = n call, in each
    row's element (kernel) order."""
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1, 1)
    groups = (n + 3) // 4
    ctr = rows * np.uint64(groups) + np.arange(groups, dtype=np.uint64)[None, :]
    r0, r1, r2, r3 = philox(ctr & M32, ctr >> np.uint64(32), 0, 0, seed)
    a, b = box_muller(uniform(r0), uniform(r1))
    c, d = box_muller(uniform(r2), uniform(r3))
    return np.stack([a, b, c, d], axis=-1).reshape(rows.shape[0], groups * 4)[:, :n]


def chi2_scales(seed, rows, D):
    """(sqrt(D / W) [len(rows)] float64, ambiguous [len(rows)] bool) for the given rows.

    The kernels form the candidate's normal in fp32 and test it in fp64; this spec forms it
    in fp64. Where the acceptance test is closer to its boundary than that rounding can
    move it, the two may pick different candidates: such rows are flagged ``ambiguous``
    (about one in 10^6) so that callers leave them out instead of flaking."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if math.isinf(D):
        return np.ones(rows.shape), np.zeros(rows.shape, bool)
    alpha = D / 2.0
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    gamma = np.full(rows.shape, -1.0)
    ambiguous = np.zeros(rows.shape, bool)
    attempt = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        while (gamma < 0).any():
            todo = np.nonzero(gamma < 0)[0]
            r0, r1, r2, r3 = philox(attempt, rows[todo].astype(np.uint64), 1, 0, seed)
            normal, _ = box_muller(uniform(r0), uniform(r1))
            base = 1.0 + c * normal
            v = base**3
            u = uniform(r2).astype(np.float64)
            lhs = np.log(u)
            rhs = 0.5 * normal**2 + d - d * v + d * np.log(np.where(v > 0, v, 1.0))
            ok = (base > 0) & (lhs < rhs)
            # how far the fp32 normal of the kernels can move each decision
            dn = _NORMAL_ULPS * (1.0 + np.abs(normal))
            slope = np.abs(normal) + 3.0 * d * c * np.abs(1.0 / np.where(base > 0, base, 1.0) - base**2)
            ambiguous[todo] |= (np.abs(base) <= c * dn) | ((base > 0) & (np.abs(lhs - rhs) <= 4.0 * slope * dn))
            cand = d * v
            if boost:
                cand = cand * np.exp(np.log(1.0 - uniform(r3).astype(np.float64)) / alpha)
            gamma[todo[ok]] = cand[ok]
            attempt += 1
    return np.sqrt(alpha / gamma), ambiguous
