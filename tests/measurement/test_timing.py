"""Steady-state warm-up and per-step timing.

Every step here "takes" the time a fake clock is advanced by (`fake_clock`, tests/conftest.py): the
decisions under test (warm-up until steady, agreeing rounds, time limits) see exact figures, so the
verdicts cannot move with the machine's load.
"""
from __future__ import annotations

import pytest

from suite.measurement.timing import round_steps, steady, summarize, time_steps, warm_up


def test_time_steps_runs_warmup_then_times_each_iteration(fake_clock):
    calls = []

    def step(x):
        calls.append(x)
        fake_clock.sleep(1e-3)

    timing = time_steps(step, "batch", warmup=2, iters=5, device="cpu")
    assert timing.rounds == 2 and timing.steps == 10 and timing.steady  # identical steps: two rounds agree
    assert len(timing.times_ms) == 10 and timing.median_ms == pytest.approx(1.0)
    assert len(calls) == timing.warmup_steps + timing.steps and timing.warmup_steps == 6  # two windows of 3
    one = time_steps(lambda x: None, None, warmup=0, iters=4, device="cpu", min_rounds=1, max_rounds=1)
    assert one.rounds == 1 and len(one.times_ms) == 4
    with pytest.raises(ValueError, match="iters=0"):
        time_steps(lambda x: None, None, warmup=0, iters=0, device="cpu")
    with pytest.raises(ValueError, match="warmup=-1"):
        time_steps(lambda x: None, None, warmup=-1, iters=1, device="cpu")


def test_summary_is_median_and_inclusive_iqr():
    t = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median_ms == 3.0 and t.iqr_ms == 2.0  # q1=2, q3=4: the outlier moves neither
    assert summarize([5.0]).iqr_ms == 0.0


def test_steady_compares_the_last_two_windows():
    assert not steady([10, 10, 10])  # fewer than two windows
    assert steady([50, 40, 10, 10, 10, 10.2, 10.1, 10.3])
    assert not steady([30, 25, 20, 15, 12, 10])  # still falling
    assert not steady([10, 10, 10, 13, 13, 13])  # a 30% jump is not steady


def _scheduled(clock, ms_per_call):
    """A step that takes ms_per_call(n) milliseconds of `clock` on its n-th call (0-based), counting calls."""
    calls = []

    def step(_):
        clock.sleep(ms_per_call(len(calls)) / 1e3)
        calls.append(1)
    return step, calls


def test_warm_up_continues_until_step_time_stops_drifting(fake_clock):
    """A step that speeds up over its first 10 calls (lazy loading, allocator growth) is warmed past them."""
    step, calls = _scheduled(fake_clock, lambda n: 40.0 / (n + 1) if n < 10 else 2.0)
    steps, settled, recent_ms = warm_up(step, None, warmup=2, device="cpu")
    assert settled and steps == 15 and recent_ms == pytest.approx(2.0)  # steady once two windows of 3 have median 2 ms
    timing = time_steps(step, None, warmup=0, iters=3, device="cpu")
    assert max(timing.times_ms) == pytest.approx(2.0)  # no slow call was timed


def test_warm_up_is_bounded_by_its_time_limit(fake_clock):
    drifting, calls = _scheduled(fake_clock, lambda n: 2.0 * 1.2 ** n)  # 20% slower every call: never steady
    steps, settled, _ = warm_up(drifting, None, warmup=1, device="cpu", max_warmup_s=0.3)
    assert not settled and steps == len(calls)
    assert sum(2.0 * 1.2 ** n for n in range(steps - 1)) <= 300 < sum(2.0 * 1.2 ** n for n in range(steps))


def test_a_round_slowed_by_a_burst_is_not_the_figure(fake_clock):
    """Other work slows the first timed round by 60%: the next two rounds agree, and they are the figure."""
    step, calls = _scheduled(fake_clock, lambda n: 8.0 if 6 <= n < 14 else 5.0)  # warm-up is 6 steps, rounds of 8
    timing = time_steps(step, None, warmup=6, iters=8, device="cpu", max_warmup_s=0)
    assert timing.warmup_steps == 6 and timing.rounds == 3 and timing.steady
    assert timing.median_ms == pytest.approx(5.0) and len(timing.times_ms) == 16


def test_a_machine_slow_throughout_is_reported_slow_and_rounds_that_never_agree_are_flagged(fake_clock):
    slow, _ = _scheduled(fake_clock, lambda n: 8.0)
    assert time_steps(slow, None, warmup=1, iters=4, device="cpu", max_warmup_s=0).median_ms == pytest.approx(8.0)
    drifting, _ = _scheduled(fake_clock, lambda n: 3.0 * 1.25 ** (n // 4))  # every round 25% slower than the last
    timing = time_steps(drifting, None, warmup=0, iters=4, device="cpu", max_warmup_s=0, max_rounds=4)
    assert timing.rounds == 4 and not timing.steady and len(timing.times_ms) == 16


def test_round_steps_fill_min_time_with_fast_steps_and_never_go_below_iters():
    assert round_steps(20, 0.0, 1.0) == 20  # off: exactly iters
    assert round_steps(20, 1.0, 14.0) == 72  # 1 s of 14 ms steps
    assert round_steps(20, 1.0, 100.0) == 20  # iters steps already last 2 s
    assert round_steps(5, 1.0, 0.0) == 5  # no step time to size from


def test_min_time_makes_each_round_last_at_least_that_long(fake_clock):
    step, calls = _scheduled(fake_clock, lambda n: 2.0)
    timing = time_steps(step, None, warmup=3, iters=3, device="cpu", min_time_s=0.06)
    per_round = timing.steps // timing.rounds
    assert timing.steps == per_round * timing.rounds and 30 <= per_round <= 31  # 60 ms of 2 ms steps (ceil of float sums)
    assert per_round * timing.median_ms == pytest.approx(0.06e3)  # the round spans min_time_s
    assert len(calls) == timing.warmup_steps + timing.steps
    with pytest.raises(ValueError, match="min_time_s=-1"):
        time_steps(step, None, warmup=0, iters=1, device="cpu", min_time_s=-1)
