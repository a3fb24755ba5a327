"""The regression gate: exit codes, noise, thresholds, unmatched trials and environments."""
from __future__ import annotations

import pandas as pd
import pytest
from factories import GPU, make_record, write_store

from suite.experiment.criteria import parse_thresholds
from suite.gate.compare import compare, compare_paths

MODELS = ("test_vit", "test_resnet", "test_convnext")


def frame(records) -> pd.DataFrame:
    return pd.DataFrame([r.flat() for r in records])


def run(**changes) -> pd.DataFrame:
    """Three ok trials; `changes` maps a model to the fields that differ in this run."""
    return frame([make_record(m, **changes.get(m, {})) for m in MODELS])


def slower(factor: float, iqr_frac: float = 0.02) -> dict:
    """Train throughput times `factor`, with step-time IQR `iqr_frac` of the median."""
    tput = 100.0 * factor
    return {"train_samples_per_sec": tput, "train_step_time_iqr": 32_000.0 / tput * iqr_frac}


def test_identical_runs_pass():
    result = compare(run(), run())
    assert result.exit_code == 0 and result.regressions == [] and result.n_compared == 3
    assert result.markdown.startswith("## Regression gate: PASS")
    assert {c.verdict for c in result.changes} == {"unchanged"}


def test_twenty_percent_slowdown_fails():
    result = compare(run(), run(test_vit=slower(0.8)))
    assert result.exit_code == 1
    assert len(result.regressions) == 1
    assert "train_samples_per_sec 100 → 80.0 (-20.0%, threshold -5%)" in result.regressions[0]
    assert "`test_vit`" in result.regressions[0]
    assert result.markdown.startswith("## Regression gate: FAIL")
    assert "| `train_samples_per_sec` | -5% | 3 | +0.0% | -20.0% | 1 | 0 |" in result.markdown


def test_a_slowdown_within_noise_wider_than_the_threshold_is_cannot_tell():
    # 8% slower: beyond the 5% threshold, but both runs spread by 5% (IQR/median): 10% combined.
    result = compare(run(test_vit=slower(1.0, 0.05)), run(test_vit=slower(0.92, 0.05)))
    assert result.exit_code == 0  # not a verdict either way: passes, with a warning
    change = next(c for c in result.changes if c.metric == "train_samples_per_sec" and "test_vit" in c.label)
    assert change.verdict == "cannot tell" and change.noise == pytest.approx(0.10)
    assert result.cannot_tell == ["`test_vit` (%s): train_samples_per_sec -8.0%%: noise ±10.0%% is wider than the "
                                  "threshold -5%%" % change.trial_id[:8]]
    assert "### Cannot tell on this machine (exit 3 with --strict)" in result.markdown
    # The same 8% faster inside that noise is just noise; 3% slower is within the threshold whatever the noise.
    faster = compare(run(test_vit=slower(1.0, 0.05)), run(test_vit=slower(1.08, 0.05)))
    assert faster.cannot_tell == [] and "within noise" in {c.verdict for c in faster.changes}
    assert compare(run(test_vit=slower(1.0, 0.05)), run(test_vit=slower(0.97, 0.05))).cannot_tell == []
    # The same 8% with tight timings is a regression.
    assert compare(run(test_vit=slower(1.0, 0.01)), run(test_vit=slower(0.92, 0.01))).exit_code == 1


def test_small_change_within_threshold_and_speedup_pass():
    result = compare(run(), run(test_vit=slower(0.97, 0.001), test_resnet=slower(1.3, 0.001)))
    assert result.exit_code == 0
    verdicts = {c.label.split("`")[1]: c.verdict for c in result.changes if c.metric == "train_samples_per_sec"}
    assert verdicts == {"test_vit": "within threshold", "test_resnet": "improvement", "test_convnext": "unchanged"}


def test_memory_growth_and_probe_drop_fail():
    result = compare(run(), run(test_vit={"train_peak_mem_mib": 1100.0}, test_resnet={"probe_top1": 48.5}))
    assert result.exit_code == 1
    text = " ".join(result.regressions)
    assert "train_peak_mem_mib 1,000 → 1,100 (+10.0%, threshold +5%)" in text
    assert "probe_top1 50.0 → 48.5 (-1.50, threshold -1)" in text
    # Probe -0.5 points is inside the default 1-point threshold.
    assert compare(run(), run(test_resnet={"probe_top1": 49.5})).exit_code == 0


