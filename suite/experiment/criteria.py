"""What an experiment file may say about results: its `select:` and `compare:` blocks.

    select:
      objective: max probe_top1
      constraints: ["train_peak_mem_mib <= 20480", "train_samples_per_sec >= 500"]
      then: max train_samples_per_sec   # the tie-break among statistically tied towers
      top: 3
    compare: {train_samples_per_sec: -5%, probe_top1: -1, train_peak_mem_mib: off}

This module parses and validates those blocks, and holds the metric vocabulary they use: which
metrics exist, which way is better, and how the read side names and shows them. Applying the
blocks to results lives in `select` (ranking) and `compare` (the regression gate).

Light on purpose (no pandas, no torch, no report code): `config` imports it to check an
experiment file before anything runs.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from suite.core.errors import SuiteError, suggest
from suite.core.records import RESULT_COLUMNS
from suite.results.rows import mib, pct, rate, sig
from suite.results.store import KNOWN_KINDS

# --- metrics ---------------------------------------------------------------------------------

# What a select or compare block may refer to: the numeric result fields, as the store types them.
METRICS: tuple[str, ...] = tuple(n for n in RESULT_COLUMNS if KNOWN_KINDS[n] in ("int", "float"))

# How the report and plots name a metric: (table header, plot axis label); others show their column.
METRIC_NAMES = {
    "train_samples_per_sec": ("train img/s", "train throughput (img/s)"),
    "infer_samples_per_sec": ("infer img/s", "inference throughput (img/s)"),
    "train_peak_mem_mib": ("train mem (MiB)", "train peak memory (MiB)"),
    "infer_peak_mem_mib": ("infer mem (MiB)", "inference peak memory (MiB)"),
    "probe_top1": ("probe top-1 (%)", "linear probe top-1 (%)"),
}


def metric_header(metric: str, *, unit: bool = True) -> str:
    """A metric's table header; `unit=False` for a column of ratios or differences ('train mem')."""
    header = METRIC_NAMES.get(metric, (metric, metric))[0]
    return header if unit else header.split(" (")[0]


def metric_label(metric: str) -> str:
    """A metric's plot axis label, e.g. 'train peak memory (MiB)'."""
    return METRIC_NAMES.get(metric, (metric, metric))[1]


def format_metric(metric: str, x: float | None) -> str:
    """A metric's value as every table shows it: throughput, MiB, percent or 3 figures."""
    if x is None:
        return "—"
    if "samples_per_sec" in metric:
        return rate(x)
    if "mem_mib" in metric:
        return mib(x)
    if metric.endswith("_mfu"):
        return pct(x, 100) + "%"
    if metric.startswith("probe_") and not metric.startswith("probe_n_"):
        return pct(x)
    return sig(x)


def higher_is_better(metric: str) -> bool | None:
    """Which way is good for a metric; None where a change is not better or worse (param_count)."""
    if metric.endswith(("_samples_per_sec", "_tflops", "_mfu")) or metric in (
        "probe_top1", "probe_top5", "probe_balanced_accuracy", "probe_knn_top1",
    ):
        return True
    if metric.endswith(("_step_time", "_peak_mem_mib", "_peak_reserved_mib", "_time_s")):
        return False
    return None


def _bad(where: str, value: Any, problem: str) -> SuiteError:
    return SuiteError(f"{where}: {problem} (got {value!r})")


def _unknown_metric(name: Any, valid: tuple[str, ...], kind: str) -> str:
    """'unknown metric ...' with close matches, else the list of valid metrics."""
    return f"unknown metric {name!r}" + (suggest(name, valid, cutoff=0.5) or f"; {kind}: {', '.join(valid)}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# --- the select block ------------------------------------------------------------------------

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>)\s*(\S+)\s*$")
SELECT_KEYS = ("objective", "constraints", "top", "then")
# Objectives computed across data sets by `suite.report.ranking` (one value per configuration), not stored.
AGGREGATES = {"probe_mean_z": "max", "probe_mean_rank": "min"}
# Objectives with per-test-image correctness stored (`suite.core.stats`): ties are tested, not assumed.
PAIRED = ("probe_top1",)
DEFAULT_THEN = ("max", "train_samples_per_sec")  # among tied towers: the cheapest to train


@dataclass(frozen=True)
class Constraint:
    """`metric op value`, e.g. train_peak_mem_mib <= 20480."""

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
    then: tuple[str, str] | None = None  # (direction, metric): the tie-break among statistically tied trials

    @property
    def objective(self) -> str:
        return f"{self.direction} {self.metric}"

    @property
    def tie_break(self) -> tuple[str, str]:
        """`then`, or `DEFAULT_THEN` (the fastest to train)."""
        return self.then or DEFAULT_THEN


