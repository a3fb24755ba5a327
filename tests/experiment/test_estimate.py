"""The cost estimate of `suite validate`: earlier run times of the same trials, models, or all trials."""
from __future__ import annotations

import dataclasses

from factories import make_record, write_store

from suite.core.options import Trial
from suite.experiment.estimate import estimate_cost
from suite.experiment.spec import Experiment
from suite.results.store import DEFAULT_NAME


def timed(model: str, seconds: float, **fields):
    """An ok record of `model` that took `seconds` from start to finish."""
    record = make_record(model, **fields)
    return dataclasses.replace(record, started_at=record.finished_at - seconds)


def experiment(*trials: Trial) -> Experiment:
    return Experiment(name="t", source="t.yaml", trials=trials)


def test_estimate_from_the_same_trial_the_same_model_or_all_trials(tmp_path):
    vit, resnet = timed("test_vit", 60.0), timed("test_resnet", 120.0)
    write_store(tmp_path / DEFAULT_NAME, [vit, resnet])
    exp = experiment(
        vit.trial,  # measured before: 60 s
        Trial(model="test_vit", pool="token"),  # new, same model as vit: 60 s
        Trial(model="test_convnext"),  # new model: median of all earlier trials, 90 s
        resnet.trial,  # skipped below: not counted
    )
    line = estimate_cost(exp, tmp_path, skip={resnet.trial.trial_id})
    assert line.startswith("cost estimate: ~3.5 min of trial time (1 trials measured before, 2 estimated")
    assert str(tmp_path / DEFAULT_NAME) in line
    assert "~5.5 min" in estimate_cost(exp, tmp_path)  # resnet not skipped: + its own 120 s, 2 known


def test_a_trial_measured_twice_costs_its_median(tmp_path):
    first = timed("test_vit", 30.0)
    again = dataclasses.replace(timed("test_vit", 90.0), env=dataclasses.replace(first.env, env_device="other"))
    write_store(tmp_path / DEFAULT_NAME, [first, again])  # two environments: two rows of one trial
    assert "~1.0 min of trial time (1 trials measured before, 0 estimated" in estimate_cost(
        experiment(first.trial), tmp_path)


def test_without_earlier_results_the_line_says_so(tmp_path):
    assert estimate_cost(experiment(Trial(model="test_vit")), tmp_path) == (
        f"cost estimate: no earlier results at {tmp_path / DEFAULT_NAME} (run once to get estimates)")
    write_store(tmp_path / DEFAULT_NAME, [dataclasses.replace(make_record(), started_at=None)])
    assert estimate_cost(experiment(Trial(model="test_vit")), tmp_path) == (
        f"cost estimate: {tmp_path / DEFAULT_NAME} has no timed trials yet")
