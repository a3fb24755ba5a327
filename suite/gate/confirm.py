"""Confirm a regression before failing the gate: re-measure only the flagged trials, A/B interleaved.

Two runs of the same code on the same machine differ by more than either run's step-time IQR:
the machine drifts over minutes (other processes, frequency, the host), and a baseline figure can
itself be a lucky one. So `suite compare --confirm` re-measures each flagged trial's configuration
now, `rounds` times, and where the baseline can be rebuilt it re-measures the baseline too,
interleaved in one worker (current A, baseline A, current B, baseline B, ...: drift hits both
sides alike). A regression holds only when the median of the current re-measurements still fails
its threshold against the baseline's (re-measured where rebuilt, else stored) figure.

Only code known to be the code that produced a figure is run again (docs/gate.md):

- the CURRENT side is re-measured here only when its rows were measured by this checkout's commit
  with a clean tree (`env_git_commit` equal to HEAD, neither with "+dirty"), in this machine's
  environment; otherwise its stored figure stands (the flag stays a regression) and the report says why;
- the BASELINE is rebuilt when both runs were measured by the same clean commit (the configuration is
  all a trial needs), or, when it was measured by another clean commit that this checkout has, by
  that commit's files (`suite.gate.rebuild`). Otherwise (an unknown commit, a dirty tree, a commit not
  here) its stored figure stands, and the report says so.

Trials are re-measured without their probe (timing only).
"""
from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

from suite.core.errors import SuiteError
from suite.core.options import OPTIONS, Trial
from suite.experiment.criteria import MAX_CONFIRM_ROUNDS
from suite.gate.ab_confirm import default_budget, has_ab_worker, run_ab, trial_values
from suite.gate.compare import apply_confirmation, compare_paths, flagged_timing, gates_of, refresh
from suite.gate.verdict import Comparison
from suite.results.rows import env_differences, get, rows_of
from suite.results.store import load_results
from suite.sweep.pool import run_trials
from suite.sweep.workers import DEFAULT_FN, load_fn


@dataclasses.dataclass(frozen=True)
class SideTrial(Trial):
    """A trial tagged with the side of the A/B re-measurement it belongs to."""

    side: str = "current"
    stored_id: str = ""  # the stored trial's id (the re-run drops the probe, which changes its own id)
    threads: int | None = None  # the stored row's torch threads: part of its environment


def ab_trial(trial: SideTrial, *, fns: dict[str, str], fn_kwargs: dict[str, dict]):
    """Worker entry: run `trial` with its side's trial function (the sides may run different code), with
    the torch threads the stored row was measured with (a worker of a multi-worker sweep had fewer)."""
    if trial.threads:
        import torch

        torch.set_num_threads(trial.threads)
    plain = Trial(**{o.name: getattr(trial, o.name) for o in OPTIONS})
    record = load_fn(fns[trial.side])(plain, **fn_kwargs.get(trial.side, {}))
    return dataclasses.replace(record, trial=trial)


def _trial_of(row, side: str) -> SideTrial:
    """The configuration a stored row was measured with (without its probe), tagged with `side`."""
    threads = get(row, "env_threads")
    return SideTrial(**trial_values(row), side=side, stored_id=str(get(row, "trial_id")),
                     threads=int(threads) if threads else None)


def same_clean_commit(base_row, cur_row) -> bool:
    """Whether both rows were measured by the same committed code (so the baseline can be rebuilt)."""
    a, b = get(base_row, "env_git_commit"), get(cur_row, "env_git_commit")
    return bool(a) and a == b and not str(a).endswith("+dirty")


def measurable_here(row) -> bool:
    """Whether this machine can re-measure a stored row: the same environment (`ENV_IDENTITY`).

    The allocator and the thread count are taken from the row: every measuring worker holds the
    allocator steady and `ab_trial` sets the row's threads, the driver calling this need not.
    The re-measured records are checked against the row again.
    """
    from suite.machine.env import capture_env  # torch: only when something was flagged

    here = capture_env(str(get(row, "device") or "auto"))
    here = dataclasses.replace(here, env_allocator=get(row, "env_allocator"), env_threads=get(row, "env_threads"))
    return not env_differences(dataclasses.asdict(here), row)[0]


def checkout_commit() -> str | None:
    """This checkout's commit ("+dirty" with uncommitted changes): the code the default trial function runs."""
    from suite.machine.env import git_commit

    return git_commit()


