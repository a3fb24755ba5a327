"""Peak memory, one meaning on every device, measured in its own untimed pass.

Peak memory of a phase = the peak of live tensor memory while the phase's steps run, minus what
was live before the tower was built; the weights are counted once. So it holds weights, inputs,
activations, gradients and optimizer state, and nothing an earlier trial or the allocator kept.

- CUDA: `max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated` before
  the tower existed (cuBLAS workspaces and what a previous trial left are in that baseline).
  `max_memory_reserved` is kept as a secondary figure.
- CPU: `LiveTensors`, a dispatch mode that adds up the storages every operator creates and
  subtracts them when they are freed: independent of glibc's heap state and of the process's
  history, unlike the resident set. The RSS growth of the pass is kept as a secondary figure.

The pass runs before the timed loop (see `suite.measure`), so tracking never slows a timed step.
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from suite.device import cuda_in_use

MIB = 2**20


class LiveTensors(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the mode, and their peak.

    Storages are keyed by data pointer, so views and in-place results are counted once, and
    released through a weak-reference finalizer when torch frees them. Tensors that existed before
    the mode (weights) are not counted: the caller adds them once.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _release(self, ptr: int, nbytes: int) -> None:
        if self._sizes.get(ptr) == nbytes:
            del self._sizes[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._sizes:
                continue
            self._sizes[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, ptr, nbytes)
        return out


def tensor_mib(module: torch.nn.Module) -> float:
    """MiB of a module's parameters and buffers (shared storages once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / MIB


def settle(device: str) -> None:
    """Collect garbage and let queued GPU work finish (never creates a CUDA context)."""
    gc.collect()
    if device == "cuda" or cuda_in_use():
        torch.cuda.synchronize()


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class PassMemory:
    """What one memory pass found, in MiB (None where the device cannot say)."""

    peak_mib: float | None  # live tensors: weights + everything the phase allocated, at its peak
    reserved_mib: float | None = None  # CUDA: the caching allocator's peak reservation
    rss_growth_mib: float | None = None  # CPU: resident-set high-water growth during the pass


class MemoryBaseline:
    """What was live before the tower existed; `measure` makes one per trial.

    Args:
        device: 'cpu' or 'cuda'.
        weights_mib: weights of a tower built before the baseline (the caller's own tower),
            added back so that peaks count them as for a tower built here.
    """

    def __init__(self, device: str, weights_mib: float = 0.0):
        self.device = device
        settle(device)
        self.cuda_mib = torch.cuda.memory_allocated() / MIB - weights_mib if device == "cuda" else 0.0

    @property
    def method(self) -> str:
        if self.device == "cuda":
            return "live tensors: cuda max_memory_allocated minus before the tower, own untimed pass"
        return "live tensors: storages tracked by a dispatch mode, plus weights, own untimed pass"

    @contextmanager
    def track(self, weights_mib: float) -> Iterator[list[PassMemory]]:
        """Track one pass: `with baseline.track(weights) as out: ...` leaves a `PassMemory` in `out`."""
        out: list[PassMemory] = []
        settle(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            yield out
            settle(self.device)
            out.append(PassMemory(torch.cuda.max_memory_allocated() / MIB - self.cuda_mib,
                                  torch.cuda.max_memory_reserved() / MIB))
            return
        rss_start = _status_mib("VmRSS") if _reset_rss_peak() else None
        with LiveTensors() as live:
            yield out
        hwm = _status_mib("VmHWM")
        growth = None if rss_start is None or hwm is None else max(0.0, hwm - rss_start)
        out.append(PassMemory(weights_mib + live.peak / MIB, None, growth))


# Allocation failures that are not `torch.OutOfMemoryError`: the CPU allocator raises a plain
# RuntimeError, and cuBLAS/cuDNN report failed workspace allocations as status codes or as a
# failed engine search.
_OOM_MESSAGES = ("defaultcpuallocator", "can't allocate memory", "not enough memory", "out of memory",
                 "cublas_status_alloc_failed", "cublas_status_not_initialized", "cudnn_status_alloc_failed",
                 "unable to find an engine")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory failure, on any device (Python's MemoryError included)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(m in str(exc).lower() for m in _OOM_MESSAGES)
