"""Test helpers that ship with the package (usable by other codebases' tests too)."""

import json
import os
import subprocess
import sys

_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

results = []
for module, name, signature, constexprs in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(module), name)
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    ptx = k.asm["ptx"]
    results.append({"kernel": f"{module}.{name}", "num_warps": k.metadata.num_warps,
                    "shared": k.metadata.shared, "sm_90": ".target sm_90" in ptx, "ptx_lines": ptx.count("\n")})
print(json.dumps(results))
"""


def compile_for_hopper(specs, timeout=600):
    """Compiles Triton kernels for sm_90 with ``triton.compile(..., target=GPUTarget("cuda", 90,
    32))``, which needs no GPU. specs: [(module, kernel_name, signature, constexprs)], e.g.
    ("ipfm_fast.kernels.perturb", "perturb_kernel", {"x_ptr": "*fp32", ...}, {"BLOCK": 256}).

    Runs in a fresh interpreter without TRITON_INTERPRET: in interpreter mode @triton.jit
    returns functions the compiler cannot take. Returns one dict per kernel; raises
    RuntimeError with the compiler's output if any fails.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(specs), capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"Hopper compile failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
