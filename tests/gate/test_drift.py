"""Drift between two stored runs: a move of every trial is not a regression; a trial against the rest is flagged."""
from __future__ import annotations

import random

import pandas as pd
from factories import make_record

from suite.gate.compare import compare, flagged_timing

SIZES = (8, 16, 24, 32, 40, 48, 56, 64)  # eight trials of one model


def frame(factors: dict[int, float] | float = 1.0, seed: int = 0, scatter: float = 0.02) -> pd.DataFrame:
    """Eight trials; each trial's infer/train throughput times its factor and a little scatter."""
    rng = random.Random(seed)
    records = []
    for size in SIZES:
        f = factors.get(size, 1.0) if isinstance(factors, dict) else factors
        noise = 1 + rng.gauss(0, scatter)
        records.append(make_record("test_resnet", embed_dim=size, infer_samples_per_sec=300.0 * f * noise,
                                   train_samples_per_sec=100.0 * f * noise))
    return pd.DataFrame([r.flat() for r in records])


def test_every_trial_faster_by_twenty_percent_is_drift_not_improvement():
    result = compare(frame(seed=1, scatter=0.01), frame(1.2, seed=2, scatter=0.01))
    assert result.exit_code == 0 and not result.regressions
    assert {c.verdict for c in result.changes if c.metric == "infer_samples_per_sec"} <= {
        "within threshold", "within noise"}
    d = result.drift["infer_samples_per_sec"]
    assert d["n"] == 8 and 0.15 < d["shift"] < 0.25
    assert "all 8 trials moved together by +" in result.markdown
    assert "net of the common" in next(c for c in result.changes if c.metric == "infer_samples_per_sec").change_text


def test_one_trial_slower_against_the_rest_is_flagged_while_the_rest_moved():
    result = compare(frame(seed=1), frame({s: 1.2 for s in SIZES} | {32: 1.2 * 0.8}, seed=2, scatter=0.005))
    flagged = {(c.label, c.metric) for c in flagged_timing(result)}
    assert flagged and all("embed_dim=32" in label for label, _ in flagged)
    assert result.exit_code == 1  # judged as stored (no confirm here): net of the +20%, it is 20% slower


def test_every_trial_slower_beyond_the_threshold_cannot_be_passed_or_failed_as_stored():
    result = compare(frame(seed=1, scatter=0.01), frame(0.8, seed=2, scatter=0.01))
    common = [c for c in result.changes if c.common]
    assert {c.metric for c in common} == {"infer_samples_per_sec", "train_samples_per_sec"}
    assert all(c.verdict == "cannot tell" for c in common) and result.exit_code == 0
    assert any("every trial moved by -" in line for line in result.cannot_tell)
    # the stand-in is what an A/B re-measurement decides
    assert {c.trial_id for c in flagged_timing(result, cannot_tell=True)} >= {c.trial_id for c in common}


def test_too_few_trials_are_judged_as_stored_and_the_report_says_so():
    few = lambda f: pd.DataFrame([make_record(m, train_samples_per_sec=100.0 * f).flat()  # noqa: E731
                                  for m in ("test_vit", "test_resnet")])
    result = compare(few(1.0), few(0.8))
    assert result.exit_code == 1 and result.drift["train_samples_per_sec"]["shift"] is None
    assert "too few" in result.markdown
