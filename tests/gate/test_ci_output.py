"""`suite compare --format text|markdown|github` and `--junit`: the verdict where a CI shows results.

Every figure is injected (stores built by `factories`); `--no-confirm` judges them as stored.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from factories import make_record, run_cli, write_store

from suite.gate.ci_output import annotations, junit, markdown, render
from suite.gate.compare import apply_confirmation, compare_paths


def stores(tmp_path, current_fields: dict | None = None, models=("test_vit", "test_resnet")):
    """Two stores of the same trials: `current_fields` maps a model to the figures that changed."""
    current_fields = current_fields or {}
    base = write_store(tmp_path / "base" / "results.sqlite", [make_record(m) for m in models])
    cur = write_store(tmp_path / "cur" / "results.sqlite",
                      [make_record(m, **current_fields.get(m, {})) for m in models])
    return base, cur


def test_github_format_writes_the_summary_and_one_error_and_junit_has_one_failure(tmp_path, monkeypatch):
    # One real regression (train 100 -> 70 img/s, 2% IQR each side), one improvement, the rest unchanged.
    base, cur = stores(tmp_path, {"test_vit": {"train_samples_per_sec": 70.0},
                                  "test_resnet": {"infer_samples_per_sec": 400.0}})
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    xml_path = tmp_path / "junit.xml"
    done = run_cli("compare", str(base), str(cur), "--no-confirm", "--format", "github", "--junit", str(xml_path))
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and "test_vit" in errors[0] and "train_samples_per_sec" in errors[0]
    assert not [line for line in done.stdout.splitlines() if line.startswith("::warning")]
    written = summary.read_text()
    assert written.startswith("earlier step\n## Regression gate: FAIL")  # appended, not overwritten
    assert "### Regressions (1)" in written and "### Improvements (1)" in written
    assert written.index("### Regressions") < written.index("### Improvements") < written.index("figures unchanged")
    assert "±2.0%" in written and "±4.0%" in written  # each figure's own band, and the pair's
    root = ET.parse(xml_path).getroot()
    cases = root.iter("testcase")
    failures = [(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None]
    assert len(failures) == 1 and "test_vit" in failures[0][0] and failures[0][1] == "train_samples_per_sec"
    assert root.get("failures") == "1"
    n_cases = len(list(root.iter("testcase")))
    assert n_cases == int(root.find("testsuite").get("tests")) >= 8  # one per trial and gated metric


def test_github_format_outside_github_prints_the_markdown_and_says_no_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    base, cur = stores(tmp_path)
    done = run_cli("compare", str(base), str(cur), "--no-confirm", "--format", "github")
    assert done.returncode == 0
    assert done.stdout.startswith("## Regression gate: PASS") and "figures unchanged" in done.stdout
    assert "GITHUB_STEP_SUMMARY is not set" in done.stderr and "summary was not written" in done.stderr
    assert "::error" not in done.stdout


def test_markdown_and_text_formats(tmp_path):
    base, cur = stores(tmp_path, {"test_vit": {"train_samples_per_sec": 70.0}})
    text = run_cli("compare", str(base), str(cur), "--no-confirm")
    assert text.stdout.startswith("## Regression gate: FAIL") and "### Per metric" in text.stdout  # unchanged
    out = tmp_path / "gate.md"
    md = run_cli("compare", str(base), str(cur), "--no-confirm", "--format", "markdown", "-o", str(out))
    assert md.returncode == 1 and "### Regressions (1)" in md.stdout and "::" not in md.stdout
    assert out.read_text() == md.stdout.rstrip("\n") + "\n"
    bad = run_cli("compare", str(base), str(cur), "--format", "html")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_not_confirmed_is_a_warning_and_passes_junit(tmp_path):
    base, cur = stores(tmp_path, {"test_vit": {"train_samples_per_sec": 70.0}})
    result = compare_paths(base, cur)
    key = next((ch.trial_id, ch.metric) for ch in result.changes if ch.verdict == "regression")
    apply_confirmation(result, {key: [99.0, 100.0, 101.0]}, result.gates)  # the re-measurement did not hold
    assert result.exit_code == 0
    lines = annotations(result)
    assert len(lines) == 1 and lines[0].startswith("::warning") and "not confirmed" in lines[0]
    assert "re-measured 99.0, 100, 101" in lines[0]
    root = ET.fromstring(junit(result))
    assert root.get("failures") == "0"
    assert "not confirmed" in markdown(result).split("### Flagged, not failing (1)")[1]  # listed, not failing


def test_status_and_environment_failures_are_errors_and_junit_failures(tmp_path):
    base = write_store(tmp_path / "b.sqlite", [make_record("test_vit"), make_record("test_resnet")])
    cur = write_store(tmp_path / "c.sqlite", [make_record("test_vit", "oom", "CUDA out of memory"),
                                              make_record("test_resnet", env_threads=64)])
    result = compare_paths(base, cur)
    text, notes = render(result, "github", environ={})
    errors = [line for line in text.splitlines() if line.startswith("::error")]
    assert len(errors) == 3 and notes  # status ok -> oom, another environment, nothing compared
    assert any("status ok → oom" in e for e in errors) and any("threads 2 vs 64" in e for e in errors)
    root = ET.fromstring(junit(result))
    assert {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None} == {
        "status", "environment", "compared"}


def test_junit_output_is_checked_before_any_work(tmp_path):
    base, cur = stores(tmp_path)
    done = run_cli("compare", str(base), str(cur), "--no-confirm", "--junit", str(base))
    assert done.returncode == 2 and "junit" not in done.stdout.lower()
