"""Timing one step function: steady-state warm-up, then per-step times, summarized as median and IQR.

timm's `benchmark.py` is the reference this improves on: it warms up a fixed number of steps and
reports a mean over the timed loop. Here:

- `warmup` steps are the minimum; warm-up then goes on until the step time has stopped drifting
  (the median of the last `window` steps within `tolerance` of the window before it), bounded by
  `max_warmup_s`, so a first timed step never pays for lazy kernel loading, autotuning or
  allocator growth. How many warm-up steps ran is part of the result.
- the timed loop runs in rounds of `iters` steps (more where `iters` steps would last less than
  `min_time_s`: a fast step gets as many as fill that time, sized from the warm-up's step time), at
  least `MIN_ROUNDS`, until the latest round's median agrees (within `tolerance`) with an earlier
  round's, at most `MAX_ROUNDS`. The figure is
  the median over the steps of the two agreeing rounds. A burst of other work on the machine (on a
  shared 2-core VM: a kernel thread, a neighbour) that slows one round for a few hundred
  milliseconds is then a round that agrees with nothing, not the trial's figure; a machine slow for
  the whole trial gives agreeing slow rounds, reported as they are. Rounds that never agree are
  reported over all their steps and marked `steady=False` (the record's `{phase}_timing_steady`).
- why `min_time_s`: a shared machine's speed wanders on a scale of seconds (on the 2-core dev VM the
  same loop in one process gives medians 1.15x apart over windows of 20 test_resnet steps, 0.3 s,
  and 1.04x over windows of 1,000 steps, 13 s), so a round of a few hundred milliseconds samples one
  moment of the machine. A round of a second or more averages that wander instead.
- each timed step is timed on its own: on CUDA with an event pair per step and one synchronization
  after each round (no host sync inside a round, so the launch queue stays full as in training);
  on CPU with `perf_counter`.
- `cudnn_benchmark()` turns cuDNN's autotuner on for the measurement, as timm's benchmark does,
  and restores the previous setting.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

WINDOW = 3  # steps per window of the drift test
TOLERANCE = 0.05  # windows whose medians differ by at most this are steady
MAX_WARMUP_S = 10.0  # warm-up stops here even if the step time still drifts
MIN_ROUNDS = 2  # timed rounds of `iters` steps: at least two, so one disturbed round cannot be the figure
MAX_ROUNDS = 5  # ... and at most this many while the rounds disagree


@dataclass(frozen=True)
class Timing:
    """Per-step times of one timed loop, in milliseconds, and how the warm-up went."""

    median_ms: float
    iqr_ms: float
    times_ms: tuple[float, ...]
    warmup_steps: int = 0
    warmup_steady: bool = True  # False: the time limit ended warm-up before the step time settled
    rounds: int = 1  # timed rounds run (`times_ms` holds the steps of the agreeing ones)
    steady: bool = True  # False: no two rounds agreed within MAX_ROUNDS (the figure is over all of them)
    steps: int = 0  # timed steps run in all rounds


def summarize(times_ms: list[float], warmup_steps: int = 0, warmup_steady: bool = True, *, rounds: int = 1,
              steady: bool = True, steps: int | None = None) -> Timing:
    """Median and inclusive-quartile IQR of `times_ms`."""
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return Timing(statistics.median(times_ms), q3 - q1, tuple(times_ms), warmup_steps, warmup_steady, rounds,
                  steady, len(times_ms) if steps is None else steps)


def agreeing(rounds: list[list[float]], tolerance: float = TOLERANCE) -> list[list[float]] | None:
    """The last round and the earlier round whose median is closest to it, if within `tolerance`; else None."""
    if len(rounds) < 2:
        return None
    last = statistics.median(rounds[-1])
    gap, best = min((abs(statistics.median(r) - last), i) for i, r in enumerate(rounds[:-1]))
    return [rounds[best], rounds[-1]] if gap <= tolerance * min(last, statistics.median(rounds[best])) else None


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
            max_warmup_s: float = MAX_WARMUP_S) -> tuple[int, bool, float]:
    """Run at least `warmup` steps, then until the step time is steady.

    Returns (steps run, steady, median ms of the last `WINDOW` steps).
    """
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(_timed_once(step, inputs, device))
        if len(times) >= warmup and (steady(times) or time.perf_counter() - start > max_warmup_s):
            return len(times), steady(times), statistics.median(times[-WINDOW:])


def round_steps(iters: int, min_time_s: float, step_ms: float) -> int:
    """Steps in a timed round: `iters`, or more when `iters` steps of `step_ms` last under `min_time_s`."""
    if min_time_s <= 0 or step_ms <= 0:
        return iters
    return max(iters, math.ceil(min_time_s * 1e3 / step_ms))


def time_steps(step: Callable, inputs: Any, *, warmup: int, iters: int, device: str, min_time_s: float = 0.0,
               max_warmup_s: float = MAX_WARMUP_S, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = MAX_ROUNDS, tolerance: float = TOLERANCE) -> Timing:
    """Warm up (see `warm_up`), then time rounds of `iters` steps (at least `min_time_s` long, see
    `round_steps`), each step on its own, until two agree.

    Raises:
        ValueError: `iters` < 1, `warmup` < 0, `min_time_s` < 0 or `min_rounds` outside 1..`max_rounds`.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}: at least one timed iteration is needed")
    if min_time_s < 0:
        raise ValueError(f"min_time_s={min_time_s} must not be negative")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must not be negative")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"min_rounds={min_rounds}, max_rounds={max_rounds}: need 1 <= min_rounds <= max_rounds")
    if device == "cuda":
        warmup = max(warmup, 1)  # the first CUDA step loads kernels and, with cudnn.benchmark, autotunes
    warmup_steps, settled, step_ms = warm_up(step, inputs, warmup=warmup, device=device, max_warmup_s=max_warmup_s)
    per_round = round_steps(iters, min_time_s, step_ms)
    rounds: list[list[float]] = []
    while True:
        rounds.append(timed_round(step, inputs, per_round, device))
        agreed = agreeing(rounds, tolerance) if min_rounds > 1 else rounds
        if (agreed is not None and len(rounds) >= min_rounds) or len(rounds) >= max_rounds:
            break
    chosen = agreed if agreed is not None else rounds
    return summarize([t for r in chosen for t in r], warmup_steps, settled, rounds=len(rounds),
                     steady=agreed is not None, steps=per_round * len(rounds))


def timed_round(step: Callable, inputs: Any, iters: int, device: str) -> list[float]:
    """Per-step times (ms) of `iters` steps: CUDA events and one synchronization, or perf_counter."""
    if device == "cuda":
        import torch

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        torch.cuda.synchronize()
        for begin, end in events:
            begin.record()
            step(inputs)
            end.record()
        torch.cuda.synchronize()
        return [b.elapsed_time(e) for b, e in events]
    times = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        step(inputs)
        times.append((clock() - t0) * 1e3)
    return times


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
