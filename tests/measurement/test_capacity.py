"""Capacity maths (no torch), the settings checks and the memory passes behind them."""
from __future__ import annotations

import pytest
from factories import make_record

from suite.measurement.capacity import affine_fit, predict_max_batch, search_max_batch
from suite.report.memory import ckpt_twins, fits_on

# --- the line and the search -------------------------------------------------------------------

def test_affine_fit_recovers_the_line():
    assert affine_fit([(8, 100.0 + 8 * 2.5), (16, 100.0 + 16 * 2.5)]) == pytest.approx((100.0, 2.5))
    assert affine_fit([(4, 10.0), (8, 18.0), (16, 34.0)]) == pytest.approx((2.0, 2.0))
    assert affine_fit([(8, 100.0), (8, 101.0)]) is None  # one batch size: no line


def test_predict_max_batch():
    assert predict_max_batch(100.0, 2.5, 2048.0) == 779  # floor((2048 - 100) / 2.5)
    assert predict_max_batch(3000.0, 2.5, 2048.0) == 0  # not even one sample
    assert predict_max_batch(100.0, 0.0, 2048.0) is None  # flat line: unbounded, say nothing
    assert predict_max_batch(None, 2.5, 2048.0) is None and predict_max_batch(1.0, 2.5, None) is None


@pytest.mark.parametrize("answer", [0, 1, 2, 7, 8, 9, 100, 1000])
@pytest.mark.parametrize("start", [1, 8, 64])
def test_search_finds_the_largest_fitting_batch(answer, start):
    calls = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= answer

    assert search_max_batch(fits, start) == answer
    assert len(calls) <= 2 * 11 + 2  # logarithmic, not linear
    assert 0 not in calls


def test_search_stops_at_the_limit():
    assert search_max_batch(lambda b: True, 8, limit=100) == 100


def test_fits_on_uses_the_recorded_line():
    row = make_record(train_fixed_mem_mib=1024.0, train_mem_per_sample_mib=100.0).flat()
    assert fits_on(row, "train") == [235, 399, 808]  # (24576 - 1024) / 100, ...
    assert fits_on(make_record().flat(), "train") == [None, None, None]


def test_ckpt_twins_pair_trials_that_differ_only_in_checkpointing():
    rows = [make_record(train_activations_mib=10.0).flat(),
            make_record(grad_checkpointing=True, train_activations_mib=4.0).flat(),
            make_record(pool="token", grad_checkpointing=True, train_activations_mib=4.0).flat(),  # no twin
            make_record("test_resnet", train_activations_mib=10.0).flat(),
            make_record("test_resnet", "skipped", grad_checkpointing=True).flat()]  # not ok
    pairs = ckpt_twins(rows)
    assert len(pairs) == 1
    off, on = pairs[0]
    assert off["grad_checkpointing"] is False and on["grad_checkpointing"] is True and off["model"] == "test_vit"


# --- settings checks -----------------------------------------------------------------------------

def _tower(**kwargs):
    import torch

    from suite.core.options import Trial
    from suite.tower.model import build_tower

    trial = Trial(model="test_vit", image_size=32, embed_dim=16, device="cpu", **kwargs)
    torch.manual_seed(0)
    return build_tower(trial), trial


@pytest.mark.parametrize("lock", [None, 0, 1, 3])
def test_lock_check_passes_for_a_working_lock(lock):
    from suite.measurement.footprint import lock_check

    tower, trial = _tower(unlocked_groups=lock)
    assert lock_check(tower, trial) == (True, "")


def test_lock_check_flags_a_lock_that_did_not_take_effect():
    from suite.measurement.footprint import lock_check

    tower, trial = _tower(unlocked_groups=1)
    next(tower.trunk.parameters()).requires_grad = True  # the patch embedding of a locked group trains
    ok, why = lock_check(tower, trial)
    assert ok is False and "unlocked_groups=1" in why and "expected" in why
    assert lock_check(tower.trunk, trial)[0] is None  # not a TimmTower: not checked


def test_state_check():
    from suite.measurement.footprint import StateSeen, state_check

    assert state_check(None) == (None, "")
    assert state_check(StateSeen(grads=400, optimizer=800, trainable=400)) == (True, "")
    ok, why = state_check(StateSeen(grads=400, optimizer=800, trainable=1000))  # trainable params got no grad
    assert ok is False and "trainable parameters" in why
    assert state_check(StateSeen(grads=400, optimizer=0, trainable=400, stepped=False)) == (True, "")  # fp16 skips
    assert state_check(StateSeen(grads=400, optimizer=0, trainable=400))[0] is False  # stepped, yet no state


def test_lock_check_reads_a_lock_the_caller_set():
    from suite.measurement.footprint import lock_check

    tower, trial = _tower()  # the trial asks for no lock ...
    tower.lock(unlocked_groups=2)  # ... the caller locked its own tower
    assert lock_check(tower, trial) == (True, "")
    ok, why = lock_check(tower, trial.__class__(**{**trial.as_dict(), "unlocked_groups": 3}))
    assert ok is False and "unlocked_groups=3" in why  # the trial claims a lock the tower does not have


def test_locked_trunk_holds_no_gradients_or_optimizer_state():
    """From the memory pass itself: with the trunk locked, gradients and moments cover the head only."""
    from suite.measurement.footprint import memory_pass
    from suite.measurement.memory import MemoryBaseline
    from suite.measurement.steps import make_inputs

    tower, trial = _tower(unlocked_groups=0)
    head = sum(p.numel() * 4 for p in tower.head.parameters())
    _, seen = memory_pass("train", tower, trial, "cpu", make_inputs(trial, "cpu", 2), MemoryBaseline("cpu"))
    assert seen.trainable == head and seen.grads == head and seen.optimizer == 2 * head
