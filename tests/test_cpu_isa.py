"""The CPU kernels' instruction-set paths (csrc/cpu/isa.h): avx512, avx2 and generic, chosen at
run time, forced by IPFM_FAST_CPU_ISA or in-process by ipfm_fast.testing.cpu_isa.

Every path must draw the numbers of the float64 spec (tests/philox_spec.py) within the
cross-backend tolerance. Beyond that contract, the SIMD paths give the very same floats as the
generic path's vector loop (the same counters, polynomials and FMA contraction; y = x + f g
rounded as two operations, as before the SIMD paths): a seeded run whose rows draw whole
vectors of counters (N a multiple of 64, e.g. every image size of the benchmarks and the demo)
is bitwise the same on every path. The generic path's scalar remainder (the last count % 8
counters of a call) contracts one of the log polynomial's sums differently: about one normal
in 2000 of those differs by an ulp, so odd shapes are compared within the tolerance.
The field target must stay within its 1e-4 bound on every path. The other perturb /
field_target tests run on the default (widest) path; `make test-isa` reruns them on each.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ipfm_fast as ipf
from ipfm_fast import _ext
from ipfm_fast.testing import cpu_isa, cpu_isa_paths

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import philox_spec as spec  # noqa: E402

pytestmark = pytest.mark.skipif(_ext._C is None, reason="extension not built")

PATHS = cpu_isa_paths() if _ext._C is not None else []
SIMD = [p for p in PATHS if p != "generic"]


def _rng(path, which, seed, first, count):
    normals = torch.full((4 * count + 1,), float("nan"))  # poisoned, one past the end as a guard
    terms = torch.full((count + 1,), float("nan"))
    _ext._C._cpu_rng(path, which, seed, first, count, normals.data_ptr(), terms.data_ptr())
    assert math.isnan(normals[-1]) and math.isnan(terms[-1]), "wrote past the end"
    return normals[:-1], terms[:-1]


def _spec_normals(seed, first, count):
    ctr = np.uint64(first) + np.arange(count, dtype=np.uint64)  # wraps mod 2^64 like the kernels
    r0, r1, r2, r3 = spec.philox(ctr & spec.M32, ctr >> np.uint64(32), 0, 0, seed)
    a, b = spec.box_muller(spec.uniform(r0), spec.uniform(r1))
    c, d = spec.box_muller(spec.uniform(r2), spec.uniform(r3))
    return torch.from_numpy(np.stack([a, b, c, d], axis=-1).reshape(-1))


# counters where the low word wraps inside one vector (the carry into the high word), the
# top of the 64-bit range, and ordinary ones; counts: every tail length of 8 and 16 lanes
CASES = [(0x243F6A8885A308D3, 2**32 - 5, 23), (7, 2**33 - 13, 40), (1, 2**64 - 9, 16),
         (0, 0, 1), (12345, 1000, 64), (2**63 + 11, 77, 31), (99, 5, 17), (3, 2**32 - 16, 16)]


@pytest.mark.skipif(not PATHS, reason="extension not built")
def test_paths_listed_and_default_is_widest():
    report = _ext._C.cpu_isa_report()
    assert PATHS[-1] == "generic" and set(PATHS) <= {"avx512", "avx2", "generic"}
    if not os.environ.get("IPFM_FAST_CPU_ISA"):
        assert report["path"] == PATHS[0] and _ext._C.cpu_isa() == PATHS[0]
    assert report["reason"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed,first,count", CASES)
def test_rng_kernels_match_the_spec(path, seed, first, count):
    want = _spec_normals(seed, first, count)
    for which in (0, 1):
        got, terms = _rng(path, which, seed, first, count)
        # vlog / vsincos_turns are ~1-2 ulp polynomials: far inside the property tests' 1e-5 (1 + |g|)
        err = (got.double() - want).abs() / (1 + want.abs())
        assert err.max().item() < 2e-6, (path, which, err.max().item())
        if which == 1:
            sq = want.reshape(count, 4).square().sum(1)
            torch.testing.assert_close(terms.double(), sq, rtol=1e-5, atol=1e-5)
    _, terms_only = _rng(path, 2, seed, first, count)
    assert torch.equal(terms_only, _rng(path, 1, seed, first, count)[1])


@pytest.mark.parametrize("path", SIMD)
@pytest.mark.parametrize("count", [1, 7, 8, 9, 15, 16, 17, 33, 64, 65, 200, 4096])
def test_simd_rng_equals_generic(path, count):
    """Bitwise on whole vectors of counters; within an ulp (1e-6 (1 + |g|)) on the generic's remainder."""
    for which in (0, 1, 2):
        first = 2**32 - 3 * count // 2
        a = _rng(path, which, 0xDEADBEEF12345678, first, count)
        b = _rng("generic", which, 0xDEADBEEF12345678, first, count)
        written = {0: [0], 1: [0, 1], 2: [1]}[which]  # randn4: normals, randn4_sq: both, sq_terms: terms
        for k in written:
            assert not a[k].isnan().any(), (path, which, count)
            if count % 16 == 0:
                assert torch.equal(a[k], b[k]), (path, which, count, (a[k] - b[k]).abs().max().item())
            else:
                assert ((a[k] - b[k]).abs() <= 1e-6 * (1 + b[k].abs())).all(), (path, which, count)


