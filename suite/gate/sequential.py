"""The confirm step's statistics: a paired, sequential test with a stated false-alarm rate.

A flagged trial is re-measured in A/B blocks (`suite.gate.abtest`): in each block, fresh processes of
baseline and current build the trial and time short rounds back to back, in the same conditions.
A pair gives the log of the current side's speed over the baseline's (speed = 1 / step time), so
whatever slows the whole machine for a moment slows both halves and cancels; a block's figure is the
mean of its pairs, and the blocks are the units judged (a process carries a speed bias of its own,
so one process pair is one sample). Over n blocks:

- the change's interval is the t interval of the blocks' mean log ratio, at the level the error
  budget leaves for this look (below), turned back into a relative change;
- "regression": the whole interval is worse than the threshold (the slowdown beyond the threshold
  is significant);
- "no regression": the whole interval is better than the threshold (no change, an improvement, or
  a slowdown shown to be smaller than the threshold);
- otherwise, after the last look or when the time budget is spent: "cannot tell", with the noise
  that kept the interval wider than the threshold.

Error rate: the probability of calling a trial a regression when its true slowdown is at most the
threshold is at most `ALPHA` for all flagged experiments together. Each experiment may look at its
blocks at `LOOKS` (so at most `len(LOOKS)` times) and each look of each experiment spends
ALPHA / (experiments x looks) of it (Bonferroni over trials and looks: conservative, and valid
whatever the looks' correlation). The same bound holds for calling a real slowdown beyond the
threshold "no regression".

Pure Python and numpy/scipy (no torch): tested with injected figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # family-wise false-alarm rate of the confirm step
LOOKS = (4, 6, 8, 12, 16, 24, 32)  # blocks after which an experiment may stop; the last is the cap
MAX_BLOCKS = LOOKS[-1]


@dataclass(frozen=True)
class Decision:
    """The verdict of one A/B experiment after `n` units (blocks); changes are relative (+0.05: 5% faster)."""

    verdict: str  # "regression" | "no regression" | "cannot tell" | "undecided" (more blocks may decide)
    n: int
    change: float | None  # the units' mean, as a relative change of speed
    lo: float | None  # the interval of the change at `confidence`
    hi: float | None
    noise: float | None  # one unit's relative noise (the units' standard deviation)
    confidence: float  # two-sided level of the interval
    boundary: float  # the threshold as a relative change of speed (e.g. -0.05)
    reason: str = ""


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t  # scikit-learn's dependency: always installed with the suite

    return float(t.ppf(p, df))


def alpha_per_look(experiments: int, alpha: float = ALPHA) -> float:
    """The one-sided error each look of each experiment may spend (Bonferroni over experiments and looks)."""
    return alpha / (max(1, experiments) * len(LOOKS))


def decide(log_ratios: list[float], boundary: float, *, experiments: int = 1, final: bool = False,
           alpha: float = ALPHA) -> Decision:
    """Judge the units (blocks) so far.

    Args:
        log_ratios: per unit, log(current speed / baseline speed).
        boundary: the threshold as a relative change of speed, worse side (-0.05 for "5% slower").
        experiments: how many A/B experiments share the error budget (flagged trial phases).
        final: no more units will come (last look, or the budget is spent): "cannot tell" instead of "undecided".
    """
    n = len(log_ratios)
    a = alpha_per_look(experiments, alpha)
    confidence = 1 - 2 * a
    if n < 2:
        why = f"{n} block{'s' * (n != 1)}: too few to estimate the noise"
        return Decision("cannot tell" if final else "undecided", n, None, None, None, None, confidence, boundary, why)
    x = np.asarray(log_ratios, dtype=float)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(1 - a, n - 1) * sd / math.sqrt(n)
    lo, hi = math.expm1(mean - half), math.expm1(mean + half)
    b = boundary
    if hi < b:
        verdict, why = "regression", f"the whole interval is worse than the threshold {100 * b:+.1f}%"
    elif lo > b:
        verdict, why = "no regression", f"the whole interval is better than the threshold {100 * b:+.1f}%"
    elif final:
        verdict = "cannot tell"
        why = (f"noise ±{100 * math.expm1(half):.1f}% after {n} blocks is wider than the distance to the "
               f"threshold {100 * b:+.1f}%")
    else:
        verdict, why = "undecided", ""
    return Decision(verdict, n, math.expm1(mean), lo, hi, math.expm1(sd), confidence, b, why)


def boundary_of(metric: str, threshold, baseline: float) -> float:
    """A timing threshold as a relative change of speed (worse side, negative), for `metric`'s stored baseline.

    Throughput, TFLOP/s and MFU move with speed; step time moves against it (+5% step time is
    1/1.05 - 1 = -4.8% speed). An absolute threshold is taken relative to the baseline figure.
    """
    limit = threshold.limit / 100 if threshold.relative else threshold.limit / abs(baseline)
    if metric.endswith("_step_time"):
        return 1 / (1 + limit) - 1
    return -min(limit, 0.999999)
