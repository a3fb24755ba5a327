"""The gate's verdict where a CI shows results: a pull request's markdown, GitHub's job summary and
annotations, JUnit XML.

`suite compare --format text|markdown|github [--junit FILE]`:

- text: the gate's full report (`Comparison.markdown`), as before;
- markdown: the table a person reads in a pull request: regressions first, then improvements, then
  how many figures did not move beyond threshold and noise, each figure with its noise band (its
  own IQR / median for a timing, its interval for an accuracy) and the band the verdict used;
- github: the markdown, appended to `$GITHUB_STEP_SUMMARY` when that is set, and one workflow
  command a line: `::error` for each regression that fails the gate (confirmed by re-measurement
  where it ran, a missing figure, a status change, a trial measured elsewhere), `::warning` for a
  flagged one that was not confirmed;
- `--junit FILE`: one test case per trial and metric, a failure for each regression.

This module reads a `Comparison` only: no torch.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from suite.experiment.criteria import format_metric
from suite.gate.compare import summary_lines
from suite.gate.verdict import Change, Comparison
from suite.results.rows import cell, table

FORMATS = ("text", "markdown", "github")
MOVED = ("regression", "not confirmed", "missing", "cannot tell")  # listed first, in this order
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def _band(x: float | None) -> str:
    return "—" if x is None else f"±{100 * x:.1f}%"


def _plain_label(label: str) -> str:
    """A trial's label without markdown: "`test_vit pool=avg` (1a2b3c4d)" -> "test_vit pool=avg (1a2b3c4d)"."""
    return label.replace("`", "")


def _rows(changes: list[Change]) -> str:
    body = [[ch.label, f"`{ch.metric}`", format_metric(ch.metric, ch.baseline) + f" {_band(ch.spreads[0])}",
             format_metric(ch.metric, ch.current) + f" {_band(ch.spreads[1])}", ch.change_text, _band(ch.noise),
             ch.threshold.text if ch.threshold else "off",
             f"**{ch.verdict}**" if ch.verdict in ("regression", "missing") else ch.verdict]
            for ch in changes]
    heads = ["trial", "metric", "baseline (noise)", "current (noise)", "change", "noise band", "threshold", "verdict"]
    return table(heads, body, "llrrrrrl")


