"""Applying the select block: ranking with constraints, and why each other trial was left out."""
from __future__ import annotations

import pandas as pd

from suite.criteria import parse_select
from suite.select import apply_select, exclusion_reason
from factories import make_record


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
