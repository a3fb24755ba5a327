"""Applying the experiment's `select` block: rank the trials that meet the user's constraints.

`apply_select` keeps the `ok` trials that meet every constraint, ranks them by the objective, and
says for every other trial why it was left out, so the report's recommendation can be checked.
Parsing the block (`parse_select`, `Select`, `Constraint`) lives in `suite.criteria`.

This module must stay light: no torch (pandas only at call time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from suite.criteria import Select
from suite.rows import number, rows_of


@dataclass
class Selection:
    """The outcome of `apply_select`.

    Attributes:
        select: the select block applied.
        ranked: rows (dicts of column -> value) of the trials that meet every constraint, best first.
        excluded: (row, reason) for every other trial, ordered by trial_id.
    """

    select: Select
    ranked: list = field(default_factory=list)
    excluded: list = field(default_factory=list)

    @property
    def best(self):
        return self.ranked[0] if self.ranked else None

    @property
    def runner_ups(self) -> list:
        return self.ranked[1 : self.select.top]


def _show(x: float) -> str:
    """A measured value rounded for a sentence, precise enough to see why it fails a bound:
    8944.39 -> '8,944', 900.5 -> '900.5', 0.0123 -> '0.0123'."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def exclusion_reason(row, select: Select) -> str | None:
    """Why a trial cannot be recommended, or None when it qualifies."""
    if row.get("status") != "ok":
        reason = row.get("reason") or ""
        return f"status {row.get('status')}" + (f": {reason}" if reason else "")
    value = number(row.get(select.metric))
    if value is None:
        return f"{select.metric} not measured"
    failed = []
    for c in select.constraints:
        x = number(row.get(c.metric))
        if x is None:
            failed.append(f"{c.metric} not measured (needed for {c.text})")
        elif not c.holds(x):
            failed.append(f"{c.metric} = {_show(x)} fails {c.text}")
    return "; ".join(failed) or None


def apply_select(df, select: Select) -> Selection:
    """Rank the trials of `df` under `select`.

    Ties in the objective are broken by trial_id, so the result does not depend on row order.
    """
    out = Selection(select)
    rows = sorted(rows_of(df), key=lambda r: str(r.get("trial_id")))
    sign = -1.0 if select.direction == "max" else 1.0
    for row in rows:
        reason = exclusion_reason(row, select)
        if reason is None:
            out.ranked.append(row)
        else:
            out.excluded.append((row, reason))
    out.ranked.sort(key=lambda r: (sign * float(r[select.metric]), str(r["trial_id"])))
    return out
