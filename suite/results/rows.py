"""Rows of results as the read side handles them: values, formatting, labels, markdown tables.

A leaf of the read side (no torch, no pandas import): `report`, `plots`, `select`, `compare`,
`export` and the sweep's live lines all format and label trials through this one module, so a
trial reads the same everywhere. A row is a dict (or a pandas row, or a `Trial`: `get` reads
attributes too).
"""
from __future__ import annotations

import math
from typing import Any

# get, plain, same_config and trial_label are re-exported: the read side takes its cell helpers from here.
from suite.core.options import OPTIONS, SHORT, config_value, get, plain, same_config, trial_label  # noqa: F401
from suite.core.records import ENV_IDENTITY

# Options that are never ablation axes: the model is what is compared; the others describe the run.
NOT_AXES = {"model", "device", "root"}
AXES = tuple(o.name for o in OPTIONS if o.identity and o.name not in NOT_AXES)
IDENTITY = tuple(o.name for o in OPTIONS if o.identity)  # what makes two trials the same configuration

DETAILS_AFTER = 10  # longer lists fold into <details> so the page stays scannable


# --- values ----------------------------------------------------------------------------------

def sort_key(value: Any) -> tuple:
    """Sorts None, numbers and strings together without comparing across types."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (bool, int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def rate(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def mib(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def sig(x: float | None) -> str:
    """Three significant figures, without exponents for everyday magnitudes."""
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def pct(x: float | None, scale: float = 1.0) -> str:
    if x is None:
        return "—"
    x *= scale
    return f"{x:.2f}" if abs(x) < 1 else f"{x:.1f}"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def delta_points(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1f} pt"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A markdown table; `align` is one char per column: l or r."""
    align = align or "l" * len(headers)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fold(summary: str, body: str, n: int) -> str:
    """Long blocks go inside <details> (GitHub renders it collapsed)."""
    if n <= DETAILS_AFTER:
        return body
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


# --- trials ----------------------------------------------------------------------------------


def rows_of(df) -> list[dict[str, Any]]:
    """The frame's rows as dicts in a fixed order (model, config, trial_id), whatever the input order."""
    # Plain dicts of Python values: indexing a pandas Series per cell is ~50x slower.
    rows = [{k: plain(v) for k, v in rec.items()} for rec in df.to_dict("records")]
    return sorted(rows, key=row_key)


def row_key(row) -> tuple:
    return (str(get(row, "env_key") or ""), str(get(row, "model") or ""),
            tuple(sort_key(get(row, a)) for a in AXES), str(get(row, "trial_id")))


def varying_axes(df) -> list[str]:
    """Identity options that take more than one value in `df`, in OPTIONS order."""
    out = []
    for name in AXES:
        if name in df.columns and len({config_value(name, plain(v)) for v in df[name].tolist()}) > 1:
            out.append(name)
    return out


def rel_iqr(row, phase: str) -> float | None:
    """IQR / median of the phase's step time (the spread of its throughput)."""
    med, iqr = num(get(row, f"{phase}_step_time")), num(get(row, f"{phase}_step_time_iqr"))
    if med is None or iqr is None or med <= 0:
        return None
    return iqr / med


def is_noisy(row, phase: str) -> bool:
    stored = get(row, f"{phase}_noisy")
    if stored is not None:
        return bool(stored)
    spread, threshold = rel_iqr(row, phase), num(get(row, "noise_threshold"))
    return spread is not None and threshold is not None and spread > threshold


def rate_with_spread(row, phase: str) -> str:
    text = rate(num(get(row, f"{phase}_samples_per_sec")))
    spread = rel_iqr(row, phase)
    if text != "—" and spread is not None:
        p = 100 * spread
        text += f" ±{p:.0f}%" if p >= 10 else f" ±{p:.1f}%"
    if text != "—" and is_noisy(row, phase):
        text += " ⚠"
    return text


def pick_metric(df, *names: str) -> str | None:
    """The first of `names` with any value in `df` (e.g. train throughput, else inference)."""
    for name in names:
        if name in df.columns and any(num(v) is not None for v in df[name]):
            return name
    return None


def number(value: Any) -> float | None:
    """A finite float, or None for a missing value (None/NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


num = number  # a finite float, or None for missing (None, NaN, non-numbers, bools)


# --- where and with which code a row was measured -------------------------------------------


def env_differences(a, b) -> tuple[list[str], list[str]]:
    """The `ENV_IDENTITY` fields in which rows `a` and `b` differ, and those one of them does not record."""
    differ, unknown = [], []
    for name in ENV_IDENTITY:
        x, y = get(a, name), get(b, name)
        if x is None and y is None:
            continue
        if x is None or y is None:
            unknown.append(name)
        elif str(x) != str(y):
            differ.append(name)
    return differ, unknown


def code_text(rows) -> str:
    """The code a run's rows were measured with: commits, clean or with uncommitted changes."""
    counts: dict[str, int] = {}
    for r in rows:
        commit = str(get(r, "env_git_commit") or "")
        text = ("unknown commit (not measured in a git checkout)" if not commit else
                f"`{commit[:12]}` with uncommitted changes (+dirty)" if commit.endswith("+dirty") else
                f"`{commit[:12]}` (clean)")
        counts[text] = counts.get(text, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{text} ({n} rows)" for text, n in sorted(counts.items())) or "no rows"
