"""Capacity: the largest batch that fits a memory budget, predicted from a line or found by search.

Peak memory is affine in the batch: `peak(b) = fixed + per_sample * b`, where `fixed` holds the
weights, gradients, optimizer state and batch-independent workspaces, and `per_sample` the
activations and inputs of one sample. Two memory passes at different batch sizes give the line;
the largest batch under a budget is `floor((budget - fixed) / per_sample)`. The prediction is
checked against a search (`search_max_batch`): on a GPU with real out-of-memory errors, on a CPU
(and in `python -m benchmarks.bench_memory`) against the measured live-tensor peak.

Pure functions, no torch: the report reads the same line (the "fits on" table) as `measure` uses.
"""
from __future__ import annotations

import math
from typing import Callable

PARTS = ("weights", "grads", "optimizer", "activations")  # the breakdown of a peak, in this order
MIB_PER_GIB = 1024


def affine_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares line through (batch, peak MiB) points: (fixed MiB, MiB per sample).

    Returns:
        None when fewer than two distinct batch sizes were measured (no line through one point).
    """
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / sum((b - mean_b) ** 2 for b, _ in points)
    return mean_m - slope * mean_b, slope


def predict_max_batch(fixed_mib: float | None, per_sample_mib: float | None, budget_mib: float | None) -> int | None:
    """The largest batch whose predicted peak is within `budget_mib` (0: not even one sample fits).

    None when the line or the budget is unknown, or memory does not grow with the batch (the
    prediction would be unbounded: the line was not measured well).
    """
    if fixed_mib is None or per_sample_mib is None or budget_mib is None or per_sample_mib <= 0:
        return None
    return max(0, math.floor((budget_mib - fixed_mib) / per_sample_mib))


def search_max_batch(fits: Callable[[int], bool], start: int, limit: int = 1 << 16) -> int:
    """The largest batch `b <= limit` with `fits(b)`, assuming fits is monotone (true up to some b).

    Doubles up from `start` (or halves down) until the answer is bracketed, then bisects:
    about 2 log2(answer / start) calls. Returns 0 when not even a batch of one fits.
    """
    start = max(1, min(start, limit))
    if fits(start):
        lo, hi = start, None
        while hi is None:
            if lo >= limit:
                return limit
            nxt = min(2 * lo, limit)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        hi, lo = start, 0
        while hi > 1:
            nxt = hi // 2
            if fits(nxt):
                lo = nxt
                break
            hi = nxt
        if lo == 0:
            return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
