"""Where a benchmark ran: device name, a folder name for it, versions."""

import platform
import re
import subprocess

import torch

import ipfm_fast

HAS_CUDA = torch.cuda.is_available()


def device_name():
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug():
    name = torch.cuda.get_device_name() if HAS_CUDA else f"cpu-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions():
    info = {
        "ipfm_fast": ipfm_fast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_runtime": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        info["git"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                              stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def write_result(result, out, markdown):
    """``result`` as JSON at ``out`` and ``markdown`` (its table) beside it as .md; prints both."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    print(f"-> {out}")
