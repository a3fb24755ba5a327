"""Confirm a regression before failing the gate: re-measure only the flagged trials.

Two runs of the same code on the same machine differ by more than either run's step-time IQR:
the machine drifts over minutes (other processes, frequency, the host). So `suite compare
--confirm` re-measures each flagged trial's configuration now, `rounds` times, interleaved in one
worker process (A B C A B C ...: drift hits every trial alike), and keeps a regression only when
the median of the re-measurements still fails its threshold against the baseline. A real slowdown
reproduces; a noisy figure does not.

Only trials measured in this machine's environment can be confirmed here; the others stay flagged.
Trials are re-measured without their probe (timing only).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from suite.compare import Comparison, apply_confirmation, compare_paths, flagged_timing, gates_of
from suite.options import OPTIONS, Trial
from suite.rows import get, rows_of
from suite.runner import run_trials
from suite.store import load_results
from suite.workers import DEFAULT_FN


def _trial_of(row) -> Trial:
    """The configuration a stored row was measured with (without its probe)."""
    values = {o.name: get(row, o.name) for o in OPTIONS if get(row, o.name) is not None or o.nullable}
    return dataclasses.replace(Trial(**values), dataset="none")


def remeasure(comparison: Comparison, current_path: str | Path, rounds: int = 3, *, fn: str = DEFAULT_FN,
              fn_kwargs: dict | None = None, console=None) -> dict[tuple[str, str], list[float]]:
    """Re-measure the flagged timing regressions' trials; {(trial_id, metric): values} from this environment."""
    flagged = flagged_timing(comparison)
    if not flagged or rounds < 1:
        return {}
    rows = {str(get(r, "trial_id")): r for r in rows_of(load_results(current_path)) if get(r, "status") == "ok"}
    ids = sorted({ch.trial_id for ch in flagged if ch.trial_id in rows})
    schedule = [_trial_of(rows[tid]) for _ in range(rounds) for tid in ids]
    owner = [tid for _ in range(rounds) for tid in ids]
    out: dict[tuple[str, str], list[float]] = {}
    records = run_trials(schedule, fn=fn, fn_kwargs=fn_kwargs, workers=1, progress=False, console=console,
                         label=lambda t: f"confirm {t.label}")
    for record in records:
        tid = _match(record.trial, schedule, owner)
        if record.status != "ok" or tid is None or record.env.key() != get(rows[tid], "env_key"):
            continue  # another environment (or a failed re-run): this trial cannot be confirmed here
        for ch in flagged:
            value = getattr(record.measure, ch.metric, None) if ch.trial_id == tid else None
            if value is not None:
                out.setdefault((tid, ch.metric), []).append(value)
    return out


def _match(trial: Trial, schedule: list[Trial], owner: list[str]) -> str | None:
    """The stored trial id of a re-run (records come back from worker processes as copies)."""
    for t, tid in zip(schedule, owner):
        if t == trial:
            return tid
    return None


def confirm_paths(baseline_path: str | Path, current_path: str | Path, thresholds: dict | None = None, *,
                  rounds: int = 3, fn: str = DEFAULT_FN, fn_kwargs: dict | None = None, console=None) -> Comparison:
    """`compare_paths`, then re-measure flagged throughput regressions and keep only those that hold.

    `fn`/`fn_kwargs`: the trial function the re-measurements run (see `suite.runner.run_trials`).
    """
    comparison = compare_paths(baseline_path, current_path, thresholds)
    values = remeasure(comparison, current_path, rounds, fn=fn, fn_kwargs=fn_kwargs, console=console)
    return apply_confirmation(comparison, values, gates_of(current_path, thresholds))
