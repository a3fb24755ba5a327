"""Confirm a regression before failing the gate: re-measure only the flagged trials, A/B interleaved.

Two runs of the same code on the same machine differ by more than either run's step-time IQR:
the machine drifts over minutes (other processes, frequency, the host), and a baseline figure can
itself be a lucky one. So `suite compare --confirm` re-measures each flagged trial's configuration
now, `rounds` times, and where the baseline can be rebuilt it re-measures the baseline too,
interleaved in one worker (current A, baseline A, current B, baseline B, ...: drift hits both
sides alike). A regression holds only when the median of the current re-measurements still fails
its threshold against the baseline's (re-measured where rebuilt, else stored) figure.

The baseline can be rebuilt when both runs were measured by the same clean commit of the suite
(`env_git_commit`): the configuration is all a trial needs. When it was measured by another clean
commit that this checkout has, that commit's files measure its side (`suite.rebuild`). Otherwise
(a dirty tree, a commit not here) the stored figure stands. Only trials measured in this machine's environment can be
confirmed; the others stay flagged. Trials are re-measured without their probe (timing only).
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

from suite.compare import Comparison, apply_confirmation, compare_paths, flagged_timing, gates_of
from suite.options import OPTIONS, Trial
from suite.rows import get, rows_of
from suite.runner import run_trials
from suite.store import load_results
from suite.workers import DEFAULT_FN, load_fn


@dataclasses.dataclass(frozen=True)
class SideTrial(Trial):
    """A trial tagged with the side of the A/B re-measurement it belongs to."""

    side: str = "current"
    stored_id: str = ""  # the stored trial's id (the re-run drops the probe, which changes its own id)


def ab_trial(trial: SideTrial, *, fns: dict[str, str], fn_kwargs: dict[str, dict]):
    """Worker entry: run `trial` with its side's trial function (the sides may run different code)."""
    plain = Trial(**{o.name: getattr(trial, o.name) for o in OPTIONS})
    record = load_fn(fns[trial.side])(plain, **fn_kwargs.get(trial.side, {}))
    return dataclasses.replace(record, trial=trial)


def _trial_of(row, side: str) -> SideTrial:
    """The configuration a stored row was measured with (without its probe), tagged with `side`."""
    values = {o.name: get(row, o.name) for o in OPTIONS if get(row, o.name) is not None or o.nullable}
    return SideTrial(**{**values, "dataset": "none"}, side=side, stored_id=str(get(row, "trial_id")))


def same_clean_commit(base_row, cur_row) -> bool:
    """Whether both rows were measured by the same committed code (so the baseline can be rebuilt)."""
    a, b = get(base_row, "env_git_commit"), get(cur_row, "env_git_commit")
    return bool(a) and a == b and not str(a).endswith("+dirty")


def measurable_here(row) -> bool:
    """Whether this machine can re-measure a stored row: its environment key but for the allocator.

    The allocator is taken from the row: every measuring worker holds it steady, the driver calling
    this need not. The re-measured records are checked against the full key.
    """
    from suite.env import capture_env  # torch: only when something was flagged

    here = capture_env(str(get(row, "device") or "auto"))
    return dataclasses.replace(here, env_allocator=get(row, "env_allocator")).key() == get(row, "env_key")