def markdown(c: Comparison) -> str:
    """The pull request's table: regressions first, then improvements, then the unchanged count."""
    verdict = "FAIL" if c.exit_code else "PASS"
    bad = [ch for v in MOVED for ch in c.changes if ch.verdict == v]
    failing = [ch for ch in bad if ch.verdict in ("regression", "missing")]
    flagged = [ch for ch in bad if ch not in failing]  # not confirmed, cannot tell: shown, not failing
    better = [ch for ch in c.changes if ch.verdict == "improvement"]
    rest = len(c.changes) - len(bad) - len(better)
    lines = [f"## Regression gate: {verdict}", ""]
    other = c.status_regressions + c.env_uncompared  # failures of a whole trial, not of one figure
    if failing or other:
        lines += [f"### Regressions ({len(failing) + len(other)})", ""]
        if failing:
            lines += [_rows(failing), ""]
        lines += [f"- {cell(r)}" for r in other] + ([""] if other else [])
    if flagged:
        lines += [f"### Flagged, not failing ({len(flagged)}): not confirmed, or noise wider than the threshold "
                  "(`--strict`: exit 3)", "", _rows(flagged), ""]
    if better:
        lines += [f"### Improvements ({len(better)})", "", _rows(better), ""]
    lines += [f"**{rest} figures unchanged** (within threshold or within the noise band of both runs).", ""]
    lines += ["<details><summary>How this was judged</summary>", ""] + summary_lines(c, c.gates)
    for title, items in (("Environment differs (not compared)", c.env_mismatch),
                         ("Only in baseline", c.only_in_baseline), ("Only in current", c.only_in_current)):
        if items:
            lines += ["", f"**{title}**", ""] + [f"- {cell(i)}" for i in items]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _escape_data(text: str) -> str:
    """A workflow command's message: GitHub's escaping of %, CR and LF."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotations(c: Comparison) -> list[str]:
    """`::error` for each regression that fails the gate, `::warning` for each flagged one not confirmed."""
    out = []
    for line in c.regressions:
        out.append(f"::error title={_escape_property('suite compare: regression')}::{_escape_data(_plain_label(line))}")
    for line in c.env_uncompared:
        out.append(f"::error title={_escape_property('suite compare: other environment')}::"
                   f"{_escape_data(_plain_label(line))}")
    for line in c.cannot_tell:
        out.append(f"::warning title={_escape_property('suite compare: cannot tell')}::{_escape_data(_plain_label(line))}")
    for ch in c.changes:
        if ch.verdict == "not confirmed":
            again = ", ".join(format_metric(ch.metric, x) for x in ch.remeasured)
            text = (f"{_plain_label(ch.label)}: {ch.metric} {format_metric(ch.metric, ch.baseline)} → "
                    f"{format_metric(ch.metric, ch.current)} ({ch.change_text}) flagged, not confirmed"
                    + (f" (re-measured {again})" if again else ""))
            out.append(f"::warning title={_escape_property('suite compare: not confirmed')}::{_escape_data(text)}")
    if c.n_compared == 0:
        out.append("::error title=suite compare::nothing was compared: no trial ran ok in both runs in the same "
                   "environment")
    return out


def junit(c: Comparison) -> str:
    """JUnit XML: one test case per trial and metric (a failure for each regression), one per trial whose
    status regressed or that was measured in another environment (failures too)."""
    suite_el = ET.Element("testsuite", name="suite compare")
    failures = 0
    for ch in c.changes:
        case = ET.SubElement(suite_el, "testcase", classname=_plain_label(ch.label), name=ch.metric)
        text = (f"{format_metric(ch.metric, ch.baseline)} -> {format_metric(ch.metric, ch.current)} "
                f"({ch.change_text}; threshold {ch.threshold.text if ch.threshold else 'off'}; "
                f"noise band {_band(ch.noise)}): {ch.verdict}")
        if ch.verdict in ("regression", "missing"):
            failures += 1
            ET.SubElement(case, "failure", message=f"{ch.metric}: {ch.verdict}", type=ch.verdict).text = text
        else:
            ET.SubElement(case, "system-out").text = text
    for name, lines in (("status", c.status_regressions), ("environment", c.env_uncompared)):
        for line in lines:
            failures += 1
            case = ET.SubElement(suite_el, "testcase", classname=_plain_label(line.split(":")[0]), name=name)
            ET.SubElement(case, "failure", message=_plain_label(line), type=name).text = _plain_label(line)
    if c.n_compared == 0:
        failures += 1
        case = ET.SubElement(suite_el, "testcase", classname="suite compare", name="compared")
        ET.SubElement(case, "failure", message="nothing was compared", type="empty")
    suite_el.set("tests", str(len(suite_el)))
    suite_el.set("failures", str(failures))
    suite_el.set("errors", "0")
    root = ET.Element("testsuites", name="suite compare", tests=suite_el.get("tests"), failures=str(failures))
    root.append(suite_el)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render(c: Comparison, fmt: str, environ: dict | None = None) -> tuple[str, list[str]]:
    """(what to print on stdout, notes for stderr) of `fmt`; `github` also appends the markdown to the
    job summary (`$GITHUB_STEP_SUMMARY`), and says so on stderr when it is not set."""
    if fmt == "text":
        return c.markdown, []
    body = markdown(c)
    if fmt == "markdown":
        return body, []
    environ = os.environ if environ is None else environ
    notes = []
    summary = environ.get(SUMMARY_ENV)
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(body + "\n")
    else:
        notes.append(f"note: ${SUMMARY_ENV} is not set (not running in GitHub Actions?): the job summary was not "
                     "written; the markdown is printed above")
    return body + "\n" + "\n".join(annotations(c)), notes


def write_junit(c: Comparison, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(junit(c), encoding="utf-8")
    return path