def _check_metric(name: str, where: str, value: Any) -> str:
    if name in METRICS:
        return name
    raise _bad(where, value, _unknown_metric(name, METRICS, "metrics"))


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
        SuiteError: naming the key path and the value, with close matches for unknown names.
    """
    if not isinstance(block, dict):
        raise _bad(where, block, "must be a mapping with 'objective' (e.g. 'max probe_top1'), 'constraints', 'top'")
    for key in block:
        if key not in SELECT_KEYS:
            hint = suggest(key, SELECT_KEYS, n=1) or f"; valid keys: {', '.join(SELECT_KEYS)}"
            raise _bad(f"{where}.{key}", key, f"unknown key{hint}")
    if "objective" not in block:
        raise SuiteError(f"{where}.objective: missing; write e.g. 'max probe_top1' or 'min train_peak_mem_mib'")
    objective = block["objective"]
    parts = objective.split() if isinstance(objective, str) else []
    if len(parts) != 2 or parts[0] not in ("max", "min"):
        raise _bad(f"{where}.objective", objective, "must be 'max METRIC' or 'min METRIC', e.g. 'max probe_top1'")
    metric = parts[1] if parts[1] in AGGREGATES else _check_metric(parts[1], f"{where}.objective", objective)
    then = _parse_then(block.get("then"), f"{where}.then")

    constraints = block.get("constraints", [])
    if isinstance(constraints, str):
        constraints = [constraints]
    if not isinstance(constraints, list):
        raise _bad(f"{where}.constraints", constraints, "must be a list of 'METRIC OP NUMBER' strings")
    parsed = tuple(parse_constraint(c, f"{where}.constraints[{i}]") for i, c in enumerate(constraints))

    top = block.get("top", 3)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise _bad(f"{where}.top", top, "must be a positive integer (best plus runner-ups)")
    return Select(metric, parts[0], parsed, top, then)


def _parse_then(value: Any, where: str) -> tuple[str, str] | None:
    """The tie-break 'max|min METRIC', or None (the default, `DEFAULT_THEN`)."""
    if value is None:
        return None
    parts = value.split() if isinstance(value, str) else []
    if len(parts) != 2 or parts[0] not in ("max", "min"):
        raise _bad(where, value, "must be 'max METRIC' or 'min METRIC', e.g. 'max train_samples_per_sec'")
    return parts[0], _check_metric(parts[1], where, value)


# --- the compare block -----------------------------------------------------------------------


@dataclass(frozen=True)
class Threshold:
    """How far `metric` may move its wrong way: `limit` percent (relative) or units (absolute)."""

    metric: str
    limit: float  # magnitude, >= 0
    relative: bool

    @property
    def text(self) -> str:
        sign = "-" if higher_is_better(self.metric) else "+"
        return f"{sign}{self.limit:g}" + ("%" if self.relative else "")


GATEABLE = tuple(m for m in METRICS if higher_is_better(m) is not None and not m.endswith("_iqr"))

DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "infer_samples_per_sec": Threshold("infer_samples_per_sec", 5.0, True),
    "train_samples_per_sec": Threshold("train_samples_per_sec", 5.0, True),
    "infer_peak_mem_mib": Threshold("infer_peak_mem_mib", 5.0, True),
    "train_peak_mem_mib": Threshold("train_peak_mem_mib", 5.0, True),
    "probe_top1": Threshold("probe_top1", 1.0, False),
}
# `suite compare --confirm ROUNDS`: each round re-measures every flagged trial once (and its rebuilt
# baseline); more than this is a typo, refused before any work (a huge count once built its schedule for minutes).
MAX_CONFIRM_ROUNDS = 100
_VALUE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*$")
_CHANGE = "must be a change like '-5%' (relative), '-1' (absolute) or 'off'"


def _parse_one(metric: Any, value: Any, where: str) -> Threshold | None:
    if not isinstance(metric, str) or metric not in GATEABLE:
        raise SuiteError(f"{where}: {_unknown_metric(metric, GATEABLE, 'gateable metrics')}")
    if isinstance(value, str) and value.strip().lower() == "off":
        return None
    m = _VALUE.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if not m:
        raise SuiteError(f"{where}: {value!r} {_CHANGE}")
    sign, magnitude, percent = m.groups()
    good_up = higher_is_better(metric)
    wrong = "-" if good_up else "+"
    if sign and sign != wrong:
        word = "higher" if good_up else "lower"
        raise SuiteError(
            f"{where}: {metric} is better {word}, so its threshold is a{' drop' if good_up else 'n increase'}: "
            f"write {wrong}{magnitude}{percent} (got {value!r})"
        )
    return Threshold(metric, float(magnitude), bool(percent))


def parse_thresholds(spec: dict | list[str] | tuple[str, ...]) -> dict[str, Threshold | None]:
    """Parse thresholds from an experiment's `compare:` block or CLI `METRIC=CHANGE` strings.

    Returns only the metrics named (None for 'off'); `compare` lays them over DEFAULT_THRESHOLDS.

    Raises:
        SuiteError: naming the entry and the value, with close matches for unknown metrics.
    """
    out: dict[str, Threshold | None] = {}
    if isinstance(spec, dict):
        for metric, value in spec.items():
            out[str(metric)] = _parse_one(metric, value, f"compare.{metric}")
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            if not isinstance(item, str) or "=" not in item:
                raise SuiteError(f"threshold {item!r}: write METRIC=CHANGE, e.g. train_samples_per_sec=-3%")
            metric, value = (s.strip() for s in item.split("=", 1))
            out[metric] = _parse_one(metric, value, f"threshold {item!r}")
    else:
        raise SuiteError(f"thresholds {spec!r}: must be a mapping (compare: block) or METRIC=CHANGE strings")
    return out
