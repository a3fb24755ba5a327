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

The breakdown of the peak (weights, gradients, optimizer state, activations) comes from the same
dispatch mode on both devices: it logs every storage, the caller tags gradients and optimizer
state as they appear, and the storages live at the peak are summed by tag. On CPU the parts add
up to the peak exactly (one counter); on CUDA the total is the allocator's, and what the dispatch
mode cannot see (allocator rounding, library workspaces allocated in the pass) is left out of the
parts, so they add up to a little less than the peak.

The pass runs before the timed loop (see `suite.measurement.engine`), so tracking never slows a timed step.
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

from suite.machine.device import cuda_in_use

MIB = 2**20


class LiveTensors(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the mode, their peak, and what was live then.

    Storages are keyed by data pointer, so views and in-place results are counted once, and
    released through a weak-reference finalizer when torch frees them. Tensors that existed before
    the mode (weights) are not counted, nor are views of them (an output on an input's storage):
    the caller adds them once.

    Every allocation is logged (size, when it was born and died, a kind the caller may `tag`), so
    the storages live at the peak can be told apart after the pass (`at_peak`) without copying the
    live set each time the peak grows.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._by_ptr: dict[int, int] = {}  # data pointer -> index into _allocs, while live
        self._allocs: list[list] = []  # [nbytes, born, died (None: live), kind (None: untagged)]
        self._clock = 0
        self._peak_at = 0

    def _release(self, ptr: int, index: int) -> None:
        if self._by_ptr.get(ptr) == index:
            del self._by_ptr[ptr]
            record = self._allocs[index]
            self._clock += 1
            record[2] = self._clock
            self.live -= record[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None  # storages of the op's inputs: an output on one of them is a view or in-place
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._by_ptr:
                continue
            if inputs is None:
                inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor) and a.device.type != "meta"}
            if ptr in inputs:  # e.g. `aten.t(weight)` in a Linear: the weight's storage, not a new one
                continue
            self._clock += 1
            self._by_ptr[ptr] = len(self._allocs)
            self._allocs.append([nbytes, self._clock, None, None])
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self._peak_at = self.live, self._clock
            weakref.finalize(storage, self._release, ptr, len(self._allocs) - 1)
        return out

    def tag(self, tensor: torch.Tensor, kind: str) -> bool:
        """Mark the live storage of `tensor` as `kind` (e.g. 'grads'); False if the mode did not create it."""
        index = self._by_ptr.get(tensor.untyped_storage().data_ptr())
        if index is None:
            return False
        self._allocs[index][3] = kind
        return True

    def at_peak(self) -> dict[str | None, int]:
        """Bytes live at the peak, by kind (None: untagged), summing to `peak`."""
        out: dict[str | None, int] = {}
        for nbytes, born, died, kind in self._allocs:
            if born <= self._peak_at and (died is None or died > self._peak_at):
                out[kind] = out.get(kind, 0) + nbytes
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


def recover(tower: torch.nn.Module, device: str) -> None:
    """Clean up after an out-of-memory try: drop gradients, collect, empty the CUDA cache."""
    tower.zero_grad(set_to_none=True)
    settle(device)
    if device == "cuda":
        torch.cuda.empty_cache()


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
    # What was live at the peak, by `suite.measurement.capacity.PARTS`; "activations" is the rest: saved activations, the
    # inputs, and temporaries (autocast copies, optimizer scratch). None where the dispatch mode
    # could not watch the pass (compiled code on CUDA).
    parts: dict[str, float] | None = None


class Tracking:
    """What `MemoryBaseline.track` yields: `live` (the dispatch mode, to `tag` storages; None
    when not watched) during the pass, and `result` (a `PassMemory`) after it."""

    def __init__(self, live: LiveTensors | None):
        self.live = live
        self.result: PassMemory | None = None

    def parts(self, weights_mib: float, inputs_mib: float) -> dict[str, float] | None:
        if self.live is None:
            return None
        by_kind = {k: v / MIB for k, v in self.live.at_peak().items()}
        parts = {"weights": weights_mib, "grads": by_kind.pop("grads", 0.0),
                 "optimizer": by_kind.pop("optimizer", 0.0)}
        parts["activations"] = inputs_mib + sum(by_kind.values())
        return parts


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
        if device == "cuda":  # blocks cached by earlier trials go back: a trial starts as in a fresh process
            torch.cuda.empty_cache()
        self.cuda_mib = torch.cuda.memory_allocated() / MIB - weights_mib if device == "cuda" else 0.0

    @property
    def method(self) -> str:
        if self.device == "cuda":
            return "live tensors: cuda max_memory_allocated minus before the tower, own untimed pass"
        return "live tensors: storages tracked by a dispatch mode, plus weights, own untimed pass"

    @contextmanager
    def track(self, weights_mib: float, inputs_mib: float = 0.0, *, held_mib: float = 0.0,
              watch: bool = True) -> Iterator[Tracking]:
        """Track one pass: `with baseline.track(w, x) as t: ...` leaves a `PassMemory` in `t.result`.

        Args:
            weights_mib: the tower's weights (they exist before the pass: counted once).
            inputs_mib: the pass's input batch, made before the pass (counted once).
            held_mib: CUDA: tensors the caller holds that are not part of this pass (another
                batch's inputs), taken off the allocator's figure.
            watch: run the dispatch mode to break the peak down (CPU: always, it is the count).
        """
        settle(self.device)
        if self.device == "cuda":
            tracking = Tracking(LiveTensors() if watch else None)
            torch.cuda.reset_peak_memory_stats()
            if tracking.live is None:
                yield tracking
            else:
                with tracking.live:
                    yield tracking
            settle(self.device)
            tracking.result = PassMemory(torch.cuda.max_memory_allocated() / MIB - self.cuda_mib - held_mib,
                                         torch.cuda.max_memory_reserved() / MIB,
                                         parts=tracking.parts(weights_mib, inputs_mib))
            return
        rss_start = _status_mib("VmRSS") if _reset_rss_peak() else None
        tracking = Tracking(LiveTensors())
        with tracking.live:
            yield tracking
        hwm = _status_mib("VmHWM")
        growth = None if rss_start is None or hwm is None else max(0.0, hwm - rss_start)
        tracking.result = PassMemory(weights_mib + inputs_mib + tracking.live.peak / MIB, None, growth,
                                     tracking.parts(weights_mib, inputs_mib))


# Allocation failures that are not `torch.OutOfMemoryError`: the CPU allocator raises a plain
# RuntimeError, and cuBLAS/cuDNN report failed workspace allocations as status codes or as a
# failed engine search.
_OOM_MESSAGES = ("defaultcpuallocator", "can't allocate memory", "not enough memory", "out of memory",
                 "cublas_status_alloc_failed", "cublas_status_not_initialized", "cudnn_status_alloc_failed",
                 "unable to find an engine")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory failure, on any device (Python's MemoryError included)."""
    if isinstance(exc, (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)):
        return True
    return any(m in str(exc).lower() for m in _OOM_MESSAGES)
