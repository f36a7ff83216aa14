"""Test helpers that ship with the package (usable by other codebases' tests too).

:func:`cpu_isa` runs a block on one instruction-set path of the CPU kernels (avx512, avx2,
generic), as IPFM_FAST_CPU_ISA does for a whole process.

:func:`hopper_compile_only` makes every Triton launch of ipfm_fast compile, on a machine
without a GPU, exactly the specialization a Hopper GPU would compile for it -- the real
launcher's grid, constexprs, dtypes, strides and integer specializations -- and run nothing.
"""

import contextlib
import dataclasses
import importlib
import os
import pkgutil
import re

GRID_X_MAX = 2**31 - 1  # CUDA limits on one launch's grid
GRID_YZ_MAX = 65535
H100_SHARED_BYTES = 232448  # opt-in shared memory per block of sm_90 (227 KiB)


@dataclasses.dataclass
class Compiled:
    """One specialization Triton compiled: ``signature`` maps each argument to its type
    (``"*fp32"``, ``"i32"``, ``"constexpr"``...), ``constexprs`` the constexpr ones (integer
    arguments equal to 1 included) to their values, ``aligned`` the arguments specialized as
    multiples of 16 (integers divisible by 16, pointers 16-byte aligned: a separate variant
    from the same kernel with unaligned arguments)."""

    kernel: str
    signature: dict
    constexprs: dict
    aligned: list
    num_warps: int
    shared: int
    ptx_target: str
    cubin_bytes: int


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict


@dataclasses.dataclass
class CompileLog:
    """What happened inside :func:`hopper_compile_only`: ``launches`` as they happen,
    ``compiles`` (one per distinct specialization) once the block has exited."""

    launches: list = dataclasses.field(default_factory=list)
    compiles: list = dataclasses.field(default_factory=list)


def kernel_modules():
    """The modules of ipfm_fast.kernels (the Triton sources)."""
    import ipfm_fast.kernels as package

    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def jit_functions():
    """{qualified name: JITFunction} of every @triton.jit function in ipfm_fast.kernels."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def launched_kernels():
    """The names of the jit functions that are kernels, not helpers called by other jit
    functions (a helper is never launched, so never compiled on its own)."""
    funcs = jit_functions()
    return sorted(name for name, fn in funcs.items()
                  if not any(re.search(rf"\b{fn.__name__}\(", other.src) for o, other in funcs.items() if o != name))


def _ptx_target(ptx):
    found = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    return found[1] if found else ""


def _constexprs(src):
    names = src.fn.arg_names
    return {names[key[0]] if isinstance(key, tuple) else key: value for key, value in src.constants.items()}


def _aligned(src):
    names = src.fn.arg_names
    return sorted(names[key[0]] for key, attrs in src.attrs.items()
                  if ["tt.divisibility", 16] in [list(a) for a in attrs])


class _Utils:
    """The part of the CUDA driver's utils a launch reaches: device properties and the
    module load (nothing is loaded: there is no device)."""

    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED_BYTES, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        if not kernel.startswith(b"\x7fELF"):
            raise RuntimeError(f"{name}: the compiled binary is not a cubin")
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads per block


def _stub_driver(log):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class Launcher:
        """Stands in for the compiled C launcher: checks the grid as cuLaunchKernel would
        and records the call instead of launching."""

        def __init__(self, src, metadata):
            self.kernel = f"{src.fn.module}.{src.fn.__name__}"
            self.constexprs = _constexprs(src)

        def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                     enter_hook, exit_hook, *args):
            grid = (grid_x, grid_y, grid_z)
            if not (1 <= grid_x <= GRID_X_MAX and 1 <= grid_y <= GRID_YZ_MAX and 1 <= grid_z <= GRID_YZ_MAX):
                raise RuntimeError(f"{self.kernel}: grid {grid} outside CUDA's limits")
            log.launches.append(Launch(self.kernel, grid, self.constexprs))

    class HopperStub(DriverBase):
        """What Triton's JIT asks of a driver (triton/runtime/jit.py, compiler.py): the target,
        the current device and stream, device properties, binary load and a launcher."""

        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = Launcher

        @classmethod
        def is_active(cls):
            return False  # never picked by Triton's own driver discovery

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")  # CPU tensors stand in for device tensors (data_ptr, dtype)

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("hopper_compile_only: nothing runs, nothing to time")

    return HopperStub()


@contextlib.contextmanager
def hopper_compile_only():
    """Inside the block, ipfm_fast's ops with ``backend="triton"`` take CPU tensors and each
    Triton launch compiles for sm_90 (what a Hopper GPU would compile for that call, through
    the JIT's own argument specialization) and is recorded instead of run; outputs are left
    unwritten. Yields a :class:`CompileLog`.

    Needs a process where Triton is *not* in interpreter mode (TRITON_INTERPRET unset before
    triton is imported: in that mode @triton.jit returns interpreter functions), e.g. a
    subprocess. Every jit function of ipfm_fast.kernels gets fresh caches for the block and
    its own back afterwards, so nothing compiled here is ever launched for real.

    Written against Triton 3.6's runtime: the stub driver provides what triton/runtime/jit.py
    and triton/compiler/compiler.py ask for (target, device, stream, ``utils`` with device
    properties and ``load_binary``, ``launcher_cls``).
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("hopper_compile_only needs TRITON_INTERPRET unset (run it in a fresh process)")
    from collections import defaultdict

    from triton.runtime.driver import driver

    from ipfm_fast import backends
    from ipfm_fast.ops import _launch

    log = CompileLog()
    funcs = jit_functions()
    saved_caches = {name: fn.device_caches for name, fn in funcs.items()}
    saved_driver = getattr(driver, "_active", None)  # None: not chosen yet (no GPU here)
    driver.set_active(_stub_driver(log))
    for fn in funcs.values():
        fn.device_caches = defaultdict(fn.create_binder)  # binders made for the stub's sm_90 target
    token = backends.triton_compile_only.set(True)
    try:
        with _launch.gpu_tiles(True):
            yield log
    finally:
        backends.triton_compile_only.reset(token)
        for name, fn in funcs.items():
            for kernel_cache, *_ in fn.device_caches.values():
                for compiled in kernel_cache.values():
                    log.compiles.append(Compiled(
                        kernel=name, signature=dict(compiled.src.signature), constexprs=_constexprs(compiled.src),
                        aligned=_aligned(compiled.src),
                        num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
                        ptx_target=_ptx_target(compiled.asm["ptx"]),
                        cubin_bytes=len(compiled.asm["cubin"])))
            fn.device_caches = saved_caches[name]
        driver.set_active(saved_driver)


def cpu_isa_paths():
    """The CPU kernels' instruction-set paths this CPU can run, widest first ([] without the extension)."""
    from ipfm_fast import _ext

    return [] if _ext._C is None else list(_ext._C.cpu_isa_report()["supported"])


@contextlib.contextmanager
def cpu_isa(name):
    """Runs the block with the CPU kernels on path ``name`` ("avx512", "avx2", "generic"), then
    restores the path the environment and the CPU choose. Raises ValueError for a path this
    CPU lacks. Not thread-safe: the path is process-wide."""
    from ipfm_fast import _ext

    if _ext._C is None:
        raise RuntimeError(f"ipfm_fast._C is not loaded ({_ext.load_error})")
    if not _ext._C._set_cpu_isa(name):
        raise ValueError(f"CPU kernel path {name!r} is unknown or not supported here (supported: "
                         f"{', '.join(cpu_isa_paths())})")
    try:
        yield
    finally:
        _ext._C._set_cpu_isa("")
