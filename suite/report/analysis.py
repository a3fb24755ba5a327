"""The maths the report and its plots share: Pareto fronts and one-axis ablation effects.

Pure functions of result rows (no torch, no pandas import, no formatting): the report renders
what these return, and the plots draw the same numbers, so a table and its plot never disagree.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from suite.core.options import OPTION_BY_NAME, config_value, same_config
from suite.results.rows import IDENTITY, get, num, rows_of, sort_key, varying_axes

# The metrics of an ablation: (column, kind), kind "ratio" (variant / reference) or "delta" (points).
EFFECT_METRICS = (
    ("train_samples_per_sec", "ratio"),
    ("infer_samples_per_sec", "ratio"),
    ("train_peak_mem_mib", "ratio"),
    ("infer_peak_mem_mib", "ratio"),
    ("probe_top1", "delta"),
)


def last_finished(df) -> float | None:
    """The latest `finished_at` of the results (unix time), None when no trial recorded one.

    Reports and exports date themselves by this, never by the clock, so they stay reproducible.
    """
    ends = [num(v) for v in df["finished_at"]] if "finished_at" in df.columns else []
    ends = [e for e in ends if e is not None]
    return max(ends) if ends else None


def pareto_front(rows: list, x: str, y: str, *, max_x: bool = True, max_y: bool = True) -> list:
    """Rows not dominated in (x, y); a row with either value missing is left out.

    Returned sorted by x, best x first (ties: by trial_id), so a plot can draw the front in order.
    """
    sx, sy = (1 if max_x else -1), (1 if max_y else -1)
    pts = [(sx * num(get(r, x)), sy * num(get(r, y)), r) for r in rows
           if num(get(r, x)) is not None and num(get(r, y)) is not None]
    front = []
    for a in pts:
        dominated = any(b[0] >= a[0] and b[1] >= a[1] and (b[0] > a[0] or b[1] > a[1]) for b in pts)
        if not dominated:
            front.append(a)
    front.sort(key=lambda p: (-p[0], -p[1], str(get(p[2], "trial_id"))))
    return [p[2] for p in front]


@dataclass
class Effect:
    """Changing one axis from `ref` to `value` with everything else fixed."""

    axis: str
    ref: Any
    value: Any
    n: int = 0  # matched pairs where both ran ok
    medians: dict[str, float | None] = field(default_factory=dict)


def reference_value(name: str, values: list) -> Any:
    """The baseline of an axis: its default when swept, else its most common value."""
    default = OPTION_BY_NAME[name].default
    if any(same_config(name, v, default) for v in values):
        return default
    counts: dict[str, tuple[int, Any]] = {}
    for v in values:
        c = counts.get(config_value(name, v), (0, v))
        counts[config_value(name, v)] = (c[0] + 1, v)
    return sorted(counts.values(), key=lambda cv: (-cv[0], sort_key(cv[1])))[0][1]


def _median_change(pairs: list[tuple], metric: str, kind: str) -> float | None:
    """Median over (reference, variant) row pairs of the ratio or the difference of `metric`."""
    vals = []
    for a, b in pairs:
        xa, xb = num(get(a, metric)), num(get(b, metric))
        if xa is None or xb is None or (kind == "ratio" and xa <= 0):
            continue
        vals.append(xb / xa if kind == "ratio" else xb - xa)
    return statistics.median(vals) if vals else None


def ablation_effects(df, axes: list[str] | None = None) -> list[Effect]:
    """Median effect of each axis over pairs of ok trials that differ only in that axis.

    Ratios are variant / reference (e.g. train memory 0.58x); probe top-1 is a difference in points.
    Pairs are matched within one environment: every other identity option and env_key equal.
    """
    all_rows = rows_of(df)
    rows = [r for r in all_rows if get(r, "status") == "ok"]
    axes = varying_axes(df) if axes is None else axes
    effects = []
    for axis in axes:
        all_values = [get(r, axis) for r in all_rows]
        ref = reference_value(axis, all_values)
        # Pairs: same environment, model and every other identity option; only `axis` differs.
        groups: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            key = (get(r, "env_key"),) + tuple(config_value(a, get(r, a)) for a in IDENTITY if a != axis)
            groups.setdefault(key, {})[config_value(axis, get(r, axis))] = r
        ref_key = config_value(axis, ref)
        variants = {config_value(axis, v): v for v in all_values if config_value(axis, v) != ref_key}
        for vkey, value in sorted(variants.items(), key=lambda kv: sort_key(kv[1])):
            pairs = [(g[ref_key], g[vkey]) for g in groups.values() if ref_key in g and vkey in g]
            medians = {metric: _median_change(pairs, metric, kind) for metric, kind in EFFECT_METRICS}
            effects.append(Effect(axis, ref, value, len(pairs), medians))
    return effects
