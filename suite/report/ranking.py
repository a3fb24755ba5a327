"""Rankings across data sets and statistical ties: the read side of "which tower, with confidence".

- `dataset_of`, `config_of`: a row's probe data set, and its configuration without the data set, so
  the rows of one tower probed on several data sets (a `dataset` grid axis) are grouped.
- `aggregate`: per configuration, accuracy per data set and two aggregates over the data sets it was
  probed on, as "Battle of the Backbones" (Goldblum et al. 2023) ranks backbones: the mean rank
  (1 = best on a data set; ties share the average rank) and the mean z-score (accuracy minus the
  data set's mean over configurations, divided by their standard deviation), computed over the
  configurations probed on every data set.
- `tied_group`: the candidates whose accuracy is not significantly below the best one's on the same
  test images (exact McNemar test on the stored per-image correctness, `suite.core.stats`).

Light: numpy only (no pandas, no torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from suite.core.options import OPTIONS
from suite.core.stats import tied_with_best, unpack_correct
from suite.results.rows import get, num

# Options that name the probe data or extra probe outputs rather than the tower; the rest identify
# a configuration (probe_features stays: it changes the accuracy).
DATA_OPTIONS = ("dataset", "root", "shots", "shot_seeds", "knn")
_CONFIG_OPTIONS = tuple(o.name for o in OPTIONS if o.identity and o.name not in DATA_OPTIONS)


def dataset_of(row) -> str:
    """'digits', 'textures', or 'imagefolder:<root>'."""
    name = str(get(row, "dataset"))
    return f"{name}:{get(row, 'root')}" if name == "imagefolder" else name


def config_of(row) -> tuple:
    """The configuration of a row without its data set (rows of one tower on several data sets share it)."""
    return tuple(repr(get(row, name)) for name in _CONFIG_OPTIONS) + (str(get(row, "env_key")),)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1 = highest; equal values share their average rank."""
    order = (-values).argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        same = values == v
        ranks[same] = ranks[same].mean()
    return ranks


@dataclass
class Aggregate:
    """Accuracy of each configuration on each data set, and the aggregates across data sets.

    Attributes:
        datasets: data set names, in first-seen order.
        rows: {config: {dataset: row}} for ok rows with the metric measured.
        mean_rank / mean_z: {config: value} for the configurations probed on every data set.
    """

    metric: str
    datasets: list[str] = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    mean_rank: dict = field(default_factory=dict)
    mean_z: dict = field(default_factory=dict)


def aggregate(rows: list, metric: str = "probe_top1") -> Aggregate:
    """Per-data-set accuracy and the mean rank / mean z-score of every configuration (see the module doc)."""
    out = Aggregate(metric)
    for r in rows:
        if get(r, "status") != "ok" or num(get(r, metric)) is None:
            continue
        ds = dataset_of(r)
        if ds not in out.datasets:
            out.datasets.append(ds)
        out.rows.setdefault(config_of(r), {}).setdefault(ds, r)
    complete = [c for c, by in out.rows.items() if len(by) == len(out.datasets)]
    if len(complete) < 2:
        return out
    ranks, zs = {c: [] for c in complete}, {c: [] for c in complete}
    for ds in out.datasets:
        x = np.array([num(get(out.rows[c][ds], metric)) for c in complete], dtype=float)
        sd = x.std()
        for c, rank, z in zip(complete, _ranks(x), (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)):
            ranks[c].append(rank)
            zs[c].append(z)
    out.mean_rank = {c: float(np.mean(v)) for c, v in ranks.items()}
    out.mean_z = {c: float(np.mean(v)) for c, v in zs.items()}
    return out


def correctness(row) -> np.ndarray | None:
    """The row's per-test-image correctness, None when not stored."""
    text, n = get(row, "probe_test_correct"), num(get(row, "probe_n_test"))
    if not text or n is None:
        return None
    return unpack_correct(str(text), int(n))


def tied_group(ranked: list) -> list:
    """The rows of `ranked` (best first) statistically tied with the first on probe top-1.

    Only rows scored on the same test set (`probe_test_set`) can be compared; the others are never
    tied. The first row is always in the group.
    """
    if not ranked:
        return []
    test_set = get(ranked[0], "probe_test_set")
    same = [r for r in ranked if test_set is not None and get(r, "probe_test_set") == test_set]
    if not same or same[0] is not ranked[0]:
        return [ranked[0]]
    flags = tied_with_best([correctness(r) for r in same], 0)
    return [r for r, tied in zip(same, flags) if tied]
