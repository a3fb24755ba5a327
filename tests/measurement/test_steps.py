"""The timed steps, and torch.compile that really compiles every trial."""
from __future__ import annotations

import pytest
import torch

from suite.core.options import Trial
from suite.measurement.engine import measure
from suite.measurement.steps import compile_stats, infer_step_fn, make_inputs, reset_compiler, train_step_fn
from suite.tower.model import build_tower

QUICK = dict(image_size=64, batch_size=4, warmup=1, iters=2, embed_dim=32, device="cpu")


@pytest.fixture()
def low_recompile_limit():
    """A recompile limit of 2, so a shared compile cache would run out after two towers."""
    import torch._dynamo.config as config

    name = "recompile_limit" if "recompile_limit" in dir(config) else "cache_size_limit"
    with config.patch(**{name: 2}):
        yield


def test_compiled_trials_in_one_process_each_compile(low_recompile_limit):
    """Three compiled towers in one process, one more than the recompile limit: each compiles its own
    graphs, none falls back to eager."""
    for embed_dim in (16, 24, 32):
        t = Trial("test_vit", **{**QUICK, "embed_dim": embed_dim}, mode="infer", compile=True,
                  compile_backend="aot_eager")
        r = measure(t)  # the device peak comes from the test run's shared cache (tests/conftest.py)
        assert r.compile_graphs >= 1, embed_dim
        assert r.compile_time_s > 0 and r.compile_graph_breaks == 0


def test_train_phase_compiles_and_steps_every_time():
    t = Trial("test_resnet", **QUICK, mode="train", compile=True, compile_backend="aot_eager")
    r = measure(t)
    assert r.compile_graphs >= 1 and r.train_skipped_steps == 0


def test_eager_trial_has_no_compile_fields():
    r = measure(Trial("test_resnet", **QUICK, mode="infer"))
    assert r.compile_graphs is None and r.compile_time_s is None


@pytest.mark.slow
def test_compiled_output_matches_eager():
    """inductor on CPU (a C++ compile: seconds): the compiled tower computes the same function."""
    t = Trial("test_vit", **QUICK, compile=True)
    torch.manual_seed(0)
    tower = build_tower(t)
    x = make_inputs(t, "cpu", 4)
    eager = infer_step_fn(tower, t, "cpu", eager=True)(x).clone()
    reset_compiler()
    compiled = infer_step_fn(tower, t, "cpu")(x)
    assert compile_stats().graphs >= 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_skipped_optimizer_steps_are_counted():
    """A step whose gradients are not finite is skipped by the fp16 scaler; the step counter shows it."""
    t = Trial("test_resnet", **QUICK, mode="train")
    step = train_step_fn(build_tower(t), t, "cpu")
    x = make_inputs(t, "cpu", 4)
    step(x)
    step(x)
    assert step.optimizer_steps() == 2
    if torch.amp.GradScaler("cpu").is_enabled():
        t16 = Trial("test_resnet", **{**QUICK, "precision": "fp16"}, mode="train")
        step16 = train_step_fn(build_tower(t16), t16, "cpu")
        step16(x * float("inf"))  # inf inputs -> inf gradients -> the scaler skips the update
        assert step16.optimizer_steps() == 0
