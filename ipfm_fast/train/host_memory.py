"""How the CPU training loops hold host memory: freed blocks kept for reuse (no page faults
per step) and the flat training buffers on transparent huge pages (the optimizer's and the
EMA's passes stream them without a TLB miss and a prefetch stop every 4 KiB).

Both only on Linux/glibc and for CPU runs; ``IPFM_FAST_HOST_MEMORY=default`` leaves the
C library's and the kernel's defaults. Neither changes a computed value.
"""

import ctypes
import functools
import os
import platform

import torch

from ipfm_fast.errors import InvalidInput

ENV = "IPFM_FAST_HOST_MEMORY"  # "keep" (default) or "default"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
KEEP_TRIM_THRESHOLD = 256 << 20
HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 1 << 20  # smaller buffers stay on 4 KiB pages (a huge page would be mostly padding)
_MADV_HUGEPAGE = 14
_kept = None  # what keep_freed did, once per process


def policy():
    """"keep" or "default", from IPFM_FAST_HOST_MEMORY (InvalidInput for anything else)."""
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "default"):
        raise InvalidInput(f"{ENV} must be keep or default, got {choice!r}")
    return choice


@functools.lru_cache(maxsize=None)
def _libc():
    if not platform.system() == "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6", use_errno=True)


def keep_freed():
    """Have glibc keep freed memory for reuse instead of returning it to the kernel: blocks
    under 32 MiB come from the heap (not from fresh mmaps) and the heap is trimmed only when
    256 MiB lie free at its top. Why: a CPU training step frees its gradients and
    activations and allocates them again; with glibc's adaptive defaults a process falls
    (by its allocation history) into a pattern that unmaps them and faults fresh zeroed
    pages back in: ~400-590 page faults per iteration of the e2e MLP step, 1-3 with this
    (benchmarks/bench_host_memory.py).
    Process-wide and once; the process keeps at most its peak plus 256 MiB. Not done under
    another allocator (LD_PRELOAD), when glibc's MALLOC_* variables are set, or with
    IPFM_FAST_HOST_MEMORY=default. Returns a line saying what was done."""
    global _kept
    if _kept is None:
        _kept = _keep_freed()
    return _kept


def _allocator_left_alone():
    """Why keep_freed leaves the C library's allocator as it is, or None when it sets the
    thresholds (one decision for keep_freed and describe)."""
    if policy() == "default":
        return f"glibc's default policy ({ENV}=default)"
    if _libc() is None:
        return "the C library's default policy (not glibc)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # tcmalloc, jemalloc, mimalloc...
        return f"the preloaded allocator's policy ({preload})"
    tuned = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_") if k in os.environ]
    if tuned:
        return f"glibc's policy as set by {', '.join(tuned)}"
    return None


def _keep_freed():
    reason = _allocator_left_alone()
    if reason:
        return reason
    libc = _libc()
    if not (libc.mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                  KEEP_TRIM_THRESHOLD)):
        return "glibc's default policy (mallopt refused the thresholds)"
    return (f"freed memory kept for reuse (glibc mmap threshold {KEEP_MMAP_THRESHOLD >> 20} MiB, trim threshold "
            f"{KEEP_TRIM_THRESHOLD >> 20} MiB; {ENV}=default leaves glibc's)")


def _huge_pages_lent():
    """Whether zeros() asks for transparent huge pages here."""
    return _libc() is not None and policy() == "keep" and transparent_huge_pages() in ("madvise", "always")


def describe():
    """What CPU training runs do with host memory here, in one line (no side effects)."""
    if policy() == "default":
        return f"the C library's and the kernel's defaults ({ENV}=default)"
    memory = _allocator_left_alone() or "freed memory kept for reuse"
    thp = transparent_huge_pages()
    pages = (f"flat training buffers on transparent huge pages (THP {thp})" if _huge_pages_lent()
             else f"4 KiB pages (THP {thp or 'unknown'})")
    return f"{memory}, {pages}; {ENV}=default leaves the defaults"


@functools.lru_cache(maxsize=None)
def transparent_huge_pages():
    """The kernel's THP mode ("always", "madvise", "never"), or None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def zeros(numel, dtype, device):
    """A zeroed 1-D buffer of ``numel`` elements. On CPU, when it spans at least 1 MiB and
    the kernel lends transparent huge pages on request: the buffer starts on a 2 MiB
    boundary and its pages are asked to be huge (madvise), before they are first touched.
    Torch's fused Adam over three such 2 MiB buffers with the caches flushed gains 2-3%
    (benchmarks/bench_host_memory.py). The buffer is a view of a slightly larger allocation
    (at most 4 MiB more)."""
    device = torch.device(device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES or not _huge_pages_lent():
        return torch.zeros(numel, dtype=dtype, device=device)
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)  # untouched pages: madvise before the first write
    start = -raw.data_ptr() % HUGE_PAGE
    _libc().madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(span), _MADV_HUGEPAGE)  # a hint
    buf = raw[start:start + nbytes].view(dtype)
    buf.zero_()
    return buf
