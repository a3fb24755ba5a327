"""The select block: parsing errors, and ranking with constraints."""
from __future__ import annotations

import pandas as pd
import pytest

from suite.select import Constraint, Select, apply_select, parse_select
from factories import make_record


def frame(*records) -> pd.DataFrame:
    return pd.DataFrame([r.flat() for r in records])


def test_parse_full_block():
    sel = parse_select({"objective": "max probe_top1",
                        "constraints": ["train_peak_mem_mib <= 20480", "train_samples_per_sec>=500"], "top": 2})
    assert sel == Select("probe_top1", "max", (Constraint("train_peak_mem_mib", "<=", 20480.0),
                                                Constraint("train_samples_per_sec", ">=", 500.0)), 2)
    assert sel.constraints[0].text == "train_peak_mem_mib <= 20480"
    assert parse_select({"objective": "min train_peak_mem_mib"}).constraints == ()


@pytest.mark.parametrize("block, message", [
    ({"objectve": "max probe_top1"}, r"select\.objectve: unknown key; did you mean 'objective'\?"),
    ({"constraints": []}, r"select\.objective: missing"),
    ({"objective": "maximize probe_top1"},
     r"select\.objective: must be 'max METRIC' or 'min METRIC'.*'maximize probe_top1'"),
    ({"objective": "max probe_top"}, r"select\.objective: unknown metric 'probe_top'; did you mean .*probe_top1"),
    ({"objective": "max probe_top1", "constraints": ["train_mem <= 3"]},
     r"select\.constraints\[0\]: unknown metric 'train_mem'.*did you mean"),
    ({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib =< 3"]},
     r"select\.constraints\[0\]: must be 'METRIC OP NUMBER'"),
    ({"objective": "max probe_top1", "constraints": ["x", "train_peak_mem_mib <= lots"]},
     r"select\.constraints\[0\]"),
    ({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= lots"]}, r"'lots' is not a number"),
    ({"objective": "max probe_top1", "constraints": {"a": 1}}, r"select\.constraints: must be a list"),
    ({"objective": "max probe_top1", "top": 0}, r"select\.top: must be a positive integer"),
    ("max probe_top1", r"select: must be a mapping"),
])
def test_parse_errors_name_the_key_and_value(block, message):
    with pytest.raises(ValueError, match=message):
        parse_select(block)


def test_where_prefix_is_used():
    with pytest.raises(ValueError, match=r"^exp\.yaml: select\.top"):
        parse_select({"objective": "max probe_top1", "top": "3"}, where="exp.yaml: select")


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