def _why_not_current(row, code: str | None, check_env: bool) -> str | None:
    """Why the code at hand may not re-measure CURRENT's `row` (None: it may). `code`: the commit that code is."""
    stored = str(get(row, "env_git_commit") or "")
    if code is not None:
        if code == "" or code.endswith("+dirty"):
            here = "is not a git checkout" if not code else f"has uncommitted changes ({code[:12]}+dirty)"
            return f"this checkout {here}, so it is not the code that measured CURRENT"
        if not stored:
            return "CURRENT's rows do not say which commit measured them"
        if stored.endswith("+dirty"):
            return f"CURRENT was measured with uncommitted changes ({stored[:12]}+dirty): that code cannot be run again"
        if stored != code:
            return f"CURRENT was measured by commit {stored[:12]}, this checkout is {code[:12]}: other code"
    if check_env and not measurable_here(row):
        return "CURRENT was measured in another environment (run the gate on the machine that measured it)"
    return None


def _why_not_baseline(row) -> str:
    """Why the baseline `row` cannot be rebuilt from its own code (see `_baseline_tree`)."""
    stored = str(get(row, "env_git_commit") or "")
    if not stored:
        return "BASELINE's rows do not say which commit measured them, so its code cannot be rebuilt"
    if stored.endswith("+dirty"):
        return f"BASELINE was measured with uncommitted changes ({stored[:12]}+dirty): that code cannot be rebuilt"
    return (f"BASELINE was measured by commit {stored[:12]}, which could not be rebuilt here (not in this checkout, "
            "or other baseline rows came from other commits)")


def _note(notes: dict[str, int], why: str) -> None:
    notes[why] = notes.get(why, 0) + 1


