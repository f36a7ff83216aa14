"""Builds ipfm_fast._C: pybind11 over raw pointers (no torch C++ ABI), CPU kernels always,
CUDA kernels when nvcc is found.

Environment:
    IPFM_FAST_BUILD_CUDA   unset: build CUDA when nvcc is found; 0: skip; 1: require it
    IPFM_FAST_CUDA_ARCHS   semicolon list of SM versions, default "80;90" (PTX of the
                           last one is embedded too, for newer GPUs)
    MAX_JOBS               parallel compile jobs (C++ and nvcc), default: CPU count
    CUDA_HOME              CUDA toolkit root (else /usr/local/cuda, else nvcc's parent)
"""

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"ipfm_fast setup: {message}", file=sys.stderr)


def find_cuda():
    """Returns (cuda_root, nvcc) or (None, reason)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root, os.path.join(root, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), nvcc
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"


def cuda_plan():
    """Decides whether to build the CUDA kernels: ((root, nvcc), None) or (None, reason)."""
    switch = os.environ.get("IPFM_FAST_BUILD_CUDA", "").strip()
    if switch == "0":
        return None, "IPFM_FAST_BUILD_CUDA=0"
    root, nvcc = find_cuda()
    if root is None:
        if switch == "1":
            raise RuntimeError(f"IPFM_FAST_BUILD_CUDA=1 but {nvcc}")
        return None, nvcc
    return (root, nvcc), None


def cuda_arch_flags():
    archs = [a.strip() for a in os.environ.get("IPFM_FAST_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise RuntimeError(f"IPFM_FAST_CUDA_ARCHS must be like '80;90', got {os.environ['IPFM_FAST_CUDA_ARCHS']!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return archs, flags


def max_jobs():
    return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)


CPU_SOURCES = sorted(["csrc/bindings.cpp"] + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
CUDA_KERNELS = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
CUDA_HOST_SOURCES = sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
HEADERS = sorted(glob.glob("csrc/**/*.h", root_dir=ROOT, recursive=True) + glob.glob("csrc/**/*.inc", root_dir=ROOT, recursive=True))


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc through ninja, then links them into _C."""

    def build_extension(self, ext):
        plan, skip_reason = cuda_plan()
        # setuptools skips an extension whose sources are older than its output, even when
        # the CUDA switches changed: remember the configuration and force a rebuild on change.
        config = repr((plan, skip_reason, os.environ.get("IPFM_FAST_CUDA_ARCHS", "80;90")))
        stamp = os.path.join(self.build_temp, "ipfm_fast_config.txt")
        if not os.path.exists(stamp) or open(stamp).read() != config:
            self.force = True
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(config)
        if plan is None:
            log(f"skipping the CUDA kernels: {skip_reason}")
            ext.define_macros.append(("IPFM_CUDA_SKIP_REASON", f'"{skip_reason}"'))
        else:
            root, nvcc = plan
            archs, arch_flags = cuda_arch_flags()
            objects = self.compile_cuda(nvcc, root, arch_flags)
            ext.sources += CUDA_HOST_SOURCES
            ext.extra_objects += objects
            ext.define_macros += [("IPFM_WITH_CUDA", "1"), ("IPFM_CUDA_ARCHS", f'"{";".join(archs)}"')]
            libdir = next(d for d in (os.path.join(root, "lib64"), os.path.join(root, "lib")) if os.path.isdir(d))
            ext.library_dirs.append(libdir)
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)

    def compile_cuda(self, nvcc, root, arch_flags):
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cuda"))
        os.makedirs(build_dir, exist_ok=True)
        include = os.path.join(ROOT, "csrc", "include")
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo", f"-I{include}"]
        flags += ["--expt-relaxed-constexpr", "-Wno-deprecated-gpu-targets"] + arch_flags
        lines = [
            f"rule nvcc\n  command = {nvcc} {' '.join(flags)} -MD -MF $out.d -c $in -o $out\n"
            "  depfile = $out.d\n  deps = gcc\n  description = nvcc $in\n"
        ]
        objects = []
        for source in CUDA_KERNELS:
            obj = os.path.join(build_dir, os.path.basename(source) + ".o")
            lines.append(f"build {obj}: nvcc {os.path.join(ROOT, source)}\n")
            objects.append(obj)
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("".join(lines))
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg  # the PyPI package ships the binary

                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError as err:
                raise RuntimeError("building the CUDA kernels needs ninja (pip install ninja)") from err
        log(f"compiling {len(CUDA_KERNELS)} CUDA files with {nvcc} ({' '.join(arch_flags)})")
        subprocess.check_call([ninja, "-C", build_dir, "-j", str(max_jobs())])
        return objects


ParallelCompile("MAX_JOBS", default=max_jobs()).install()

extension = Pybind11Extension(
    "ipfm_fast._C",
    sources=CPU_SOURCES,
    include_dirs=["csrc/include", "csrc/cpu", "csrc/cuda"],
    depends=HEADERS,
    cxx_std=20,
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
)

setup(
    # kernels/ (Triton) sits at the top level of the repository and installs as
    # ipfm_fast.kernels, so the wheel carries the Triton sources.
    packages=find_packages(include=["ipfm_fast", "ipfm_fast.*"]) + ["ipfm_fast.kernels"],
    package_dir={"ipfm_fast.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
)
