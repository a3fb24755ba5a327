"""The pytest plugin: `tower_bench` in a fresh project (pytester), `--tower-baseline` from stored figures.

The pytester run measures for real (tiny settings) and asserts only what holds on any machine: a test
passes, a test fails on a threshold no machine meets (1e12 img/s) or on a parameter count, and
pytest-benchmark's JSON holds the suite's figures, finite and positive. The baseline gate is tested
with injected records (`factories`), never with a measured speed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from factories import make_record, write_store

from suite.gate.pytest_plugin import _synthetic_steps, check_expectations, gate

pytest_plugins = ["pytester"]

TINY = 'model="test_resnet", image_size=32, batch_size=2, warmup=1, iters=2, mode="infer", device="cpu"'

PROJECT = f'''
def test_fast_enough(tower_bench):
    record = tower_bench({TINY}, expect=["infer_samples_per_sec > 0", "param_count < 1000"])
    assert record.status == "ok"

def test_impossible_throughput(tower_bench):
    tower_bench({TINY}, expect=["infer_samples_per_sec >= 1e12"])

def test_too_many_params(tower_bench):
    tower_bench({TINY}, expect=["param_count <= 0.000001"])
'''


def test_entry_point_is_declared():
    """pyproject declares the plugin (an install registers it: the pytester run below finds it that way)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["pytest11"] == {"suite": "suite.gate.pytest_plugin"}


@pytest.mark.slow
def test_tower_bench_in_a_fresh_project(pytester, monkeypatch):
    # A fresh project's own pytest run, not a worker of this one: under xdist the child inherits
    # PYTEST_XDIST_WORKER, and pytest-benchmark then leaves writing --benchmark-json to a controller
    # that does not exist.
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(test_tower=PROJECT)
    out = pytester.path / "bench.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--benchmark-json={out}", "-q")
    result.assert_outcomes(passed=1, failed=2)
    text = "\n".join(result.outlines)
    assert "infer_samples_per_sec >= 1000000000000: measured" in text and "param_count <= 1e-06: measured" in text
    benchmarks = json.loads(out.read_text())["benchmarks"]
    passed = next(b for b in benchmarks if b["name"] == "test_fast_enough")
    extra, stats = passed["extra_info"], passed["stats"]
    for key in ("infer_samples_per_sec", "infer_step_time", "infer_peak_mem_mib", "infer_gflops", "param_count"):
        assert math.isfinite(extra[key]) and extra[key] > 0, key
    assert extra["model"] == "test_resnet" and extra["phase"] == "infer" and extra["env_device"] == "cpu"
    assert math.isfinite(stats["median"]) and stats["median"] > 0
    assert stats["median"] == pytest.approx(extra["infer_step_time"] / 1000.0)


def test_synthetic_steps_keep_the_median_and_spread():
    steps = _synthetic_steps(0.010, 0.002, 20)
    assert sorted(steps)[9] < 0.010 < sorted(steps)[10] and max(steps) - min(steps) == pytest.approx(0.0038)
    assert _synthetic_steps(0.010, 0.0, 1) == [0.010]


def test_expectations():
    record = make_record("test_resnet", infer_peak_mem_mib=300.0)
    assert check_expectations(record, ["infer_peak_mem_mib <= 400", "infer_samples_per_sec >= 100"]) == []
    assert check_expectations(record, ["infer_peak_mem_mib < 200"]) == ["infer_peak_mem_mib < 200: measured 300.0"]
    assert "nothing" in check_expectations(make_record(train_mfu=None), ["train_mfu > 0"])[0]


def test_baseline_gate_uses_stored_figures_and_confirms(tmp_path):
    base = write_store(tmp_path / "base.sqlite", [make_record("test_resnet")])
    same = make_record("test_resnet")
    assert gate(same, base).exit_code == 0
    slow = make_record("test_resnet", infer_samples_per_sec=200.0)  # 300 -> 200 img/s
    assert gate(slow, base, remeasure=None).exit_code == 1
    # Flagged, re-measured twice at the baseline's speed: not confirmed, the test passes.
    calls = []
    fine = gate(slow, base, remeasure=lambda: calls.append(1) or make_record("test_resnet"), rounds=2)
    assert fine.exit_code == 0 and len(calls) == 2
    held = gate(slow, base, remeasure=lambda: slow, rounds=2)
    assert held.exit_code == 1 and "confirmed: re-measured" in held.regressions[0]
    # Memory growth is not re-measured; a trial the baseline lacks is not gated; another machine fails.
    assert gate(make_record("test_resnet", infer_peak_mem_mib=400.0), base, remeasure=lambda: pytest.fail()).exit_code == 1
    assert gate(make_record("test_vit"), base) is None
    elsewhere = gate(make_record("test_resnet", env_threads=64), base)
    assert elsewhere.exit_code == 1 and "threads 2 vs 64" in elsewhere.env_uncompared[0]


def test_tower_confirm_is_bounded_before_any_test_runs():
    """--tower-confirm is checked like `suite compare --confirm`: a huge count is a typo, refused at configure."""
    from types import SimpleNamespace

    from suite.experiment.criteria import MAX_CONFIRM_ROUNDS
    from suite.gate.pytest_plugin import pytest_configure

    def config(rounds):
        return SimpleNamespace(getoption=lambda name: {"tower_confirm": rounds}[name])

    for ok in (0, 2, MAX_CONFIRM_ROUNDS):
        pytest_configure(config(ok))
    for bad in (-1, MAX_CONFIRM_ROUNDS + 1, 10**21):
        with pytest.raises(pytest.UsageError, match=f"--tower-confirm {bad}: give a whole number from 0 to"):
            pytest_configure(config(bad))
