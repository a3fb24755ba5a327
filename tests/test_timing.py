"""Steady-state warm-up and per-step timing."""
from __future__ import annotations

import time

import pytest

from suite.timing import round_steps, steady, summarize, time_steps, warm_up


def test_time_steps_runs_warmup_then_times_each_iteration():
    calls = []
    timing = time_steps(lambda x: calls.append(x), "batch", warmup=2, iters=5, device="cpu")
    assert 2 <= timing.rounds <= 5 and timing.steps == 5 * timing.rounds
    assert len(timing.times_ms) == (10 if timing.steady else timing.steps)  # the two agreeing rounds
    assert len(calls) == timing.warmup_steps + timing.steps and timing.warmup_steps >= 2
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


def test_warm_up_continues_until_step_time_stops_drifting():
    """A step that speeds up over its first 10 calls (lazy loading, allocator growth) is warmed past them."""
    calls = []

    def step(_):
        calls.append(1)
        time.sleep(0.04 / len(calls) if len(calls) <= 10 else 0.002)

    steps, settled, recent_ms = warm_up(step, None, warmup=2, device="cpu")
    assert settled and steps >= 10 and recent_ms < 10  # still speeding up until then
    timing = time_steps(step, None, warmup=0, iters=3, device="cpu")
    assert max(timing.times_ms) < 10  # no slow call was timed


def test_warm_up_is_bounded_by_its_time_limit():
    calls = []

    def drifting(_):
        calls.append(1)
        time.sleep(2e-3 * 1.2 ** len(calls))  # 20% slower every call (far above sleep jitter): never steady

    steps, settled, _ = warm_up(drifting, None, warmup=1, device="cpu", max_warmup_s=0.3)
    assert not settled and steps >= 2


def _scheduled(ms_per_call):
    """A step that sleeps ms_per_call(n) milliseconds on its n-th call (0-based), counting calls."""
    calls = []

    def step(_):
        time.sleep(ms_per_call(len(calls)) / 1e3)
        calls.append(1)
    return step, calls


def test_a_round_slowed_by_a_burst_is_not_the_figure():
    """Other work slows the first timed round by 60%: the next two rounds agree, and they are the figure."""
    step, calls = _scheduled(lambda n: 8.0 if 6 <= n < 14 else 5.0)  # warm-up is 6 steps, rounds of 8
    timing = time_steps(step, None, warmup=6, iters=8, device="cpu", max_warmup_s=0)
    assert timing.warmup_steps == 6 and timing.rounds == 3 and timing.steady
    assert 5.0 <= timing.median_ms < 6.0 and len(timing.times_ms) == 16


def test_a_machine_slow_throughout_is_reported_slow_and_rounds_that_never_agree_are_flagged():
    slow, _ = _scheduled(lambda n: 8.0)
    assert time_steps(slow, None, warmup=1, iters=4, device="cpu", max_warmup_s=0).median_ms >= 8.0
    drifting, _ = _scheduled(lambda n: 3.0 * 1.25 ** (n // 4))  # every round 25% slower than the last
    timing = time_steps(drifting, None, warmup=0, iters=4, device="cpu", max_warmup_s=0, max_rounds=4)
    assert timing.rounds == 4 and not timing.steady and len(timing.times_ms) == 16


def test_round_steps_fill_min_time_with_fast_steps_and_never_go_below_iters():
    assert round_steps(20, 0.0, 1.0) == 20  # off: exactly iters
    assert round_steps(20, 1.0, 14.0) == 72  # 1 s of 14 ms steps
    assert round_steps(20, 1.0, 100.0) == 20  # iters steps already last 2 s
    assert round_steps(5, 1.0, 0.0) == 5  # no step time to size from


def test_min_time_makes_each_round_last_at_least_that_long():
    step, calls = _scheduled(lambda n: 2.0)
    timing = time_steps(step, None, warmup=3, iters=3, device="cpu", min_time_s=0.06)
    per_round = timing.steps // timing.rounds
    assert timing.steps == per_round * timing.rounds and 3 < per_round <= 30  # sleep(2 ms) lasts >= 2 ms
    assert per_round * timing.median_ms >= 0.06e3 * 0.8  # the round spans about min_time_s
    assert len(calls) == timing.warmup_steps + timing.steps
    with pytest.raises(ValueError, match="min_time_s=-1"):
        time_steps(step, None, warmup=0, iters=1, device="cpu", min_time_s=-1)