def remeasure(comparison: Comparison, baseline_path, current_path, rounds: int = 3, *, fn: str = DEFAULT_FN,
              fn_kwargs: dict | None = None, baseline_fn: str | None = None, baseline_kwargs: dict | None = None,
              console=None) -> dict[tuple[str, str, str], list[float]]:
    """Re-measure the flagged trials: {(side, trial_id, metric): values} from this environment.

    `baseline_fn`: how to rebuild the baseline side (default: `fn` when both runs come from the same
    clean commit, else not rebuilt).
    """
    flagged = flagged_timing(comparison)
    if not flagged or rounds < 1:
        return {}
    rows = {s: {str(get(r, "trial_id")): r for r in rows_of(load_results(p)) if get(r, "status") == "ok"}
            for s, p in (("baseline", baseline_path), ("current", current_path))}
    ids = sorted({ch.trial_id for ch in flagged if ch.trial_id in rows["current"]
                  and (fn != DEFAULT_FN or measurable_here(rows["current"][ch.trial_id]))})
    if not ids:  # nothing this machine can re-measure: do not build a single tower
        return {}
    rebuild = {tid: baseline_fn is not None or (tid in rows["baseline"]
                                                 and same_clean_commit(rows["baseline"][tid], rows["current"][tid]))
               for tid in ids}
    tree = None
    if baseline_fn is None and fn == DEFAULT_FN and not all(rebuild.values()):
        tree = _baseline_tree(rows, ids)  # the baseline's own commit, exported, measures its side
        if tree is not None:
            baseline_fn, baseline_kwargs = "suite.rebuild:measure_at", {"tree": str(tree)}
            rebuild = {tid: tid in rows["baseline"] for tid in ids}
    try:
        return _interleaved(flagged, rows, ids, rebuild, rounds, fn, fn_kwargs, baseline_fn, baseline_kwargs, console)
    finally:
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)


def _baseline_tree(rows: dict, ids: list[str]) -> Path | None:
    """The files of the one clean commit the baseline rows were measured by, when it is not the
    current rows' commit and this checkout has it (`suite.rebuild.export_commit`); else None."""
    from suite.rebuild import export_commit

    commits = {str(get(rows["baseline"][tid], "env_git_commit") or "") for tid in ids if tid in rows["baseline"]}
    current = {str(get(rows["current"][tid], "env_git_commit") or "") for tid in ids}
    if len(commits) != 1 or commits == current:
        return None
    return export_commit(commits.pop())


def _interleaved(flagged, rows, ids, rebuild, rounds, fn, fn_kwargs, baseline_fn, baseline_kwargs,
                 console) -> dict[tuple[str, str, str], list[float]]:
    """Run the A/B schedule in one worker; the re-measured values by (side, trial_id, metric)."""
    schedule = [_trial_of(rows[side][tid], side) for _ in range(rounds) for tid in ids
                for side in (("current", "baseline") if rebuild[tid] else ("current",))]
    fns = {"current": fn, "baseline": baseline_fn or fn}
    kwargs = {"current": fn_kwargs or {}, "baseline": (baseline_kwargs or {}) if baseline_fn else (fn_kwargs or {})}
    out: dict[tuple[str, str, str], list[float]] = {}
    records = run_trials(schedule, fn="suite.confirm:ab_trial", fn_kwargs={"fns": fns, "fn_kwargs": kwargs},
                         workers=1, progress=False, console=console, label=lambda t: f"confirm {t.side} {t.label}")
    for record in records:
        side, tid = record.trial.side, record.trial.stored_id
        if record.status != "ok" or tid not in rows["current"] or record.env.key() != get(rows["current"][tid], "env_key"):
            continue  # another environment (or a failed re-run): not confirmed here
        for ch in flagged:
            value = getattr(record.measure, ch.metric, None) if ch.trial_id == tid else None
            if value is not None:
                out.setdefault((side, tid, ch.metric), []).append(value)
    return out


def confirm_paths(baseline_path: str | Path, current_path: str | Path, thresholds: dict | None = None, *,
                  rounds: int = 3, fn: str = DEFAULT_FN, fn_kwargs: dict | None = None,
                  baseline_fn: str | None = None, baseline_kwargs: dict | None = None, console=None) -> Comparison:
    """`compare_paths`, then re-measure flagged throughput regressions and keep only those that hold.

    `fn`/`fn_kwargs`: the trial function of the current side (see `suite.runner.run_trials`);
    `baseline_fn`/`baseline_kwargs`: how to rebuild the baseline side (see `remeasure`).
    """
    comparison = compare_paths(baseline_path, current_path, thresholds)
    values = remeasure(comparison, baseline_path, current_path, rounds, fn=fn, fn_kwargs=fn_kwargs,
                       baseline_fn=baseline_fn, baseline_kwargs=baseline_kwargs, console=console)
    current = {(tid, m): v for (side, tid, m), v in values.items() if side == "current"}
    baseline = {(tid, m): statistics.median(v) for (side, tid, m), v in values.items() if side == "baseline"}
    return apply_confirmation(comparison, current, gates_of(current_path, thresholds), baseline)