def check_rounds(rounds: int) -> None:
    """Refuse a re-measurement count beyond `MAX_CONFIRM_ROUNDS` before any work (exit 2 on the CLI)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= MAX_CONFIRM_ROUNDS:
        raise SuiteError(f"confirm rounds {rounds!r}: give a whole number from 1 to {MAX_CONFIRM_ROUNDS} "
                         "(each round re-measures every flagged trial once)")


def remeasure(comparison: Comparison, baseline_path, current_path, rounds: int = 3, *, fn: str = DEFAULT_FN,
              fn_kwargs: dict | None = None, code: str | None = None, baseline_fn: str | None = None,
              baseline_kwargs: dict | None = None, console=None,
              budget_s: float | None = None) -> dict[tuple[str, str, str], list[float]]:
    """Re-measure the flagged trials: {(side, trial_id, metric): values} from this environment.

    What was not re-measured or rebuilt, and why, is added to `comparison.notes`.

    Args:
        code: the commit the current side's trial function runs. Default: this checkout's
            (`checkout_commit`) for the suite's own trial function; for another `fn` (a test's stub)
            None, which trusts it to be the code that measured CURRENT.
        baseline_fn: how to rebuild the baseline side (default: `fn` when both runs come from the same
            clean commit, else that commit's files where this checkout has it, else not rebuilt).
    """
    check_rounds(rounds)
    ab = fn == DEFAULT_FN and baseline_fn is None  # the suite's own code on both sides: the A/B experiment
    flagged = flagged_timing(comparison, cannot_tell=ab)
    if not flagged or rounds < 1:
        return {}
    if code is None and fn == DEFAULT_FN:
        code = checkout_commit() or ""
    rows = {s: {str(get(r, "trial_id")): r for r in rows_of(load_results(p)) if get(r, "status") == "ok"}
            for s, p in (("baseline", baseline_path), ("current", current_path))}
    notes: dict[str, int] = {}
    ids = []
    for tid in sorted({ch.trial_id for ch in flagged if ch.trial_id in rows["current"]}):
        why = _why_not_current(rows["current"][tid], code, check_env=fn == DEFAULT_FN)
        if why:
            _note(notes, why)
        else:
            ids.append(tid)
    rebuild, tree = _rebuild_plan(rows, ids, fn, baseline_fn, notes)
    if tree is not None:
        baseline_fn, baseline_kwargs = "suite.gate.rebuild:measure_at", {"tree": str(tree)}
    comparison.notes += [f"{n} flagged trial{'s' * (n > 1)}: {why}; the stored figures stand"
                         for why, n in notes.items()]
    if not ids:  # nothing this machine can re-measure: do not build a single tower
        return {}
    n_rebuilt = sum(rebuild.values())
    comparison.notes.append("CURRENT re-measured with " + (f"this checkout's code (commit {code[:12]})" if code else
                                                            f"the trial function {fn}")
                            + (f"; BASELINE rebuilt from its own code and re-measured A/B for {n_rebuilt} of "
                               f"{len(ids)} trials" if n_rebuilt else "; BASELINE not rebuilt (stored figures)"))
    try:
        if ab:
            ab_ids = [tid for tid in ids if rebuild[tid] and (tree is None or has_ab_worker(tree))]
            if ab_ids:
                budget = budget_s if budget_s is not None else default_budget(rows, ab_ids)
                run_ab(comparison, rows, ab_ids, tree, budget, budget_why="given" if budget_s is not None
                       else "twice the flagged trials' original measuring time in the two runs")
            # The rest (a baseline not rebuilt, or an older commit without the A/B worker): regressions only,
            # one process per measurement, as before.
            flagged = [ch for ch in flagged if ch.verdict == "regression" and ch.trial_id not in ab_ids]
            ids = [tid for tid in ids if any(ch.trial_id == tid for ch in flagged)]
        if not ids:
            return {}
        return _interleaved(flagged, rows, ids, rebuild, rounds, fn, fn_kwargs, baseline_fn, baseline_kwargs, console)
    finally:
        if tree is not None:
            shutil.rmtree(tree, ignore_errors=True)


def _rebuild_plan(rows: dict, ids: list[str], fn: str, baseline_fn: str | None,
                  notes: dict[str, int]) -> tuple[dict[str, bool], Path | None]:
    """Which flagged trials get their baseline re-measured, and the exported tree of its commit (or None)."""
    if baseline_fn is not None:
        return {tid: tid in rows["baseline"] for tid in ids}, None
    rebuild = {tid: tid in rows["baseline"] and same_clean_commit(rows["baseline"][tid], rows["current"][tid])
               for tid in ids}
    tree = None
    if fn == DEFAULT_FN and not all(rebuild.values()):
        tree = _baseline_tree(rows, ids)  # the baseline's own commit, exported, measures its side
        if tree is not None:
            rebuild = {tid: tid in rows["baseline"] for tid in ids}
    for tid in ids:
        if not rebuild[tid] and tid in rows["baseline"]:
            _note(notes, _why_not_baseline(rows["baseline"][tid]))
    return rebuild, tree


def _baseline_tree(rows: dict, ids: list[str]) -> Path | None:
    """The files of the one clean commit the baseline rows were measured by, when it is not the
    current rows' commit and this checkout has it (`suite.gate.rebuild.export_commit`); else None."""
    from suite.gate.rebuild import export_commit

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
    records = run_trials(schedule, fn="suite.gate.confirm:ab_trial", fn_kwargs={"fns": fns, "fn_kwargs": kwargs},
                         workers=1, progress=False, console=console, label=lambda t: f"confirm {t.side} {t.label}")
    for record in records:
        side, tid = record.trial.side, record.trial.stored_id
        if (record.status != "ok" or tid not in rows["current"]
                or env_differences(dataclasses.asdict(record.env), rows["current"][tid])[0]):
            continue  # another environment (or a failed re-run): not confirmed here
        for ch in flagged:
            value = getattr(record.measure, ch.metric, None) if ch.trial_id == tid else None
            if value is not None:
                out.setdefault((side, tid, ch.metric), []).append(value)
    return out


def confirm_paths(baseline_path: str | Path, current_path: str | Path, thresholds: dict | None = None, *,
                  rounds: int = 3, fn: str = DEFAULT_FN, fn_kwargs: dict | None = None, code: str | None = None,
                  baseline_fn: str | None = None, baseline_kwargs: dict | None = None, console=None,
                  budget_s: float | None = None) -> Comparison:
    """`compare_paths`, then re-measure flagged throughput regressions and keep only those that hold.

    `fn`/`fn_kwargs`: the trial function of the current side (see `suite.sweep.pool.run_trials`) and `code`,
    the commit it runs; `baseline_fn`/`baseline_kwargs`: how to rebuild the baseline side (see `remeasure`).

    Raises:
        SuiteError: `rounds` outside 0..MAX_CONFIRM_ROUNDS (before anything is read or run).
    """
    check_rounds(rounds)
    comparison = compare_paths(baseline_path, current_path, thresholds)
    values = remeasure(comparison, baseline_path, current_path, rounds, fn=fn, fn_kwargs=fn_kwargs, code=code,
                       baseline_fn=baseline_fn, baseline_kwargs=baseline_kwargs, console=console, budget_s=budget_s)
    if comparison.ab:
        refresh(comparison, gates_of(current_path, thresholds))
    current = {(tid, m): v for (side, tid, m), v in values.items() if side == "current"}
    baseline = {(tid, m): statistics.median(v) for (side, tid, m), v in values.items() if side == "baseline"}
    return apply_confirmation(comparison, current, gates_of(current_path, thresholds), baseline)
