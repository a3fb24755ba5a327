"""The experiment's `select` block: the user's objective and constraints, and applying them.

    select:
      objective: max probe_top1
      constraints: ["train_peak_mem_mib <= 20480", "train_samples_per_sec >= 500"]
      top: 3

`apply_select` keeps the `ok` trials that meet every constraint, ranks them by the objective, and
says for every other trial why it was left out, so the report's recommendation can be checked.

This module must stay light: no torch (pandas only at call time).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

from suite.records import MeasureResult, ProbeResult
from suite.rows import number, rows_of

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>)\s*(\S+)\s*$")
KEYS = ("objective", "constraints", "top")


def _numeric_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if str(f.type).replace(" ", "").split("|")[0] in ("int", "float")]


# What a select block may refer to: the numeric result fields.
METRICS: tuple[str, ...] = tuple(_numeric_fields(MeasureResult) + _numeric_fields(ProbeResult))


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    value: float

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {_fmt(self.value)}"

    def holds(self, x: float) -> bool:
        return OPS[self.op](x, self.value)


@dataclass(frozen=True)
class Select:
    """A parsed select block: maximise/minimise `metric` subject to `constraints`."""

    metric: str
    direction: str  # "max" or "min"
    constraints: tuple[Constraint, ...] = ()
    top: int = 3

    @property
    def objective(self) -> str:
        return f"{self.direction} {self.metric}"


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


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show(x: float) -> str:
    """A measured value rounded for a sentence: 8944.39 -> '8,944', 0.0123 -> '0.0123'."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _bad(where: str, value: Any, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem} (got {value!r})")


def _check_metric(name: str, where: str, value: Any) -> str:
    if name in METRICS:
        return name
    close = difflib.get_close_matches(name, METRICS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; metrics: {', '.join(METRICS)}"
    raise _bad(where, value, f"unknown metric {name!r}{hint}")


def parse_constraint(text: Any, where: str) -> Constraint:
    """Parse 'metric OP number', e.g. 'train_peak_mem_mib <= 20480'."""
    if not isinstance(text, str):
        raise _bad(where, text, "must be a string like 'train_peak_mem_mib <= 20480'")
    m = _CONSTRAINT.match(text)
    if not m:
        raise _bad(where, text, "must be 'METRIC OP NUMBER' with OP one of <=, <, >=, >, ==")
    metric, op, raw = m.groups()
    metric = _check_metric(metric, where, text)
    try:
        value = float(raw)
    except ValueError:
        raise _bad(where, text, f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _bad(where, text, "the bound must be a finite number")
    return Constraint(metric, op, value)


def parse_select(block: Any, *, where: str = "select") -> Select:
    """Validate and parse a select block.

    Args:
        block: the mapping from the experiment file.
        where: key path used in error messages (e.g. 'smoke.yaml: select').

    Raises:
        ValueError: naming the key path and the value, with close matches for unknown names.
    """
    if not isinstance(block, dict):
        raise _bad(where, block, "must be a mapping with 'objective' (e.g. 'max probe_top1'), 'constraints', 'top'")
    for key in block:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(KEYS)}"
            raise _bad(f"{where}.{key}", key, f"unknown key{hint}")
    if "objective" not in block:
        raise ValueError(f"{where}.objective: missing; write e.g. 'max probe_top1' or 'min train_peak_mem_mib'")
    objective = block["objective"]
    parts = objective.split() if isinstance(objective, str) else []
    if len(parts) != 2 or parts[0] not in ("max", "min"):
        raise _bad(f"{where}.objective", objective, "must be 'max METRIC' or 'min METRIC', e.g. 'max probe_top1'")
    metric = _check_metric(parts[1], f"{where}.objective", objective)

    constraints = block.get("constraints", [])
    if isinstance(constraints, str):
        constraints = [constraints]
    if not isinstance(constraints, list):
        raise _bad(f"{where}.constraints", constraints, "must be a list of 'METRIC OP NUMBER' strings")
    parsed = tuple(parse_constraint(c, f"{where}.constraints[{i}]") for i, c in enumerate(constraints))

    top = block.get("top", 3)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise _bad(f"{where}.top", top, "must be a positive integer (best plus runner-ups)")
    return Select(metric, parts[0], parsed, top)


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
