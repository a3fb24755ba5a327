"""Applying the experiment's `select` block: rank the trials that meet the user's constraints.

`apply_select` keeps the `ok` trials that meet every constraint, ranks them by the objective, and
says for every other trial why it was left out, so the report's recommendation can be checked.
Parsing the block (`parse_select`, `Select`, `Constraint`) lives in `suite.experiment.criteria`.

This module must stay light: no torch (pandas only at call time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from suite.experiment.criteria import AGGREGATES, PAIRED, Select
from suite.report.ranking import aggregate, config_of, dataset_of, tied_group
from suite.results.rows import number, rows_of


@dataclass
class Selection:
    """The outcome of `apply_select`.

    Attributes:
        select: the select block applied.
        ranked: rows (dicts of column -> value) of the trials that meet every constraint, best first.
        excluded: (row, reason) for every other trial, ordered by trial_id.
        tied: the rows statistically tied with the top one on the objective (paired test on the same
            test images), ordered by the tie-break; `ranked` starts with them. Empty when not tested.
        dataset: the data set the objective was ranked on, when the results hold several.
    """

    select: Select
    ranked: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    tied: list = field(default_factory=list)
    dataset: str | None = None

    @property
    def tie_note(self) -> str:
        """'3 towers are statistically tied on probe_top1; picked the fastest (max train_samples_per_sec)'."""
        if len(self.tied) < 2:
            return ""
        direction, metric = self.select.tie_break
        how = "the fastest" if (direction, metric) == ("max", "train_samples_per_sec") else f"by {direction} {metric}"
        return (f"{len(self.tied)} towers are statistically tied on {self.select.metric} (exact McNemar test on "
                f"the same test images, p >= 0.05 against the best); picked {how} ({direction} {metric})")

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


def _with_aggregates(rows: list, select: Select) -> tuple[list, list]:
    """(rows carrying `probe_mean_rank`/`probe_mean_z`, one per configuration; (row, reason) left out)."""
    agg = aggregate(rows)
    values = {"probe_mean_rank": agg.mean_rank, "probe_mean_z": agg.mean_z}[select.metric]
    kept, dropped, seen = [], [], set()
    for row in rows:
        key = config_of(row)
        if key in seen:
            dropped.append((row, "the same configuration on another data set (ranked once, by the aggregate)"))
            continue
        seen.add(key)
        kept.append(dict(row, **{select.metric: values.get(key)}))
    return kept, dropped


def _primary_dataset(rows: list, select: Select) -> tuple[list, list, str | None]:
    """With several data sets, a per-data-set objective ranks the rows of one: the data set with the
    most ok rows (then by name). Returns (rows, (row, reason) left out, that data set or None)."""
    names = sorted({dataset_of(r) for r in rows})
    if len(names) < 2:
        return rows, [], None
    ok = [dataset_of(r) for r in rows if r.get("status") == "ok"]
    primary = min(names, key=lambda n: (-ok.count(n), n))
    why = (f"probed on another data set; {select.metric} is ranked on {primary} (use objective "
           f"max probe_mean_z or min probe_mean_rank to rank across data sets)")
    return ([r for r in rows if dataset_of(r) == primary],
            [(r, why) for r in rows if dataset_of(r) != primary], primary)


def apply_select(df, select: Select) -> Selection:
    """Rank the trials of `df` under `select`.

    Ties in the objective are broken by trial_id, so the result does not depend on row order. For a
    paired objective (probe top-1), the trials statistically tied with the best (`suite.report.ranking.tied_group`)
    come first, ordered by the select block's tie-break (`then`, default: the fastest to train).
    """
    out = Selection(select)
    rows = sorted(rows_of(df), key=lambda r: str(r.get("trial_id")))
    sign = -1.0 if select.direction == "max" else 1.0
    if select.metric in AGGREGATES:
        rows, out.excluded = _with_aggregates(rows, select)
    else:
        rows, out.excluded, out.dataset = _primary_dataset(rows, select)
    for row in rows:
        reason = exclusion_reason(row, select)
        if reason is None:
            out.ranked.append(row)
        else:
            out.excluded.append((row, reason))
    out.ranked.sort(key=lambda r: (sign * float(r[select.metric]), str(r["trial_id"])))
    out.excluded.sort(key=lambda e: str(e[0].get("trial_id")))
    if select.metric in PAIRED and len(out.ranked) > 1:
        out.tied = _by_tie_break(tied_group(out.ranked), select)
        ids = {id(r) for r in out.tied}
        out.ranked = out.tied + [r for r in out.ranked if id(r) not in ids]
    return out


def _by_tie_break(rows: list, select: Select) -> list:
    """`rows` ordered by the tie-break (unmeasured last), then by the objective, then trial_id."""
    direction, metric = select.tie_break
    sign = -1.0 if direction == "max" else 1.0
    obj = -1.0 if select.direction == "max" else 1.0

    def key(r):
        x = number(r.get(metric))
        return (x is None, sign * (x or 0.0), obj * float(r[select.metric]), str(r["trial_id"]))

    return sorted(rows, key=key)
