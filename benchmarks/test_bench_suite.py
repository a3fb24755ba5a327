"""The suite's own speed, with pytest-benchmark (its statistics, its comparisons across runs).

    python -m pytest benchmarks --benchmark-enable                      # run and print (from the repository root)
    python -m pytest benchmarks --benchmark-enable --benchmark-autosave  # save as a baseline
    python -m pytest benchmarks --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:10%

Not collected by a plain `pytest` (`testpaths` is tests/). Figures that are ratios against a
reference (fidelity, repeatability, probe solver accuracy) are printed by the scripts beside this
file (`python -m benchmarks.bench_measure`, `bench_probe`, `bench_sweep`).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.factories import make_record, write_store


@pytest.fixture(scope="module")
def results_500(tmp_path_factory):
    """500 trials over five swept axes, as a large sweep's store would hold them."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(500):
        records.append(make_record(
            ["test_vit", "test_resnet", "test_convnext", "test_efficientnet", "test_vit2"][i % 5],
            pool=["avg", "max"][i // 5 % 2], proj=["linear", "mlp", "none"][i // 10 % 3],
            unlocked_groups=[None, 0][i // 30 % 2], grad_checkpointing=bool(i // 60 % 2),
            embed_dim=[256, 512, 768, 1024, 1280][i // 120 % 5] if i < 600 else 512,
            batch_size=32 + i // 300,
            train_samples_per_sec=float(rng.uniform(50, 500)), probe_top1=float(rng.uniform(20, 90)),
        ))
    path = write_store(tmp_path_factory.mktemp("big") / "results.sqlite", records, {"experiment": {
        "name": "big", "select": {"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= 2000"]}}})
    return path


def test_report_render_500_trials(benchmark, results_500):
    from suite.report.render import render
    from suite.results.store import load_meta, load_results

    df, meta = load_results(results_500), load_meta(results_500)
    text = benchmark(render, df, meta)
    assert "## All trials" in text


def test_store_write_one_trial(benchmark, tmp_path):
    from suite.results.store import ResultStore

    store = ResultStore(tmp_path / "results.sqlite")
    records = iter([make_record(embed_dim=i + 1) for i in range(100_000)])
    benchmark(lambda: store.write(next(records)))
    store.close()


def test_linear_probe_digits_sized(benchmark):
    from suite.probe.classifier import linear_probe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 64))
    y = rng.integers(0, 10, size=1800)
    x = (centers[y] + rng.normal(scale=2.0, size=(1800, 64))).astype(np.float32)
    result = benchmark.pedantic(linear_probe, args=(x[:1400], y[:1400], x[1400:], y[1400:]), rounds=3)
    assert result.top1 > 50


def test_suite_inference_step_test_vit(benchmark):
    """One inference step as suite.measurement.engine runs it: pytest-benchmark's view of the same step."""
    import torch

    from suite.core.options import Trial
    from suite.measurement.steps import infer_step_fn, make_inputs
    from suite.tower.model import build_tower

    trial = Trial(model="test_vit", embed_dim=64, image_size=96, batch_size=16, device="cpu")
    torch.manual_seed(0)
    step = infer_step_fn(build_tower(trial), trial, "cpu")
    x = make_inputs(trial, "cpu", trial.batch_size)
    out = benchmark(step, x)
    assert out.shape == (16, 64)
