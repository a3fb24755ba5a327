"""The select and compare blocks: parsing, errors that name the key and value, the metric vocabulary."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from suite.core.errors import SuiteError
from suite.experiment.criteria import (
    DEFAULT_THRESHOLDS,
    GATEABLE,
    METRICS,
    Constraint,
    Select,
    Threshold,
    format_metric,
    higher_is_better,
    metric_header,
    metric_label,
    parse_select,
    parse_thresholds,
)

# --- the select block ------------------------------------------------------------------------


def test_parse_full_block():
    sel = parse_select({"objective": "max probe_top1",
                        "constraints": ["train_peak_mem_mib <= 20480", "train_samples_per_sec>=500"], "top": 2})
    assert sel == Select("probe_top1", "max", (Constraint("train_peak_mem_mib", "<=", 20480.0),
                                                Constraint("train_samples_per_sec", ">=", 500.0)), 2)
    assert sel.constraints[0].text == "train_peak_mem_mib <= 20480" and sel.objective == "max probe_top1"
    assert parse_select({"objective": "min train_peak_mem_mib"}).constraints == ()
    assert parse_select({"objective": "max probe_top1", "constraints": "probe_top1 > 0.5"}).constraints[0].text \
        == "probe_top1 > 0.5"


def test_constraint_holds():
    assert Constraint("train_peak_mem_mib", "<=", 900.0).holds(900.0)
    assert not Constraint("train_peak_mem_mib", "<", 900.0).holds(900.0)
    assert Constraint("probe_top1", "==", 50.0).holds(50.0) and not Constraint("probe_top1", ">", 50.0).holds(49.9)


@pytest.mark.parametrize("block, message", [
    ({"objectve": "max probe_top1"}, r"select\.objectve: unknown key; did you mean 'objective'\?"),
    ({"sort": "max probe_top1"}, r"select\.sort: unknown key; valid keys: objective, constraints, top"),
    ({"constraints": []}, r"select\.objective: missing"),
    ({"objective": "maximize probe_top1"},
     r"select\.objective: must be 'max METRIC' or 'min METRIC'.*'maximize probe_top1'"),
    ({"objective": "max probe_top"}, r"select\.objective: unknown metric 'probe_top'; did you mean .*'probe_top1'"),
    ({"objective": "max zzz"}, r"unknown metric 'zzz'; metrics: param_count, "),
    ({"objective": "max probe_top1", "constraints": ["train_mem <= 3"]},
     r"select\.constraints\[0\]: unknown metric 'train_mem'.*did you mean"),
    ({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib =< 3"]},
     r"select\.constraints\[0\]: must be 'METRIC OP NUMBER'"),
    ({"objective": "max probe_top1", "constraints": ["x", "train_peak_mem_mib <= lots"]},
     r"select\.constraints\[0\]"),
    ({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= lots"]}, r"'lots' is not a number"),
    ({"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= inf"]}, r"must be a finite number"),
    ({"objective": "max probe_top1", "constraints": {"a": 1}}, r"select\.constraints: must be a list"),
    ({"objective": "max probe_top1", "top": 0}, r"select\.top: must be a positive integer"),
    ("max probe_top1", r"select: must be a mapping"),
])
def test_select_errors_name_the_key_and_value(block, message):
    with pytest.raises(SuiteError, match=message):
        parse_select(block)


def test_where_prefix_is_used():
    with pytest.raises(ValueError, match=r"^exp\.yaml: select\.top"):
        parse_select({"objective": "max probe_top1", "top": "3"}, where="exp.yaml: select")


# --- the compare block -----------------------------------------------------------------------


def test_parse_thresholds():
    parsed = parse_thresholds(["infer_samples_per_sec=-3%", "probe_top1=-0.5", "train_peak_mem_mib=off"])
    assert parsed == {"infer_samples_per_sec": Threshold("infer_samples_per_sec", 3.0, True),
                      "probe_top1": Threshold("probe_top1", 0.5, False), "train_peak_mem_mib": None}
    assert parse_thresholds({"train_samples_per_sec": "10%", "train_step_time": "+2%"}) == {
        "train_samples_per_sec": Threshold("train_samples_per_sec", 10.0, True),
        "train_step_time": Threshold("train_step_time", 2.0, True)}
    assert parse_thresholds({"probe_top1": 2}) == {"probe_top1": Threshold("probe_top1", 2.0, False)}
    assert DEFAULT_THRESHOLDS["train_peak_mem_mib"].text == "+5%" and DEFAULT_THRESHOLDS["probe_top1"].text == "-1"


@pytest.mark.parametrize("spec, message", [
    (["train_samples_per_sec=+5%"], r"train_samples_per_sec is better higher, so its threshold is a drop: write -5%"),
    (["train_peak_mem_mib=-5%"], r"better lower, so its threshold is an increase: write \+5%"),
    (["train_samples_per_secs=-5%"],
     r"unknown metric 'train_samples_per_secs'; did you mean 'train_samples_per_sec'"),
    (["train_samples_per_sec"], r"write METRIC=CHANGE"),
    (["train_samples_per_sec=fast"], r"'fast' must be a change like '-5%'"),
    ({"probe_top1": True}, r"True must be a change like '-5%'"),
    ({"param_count": "+1%"}, r"compare\.param_count: unknown metric"),
    ("train_samples_per_sec=-5%", r"must be a mapping \(compare: block\) or METRIC=CHANGE strings"),
])
def test_threshold_errors(spec, message):
    with pytest.raises(SuiteError, match=message):
        parse_thresholds(spec)


# --- the metric vocabulary -------------------------------------------------------------------


def test_metrics_are_the_numeric_result_fields():
    assert "probe_top1" in METRICS and "train_peak_mem_mib" in METRICS and "param_count" in METRICS
    assert "mem_method" not in METRICS and "train_noisy" not in METRICS  # a string and a bool
    assert "param_count" not in GATEABLE and "train_step_time_iqr" not in GATEABLE
    assert higher_is_better("infer_samples_per_sec") is True and higher_is_better("train_step_time") is False
    assert higher_is_better("param_count") is None


def test_metric_names_and_formats():
    assert metric_header("train_peak_mem_mib") == "train mem (MiB)"
    assert metric_header("train_peak_mem_mib", unit=False) == "train mem"
    assert metric_header("infer_samples_per_sec", unit=False) == "infer img/s"
    assert metric_label("probe_top1") == "linear probe top-1 (%)"
    assert metric_header("probe_top5") == metric_label("probe_top5") == "probe_top5"  # unnamed: its column
    assert format_metric("train_samples_per_sec", 8944.39) == "8,944" and format_metric("infer_samples_per_sec", 80) \
        == "80.0"
    assert format_metric("train_peak_mem_mib", 1100.4) == "1,100" and format_metric("probe_top1", 48.5) == "48.5"
    assert format_metric("train_mfu", 0.1234) == "12.3%" and format_metric("probe_n_train", 120) == "120"
    assert format_metric("train_step_time", 3.21) == "3.21" and format_metric("probe_top1", None) == "—"


def test_criteria_loads_no_report_code():
    """config checks select/compare blocks through this module: it must not pull in pandas or the report."""
    code = ("import sys, suite.experiment.criteria; heavy = {'pandas', 'torch', 'suite.report.render', 'suite.report.selection', "
            "'suite.gate.compare', 'suite.report.plots'} & set(sys.modules); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 0, proc.stderr


def test_select_then_and_aggregate_objectives():
    from suite.experiment.criteria import DEFAULT_THEN

    sel = parse_select({"objective": "max probe_top1", "then": "min train_peak_mem_mib"})
    assert sel.then == ("min", "train_peak_mem_mib") and sel.tie_break == sel.then
    assert parse_select({"objective": "max probe_top1"}).tie_break == DEFAULT_THEN == ("max", "train_samples_per_sec")
    assert parse_select({"objective": "max probe_mean_z"}).metric == "probe_mean_z"
    with pytest.raises(SuiteError, match=r"select.then: must be 'max METRIC' or 'min METRIC'"):
        parse_select({"objective": "max probe_top1", "then": "fastest"})
    with pytest.raises(SuiteError, match="did you mean 'train_samples_per_sec'"):
        parse_select({"objective": "max probe_top1", "then": "max train_samples_per_se"})
