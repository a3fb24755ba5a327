"""`suite history RESULTS...`: one metric of each trial over the commits found in result stores, with
the steps in it found and attributed to a commit range (asv's main view).

A pairwise gate compares two runs; a drift of 1% per change never fails it. History lays every
stored run of a trial (same environment: `ENV_IDENTITY`) along the commits that measured it, and
finds steps by binary segmentation: the split of a series that leaves the least spread on either
side is a step when the medians on its two sides differ by more than the threshold AND more than
the figures' own noise (the median IQR / median of the step time on each side, summed, as
`suite compare` sums the two runs'; a probe accuracy's interval); each side is then searched again.
A step is named by the commit range it lies in: the last commit measured before it, the first after.

Drift between runs: on a shared machine every trial of a run moves together (the whole run was
measured while the machine was faster or slower), which no run's own IQR records. For a timing
metric with at least `MIN_TRIALS` trials, each commit's common move is the median over the trials of
their log figure's deviation from that trial's own median (a two-way median fit: trial x commit);
each trial's series is taken net of it, and a point's noise includes the scatter left after it
(robust standard deviations, Bonferroni over the trials and step positions). Common moves beyond
the threshold are listed apart: drift of the machine, or a change to every tower, which
`suite compare --confirm` (A/B) tells apart.

A point's commit is the store's `project_commit` meta entry where it is known (the measured project's
commit, written by the pytest plugin), else the rows' `env_git_commit` (the suite's checkout), else
the store's name. Commits are ordered by when their rows were measured. Offline, stores only: no torch.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from suite.core.errors import SuiteError, suggest
from suite.core.records import ENV_IDENTITY
from suite.experiment.criteria import GATEABLE, format_metric
from suite.gate.compare import spread
from suite.gate.drift import FAMILY_ALPHA, MIN_TRIALS, common_move
from suite.gate.verdict import is_timing
from suite.results.rows import cell, get, num, rows_of, table, trial_label, varying_axes
from suite.results.store import load_meta, load_results

DEFAULT_METRICS = ("train_samples_per_sec", "infer_samples_per_sec")
DEFAULT_STEP = 0.05  # a step smaller than 5% is not named, however quiet the figures


@dataclass
class Point:
    commit: str
    value: float  # the median over the runs at this commit
    noise: float  # the figure's own relative noise (0 where none is stored)
    runs: int


@dataclass
class Step:
    index: int  # the first point after the step
    before: float
    after: float
    band: float  # the noise the step had to exceed

    @property
    def rel(self) -> float:
        return (self.after - self.before) / abs(self.before)


@dataclass
class Series:
    trial_id: str
    label: str
    points: list[Point]
    steps: list[Step] = field(default_factory=list)

    def commit_range(self, step: Step) -> tuple[str, str]:
        return self.points[step.index - 1].commit, self.points[step.index].commit


@dataclass
class History:
    metric: str
    commits: list[str]
    series: list[Series]
    threshold: float
    markdown: str = ""
    common: dict[str, float] = field(default_factory=dict)  # commit -> common move of all trials (relative)
    scatter: float | None = None  # robust sd of the trials' figures net of the common moves (relative)


def short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "") if len(commit) >= 40 else commit


def parse_step(text: str) -> float:
    """"5%" (or "5") -> 0.05; SuiteError naming the fix otherwise."""
    try:
        value = float(str(text).strip().rstrip("%")) / 100
    except ValueError:
        value = float("nan")
    if not 0 < value < 10:
        raise SuiteError(f"--step {text!r} is not a positive percentage (e.g. --step 5%)")
    return value


# --- change points ---------------------------------------------------------------------------------

def _sse(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return sum((v - mean) ** 2 for v in values)


def find_steps(values: list[float], noises: list[float], threshold: float = DEFAULT_STEP) -> list[Step]:
    """Binary segmentation of `values` (in commit order): the steps, each beyond `threshold` (relative)
    and beyond the noise of the figures on its two sides."""
    steps: list[Step] = []

    def search(lo: int, hi: int) -> None:
        if hi - lo < 2:
            return
        k = min(range(lo + 1, hi), key=lambda i: (_sse(values[lo:i]) + _sse(values[i:hi]), i))
        before, after = statistics.median(values[lo:k]), statistics.median(values[k:hi])
        band = statistics.median(noises[lo:k]) + statistics.median(noises[k:hi])
        rel = abs(after - before) / abs(before) if before else float("inf")
        if rel > threshold and rel > band:
            steps.append(Step(k, before, after, band))
            search(lo, k)
            search(k, hi)

    search(0, len(values))
    return sorted(steps, key=lambda s: s.index)


# --- reading the stores -------------------------------------------------------------------------

def _store_commit(path: Path, meta: dict, row) -> str:
    return str(meta.get("project_commit") or get(row, "env_git_commit") or f"unknown commit ({path.parent.name}/{path.name})")


def _experiment(meta: dict) -> str | None:
    exp = meta.get("experiment")
    return exp.get("name") if isinstance(exp, dict) else None


def _load(paths: list[Path]) -> list[tuple[str, dict]]:
    """(commit, row) of every ok row of the stores; stores of different experiments are refused."""
    names: dict[str, list[str]] = {}
    out = []
    for path in paths:
        meta = load_meta(path)
        if _experiment(meta):
            names.setdefault(_experiment(meta), []).append(str(path))
        out += [(_store_commit(path, meta, r), r) for r in rows_of(load_results(path)) if get(r, "status") == "ok"]
    if len(names) > 1:
        which = "; ".join(f"{n!r}: {', '.join(p)}" for n, p in sorted(names.items()))
        raise SuiteError(f"the stores hold different experiments ({which}); a history follows one experiment: "
                         "pass the stores of one experiment only")
    if not out:
        raise SuiteError(f"no ok trial in {', '.join(map(str, paths))}: nothing to follow over commits")
    return out


def _pick_metric(rows: list[dict], metric: str | None) -> str:
    present = sorted({k for r in rows for k, v in r.items() if num(v) is not None})
    if metric is None:
        found = [m for m in DEFAULT_METRICS if m in present]
        if not found:
            raise SuiteError(f"the stores hold neither {' nor '.join(DEFAULT_METRICS)}: name one with --metric")
        return found[0]
    if metric not in present:
        known = sorted(set(GATEABLE) | set(present))
        raise SuiteError(f"unknown metric {metric!r}{suggest(metric, known)}: no stored row has it; "
                         f"choose one of {', '.join(m for m in GATEABLE if m in present)} (or another stored column)")
    return metric


def _series(pairs: list[tuple[str, dict]], metric: str, commits: list[str]) -> list[Series]:
    axes = varying_axes(_frame([r for _, r in pairs]))
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for commit, r in pairs:
        if num(get(r, metric)) is None:
            continue
        key = (str(get(r, "trial_id")), tuple(str(get(r, k)) for k in ENV_IDENTITY))
        groups.setdefault(key, {}).setdefault(commit, []).append(r)
    envs_of: dict[str, set] = {}
    for tid, env in groups:
        envs_of.setdefault(tid, set()).add(env)
    out = []
    for (tid, env), by_commit in groups.items():
        first = next(iter(by_commit.values()))[0]
        label = f"`{trial_label(first, axes)}` ({tid[:8]})"
        if len(envs_of[tid]) > 1:
            label += f" on {get(first, 'env_device')}, {get(first, 'env_threads')} threads, torch {get(first, 'env_torch')}"
        points = [Point(c, statistics.median(num(get(r, metric)) for r in rows),
                        statistics.median(spread(metric, r) or 0.0 for r in rows), len(rows))
                  for c in commits if (rows := by_commit.get(c))]
        out.append(Series(tid, label, points))
    return sorted(out, key=lambda s: (s.label, s.trial_id))


def _remove_common_moves(h: History) -> tuple[dict[str, float], float]:
    """({commit: log common move}, the per-point noise the scatter adds); ({}, 0) when not estimable."""
    if not is_timing(h.metric):
        return {}, 0.0
    series = [s for s in h.series if len(s.points) >= 2 and all(p.value > 0 for p in s.points)]
    if len(series) < MIN_TRIALS:
        return {}, 0.0
    own = {id(s): statistics.median(math.log(p.value) for p in s.points) for s in series}
    moves = {}
    for c in h.commits:
        devs = [math.log(p.value) - own[id(s)] for s in series for p in s.points if p.commit == c]
        if len(devs) >= MIN_TRIALS:
            moves[c] = statistics.median(devs)
    residuals = [math.log(p.value) - own[id(s)] - moves[p.commit] for s in series for p in s.points
                 if p.commit in moves]
    _, sd = common_move(residuals)
    z = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * len(series) * max(1, len(h.commits) - 1)))
    h.common = {c: math.expm1(m) for c, m in moves.items()}
    h.scatter = math.expm1(sd)
    return moves, math.expm1(z * sd / math.sqrt(2))


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def history(paths: list[str | Path], metric: str | None = None, threshold: float = DEFAULT_STEP) -> History:
    """The metric of each trial over the commits of the stores, with its steps."""
    pairs = _load([Path(p) for p in paths])
    metric = _pick_metric([r for _, r in pairs], metric)
    first_seen: dict[str, float] = {}
    for commit, r in pairs:
        when = num(get(r, "finished_at")) or 0.0
        first_seen[commit] = min(first_seen.get(commit, when), when)
    commits = sorted(first_seen, key=lambda c: (first_seen[c], c))
    series = _series(pairs, metric, commits)
    if not any(len(s.points) >= 2 for s in series):
        raise SuiteError(f"no trial has {metric} at two commits in the same environment ({len(commits)} commits "
                         "found): pass stores of the same experiment, measured on the same machine, by different commits")
    out = History(metric, commits, series, threshold)
    moves, scatter_noise = _remove_common_moves(out)
    for s in series:
        values = [p.value / math.exp(moves.get(p.commit, 0.0)) for p in s.points]
        s.steps = find_steps(values, [max(p.noise, scatter_noise) for p in s.points], threshold)
    out.markdown = render(out)
    return out


# --- output ----------------------------------------------------------------------------------------

def _step_text(h: History, s: Series, step: Step) -> str:
    before, after = s.commit_range(step)
    return (f"{100 * step.rel:+.1f}% between `{short(before)}` and `{short(after)}` "
            f"({format_metric(h.metric, step.before)} → {format_metric(h.metric, step.after)}; "
            f"threshold {100 * h.threshold:.0f}%, noise band ±{100 * step.band:.1f}%)")


def render(h: History) -> str:
    """Markdown: the commits, one row per trial (the metric at each commit, its noise, the change over the
    whole range, the steps found), then each step with its commit range."""
    lines = [f"## History of `{h.metric}` over {len(h.commits)} commits", "",
             "Commits, oldest first: " + ", ".join(f"{i + 1}. `{short(c)}`" for i, c in enumerate(h.commits)) + ".",
             f"A step is named when the medians on its two sides differ by more than {100 * h.threshold:.0f}% and "
             "more than the figures' own noise (IQR / median of the step time on each side, summed, and the trials' "
             "scatter between runs), after the move all trials made together at each commit is taken out (below). "
             "Confirm a step with `suite compare --confirm`, which re-measures both commits A/B.", ""]
    body = []
    for s in h.series:
        at = {p.commit: p for p in s.points}
        cells = [format_metric(h.metric, at[c].value) + (f" ±{100 * at[c].noise:.0f}%" if at[c].noise else "")
                 if c in at else "—" for c in h.commits]
        total = (s.points[-1].value - s.points[0].value) / abs(s.points[0].value) if s.points[0].value else None
        steps = "; ".join(f"**{100 * st.rel:+.1f}%** at `{short(s.points[st.index].commit)}`" for st in s.steps)
        body.append([s.label] + cells + ["—" if total is None else f"{100 * total:+.1f}%", steps or "none"])
    lines.append(table(["trial"] + [f"{i + 1}" for i in range(len(h.commits))] + ["first → last", "steps"],
                       body, "l" + "r" * (len(h.commits) + 1) + "l"))
    lines += _common_lines(h)
    found = [(s, st) for s in h.series for st in s.steps]
    lines += ["", f"### Steps ({len(found)})", ""]
    lines += [f"- {cell(s.label)}: {_step_text(h, s, st)}" for s, st in found] or ["No step beyond threshold and noise."]
    return "\n".join(lines) + "\n"


def _common_lines(h: History) -> list[str]:
    """The common move of all trials at each commit, and the moves between commits beyond the threshold."""
    if not h.common:
        return ["", f"Fewer than {MIN_TRIALS} trials at each commit: steps are judged on the figures as stored "
                "(drift of the machine between runs included)."] if h.series else []
    at = [c for c in h.commits if c in h.common]
    lines = ["", "### Drift between runs", "",
             "Every trial's figure at each commit, net of its own median, has this median (the common move of the "
             "whole run; each trial is judged net of it; the trials scatter ±"
             f"{100 * (h.scatter or 0):.1f}% around it): " + ", ".join(f"`{short(c)}` {100 * h.common[c]:+.1f}%"
                                                                      for c in at) + "."]
    for before, after in zip(at, at[1:]):
        move = (1 + h.common[after]) / (1 + h.common[before]) - 1
        if abs(move) > h.threshold:
            lines.append(f"- every trial moved by **{100 * move:+.1f}%** between `{short(before)}` and `{short(after)}`: "
                         "drift of the machine between the runs, or a change to every tower; `suite compare --confirm` "
                         "(A/B) tells them apart")
    return lines


def plot(h: History, s: Series, out_dir: Path) -> Path:
    """One PNG per trial: the metric at each commit with its noise band, steps marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    index = {c: i for i, c in enumerate(h.commits)}
    xs = [index[p.commit] for p in s.points]
    ax.errorbar(xs, [p.value for p in s.points], yerr=[p.value * p.noise / 2 for p in s.points], marker="o", capsize=3)
    for st in s.steps:
        ax.axvline((xs[st.index - 1] + xs[st.index]) / 2, color="C3", linestyle="--")
    ax.set_xticks(range(len(h.commits)), [short(c)[:8] for c in h.commits], rotation=45, fontsize=7)
    ax.set_ylabel(h.metric)
    ax.set_title(s.label.replace("`", ""), fontsize=9)
    path = out_dir / f"history_{h.metric}_{s.trial_id[:8]}.png"
    fig.savefig(path, metadata={"Software": None})
    return path


def write_history(paths: list[str | Path], out_dir: str | Path | None = None, *, metric: str | None = None,
                  threshold: float = DEFAULT_STEP) -> History:
    """`history`, and with `out_dir`: history.md and one PNG per trial written there."""
    h = history(paths, metric, threshold)
    if out_dir is not None:
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise SuiteError(f"-o {out} is a file; give a folder for history.md and its plots")
        out.mkdir(parents=True, exist_ok=True)
        images = [plot(h, s, out) for s in h.series if len(s.points) >= 2]
        (out / "history.md").write_text(h.markdown + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n")
    return h
