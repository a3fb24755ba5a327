"""The A/B confirm step's statistics and schedule, on injected figures (no real timing, no processes)."""
from __future__ import annotations

import math
import random

import pytest

from suite.experiment.criteria import Threshold
from suite.gate.abtest import Experiment, SideError, run_experiment
from suite.gate.sequential import ALPHA, LOOKS, MAX_BLOCKS, alpha_per_look, boundary_of, decide

FIVE = Threshold("infer_samples_per_sec", 5.0, True)


def pairs(change: float, noise: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [math.log1p(change) + rng.gauss(0, noise) for _ in range(n)]


def test_a_clear_slowdown_is_a_regression_and_no_change_is_no_regression():
    assert decide(pairs(-0.10, 0.01, 12, 1), -0.05).verdict == "regression"
    assert decide(pairs(0.0, 0.01, 12, 2), -0.05).verdict == "no regression"
    slow = decide(pairs(-0.10, 0.01, 12, 1), -0.05)
    assert slow.lo < -0.10 < slow.hi < -0.05 and slow.n == 12


def test_too_few_pairs_or_too_much_noise_is_undecided_then_cannot_tell():
    assert decide([0.0], -0.05).verdict == "undecided"
    noisy = pairs(-0.05, 0.10, 8, 3)
    assert decide(noisy, -0.05).verdict == "undecided"
    final = decide(noisy, -0.05, final=True)
    assert final.verdict == "cannot tell" and "wider than" in final.reason and final.noise > 0.05


def test_more_experiments_spend_less_error_each_and_widen_the_interval():
    assert alpha_per_look(1) == pytest.approx(ALPHA / len(LOOKS))
    assert alpha_per_look(10) == pytest.approx(alpha_per_look(1) / 10)
    x = pairs(-0.08, 0.02, 8, 4)
    one, many = decide(x, -0.05, experiments=1), decide(x, -0.05, experiments=20)
    assert many.hi - many.lo > one.hi - one.lo


def test_step_time_and_absolute_thresholds_become_speed_boundaries():
    assert boundary_of("infer_samples_per_sec", FIVE, 100.0) == pytest.approx(-0.05)
    assert boundary_of("infer_step_time", Threshold("infer_step_time", 5.0, True), 10.0) == pytest.approx(1 / 1.05 - 1)
    assert boundary_of("infer_samples_per_sec", Threshold("infer_samples_per_sec", 20.0, False), 200.0) \
        == pytest.approx(-0.10)


def test_false_alarms_stay_under_the_stated_rate_at_the_threshold():
    """The worst case for a false alarm: a true slowdown of exactly the threshold, judged at every look."""
    alarms = 0
    runs = 400
    for seed in range(runs):
        x = pairs(-0.05, 0.03, MAX_BLOCKS, seed)
        for n in LOOKS:
            if decide(x[:n], -0.05).verdict == "regression":
                alarms += 1
                break
    assert alarms / runs <= ALPHA


class FakeSide:
    """A side whose step takes `ms` times the machine's momentary slowness (shared with the other side),
    times a bias of its process (a new one for every block: a fresh process)."""

    def __init__(self, machine, ms: float, *, fail: str = ""):
        self.machine, self.ms, self.fail, self.bias, self.blocks = machine, ms, fail, 1.0, 0

    def start_block(self):
        self.bias, self.blocks = 1 + self.machine.rng.gauss(0, 0.03), self.blocks + 1

    def end_block(self):
        pass

    def prepare(self, trial_values, phase, threads):
        if self.fail:
            raise SideError(self.fail)
        return {"step_ms": self.ms}

    def round(self, steps):
        slow = self.machine.tick(steps * self.ms) * self.bias
        return {"times_ms": [self.ms * slow * (1 + self.machine.rng.gauss(0, 0.01)) for _ in range(5)],
                "calib_ms": 2.0 * slow}


class Machine:
    """A clock and a machine that gets `drift` slower per second of work (both sides alike)."""

    def __init__(self, drift: float = 0.0, seed: int = 0):
        self.t, self.drift, self.rng = 0.0, drift, random.Random(seed)

    def tick(self, ms: float) -> float:
        self.t += ms / 1e3
        return 1 + self.drift * self.t

    def clock(self) -> float:
        return self.t


def _run(machine, base_ms, cur_ms, *, budget_s=60.0, fail=""):
    exp = Experiment("t1", "infer", -0.05)
    return run_experiment(exp, FakeSide(machine, base_ms), FakeSide(machine, cur_ms, fail=fail), {}, 2,
                          deadline=machine.clock() + budget_s, experiments=1, clock=machine.clock)


def test_a_machine_drifting_40_percent_during_the_experiment_is_not_a_regression():
    machine = Machine(drift=0.4)
    exp = _run(machine, 5.0, 5.0)
    assert exp.decision.verdict == "no regression"
    assert exp.calib_drift < -0.05  # the calibration workload saw the machine slow down
    assert exp.pairs[0].base_first and not exp.pairs[1].base_first  # A B, B A, ...
    assert len(exp.blocks) >= LOOKS[0] and all(len(b) == 3 for b in exp.blocks)


def test_a_planted_ten_percent_slowdown_is_a_regression_under_drift():
    exp = _run(Machine(drift=0.4, seed=1), 5.0, 5.0 / 0.9)
    assert exp.decision.verdict == "regression"
    assert exp.decision.hi < -0.05 and exp.calibrated.verdict == "regression"


def test_a_spent_budget_is_cannot_tell_with_its_reason_and_a_failing_side_is_an_error():
    exp = _run(Machine(seed=2), 5.0, 5.0 / 0.96, budget_s=0.5)
    assert exp.decision.verdict == "cannot tell" and "budget" in exp.decision.reason
    block_s = (5 + 3 * exp.steps) * 2 * 5.0 / 1e3 / 0.96 * 1.2  # sizing + 3 pairs of both sides, biased slow
    assert exp.time_s <= 0.5 + block_s  # at most one block past the deadline
    broken = _run(Machine(), 5.0, 5.0, fail="current side: KeyError: 'no_such_option'")
    assert broken.decision is None and "no_such_option" in broken.error


# --- run_ab: the confirm step over a comparison, with recorded sides ---------------------------

def _comparison():
    import pandas as pd
    from factories import make_record

    from suite.gate.compare import compare
    from suite.results.rows import get, rows_of

    sizes = (8, 16, 24, 32, 40, 48)
    frames = []
    for slow in (1.0, 0.8):
        frames.append(pd.DataFrame([make_record("test_resnet", embed_dim=s, infer_samples_per_sec=300.0 * (
            slow if s == 32 else 1.0) * (1 + 0.002 * s), train_samples_per_sec=100.0 * (1 + 0.002 * s)).flat()
            for s in sizes]))
    c = compare(*frames)
    rows = {side: {str(get(r, "trial_id")): r for r in rows_of(f)} for side, f in zip(("baseline", "current"), frames)}
    return c, rows


def _sides(machine, slower: float, env: dict | None = None):
    class Current(FakeSide):
        def env(self, device):
            return env

    def make(name, tree, threads):
        return FakeSide(machine, 5.0) if name == "baseline" else Current(machine, 5.0 / slower)
    return make


def test_run_ab_confirms_a_real_slowdown_and_clears_a_stored_fluke():
    from suite.gate.ab_confirm import run_ab
    from suite.gate.compare import flagged_timing

    for slower, verdict in ((0.8, "regression"), (1.0, "not confirmed")):
        c, rows = _comparison()
        flagged = flagged_timing(c, cannot_tell=True)
        assert [ch.metric for ch in flagged] == ["infer_samples_per_sec"]
        machine = Machine(drift=0.2, seed=3)
        run_ab(c, rows, [flagged[0].trial_id], None, 30.0, budget_why="given", make_side=_sides(machine, slower),
               clock=machine.clock)
        ch = flagged[0]
        assert ch.verdict == verdict and ch.ab["blocks"] >= LOOKS[0] and ch.ab["lo"] < ch.ab["hi"]
        assert c.ab["experiments"] == 1 and 0 < c.ab["time_s"] <= 30.0 + 1.0


def test_run_ab_refuses_another_environment_and_the_stored_verdict_stands():
    from suite.gate.ab_confirm import run_ab
    from suite.gate.compare import flagged_timing

    c, rows = _comparison()
    ch = flagged_timing(c, cannot_tell=True)[0]
    before = ch.verdict
    machine = Machine()
    other = {**{k: rows["current"][ch.trial_id][k] for k in rows["current"][ch.trial_id] if k.startswith("env_")},
             "env_threads": 64}
    run_ab(c, rows, [ch.trial_id], None, 30.0, budget_why="given", make_side=_sides(machine, 1.0, other),
           clock=machine.clock)
    assert ch.verdict == before and "another environment" in ch.ab["reason"] and "env_threads" in ch.ab["reason"]
