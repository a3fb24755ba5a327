"""Put a measuring process into a steady state before it times anything.

On CPU, glibc's allocator is the largest hidden variable in a throughput figure. By default its
mmap threshold is dynamic (128 KiB, growing as large blocks are freed) and freed heap is trimmed
back to the OS, so early steps of a process map, page-fault and unmap their activations afresh,
and later trials inherit whatever heap the earlier ones grew. Measured on the 2-core dev machine
(reports/benchmarks.md has the figures): test_resnet inference 857 img/s as the first
measurement of a process and ~1,150 later; with the allocator held steady, the same from the first
run on, and faster.

`steady_allocator()` fixes that once per process, before anything is timed: no block is served by
its own mmap (a fixed threshold alone stops at glibc's 32 MiB maximum, and a 224-px activation is
larger), so every tensor comes from the heap and is reused, and a trim threshold so high that freed
heap is never returned between steps. Measured on resnet18 at 224 px, batch 16, inference: 56 img/s
with the 32 MiB threshold, 59 with no mmap at all. It uses `mallopt` through
ctypes (it does not need the process to be restarted) and does nothing where another allocator is
preloaded (jemalloc, tcmalloc through `LD_PRELOAD`: those are steady by design) or the C library is
not glibc. `allocator()` describes the result for the environment fingerprint: rows measured under
another allocator are another environment.

Light: ctypes only, no torch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # never trim freed heap between steps (mallopt takes an int)
# The same settings as environment variables, for processes started before any code runs.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
                 "MALLOC_MMAP_MAX_": "0"}
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_state = {"applied": False}


def preloaded_allocator() -> str | None:
    """The name of an allocator preloaded with LD_PRELOAD (jemalloc, tcmalloc, mimalloc), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADED if name in preload), None)


@functools.lru_cache(maxsize=1)
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def steady_allocator() -> str:
    """Hold the C allocator steady for the rest of this process (idempotent); return `allocator()`.

    Call it before the first measurement of a process: `suite bench`, each sweep worker, the
    benchmarks. A process started with `ALLOCATOR_ENV` in its environment is steady from its
    first allocation; this call gets the same settings into a process that is already running.
    """
    libc = _glibc()
    if libc is not None and preloaded_allocator() is None and not _state["applied"]:
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok &= libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        _state["applied"] = ok
    return allocator()


def allocator() -> str:
    """This process's allocator settings, as the environment fingerprint records them."""
    preloaded = preloaded_allocator()
    if preloaded:
        return f"{preloaded} (LD_PRELOAD)"
    if _glibc() is None:
        return f"system ({platform.system()} {platform.libc_ver()[0] or 'libc'})"
    version = platform.libc_ver()[1]
    if _state["applied"] or all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()):
        return f"glibc {version} steady (no mmap, no trim)"
    return f"glibc {version} default (dynamic mmap threshold, trimming)"
