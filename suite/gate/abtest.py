"""The confirm step as a designed experiment: A/B pairs of one flagged trial, until decided or out of time.

For each flagged (trial, phase), both sides' processes (`suite.gate.abworker`: the baseline's code
and the current code) build the trial and warm it up, then time short rounds in turn, in the order
A B, B A, A B, ... (so a machine that slows steadily over the experiment slows each side alike).
Every pair gives log(current speed / baseline speed); after each look of `suite.gate.sequential`
the experiment stops when its verdict is decided, else when its share of the time budget is spent.
Each round is followed by the calibration workload in the same process, so the report can show the
machine's own drift over the experiment and the change relative to it.

The process handling (`ProcessSide`) is kept apart from the schedule (`run_experiment`), which takes
any object with `prepare` and `round`: tests drive it with recorded figures, not real timings.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from suite.core.errors import one_line
from suite.gate.sequential import LOOKS, MAX_PAIRS, Decision, decide

REPO = Path(__file__).resolve().parents[2]
ROUND_S = 0.1  # target length of one timed round (one half of a pair)
MIN_ROUND_STEPS = 3
_REPLY_TIMEOUT_S = 900


class Side(Protocol):
    def prepare(self, trial_values: dict, phase: str, threads: int | None) -> dict: ...
    def round(self, steps: int) -> dict: ...


class SideError(RuntimeError):
    """A side could not do what was asked (its reply's error, or its process ended)."""


class ProcessSide:
    """A running `suite.gate.abworker` with the suite code of `tree` (None: this checkout)."""

    def __init__(self, name: str, tree: str | Path | None = None, threads: int | None = None):
        self.name = name
        root = str(tree or REPO)
        env = dict(os.environ, PYTHONPATH=root, PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "suite.gate.abworker"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, **msg) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SideError(f"the {self.name} side's process ended: {one_line(exc)}") from None

    def ask(self, **msg) -> dict:
        self.send(**msg)
        return self.reply()

    def reply(self) -> dict:
        try:
            line = self.proc.stdout.readline()
        except OSError as exc:
            raise SideError(f"the {self.name} side's process ended: {one_line(exc)}") from None
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            last = err.strip().splitlines()[-1] if err.strip() else f"exit code {self.proc.poll()}"
            raise SideError(f"the {self.name} side's process ended: {one_line(last)}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise SideError(f"{self.name} side: {reply.get('error')}")
        return reply

    def env(self, device: str) -> dict:
        return self.ask(op="env", device=device)["env"]

    def prepare(self, trial_values: dict, phase: str, threads: int | None) -> dict:
        return self.ask(op="prepare", trial=trial_values, phase=phase, threads=threads)

    def start_prepare(self, trial_values: dict, phase: str, threads: int | None) -> None:
        """`prepare` without waiting (both sides build and warm up at once; nothing is timed then)."""
        self.send(op="prepare", trial=trial_values, phase=phase, threads=threads)

    def round(self, steps: int) -> dict:
        return self.ask(op="round", steps=steps)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@dataclass
class Pair:
    """One A/B pair: each side's round median (ms per step) and calibration time (ms)."""

    base_ms: float
    cur_ms: float
    base_calib_ms: float
    cur_calib_ms: float
    base_first: bool

    @property
    def log_ratio(self) -> float:
        """log(current speed / baseline speed)."""
        return math.log(self.base_ms / self.cur_ms)

    @property
    def calibrated_log_ratio(self) -> float:
        """The same, each side's step time taken relative to its calibration workload."""
        return math.log((self.base_ms / self.base_calib_ms) / (self.cur_ms / self.cur_calib_ms))


@dataclass
class Experiment:
    """The A/B re-measurement of one flagged trial's phase."""

    trial_id: str
    phase: str
    boundary: float  # the threshold as a relative change of speed (negative)
    pairs: list[Pair] = field(default_factory=list)
    decision: Decision | None = None
    calibrated: Decision | None = None  # the same test on calibrated ratios (reported, not the verdict)
    error: str = ""  # why it could not run (then no decision: the stored verdict stands)
    time_s: float = 0.0
    steps: int = 0  # steps per round

    @property
    def calib_drift(self) -> float | None:
        """How far the calibration workload moved over the experiment (last pair vs first; relative)."""
        if len(self.pairs) < 2:
            return None
        first, last = self.pairs[0], self.pairs[-1]
        return (first.cur_calib_ms + first.base_calib_ms) / (last.cur_calib_ms + last.base_calib_ms) - 1


def _median(reply: dict) -> tuple[float, float]:
    return statistics.median(reply["times_ms"]), float(reply["calib_ms"])


def run_experiment(exp: Experiment, baseline: Side, current: Side, trial_values: dict, threads: int | None, *,
                   deadline: float, experiments: int, clock: Callable[[], float] = time.monotonic) -> Experiment:
    """Prepare both sides, then add pairs until `decide` settles it, MAX_PAIRS, or `deadline` (on `clock`)."""
    t0 = clock()
    try:
        ready = _prepare_both(baseline, current, trial_values, exp.phase, threads)
        step_ms = max(float(r["step_ms"]) for r in ready)
        exp.steps = max(MIN_ROUND_STEPS, math.ceil(ROUND_S * 1e3 / max(step_ms, 1e-3)))
        while True:
            base_first = len(exp.pairs) % 2 == 0
            order = (baseline, current) if base_first else (current, baseline)
            got = {id(side): _median(side.round(exp.steps)) for side in order}
            (b_ms, b_cal), (c_ms, c_cal) = got[id(baseline)], got[id(current)]
            exp.pairs.append(Pair(b_ms, c_ms, b_cal, c_cal, base_first))
            n = len(exp.pairs)
            out_of_time = clock() >= deadline
            if n in LOOKS or out_of_time:
                final = out_of_time or n >= MAX_PAIRS
                exp.decision = decide([p.log_ratio for p in exp.pairs], exp.boundary, experiments=experiments,
                                      final=final)
                if exp.decision.verdict != "undecided" or final:
                    if out_of_time and exp.decision.verdict == "cannot tell":
                        exp.decision = _with_reason(exp.decision, "the time budget was spent")
                    break
    except SideError as exc:
        exp.error = str(exc)
    finally:
        exp.time_s = clock() - t0
    if exp.pairs and not exp.error:
        exp.calibrated = decide([p.calibrated_log_ratio for p in exp.pairs], exp.boundary, experiments=experiments,
                                final=True)
    return exp


def _prepare_both(baseline, current, trial_values: dict, phase: str, threads: int | None) -> list[dict]:
    """Both sides build and warm up the trial, at the same time where they can (`start_prepare`)."""
    if all(hasattr(side, "start_prepare") for side in (baseline, current)):
        for side in (baseline, current):
            side.start_prepare(trial_values, phase, threads)
        return [side.reply() for side in (baseline, current)]
    return [side.prepare(trial_values, phase, threads) for side in (baseline, current)]


def _with_reason(d: Decision, extra: str) -> Decision:
    from dataclasses import replace

    return replace(d, reason=f"{d.reason}; {extra}" if d.reason else extra)


def ab_lines(c) -> list[str]:
    """The report's section on the A/B confirm step of Comparison `c` (nothing when it did not run)."""
    tried = [ch for ch in c.changes if ch.ab is not None]
    if not c.ab and not tried:
        return []
    lines = ["", "### Confirmation: A/B re-measurement on this machine", ""]
    if c.ab:
        lines.append(f"Confirm step: {c.ab['time_s']:.1f} s of a {c.ab['budget_s']:.1f} s budget "
                     f"({c.ab['budget_why']}); {c.ab['experiments']} experiments; false-alarm rate at most "
                     f"{100 * c.ab['alpha']:.0f}% over all of them (Bonferroni over trials and looks). Each pair: "
                     "baseline and current code, back to back (A B, B A, ...); the calibration workload after each "
                     "round shows the machine's own drift.")
        lines.append("")
    body = []
    for ch in tried:
        ab = ch.ab
        interval = "—" if ab.get("lo") is None else f"{100 * ab['lo']:+.1f}% .. {100 * ab['hi']:+.1f}%"
        calibrated = "—" if ab.get("cal_lo") is None else f"{100 * ab['cal_lo']:+.1f}% .. {100 * ab['cal_hi']:+.1f}%"
        body.append([ch.label, f"`{ch.metric}`", ab.get("pairs", 0),
                     "—" if ab.get("noise") is None else f"±{100 * ab['noise']:.1f}%", interval, calibrated,
                     "—" if ab.get("calib_drift") is None else f"{100 * ab['calib_drift']:+.1f}%",
                     f"{ab.get('time_s', 0.0):.1f} s", f"**{ch.verdict}**" if ch.verdict == "regression" else ch.verdict,
                     ab.get("reason", "")])
    from suite.results.rows import table

    lines.append(table(["trial", "metric", "pairs", "noise/pair", "change of speed", "vs calibration",
                        "machine drift", "time", "verdict", "why"], body, "llrrrrrrll"))
    return lines
