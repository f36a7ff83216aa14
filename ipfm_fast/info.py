"""`ipfm-fast info`: versions, build flags, which backends serve which devices and why not."""

import platform

import torch

from ipfm_fast import __version__, _ext, backends, models


def collect():
    """A dict describing this installation (also written next to benchmark results)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # noqa: BLE001 - report any import failure
        triton_version = f"unavailable ({type(err).__name__}: {err})"
    ext = _ext._C
    build = {"loaded": ext is not None}
    if ext is None:
        build["error"] = _ext.load_error
    else:
        build.update(openmp=bool(ext.openmp), cuda=bool(ext.has_cuda), cuda_archs=ext.cuda_archs or None,
                     cuda_skip_reason=ext.cuda_skip_reason or None, path=ext.__file__,
                     cpu_isa=dict(ext.cpu_isa_report()))
        if ext.has_cuda:
            build["cuda_devices_seen_by_extension"] = ext.cuda_device_count()
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return {
        "ipfm_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": backends.triton_interpreter(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": build,
        "backends": backends.report(devices),
        "auto": {d: backends.resolve("info", "auto", d, torch.float32) for d in devices},
        "compiled_cpu_linear": dict(zip(("backend", "reason"), models.linear_backend())),
        "training_cpu": _training_cpu(ext),
    }


def _training_cpu(ext):
    """The CPU training loops' optimizer kernel and host-memory policy."""
    from ipfm_fast.train import flat, host_memory

    if ext is None:
        adam = "torch's fused Adam (extension not loaded)"
    elif flat.own_adam_matches_torch():
        adam = "the extension's kernel for beta1 = 0 (bitwise torch's fused Adam here, fewer bytes)"
    else:
        adam = "torch's fused Adam (the extension's kernel differs from it on this machine or torch build)"
    return {"adam": adam, "host_memory": host_memory.describe()}


def format_report(info):
    lines = [f"ipfm_fast {info['ipfm_fast']}  (python {info['python']}, torch {info['torch']}, "
             f"CUDA runtime {info['torch_cuda'] or 'none'}, triton {info['triton']})"]
    lines.append(f"GPUs: {', '.join(info['gpus']) or 'none'}")
    ext = info["extension"]
    if ext["loaded"]:
        cuda = f"CUDA kernels for sm {ext['cuda_archs']}" if ext["cuda"] else f"no CUDA kernels ({ext['cuda_skip_reason']})"
        lines.append(f"extension ipfm_fast._C: loaded, OpenMP {'on' if ext['openmp'] else 'off'}, {cuda}")
        isa = ext["cpu_isa"]
        lines.append(f"CPU kernels: {isa['path']} path ({isa['reason']}; this CPU supports "
                     f"{', '.join(isa['supported'])}; IPFM_FAST_CPU_ISA=avx512|avx2|generic chooses)")
    else:
        lines.append(f"extension ipfm_fast._C: NOT loaded ({ext['error']})")
    lin = info["compiled_cpu_linear"]
    lines.append(f"networks' linear layers, compiled on CPU: {lin['backend']} GEMMs ({lin['reason']}; "
                 f"{models.LINEAR_ENV}=onednn|torch chooses)")
    lines.append(f"CPU training: Adam: {info['training_cpu']['adam']}; host memory: "
                 f"{info['training_cpu']['host_memory']}")
    if info["triton_interpreter"]:
        lines.append("TRITON_INTERPRET=1: Triton kernels run in the interpreter on CPU tensors")
    for device, table in info["backends"].items():
        lines.append(f"{device} tensors (auto -> {info['auto'][device]}):")
        for backend, reason in table.items():
            why = reason.split(": ", 1)[1] if reason and reason.startswith(f"{backend}: ") else reason
            lines.append(f"  {backend:<10} {'yes' if reason is None else 'no: ' + why}")
    return "\n".join(lines)
