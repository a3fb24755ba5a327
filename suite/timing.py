"""Timing one step function: steady-state warm-up, then per-step times, summarized as median and IQR.

timm's `benchmark.py` is the reference this improves on: it warms up a fixed number of steps and
reports a mean over the timed loop. Here:

- `warmup` steps are the minimum; warm-up then goes on until the step time has stopped drifting
  (the median of the last `window` steps within `tolerance` of the window before it), bounded by
  `max_warmup_s`, so a first timed step never pays for lazy kernel loading, autotuning or
  allocator growth. How many warm-up steps ran is part of the result.
- each timed step is timed on its own: on CUDA with an event pair per step and one synchronization
  after the loop (no host sync inside the loop, so the launch queue stays full as in training);
  on CPU with `perf_counter`.
- `cudnn_benchmark()` turns cuDNN's autotuner on for the measurement, as timm's benchmark does,
  and restores the previous setting.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

WINDOW = 3  # steps per window of the drift test
TOLERANCE = 0.05  # windows whose medians differ by at most this are steady
MAX_WARMUP_S = 10.0  # warm-up stops here even if the step time still drifts


@dataclass(frozen=True)
class Timing:
    """Per-step times of one timed loop, in milliseconds, and how the warm-up went."""

    median_ms: float
    iqr_ms: float
    times_ms: tuple[float, ...]
    warmup_steps: int = 0
    warmup_steady: bool = True  # False: the time limit ended warm-up before the step time settled


def summarize(times_ms: list[float], warmup_steps: int = 0, warmup_steady: bool = True) -> Timing:
    """Median and inclusive-quartile IQR of `times_ms`."""
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return Timing(statistics.median(times_ms), q3 - q1, tuple(times_ms), warmup_steps, warmup_steady)


def _timed_once(step: Callable, inputs: Any, device: str) -> float:
    """Wall time of one step in ms, synchronized on CUDA (used in warm-up only)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(inputs)
        torch.cuda.synchronize()
    else:
        t0 = time.perf_counter()
        step(inputs)
    return (time.perf_counter() - t0) * 1e3


def steady(times_ms: list[float], window: int = WINDOW, tolerance: float = TOLERANCE) -> bool:
    """Whether the last `window` step times have the same median as the `window` before them."""
    if len(times_ms) < 2 * window:
        return False
    last = statistics.median(times_ms[-window:])
    before = statistics.median(times_ms[-2 * window:-window])
    return abs(last - before) <= tolerance * before


def warm_up(step: Callable, inputs: Any, *, warmup: int, device: str,
            max_warmup_s: float = MAX_WARMUP_S) -> tuple[int, bool]:
    """Run at least `warmup` steps, then until the step time is steady; return (steps run, steady)."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(_timed_once(step, inputs, device))
        if len(times) >= warmup and steady(times):
            return len(times), True
        if len(times) >= warmup and time.perf_counter() - start > max_warmup_s:
            return len(times), False


def time_steps(step: Callable, inputs: Any, *, warmup: int, iters: int, device: str,
               max_warmup_s: float = MAX_WARMUP_S) -> Timing:
    """Warm up (see `warm_up`), then time `iters` steps one by one.

    Raises:
        ValueError: `iters` < 1 or `warmup` < 0.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}: at least one timed iteration is needed")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must not be negative")
    if device == "cuda":
        warmup = max(warmup, 1)  # the first CUDA step loads kernels and, with cudnn.benchmark, autotunes
    warmup_steps, settled = warm_up(step, inputs, warmup=warmup, device=device, max_warmup_s=max_warmup_s)
    if device == "cuda":
        import torch

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        torch.cuda.synchronize()
        for begin, end in events:
            begin.record()
            step(inputs)
            end.record()
        torch.cuda.synchronize()
        return summarize([b.elapsed_time(e) for b, e in events], warmup_steps, settled)
    times = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        step(inputs)
        times.append((clock() - t0) * 1e3)
    return summarize(times, warmup_steps, settled)


@contextmanager
def cudnn_benchmark(device: str) -> Iterator[None]:
    """cuDNN's autotuner on during a CUDA measurement (timm's benchmark does the same), restored after."""
    if device != "cuda":
        yield
        return
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
