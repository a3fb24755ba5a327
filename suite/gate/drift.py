"""Drift between two stored runs: how much all trials moved together, judged apart from each trial's own move.

Two runs of the same code made at different times on a shared machine differ as a whole (on the
2-core dev VM, identical smoke runs moved +20% together: the second ran while the machine was
faster). That common move says nothing about any one tower, so for each timing metric:

- the common move is the median over the compared trials of log(current / baseline), needing at
  least `MIN_TRIALS` of them (fewer: nothing is removed, and the report says so);
- each trial is judged net of it (current / (1 + common move)), against its threshold and a noise
  band that includes the trials' scatter around the common move (robust standard deviations, as
  many as keep the chance that any of n identical trials falls outside under `FAMILY_ALPHA`): only
  trials that move against the rest are flagged;
- a common move beyond the threshold is neither passed nor failed from the stored figures: the
  trial nearest the common move stands for it ("cannot tell"), and the A/B re-measurement of that
  trial (`suite compare --confirm`) tells drift of the machine (no change A/B) from a change to every
  tower (a regression A/B).

Memory and accuracy are deterministic here and are judged as stored. Pure Python (no torch).
"""
from __future__ import annotations

import math
import statistics
from statistics import NormalDist

from suite.gate.verdict import Change, Comparison, is_timing, judge

MIN_TRIALS = 5  # compared trials of a metric needed to estimate its common move
FAMILY_ALPHA = 0.05  # chance that any trial of an unchanged run falls outside the scatter band (two-sided)
_MAD_TO_SD = 1.4826


def common_move(log_ratios: list[float]) -> tuple[float, float]:
    """(median, robust standard deviation around it) of per-trial log ratios."""
    centre = statistics.median(log_ratios)
    mad = statistics.median(abs(r - centre) for r in log_ratios)
    return centre, _MAD_TO_SD * mad


def band_width(n: int) -> float:
    """Standard deviations of the scatter band for n trials (Bonferroni: 2.7 for 8 trials, 3.3 for 46)."""
    return NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * n))


def remove_drift(c: Comparison) -> None:
    """Judge every timing change net of its metric's common move, in place (see the module doc)."""
    by_metric: dict[str, list[Change]] = {}
    for ch in c.changes:
        if (is_timing(ch.metric) and ch.threshold is not None and ch.threshold.relative and ch.baseline
                and ch.current and ch.baseline > 0 and ch.current > 0):
            by_metric.setdefault(ch.metric, []).append(ch)
    for metric, changes in by_metric.items():
        if len(changes) < MIN_TRIALS:
            c.drift[metric] = {"n": len(changes), "shift": None, "scatter": None}
            continue
        logs = [math.log(ch.current / ch.baseline) for ch in changes]
        centre, scatter = common_move(logs)
        shift = math.expm1(centre)
        c.drift[metric] = {"n": len(changes), "shift": shift, "scatter": math.expm1(scatter)}
        for ch, r in zip(changes, logs):
            ch.drift = shift
            noise = max(ch.noise or 0.0, math.expm1(band_width(len(changes)) * scatter))
            ch.noise = noise
            ch.verdict = judge(metric, ch.baseline, ch.baseline * math.exp(r - centre), ch.threshold, noise)
        if 100 * abs(shift) > changes[0].threshold.limit and _worse(metric, shift):
            stand_in = min(zip(changes, logs), key=lambda pair: (abs(pair[1] - centre), pair[0].label))[0]
            stand_in.verdict, stand_in.common = "cannot tell", True


def _worse(metric: str, shift: float) -> bool:
    return shift > 0 if metric.endswith("_step_time") else shift < 0


def drift_lines(c: Comparison) -> list[str]:
    """The report's lines on the common move of each timing metric."""
    lines = []
    for metric, d in c.drift.items():
        if d["shift"] is None:
            lines.append(f"`{metric}`: {d['n']} trials compared, too few (< {MIN_TRIALS}) to tell a move of the whole "
                         "machine from a move of each trial: judged as stored.")
            continue
        beyond = any(ch.common for ch in c.changes if ch.metric == metric)
        lines.append(f"`{metric}`: all {d['n']} trials moved together by {100 * d['shift']:+.1f}% (median; the trials "
                     f"scatter ±{100 * d['scatter']:.1f}% around it). Each trial is judged net of that move"
                     + (": a common move beyond the threshold is drift of the machine or a change to every tower, "
                        "which an A/B re-measurement decides." if beyond else "."))
    return lines
