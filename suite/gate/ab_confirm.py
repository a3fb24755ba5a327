"""Run the A/B confirm step over a comparison's flagged trials and write its verdicts into the comparison.

`suite.gate.confirm` decides which flagged trials can be re-measured with both sides' code; this
module runs them as A/B experiments (`suite.gate.abtest`) within one time budget, shared in order of
how bad each flag looked (the likeliest regression first), and turns each experiment's decision
(`suite.gate.sequential`) into the change's verdict: "regression" (fails the gate), "not confirmed"
(no regression established), or "cannot tell" (the noise of this machine is wider than the
threshold within the budget). A trial whose experiment could not run keeps its stored verdict.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from suite.core.options import OPTIONS
from suite.gate.abtest import Experiment, ProcessSide, SideError, run_experiment
from suite.gate.sequential import ALPHA, LOOKS, boundary_of, decide
from suite.gate.verdict import Change, Comparison
from suite.results.rows import env_differences, get, num

BUDGET_SPENT = "the time budget was spent"
BUDGET_FACTOR = 2.0  # default budget: this many times the flagged trials' original measuring time
MIN_TRIAL_S = 1.0  # a trial whose row records no time counts as this long


def has_ab_worker(tree: str | Path) -> bool:
    """Whether a baseline commit's files have the A/B worker with blocks (its "fork" request); older
    commits are measured one `suite bench` process at a time."""
    worker = Path(tree) / "suite" / "gate" / "abworker.py"
    return worker.is_file() and 'op == "fork"' in worker.read_text(errors="replace")


def trial_seconds(row) -> float:
    """How long measuring a stored trial took: its wall time in the sweep, else its measured time."""
    start, end = num(get(row, "started_at")), num(get(row, "finished_at"))
    if start is not None and end is not None and end > start:
        return end - start
    return num(get(row, "measured_time_s")) or MIN_TRIAL_S


def default_budget(rows: dict, ids: list[str]) -> float:
    """`BUDGET_FACTOR` times the original measuring time of the trials `ids`: what measuring them took in
    the two stored runs (each side measured them once; the A/B step measures both sides again)."""
    return BUDGET_FACTOR * sum(trial_seconds(side_rows[tid]) for side_rows in rows.values() for tid in ids
                               if tid in side_rows)


def trial_values(row) -> dict:
    """The stored row's configuration as option values (timing only: no probe)."""
    values = {o.name: get(row, o.name) for o in OPTIONS if get(row, o.name) is not None or o.nullable}
    return {**values, "dataset": "none"}


def _severity(changes: list[Change]) -> float:
    """How far the worst flag of an experiment sits beyond the rest (more negative: look at it first)."""
    worst = 0.0
    for ch in changes:
        rel = (ch.current / ch.baseline) / (1 + (ch.drift or 0.0)) - 1
        worst = min(worst, rel if not ch.metric.endswith("_step_time") else -rel)
    return worst


def run_ab(c: Comparison, rows: dict, ids: list[str], tree: str | Path | None, budget_s: float, *,
           budget_why: str, make_side: Callable[..., object] = ProcessSide,
           clock: Callable[[], float] = time.monotonic) -> None:
    """A/B-test the flagged timing changes of trials `ids` within `budget_s`; verdicts written into `c`.

    `make_side(name, tree, threads)` makes a side (a `ProcessSide` by default; tests pass recorded ones).
    """
    from suite.gate.compare import flagged_timing

    groups: dict[tuple[str, str], list[Change]] = {}
    for ch in flagged_timing(c, cannot_tell=True):
        if ch.trial_id in ids:
            groups.setdefault((ch.trial_id, ch.metric.split("_")[0]), []).append(ch)
    order = sorted(groups, key=lambda key: (_severity(groups[key]), key))
    start = clock()
    deadline = start + budget_s
    c.ab = {"time_s": 0.0, "budget_s": budget_s, "budget_why": budget_why, "alpha": ALPHA, "experiments": len(order)}
    sides: dict[tuple[str, int | None], tuple] = {}
    try:
        for i, key in enumerate(order):
            tid, phase = key
            row = rows["current"][tid]
            threads = int(num(get(row, "env_threads")) or 0) or None
            changes = groups[key]
            exp = Experiment(tid, phase, boundary_of(changes[0].metric, changes[0].threshold, changes[0].baseline))
            now = clock()
            if now >= deadline:
                exp.error = f"{BUDGET_SPENT} before this trial's turn"
            else:
                try:
                    pair = sides.get(threads) or _start_sides(sides, threads, tree, make_side, row)
                    run_experiment(exp, pair[0], pair[1], trial_values(row), threads,
                                   deadline=now + (deadline - now) / (len(order) - i), experiments=len(order),
                                   clock=clock)
                except SideError as exc:
                    exp.error = str(exc)
            for ch in changes:
                _apply(ch, exp, len(order))
    finally:
        for pair in sides.values():
            for side in pair:
                getattr(side, "close", lambda: None)()
        c.ab["time_s"] = clock() - start


def _start_sides(sides: dict, threads: int | None, tree, make_side, row) -> tuple:
    """Start (baseline, current) sides for `threads`; refuse them when the current side's environment is not the row's."""
    pair = (make_side("baseline", tree, threads), make_side("current", None, threads))
    sides[threads] = pair
    env = getattr(pair[1], "env", None)
    if env is not None:
        here = env(str(get(row, "device") or "auto"))
        differ = env_differences(here, row)[0]
        if differ:
            sides[threads] = (_Refused(differ), _Refused(differ))
            raise SideError(f"this machine is another environment than CURRENT's rows ({', '.join(differ)})")
    return pair


class _Refused:
    """Stands for sides that may not measure (another environment): every request fails."""

    def __init__(self, differ):
        self.why = f"this machine is another environment than CURRENT's rows ({', '.join(differ)})"

    def prepare(self, *args, **kwargs):
        raise SideError(self.why)

    def round(self, steps):
        raise SideError(self.why)


def _apply(ch: Change, exp: Experiment, experiments: int) -> None:
    """The experiment's decision for `ch` (with its own threshold) as its verdict and A/B summary."""
    blocks = exp.block_means()
    summary = {"blocks": len(blocks), "pairs": len(exp.pairs), "time_s": exp.time_s}
    if exp.error and not exp.error.startswith(BUDGET_SPENT):
        ch.ab = {**summary, "reason": f"not re-measured ({exp.error}); the stored verdict stands"}
        return
    if len(blocks) < LOOKS[0]:  # out of time before the first look: no verdict either way
        ch.ab = {**summary, "reason": f"the time budget was spent after {len(blocks)} blocks (the first look needs "
                                      f"{LOOKS[0]})"}
        ch.verdict = "cannot tell"
        return
    boundary = boundary_of(ch.metric, ch.threshold, ch.baseline)  # on the speed scale, step time included
    d = exp.decision if boundary == exp.boundary and exp.decision else None
    if d is None or d.verdict == "undecided":
        d = decide(blocks, boundary, experiments=experiments, final=True)
    cal = exp.calibrated
    ch.ab = {**summary, "change": d.change, "lo": d.lo, "hi": d.hi, "noise": d.noise,
             "confidence": d.confidence, "reason": d.reason, "steps": exp.steps,
             "cal_lo": cal.lo if cal else None, "cal_hi": cal.hi if cal else None, "calib_drift": exp.calib_drift}
    ch.verdict = {"regression": "regression", "no regression": "not confirmed"}.get(d.verdict, "cannot tell")