def _op_outputs(seed):
    """Every CPU perturb / sample_prior variant on odd shapes (tails of every vector width)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 3, 5, 17, 64, 255, 257, 1031, 3072):
            g = torch.Generator().manual_seed(seed + n)
            x = torch.randn(6, n, generator=g).to(dtype)
            sigma = torch.rand(6, generator=g) * 10 + 0.01
            for D in (3.5, 128.0, math.inf):
                key = f"{dtype}-{n}-{D}"
                out[key] = ipf.perturb(x, sigma, D, generator=g, return_noise=True, backend="cpu")
                if not math.isinf(D):
                    out[key + "-clip"] = ipf.perturb(x, sigma, D, generator=g, clip_beta=(0.05, 0.95), backend="cpu")
                gauss = torch.randn(6, n, generator=g).to(dtype)
                out[key + "-given"] = ipf.noise_from_gaussian(gauss, sigma, D, generator=g, backend="cpu")
            out[f"{dtype}-{n}-prior"] = ipf.sample_prior((4, n), 80.0, 128.0, dtype=dtype, generator=g, backend="cpu")
    return out


def _flat(v):
    return list(v) if isinstance(v, tuple) else [v]


@pytest.mark.parametrize("path", SIMD)
def test_perturb_equals_generic_bitwise(path):
    with cpu_isa("generic"):
        want = _op_outputs(11)
    with cpu_isa(path):
        assert _ext._C.cpu_isa() == path
        got = _op_outputs(11)
    assert _ext._C.cpu_isa() == _ext._C.cpu_isa_report()["path"]
    for key in want:
        n = int(key.split("-")[1])
        for a, b in zip(_flat(got[key]), _flat(want[key])):
            if n % 64 == 0 or key.endswith("given"):  # whole vectors of counters, or no counters drawn
                assert torch.equal(a, b), (path, key, (a.float() - b.float()).abs().max().item())
            else:  # the cross-backend tolerance (tests/test_perturb.py), and no more than a few floats off
                torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
                assert (a != b).sum().item() <= max(2, a.numel() // 500), (path, key)


def _informative_case(rows, m, n, sigma, D, seed):
    """x_ref in clusters, y perturbed from its rows: the posterior really mixes (as tests/test_field_target.py)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, n, generator=g)
    x = centers[torch.randint(0, 4, (m,), generator=g)] + sigma / math.sqrt(n) * torch.randn(m, n, generator=g)
    y = ipf.reference.perturb(x[torch.randint(0, m, (rows,), generator=g)], sigma, D, generator=g)
    return y, x


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,m,n", [(70, 129, 3072), (5, 33, 1), (33, 7, 131), (130, 40, 64)])
@pytest.mark.parametrize("D", [128.0, math.inf])
def test_field_target_accuracy_on_every_path(path, rows, m, n, D):
    sigma = torch.tensor([0.05, 1.0, 10.0, 80.0]).repeat(rows)[:rows]
    y, x = _informative_case(rows, m, n, 1.0, D, seed=rows + m + n)
    t64, logz64 = ipf.reference.field_target(y.double(), sigma.double(), x.double(), D, return_logz=True)
    with cpu_isa(path):
        t, logz = ipf.field_target(y, sigma, x, D, backend="cpu", return_logz=True)
    err = ((t.double() - t64).norm(dim=1) / t64.norm(dim=1)).max().item()
    assert err <= 1e-4, (path, err)
    torch.testing.assert_close(logz.double(), logz64, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,m,n", [(128, 512, 3072), (67, 13, 130), (3, 100, 7)])
def test_field_gemm_steps_match_mm(path, rows, m, n):
    """The benchmark entry point (the screen and the combine alone) computes y x^T and w x."""
    g = torch.Generator().manual_seed(rows * m + n)
    y, x = torch.randn(rows, n, generator=g), torch.randn(m, n, generator=g)
    w = torch.rand(rows, m, generator=g)
    with cpu_isa(path):
        s = torch.full((rows, m), float("nan"))
        _ext._C.field_gemm_cpu(0, y.data_ptr(), n, x.data_ptr(), n, s.data_ptr(), m, rows, m, n, 2)
        o = torch.full((rows, n), float("nan"))
        _ext._C.field_gemm_cpu(1, w.data_ptr(), m, x.data_ptr(), n, o.data_ptr(), n, rows, m, n, 2)
    torch.testing.assert_close(s.double(), y.double() @ x.double().T, rtol=1e-5, atol=2e-6 * n**0.5 * 4)
    torch.testing.assert_close(o.double(), w.double() @ x.double(), rtol=1e-5, atol=2e-6 * m**0.5 * 4)


def _run(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=full).stdout


@pytest.mark.parametrize("path", PATHS)
def test_environment_override(path):
    code = "import json, ipfm_fast._C as C; print(json.dumps(C.cpu_isa_report()))"
    report = json.loads(_run(code, IPFM_FAST_CPU_ISA=path))
    assert report["path"] == path and report["requested"] == path and path in report["reason"]
    info = subprocess.run([sys.executable, "-m", "ipfm_fast", "info"], capture_output=True, text=True, check=True,
                          env=dict(os.environ, IPFM_FAST_CPU_ISA=path)).stdout
    assert f"CPU kernels: {path} path (IPFM_FAST_CPU_ISA={path};" in info


def test_environment_override_unknown_or_missing():
    code = "import json, ipfm_fast._C as C; print(json.dumps(C.cpu_isa_report()))"
    report = json.loads(_run(code, IPFM_FAST_CPU_ISA="sse9"))
    assert report["path"] == PATHS[0] and "not one of" in report["reason"]
    if "avx512" not in PATHS:  # asked for a path this CPU lacks: the widest it has, and why
        report = json.loads(_run(code, IPFM_FAST_CPU_ISA="avx512"))
        assert report["path"] == PATHS[0] and "lacks" in report["reason"]


def test_in_process_switch_refuses_unknown():
    before = _ext._C.cpu_isa()
    with pytest.raises(ValueError, match="not supported"):
        with cpu_isa("sse9"):
            pass
    assert _ext._C.cpu_isa() == before
