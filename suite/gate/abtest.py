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
from suite.gate.sequential import LOOKS, MAX_BLOCKS, Decision, decide

REPO = Path(__file__).resolve().parents[2]
ROUND_S = 0.2  # target length of one timed round (one half of a pair)
MIN_ROUND_STEPS = 3
SIZING_STEPS = 5  # steps of the untimed round each side runs to size the rounds
PAIRS_PER_BLOCK = 3  # pairs in one block (one process pair); the process bias, not these, dominates a block
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
        # Passive OpenMP waits: an idle side's threads must not spin on the cores the other side is timed on.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
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

    def start_block(self) -> None:
        """Fork a fresh process from this side's zygote for the next block (`suite.gate.abworker`)."""
        self.ask(op="fork")

    def end_block(self) -> None:
        self.ask(op="end")

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
    """The A/B re-measurement of one flagged trial's phase: blocks of pairs, each block in fresh processes."""

    trial_id: str
    phase: str
    boundary: float  # the threshold as a relative change of speed (negative)
    blocks: list[list[Pair]] = field(default_factory=list)
    decision: Decision | None = None
    calibrated: Decision | None = None  # the same test on calibrated ratios (reported, not the verdict)
    error: str = ""  # why it could not run (then no decision: the stored verdict stands)
    time_s: float = 0.0
    steps: int = 0  # steps per round

    @property
    def pairs(self) -> list[Pair]:
        return [p for block in self.blocks for p in block]

    def block_means(self, calibrated: bool = False) -> list[float]:
        """Each complete block's mean log speed ratio: the units the test judges."""
        return [statistics.fmean(p.calibrated_log_ratio if calibrated else p.log_ratio for p in block)
                for block in self.blocks if len(block) == PAIRS_PER_BLOCK]

    @property
    def calib_drift(self) -> float | None:
        """How far the calibration workload moved over the experiment (last pair vs first; relative)."""
        pairs = self.pairs
        if len(pairs) < 2:
            return None
        first, last = pairs[0], pairs[-1]
        return (first.cur_calib_ms + first.base_calib_ms) / (last.cur_calib_ms + last.base_calib_ms) - 1


def _median(reply: dict) -> tuple[float, float]:
    return statistics.median(reply["times_ms"]), float(reply["calib_ms"])


def run_experiment(exp: Experiment, baseline: Side, current: Side, trial_values: dict, threads: int | None, *,
                   deadline: float, experiments: int, clock: Callable[[], float] = time.monotonic) -> Experiment:
    """Add blocks until `decide` settles it, MAX_BLOCKS, or `deadline` (on `clock`).

    A block: both sides fork a fresh process from their zygote (`start_block`, where a side has it),
    build and warm up the trial, size the rounds, run PAIRS_PER_BLOCK pairs, and end. A process
    of the same code can be several percent faster or slower than another for its whole life (its
    memory layout; on the 2-core VM two identical processes differed by -25% to +7%), so one process
    pair's bias must not be the verdict: it is one sample, and the blocks' means are what is judged.
    """
    t0 = clock()
    try:
        while True:
            exp.blocks.append(block(exp, baseline, current, trial_values, threads))
            n = len(exp.blocks)
            out_of_time = clock() >= deadline
            if n in LOOKS or out_of_time or n >= MAX_BLOCKS:
                final = out_of_time or n >= MAX_BLOCKS
                exp.decision = decide(exp.block_means(), exp.boundary, experiments=experiments, final=final)
                if exp.decision.verdict != "undecided" or final:
                    if out_of_time and exp.decision.verdict == "cannot tell":
                        exp.decision = _with_reason(exp.decision, "the time budget was spent")
                    break
    except SideError as exc:
        exp.error = str(exc)
    finally:
        exp.time_s = clock() - t0
    if len(exp.block_means()) >= 2 and not exp.error:
        exp.calibrated = decide(exp.block_means(calibrated=True), exp.boundary, experiments=experiments, final=True)
    return exp


def block(exp: Experiment, baseline: Side, current: Side, trial_values: dict, threads: int | None) -> list[Pair]:
    """One block of pairs in fresh processes (see `run_experiment`)."""
    sides = (baseline, current)
    for side in sides:
        getattr(side, "start_block", lambda: None)()
    try:
        _prepare_both(baseline, current, trial_values, exp.phase, threads)
        if not exp.steps:
            # Rounds are sized once, from a round of each side alone (the warm-ups ran at the same
            # time, so their step times are those of a shared machine); sizing rounds are not counted.
            step_ms = max(_median(side.round(SIZING_STEPS))[0] for side in sides)
            exp.steps = max(MIN_ROUND_STEPS, math.ceil(ROUND_S * 1e3 / max(step_ms, 1e-3)))
        pairs = []
        for i in range(PAIRS_PER_BLOCK):
            base_first = (len(exp.blocks) + i) % 2 == 0  # A B, B A, ... across blocks too
            order = sides if base_first else sides[::-1]
            got = {id(side): _median(side.round(exp.steps)) for side in order}
            (b_ms, b_cal), (c_ms, c_cal) = got[id(baseline)], got[id(current)]
            pairs.append(Pair(b_ms, c_ms, b_cal, c_cal, base_first))
        return pairs
    finally:
        for side in sides:
            getattr(side, "end_block", lambda: None)()


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
                     "baseline and current code, back to back (A B, B A, ...); a block: a fresh process of each side, "
                     f"{PAIRS_PER_BLOCK} pairs; the calibration workload after each round shows the machine's own "
                     "drift.")
        lines.append("")
    body = []
    for ch in tried:
        ab = ch.ab
        interval = "—" if ab.get("lo") is None else f"{100 * ab['lo']:+.1f}% .. {100 * ab['hi']:+.1f}%"
        calibrated = "—" if ab.get("cal_lo") is None else f"{100 * ab['cal_lo']:+.1f}% .. {100 * ab['cal_hi']:+.1f}%"
        body.append([ch.label, f"`{ch.metric}`", f"{ab.get('blocks', 0)} × {PAIRS_PER_BLOCK}",
                     "—" if ab.get("noise") is None else f"±{100 * ab['noise']:.1f}%", interval, calibrated,
                     "—" if ab.get("calib_drift") is None else f"{100 * ab['calib_drift']:+.1f}%",
                     f"{ab.get('time_s', 0.0):.1f} s", f"**{ch.verdict}**" if ch.verdict == "regression" else ch.verdict,
                     ab.get("reason", "")])
    from suite.results.rows import table

    lines.append(table(["trial", "metric", "blocks × pairs", "noise/block", "change of speed", "vs calibration",
                        "machine drift", "time", "verdict", "why"], body, "llrrrrrrll"))
    return lines
