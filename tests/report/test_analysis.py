"""The report's maths: Pareto fronts, axis references, ablation effects over matched pairs."""
from __future__ import annotations

import pandas as pd
import pytest
from factories import GPU, make_record

from suite.report.analysis import ablation_effects, last_finished, pareto_front, reference_value


def frame(records) -> pd.DataFrame:
    return pd.DataFrame([r.flat() for r in records])


POINTS = [  # (trial_id, throughput, accuracy, memory)
    ("a", 1.0, 5.0, 10.0), ("b", 2.0, 4.0, 30.0), ("c", 2.0, 3.0, 20.0), ("d", 3.0, 1.0, 40.0),
    ("e", None, 9.0, 1.0), ("f", 0.5, 5.0, 50.0),
]
ROWS = [{"trial_id": t, "speed": s, "acc": a, "mem": m} for t, s, a, m in POINTS]


def test_pareto_front_maximises_both_and_sorts_by_x():
    # c is dominated by b (same speed, lower accuracy), f by a; e has no speed and is left out.
    assert [r["trial_id"] for r in pareto_front(ROWS, "speed", "acc")] == ["d", "b", "a"]


def test_pareto_front_minimising_y():
    # b is dominated by c (same speed, more memory); f by a.
    assert [r["trial_id"] for r in pareto_front(ROWS, "speed", "mem", max_y=False)] == ["d", "c", "a"]
    # Minimising both: the slowest first.
    assert [r["trial_id"] for r in pareto_front(ROWS, "speed", "mem", max_x=False, max_y=False)] == ["f", "a"]


def test_pareto_front_keeps_ties_in_trial_id_order():
    rows = [{"trial_id": "z", "x": 1, "y": 1}, {"trial_id": "y", "x": 1, "y": 1}]
    assert [r["trial_id"] for r in pareto_front(rows, "x", "y")] == ["y", "z"]
    assert pareto_front([], "x", "y") == []


@pytest.mark.parametrize("name, values, ref", [
    ("pool", ["token", "avg", "token"], "avg"),  # the default, whenever it was swept
    ("pool", ["token", "max", "max"], "max"),  # else the most common value
    ("pool", ["token", "max"], "max"),  # ties: the first in sort order
    ("grad_checkpointing", [True, False, True], False),
    ("unlocked_groups", [2, 0], 0),  # default None (not locked) absent: most common, then sort order
])
def test_reference_value(name, values, ref):
    assert reference_value(name, values) == ref


def test_ablation_effects_pair_within_model_and_environment():
    recs = [
        make_record("test_vit", train_samples_per_sec=100.0, train_peak_mem_mib=1000.0, probe_top1=50.0),
        make_record("test_vit", grad_checkpointing=True, train_samples_per_sec=80.0, train_peak_mem_mib=500.0,
                    probe_top1=50.0),
        make_record("test_resnet", train_samples_per_sec=200.0, train_peak_mem_mib=2000.0, probe_top1=40.0),
        make_record("test_resnet", grad_checkpointing=True, train_samples_per_sec=180.0, train_peak_mem_mib=1200.0,
                    probe_top1=41.0),
        make_record("test_convnext"),  # its partner failed: no pair
        make_record("test_convnext", "oom", "CUDA out of memory", grad_checkpointing=True),
        make_record("test_vit", env=GPU, grad_checkpointing=True, train_samples_per_sec=5000.0),  # no GPU reference
    ]
    [effect] = ablation_effects(frame(recs))
    assert (effect.axis, effect.ref, effect.value, effect.n) == ("grad_checkpointing", False, True, 2)
    assert effect.medians["train_samples_per_sec"] == pytest.approx((0.8 + 0.9) / 2)
    assert effect.medians["train_peak_mem_mib"] == pytest.approx((0.5 + 0.6) / 2)
    assert effect.medians["probe_top1"] == pytest.approx(0.5)  # a difference in points, not a ratio
    assert effect.medians["infer_samples_per_sec"] == pytest.approx(1.0)


def test_trials_differing_in_two_options_are_not_paired():
    recs = [make_record(pool="avg"), make_record(pool="token", grad_checkpointing=True),
            make_record(pool="token", root="/other/data")]  # differs in root too: no partner either
    effects = ablation_effects(frame(recs))
    assert {(e.axis, e.n) for e in effects} == {("pool", 0), ("grad_checkpointing", 0)}  # root is no axis
    assert all(v is None for e in effects for v in e.medians.values())


def test_last_finished():
    df = frame([make_record(finished_at=1_700_000_000.0), make_record("test_resnet", finished_at=1_700_000_500.0)])
    assert last_finished(df) == 1_700_000_500.0
    assert last_finished(df.assign(finished_at=None)) is None
    assert last_finished(df.drop(columns=["finished_at"])) is None
