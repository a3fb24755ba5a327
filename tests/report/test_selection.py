"""Applying the select block: ranking with constraints, and why each other trial was left out."""
from __future__ import annotations

import pandas as pd
from factories import make_record

from suite.experiment.criteria import parse_select
from suite.report.selection import apply_select, exclusion_reason


def frame(*records) -> pd.DataFrame:
    return pd.DataFrame([r.flat() for r in records])


def test_apply_ranks_and_explains_exclusions():
    df = frame(
        make_record("a", probe_top1=80.0, train_peak_mem_mib=500.0),
        make_record("b", probe_top1=90.0, train_peak_mem_mib=3000.0),  # best probe, too much memory
        make_record("c", probe_top1=70.0, train_peak_mem_mib=100.0),
        make_record("d", probe_top1=75.0, train_peak_mem_mib=900.0),
        make_record("e", "oom", "CUDA out of memory"),
        make_record("f", probe_top1=None),  # probe not run
    )
    sel = parse_select({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= 1000"], "top": 2})
    result = apply_select(df, sel)
    assert [r["model"] for r in result.ranked] == ["a", "d", "c"]
    assert result.best["model"] == "a" and [r["model"] for r in result.runner_ups] == ["d"]
    why = {r["model"]: reason for r, reason in result.excluded}
    assert why == {
        "b": "train_peak_mem_mib = 3,000 fails train_peak_mem_mib <= 1000",
        "e": "status oom: CUDA out of memory",
        "f": "probe_top1 not measured",
    }


def test_min_objective_and_ties_do_not_depend_on_row_order():
    recs = [make_record(m, train_peak_mem_mib=100.0) for m in ("x", "y", "z")]
    sel = parse_select({"objective": "min train_peak_mem_mib"})
    first = apply_select(frame(*recs), sel).best["trial_id"]
    assert apply_select(frame(*reversed(recs)), sel).best["trial_id"] == first == min(r.trial.trial_id for r in recs)


def test_constraints_that_exclude_everything():
    df = frame(make_record("a", train_samples_per_sec=10.0), make_record("b", train_samples_per_sec=20.0))
    result = apply_select(df, parse_select({"objective": "max probe_top1",
                                            "constraints": ["train_samples_per_sec > 1000"]}))
    assert result.best is None and result.ranked == [] and result.runner_ups == []
    assert len(result.excluded) == 2
    assert all("fails train_samples_per_sec > 1000" in why for _, why in result.excluded)


def test_exclusion_reason_keeps_the_precision_that_explains_it():
    sel = parse_select({"objective": "max probe_top1",
                        "constraints": ["train_peak_mem_mib <= 900", "infer_gmacs < 2"]})
    row = {"status": "ok", "probe_top1": 60.0, "train_peak_mem_mib": 900.5, "infer_gmacs": None}
    assert exclusion_reason(row, sel) == ("train_peak_mem_mib = 900.5 fails train_peak_mem_mib <= 900; "
                                          "infer_gmacs not measured (needed for infer_gmacs < 2)")
    assert exclusion_reason({**row, "train_peak_mem_mib": 899.0, "infer_gmacs": 1.5}, sel) is None
    assert exclusion_reason({"status": "timeout", "reason": ""}, sel) == "status timeout"


# --------------------------------------------------------------------------- statistical ties (issue 13)


def _probed(model: str, correct, *, test_set: str = "t1", **fields):
    import numpy as np

    from suite.core.stats import pack_correct

    correct = np.asarray(correct, dtype=bool)
    return make_record(model, probe_top1=100.0 * correct.mean(), probe_test_correct=pack_correct(correct),
                       probe_n_test=len(correct), probe_test_set=test_set, **fields)


def test_tied_towers_are_picked_by_the_tie_break():
    import numpy as np

    base = np.random.default_rng(0).random(360) < 0.886
    near = base.copy()
    near[np.flatnonzero(base)[:3]] = False  # 3 images worse: tied
    worse = base.copy()
    worse[np.flatnonzero(base)[:40]] = False  # 40 images worse: not tied
    df = frame(_probed("best", base, train_samples_per_sec=50.0),
               _probed("near", near, train_samples_per_sec=200.0),
               _probed("worse", worse, train_samples_per_sec=900.0),
               _probed("other_test_set", near, test_set="t2", train_samples_per_sec=999.0))
    result = apply_select(df, parse_select({"objective": "max probe_top1"}))
    assert [r["model"] for r in result.tied] == ["near", "best"]  # fastest first
    assert result.best["model"] == "near"
    assert sorted(r["model"] for r in result.ranked[2:]) == ["other_test_set", "worse"]  # another test set: never tied
    assert result.tie_note.startswith("2 towers are statistically tied on probe_top1")
    assert "picked the fastest (max train_samples_per_sec)" in result.tie_note
    by_mem = apply_select(df, parse_select({"objective": "max probe_top1", "then": "min train_peak_mem_mib"}))
    assert by_mem.tie_note.endswith("picked by min train_peak_mem_mib (min train_peak_mem_mib)")


def test_no_ties_without_stored_correctness():
    df = frame(make_record("a", probe_top1=88.6), make_record("b", probe_top1=88.6))
    result = apply_select(df, parse_select({"objective": "max probe_top1"}))
    assert result.tied == [result.best] and result.tie_note == ""


def test_several_datasets_rank_on_one_or_by_the_aggregate():
    recs = []
    for model, digits, textures in (("a", 90.0, 20.0), ("b", 85.0, 40.0), ("c", 80.0, 30.0)):
        recs += [make_record(model, dataset="digits", probe_top1=digits),  # few-shot extras do not split a tower
                 make_record(model, dataset="textures", probe_top1=textures, shots="1,5")]
    per_set = apply_select(frame(*recs), parse_select({"objective": "max probe_top1"}))
    assert per_set.dataset == "digits" and [r["model"] for r in per_set.ranked] == ["a", "b", "c"]
    assert all("ranked on digits" in why for _, why in per_set.excluded)
    z = apply_select(frame(*recs), parse_select({"objective": "max probe_mean_z"}))
    assert [r["model"] for r in z.ranked] == ["b", "a", "c"]  # b: 2nd and 1st; a: 1st and 3rd
    rank = apply_select(frame(*recs), parse_select({"objective": "min probe_mean_rank"}))
    assert [r["model"] for r in rank.ranked][0] == "b" and rank.ranked[0]["probe_mean_rank"] == 1.5