def test_status_change_and_unmatched_trials_are_reported():
    base = frame([make_record(m) for m in MODELS])
    cur = frame([make_record("test_vit", "oom", "CUDA out of memory"), make_record("test_resnet"),
                 make_record("test_efficientnet")])
    result = compare(base, cur)
    assert result.exit_code == 1
    assert any("status ok → oom (CUDA out of memory)" in r for r in result.regressions)
    assert [s.split(" (")[0] for s in result.only_in_baseline] == ["`test_convnext`"]
    assert [s.split(" (")[0] for s in result.only_in_current] == ["`test_efficientnet`"]
    assert "### Only in baseline" in result.markdown and "### Only in current" in result.markdown
    # A trial that ran ok in the baseline and is gone from the current run (an interrupted run, a deleted
    # row) fails the gate on its own: its gated figures were never compared.
    gone = compare(base, frame([make_record("test_vit"), make_record("test_resnet")]))
    assert gone.exit_code == 1 and any("`test_convnext`" in r and "absent from current" in r for r in gone.regressions)
    # ... but a trial that failed in the baseline and is gone now is no regression; new trials are none either.
    failed_before = frame([make_record("test_vit"), make_record("test_convnext", "error", "boom")])
    assert compare(failed_before, frame([make_record("test_vit"), make_record("test_efficientnet")])).exit_code == 0


def test_environment_mismatch_is_reported_not_compared():
    base = frame([make_record(m) for m in MODELS])
    cur = frame([make_record(m, env=GPU, train_samples_per_sec=10.0) for m in MODELS])
    result = compare(base, cur)
    assert result.n_compared == 0 and result.changes == [] and len(result.env_mismatch) == 3
    assert "baseline device cpu, torch 2.14.1, timm 1.0.31 vs current device NVIDIA H100 80GB HBM3" \
        in result.env_mismatch[0]
    assert "### Environment differs (not compared)" in result.markdown
    assert "**Nothing was compared**" in result.markdown
    assert result.exit_code == 1  # a gate that compared nothing must not pass


def test_custom_threshold_and_off():
    base, cur = run(), run(test_vit=slower(0.93, 0.001))
    assert compare(base, cur).exit_code == 1  # -7% fails the default -5%
    assert compare(base, cur, parse_thresholds(["train_samples_per_sec=-10%"])).exit_code == 0
    assert compare(base, cur, parse_thresholds(["train_samples_per_sec=off"])).exit_code == 0


def test_compare_paths_uses_the_experiment_compare_block(tmp_path):
    base = write_store(tmp_path / "base.sqlite", [make_record(m) for m in MODELS])
    recs = [make_record("test_vit", **slower(0.93, 0.001))] + [make_record(m) for m in MODELS[1:]]
    cur = write_store(tmp_path / "cur.sqlite", recs)
    assert compare_paths(base, cur).exit_code == 1
    cur2 = write_store(tmp_path / "cur2.sqlite", recs,
                       {"experiment": {"name": "ci", "compare": {"train_samples_per_sec": "-10%"}}})
    assert compare_paths(base, cur2).exit_code == 0
    # The command line wins over the experiment file.
    assert compare_paths(base, cur2, parse_thresholds(["train_samples_per_sec=-5%"])).exit_code == 1


def test_accuracy_is_not_compared_across_probed_feature_kinds(tmp_path):
    """A baseline stored before `probe_features` probed projected features: not comparable with pooled."""
    import sqlite3

    from factories import make_record, write_store

    from suite.gate.compare import compare_paths

    a = write_store(tmp_path / "a" / "results.sqlite", [make_record(probe_top1=90.0)])
    with sqlite3.connect(a) as db:  # as stored before the option existed: same trial id, no value
        db.execute("UPDATE trials SET probe_features = NULL")
    b = write_store(tmp_path / "b" / "results.sqlite", [make_record(probe_top1=50.0)])
    result = compare_paths(a, b)
    assert not any(ch.metric == "probe_top1" for ch in result.changes)
    assert "probe features projected vs pooled" in result.env_mismatch[0]
