"""The regression gate: compare a current results store with a baseline, fail only on real change.

Trials are matched by `trial_id` (the hash of their configuration) within the same environment.
A metric regresses when it moves the wrong way beyond its threshold AND beyond the measured noise
of both runs: for timing metrics the noise is the sum of the two runs' relative step-time IQRs
(IQR / median), so a 3% slowdown of a trial whose timings spread by 4% is not a regression.
Trials present in one run only are listed. Trials measured in different environments (any field of
`ENV_IDENTITY` differs: GPU, driver, CPU model, threads, torch, timm, ...) are listed with what differs
and not compared, and they fail the gate: a speed measured elsewhere says nothing about this code.
A gated metric stored on one side only (NULL, or a column an older store lacks) is "missing: not
compared" and fails the gate unless its threshold is turned off. The report names the code (commit,
clean or with uncommitted changes) each side was measured with. docs/gate.md states these guarantees.

Run-to-run variance is larger than any one run's IQR (the machine drifts between runs), so a
flagged throughput regression can be confirmed before it fails the gate: `suite compare --confirm`
(`suite.gate.confirm`) re-measures only the flagged trials, in rounds interleaved in one worker, and
`apply_confirmation` keeps a regression only if the re-measured median still fails its threshold.

Thresholds: a relative change ("-5%") or an absolute one in the metric's unit ("-1" for probe
top-1 points); the sign must point the metric's wrong way (or be left out). "off" disables one.
They are parsed by `suite.experiment.criteria` (so an experiment file is checked without this module).

This module must stay light: no torch.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from suite.core.stats import half_width
from suite.experiment.criteria import (
    DEFAULT_THRESHOLDS,
    GATEABLE,
    Threshold,
    format_metric,
    higher_is_better,
    parse_thresholds,
)
from suite.gate.abtest import ab_lines
from suite.gate.drift import drift_lines, remove_drift
from suite.gate.verdict import TIMING_PHASE, Change, Comparison, is_timing, judge
from suite.results.rows import (
    AXES,
    cell,
    code_text,
    env_differences,
    get,
    num,
    rel_iqr,
    rows_of,
    table,
    trial_label,
    varying_axes,
)
from suite.results.store import load_meta, load_results


def _noise(metric: str, a, b) -> float | None:
    """Combined relative IQR of both runs for timing metrics; for a probe accuracy with a 95% interval
    in both runs, the half-width of the difference's interval (the two half-widths in quadrature),
    relative to the baseline, so a drop counts only beyond both the threshold and the interval
    (`suite.core.stats`); None for the rest."""
    if num(get(a, f"{metric}_lo")) is not None and num(get(b, f"{metric}_lo")) is not None:
        halves = [half_width(num(get(r, f"{metric}_lo")), num(get(r, f"{metric}_hi"))) for r in (a, b)]
        base = num(get(a, metric))
        if None not in halves and base:
            return math.hypot(*halves) / abs(base)
    spreads = [spread(metric, row) for row in (a, b)]  # timing: each run's step-time IQR / median, summed
    return None if None in spreads else sum(spreads)


def spread(metric: str, row) -> float | None:
    """One figure's own relative noise: IQR / median of the step time for a timing metric, the 95%
    interval's half-width / value for a probe accuracy that stores one; None for the rest."""
    value = num(get(row, metric))
    lo, hi = num(get(row, f"{metric}_lo")), num(get(row, f"{metric}_hi"))
    if lo is not None and hi is not None and value:
        half = half_width(lo, hi)
        return None if half is None else half / abs(value)
    m = TIMING_PHASE.match(metric)
    return rel_iqr(row, m.group(1)) if m else None


def _env_text(row) -> str:
    return ", ".join(f"{k[4:]} {get(row, k)}" for k in ("env_device", "env_torch", "env_timm", "env_cuda")
                     if get(row, k) is not None) or str(get(row, "env_key"))


def _pairs(out: "Comparison", b_envs: dict, c_envs: dict) -> list[tuple[dict, dict]]:
    """(baseline row, current row) of one trial measured in the same environment (`env_differences`)."""
    pairs, used = [], set()
    for ckey in sorted(c_envs):
        for bkey in sorted(b_envs):
            differ, unknown = env_differences(b_envs[bkey], c_envs[ckey])
            if bkey not in used and not differ:
                pairs.append((b_envs[bkey], c_envs[ckey]))
                used.add(bkey)
                out.env_unknown += [u for u in unknown if u not in out.env_unknown]
                break
    return pairs


def _mismatch(out: "Comparison", label: str, b_envs: dict, c_envs: dict) -> None:
    """A trial stored by both runs, in different environments only: listed with what differs, not compared."""
    b, c = b_envs[sorted(b_envs)[0]], c_envs[sorted(c_envs)[0]]
    differ = env_differences(b, c)[0]
    what = "; ".join(f"{n[4:]} {get(b, n)} vs {get(c, n)}" for n in differ)
    line = f"{label}: baseline {_env_text(b)} vs current {_env_text(c)} (differs: {what})"
    out.env_mismatch.append(line)
    if "ok" in {get(r, "status") for r in (*b_envs.values(), *c_envs.values())}:
        out.env_uncompared.append(line)


def _by_trial(df) -> dict[str, dict[str, dict]]:
    """{trial_id: {env_key: row}}."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows_of(df):
        out.setdefault(str(get(r, "trial_id")), {})[str(get(r, "env_key"))] = r
    return out


def _compare_pair(out: Comparison, tid: str, label: str, b, c, gates: dict[str, Threshold | None]) -> None:
    """Compare one trial measured in the same environment by both runs, adding to `out`."""
    bs, cs = get(b, "status"), get(c, "status")
    if bs != cs:
        line = f"{label}: status {bs} → {cs}" + (f" ({get(c, 'reason')})" if get(c, "reason") else "")
        out.status_changes.append(line)
        if bs == "ok":  # it ran before and no longer does: the worst regression
            out.status_regressions.append(line)
            out.regressions.append(line)
        return
    if bs != "ok":
        return
    out.n_compared += 1
    # Rows stored before `probe_features` existed probed the projected features.
    features = [get(row, "probe_features") or "projected" for row in (b, c)]
    if features[0] != features[1] and num(get(b, "probe_top1")) is not None:
        out.env_mismatch.append(f"{label}: probe features {features[0]} vs {features[1]} (accuracy not compared)")
    for metric in (m for m in GATEABLE if gates.get(m) is not None):
        xb, xc = num(get(b, metric)), num(get(c, metric))
        if (xb is None and xc is None) or (metric.startswith("probe_") and features[0] != features[1]):
            continue  # measured by neither run (mode: infer has no train figures), or not comparable
        if xb is None or xc is None:  # stored on one side only: never dropped silently
            change = Change(tid, label, metric, xb, xc, gates[metric], None, "missing")
        else:
            noise = _noise(metric, b, c)
            change = Change(tid, label, metric, xb, xc, gates[metric], noise,
                            judge(metric, xb, xc, gates[metric], noise), spreads=(spread(metric, b), spread(metric, c)))
        out.changes.append(change)


def _regression_line(ch: Change) -> str:
    if ch.verdict == "missing":
        side = "baseline" if ch.baseline is None else "current"
        return (f"{ch.label}: {ch.metric} missing: not compared (no value stored in {side}), which fails the gate; "
                f"turn its threshold off (`--threshold {ch.metric}=off`) if that is expected")
    line = (f"{ch.label}: {ch.metric} {format_metric(ch.metric, ch.baseline)} → {format_metric(ch.metric, ch.current)} "
            f"({ch.change_text}, threshold {ch.threshold.text})")
    if ch.ab and ch.ab.get("lo") is not None:
        line += (f"; confirmed A/B on this machine: {ch.ab['blocks']} blocks, change {100 * ch.ab['lo']:+.1f}% to "
                 f"{100 * ch.ab['hi']:+.1f}% ({100 * ch.ab['confidence']:.2f}% interval)")
    if ch.remeasured:
        line += f"; confirmed: re-measured {', '.join(format_metric(ch.metric, x) for x in ch.remeasured)}"
    return line


def flagged_timing(c: Comparison, *, cannot_tell: bool = False) -> list[Change]:
    """The timing regressions of `c` (and, with `cannot_tell`, the slowdowns it cannot tell from noise):
    what `--confirm` re-measures."""
    verdicts = ("regression", "cannot tell") if cannot_tell else ("regression",)
    return [ch for ch in c.changes if ch.verdict in verdicts and is_timing(ch.metric)]


def apply_confirmation(c: Comparison, remeasured: dict[tuple[str, str], list[float]], gates: dict,
                       rebuilt_baseline: dict[tuple[str, str], float] | None = None) -> Comparison:
    """Re-judge flagged timing regressions against re-measured current values, in place.

    A regression holds when the median of the re-measurements still fails its threshold against the
    baseline (its re-measured median where `rebuilt_baseline` has one, else its stored figure);
    otherwise its verdict becomes "not confirmed" and it no longer fails the gate. A flagged trial
    without re-measurements (another environment, or its re-run failed) stays a regression.
    """
    for ch in flagged_timing(c):
        values = remeasured.get((ch.trial_id, ch.metric))
        if not values:
            continue
        ch.remeasured = tuple(values)
        base = (rebuilt_baseline or {}).get((ch.trial_id, ch.metric), ch.baseline)
        again = judge(ch.metric, base, statistics.median(values), ch.threshold, None)
        ch.verdict = "regression" if again == "regression" else "not confirmed"
    return refresh(c, gates)


def refresh(c: Comparison, gates: dict) -> Comparison:
    """After verdicts changed (a confirm step ran): the regression lines and the markdown again."""
    c.regressions = c.status_regressions + [_regression_line(ch) for ch in c.changes
                                            if ch.verdict in ("regression", "missing")]
    c.confirmed = True
    c.markdown = _markdown(c, gates)
    return c


def compare(baseline_df, current_df, thresholds: dict | None = None) -> Comparison:
    """Compare two results frames trial by trial.

    Args:
        baseline_df, current_df: frames from `suite.results.store.load_results`.
        thresholds: {metric: Threshold or None (off)} laid over DEFAULT_THRESHOLDS.
    """
    gates: dict[str, Threshold | None] = dict(DEFAULT_THRESHOLDS)
    gates.update(thresholds or {})
    axes = sorted(set(varying_axes(baseline_df)) | set(varying_axes(current_df)), key=AXES.index)
    base, cur = _by_trial(baseline_df), _by_trial(current_df)
    out = Comparison(gates=gates)
    labels = {}
    for tid in set(base) | set(cur):
        any_row = next(iter((base.get(tid) or cur.get(tid)).values()))
        labels[tid] = f"`{trial_label(any_row, axes)}` ({tid[:8]})"
    for tid in sorted(labels, key=lambda t: (labels[t].replace("`", ""), t)):
        b_envs, c_envs = base.get(tid, {}), cur.get(tid, {})
        label = labels[tid]
        if not b_envs:
            out.only_in_current.append(label)
            continue
        if not c_envs:
            out.only_in_baseline.append(label)
            if any(get(r, "status") == "ok" for r in b_envs.values()):  # its gated figures are all missing
                line = (f"{label}: ran ok in baseline, absent from current: not compared, which fails the gate "
                        "(an interrupted run? `suite run --resume` finishes it; dropped on purpose? compare "
                        "against a baseline without it)")
                out.status_regressions.append(line)
                out.regressions.append(line)
            continue
        pairs = _pairs(out, b_envs, c_envs)
        if not pairs:
            _mismatch(out, label, b_envs, c_envs)
        for b, c in pairs:
            _compare_pair(out, tid, label, b, c, gates)
    remove_drift(out)  # judged net of the move all trials made together (suite.gate.drift)
    out.regressions = out.status_regressions + [_regression_line(ch) for ch in out.changes
                                                if ch.verdict in ("regression", "missing")]
    seen = {ch.metric for ch in out.changes}
    out.not_measured = [m for m, t in gates.items() if t is not None and m not in seen]
    out.code = {"baseline": code_text(rows_of(baseline_df)), "current": code_text(rows_of(current_df))}
    out.markdown = _markdown(out, gates)
    return out


def summary_lines(c: Comparison, gates: dict) -> list[str]:
    """The verdict's reasons: what was compared, with which code, and what could not be."""
    missing = sum(ch.verdict == "missing" for ch in c.changes)
    lines = [f"{c.n_compared} trials compared, {len(c.regressions) - missing} regressions"
             + (f", {missing} gated figures missing on one side (not compared: fails the gate)" if missing else "")
             + ". Thresholds: " + ", ".join(f"`{m}` {t.text}" for m, t in gates.items() if t is not None)
             + "; a change within the two runs' combined step-time IQR is noise, not a regression "
               "(a slowdown beyond its threshold inside it: cannot tell)."]
    if c.drift:
        lines += ["", "Drift between the two runs (timing):"] + [f"- {line}" for line in drift_lines(c)] + [""]
    if c.code:
        lines.append(f"Code measured: baseline {c.code['baseline']}; current {c.code['current']}.")
    flagged = [ch for ch in c.changes if is_timing(ch.metric) and ch.verdict in ("regression", "not confirmed")]
    if c.confirmed and flagged:
        held = sum(ch.verdict == "regression" and bool(ch.remeasured) for ch in flagged)
        dropped = sum(ch.verdict == "not confirmed" for ch in flagged)
        unmeasured = len(flagged) - held - dropped
        lines.append(f"Flagged throughput regressions were re-measured on this machine: {held} held, {dropped} did "
                     "not (not confirmed: run-to-run noise, not a regression)"
                     + (f", {unmeasured} could not be re-measured here (see below: the code or environment "
                        "differs, or the re-run failed) and stand" if unmeasured else "") + ".")
    lines += [f"- {cell(n)}" for n in c.notes]
    if c.env_uncompared:
        lines += ["", f"**{len(c.env_uncompared)} trials were measured in another environment** (listed below): "
                  "their speed, memory and accuracy are not compared, so this gate cannot pass; compare runs "
                  "measured on the same machine, with the same threads and versions."]
    if c.env_unknown:
        lines += ["", f"Not recorded by one side (an older store): {', '.join(c.env_unknown)}; "
                  "assumed the same environment."]
    if c.n_compared and c.not_measured:
        lines += ["", "Gated but in no trial stored by both runs (nothing to gate): "
                  + ", ".join(f"`{m}`" for m in c.not_measured) + "."]
    if c.n_compared == 0:
        lines += ["", "**Nothing was compared**: no trial ran ok in both runs in the same environment, "
                  "so this gate cannot pass."]
    return lines


def _markdown(c: Comparison, gates: dict) -> str:
    verdict = "FAIL" if c.exit_code else "PASS"
    lines = [f"## Regression gate: {verdict}", ""] + summary_lines(c, gates)
    lines += ab_lines(c)
    if c.regressions:
        lines += ["", "### Regressions", ""] + [f"- {cell(r)}" for r in c.regressions]
    if c.cannot_tell:
        lines += ["", "### Cannot tell on this machine (exit 3 with --strict)", ""] + [f"- {cell(t)}" for t in c.cannot_tell]
    for title, items in (("Environment differs (not compared)", c.env_mismatch),
                         ("Status changed", [s for s in c.status_changes if s not in c.regressions]),
                         ("Only in baseline", c.only_in_baseline), ("Only in current", c.only_in_current)):
        if items:
            lines += ["", f"### {title}", ""] + [f"- {cell(i)}" for i in items]
    by_metric: dict[str, list[Change]] = {}
    for ch in c.changes:
        if ch.verdict != "missing":
            by_metric.setdefault(ch.metric, []).append(ch)
    if by_metric:
        body = []
        for metric, changes in by_metric.items():
            counts = {v: sum(ch.verdict == v for ch in changes) for v in ("regression", "improvement")}
            rels = sorted(ch.current - ch.baseline if not ch.threshold.relative else (ch.rel_change or 0.0)
                          for ch in changes)
            worst = rels[0] if higher_is_better(metric) else rels[-1]
            fmt = (lambda x: f"{100 * x:+.1f}%") if gates[metric].relative else (lambda x: f"{x:+.2f}")
            body.append([f"`{metric}`", gates[metric].text, len(changes), fmt(statistics.median(rels)), fmt(worst),
                         counts["regression"], counts["improvement"]])
        lines += ["", "### Per metric", "",
                  table(["metric", "threshold", "n", "median change", "worst change", "regressions", "improvements"],
                        body, "llrrrrr")]
    moved = [ch for ch in c.changes if ch.verdict in ("regression", "improvement", "not confirmed")]
    if moved:
        lines += ["", "### Changes beyond threshold and noise", "", _change_table(moved, with_metric=True)]
    if c.changes:
        details = []
        for metric, changes in by_metric.items():
            details += [f"#### {metric}", "", _change_table(changes, with_metric=False), ""]
        lines += ["", "<details><summary>Every compared value</summary>", ""] + details + ["</details>"]
    return "\n".join(lines) + "\n"


def _change_table(changes: list[Change], *, with_metric: bool) -> str:
    body = [[ch.label] + ([f"`{ch.metric}`"] if with_metric else [])
            + [format_metric(ch.metric, ch.baseline), format_metric(ch.metric, ch.current), ch.change_text,
               "—" if ch.noise is None else f"±{100 * ch.noise:.1f}%",
               f"**{ch.verdict}**" if ch.verdict == "regression" else ch.verdict] for ch in changes]
    heads = ["trial"] + (["metric"] if with_metric else []) + ["baseline", "current", "change", "noise", "verdict"]
    return table(heads, body, "l" + ("l" if with_metric else "") + "rrrrl")


def compare_paths(baseline_path: str | Path, current_path: str | Path, thresholds: dict | None = None) -> Comparison:
    """Compare two results stores.

    Thresholds, later winning: DEFAULT_THRESHOLDS, the current run's experiment `compare:` block,
    then `thresholds` (e.g. parsed from the command line).
    """
    gates = gates_of(current_path, thresholds)
    return compare(load_results(baseline_path), load_results(current_path), gates)


def gates_of(current_path: str | Path, thresholds: dict | None = None) -> dict[str, Threshold | None]:
    """The thresholds `compare_paths` applies: defaults, the experiment's `compare:` block, `thresholds`."""
    gates: dict[str, Threshold | None] = dict(DEFAULT_THRESHOLDS)
    exp = load_meta(current_path).get("experiment") or {}
    if isinstance(exp, dict) and exp.get("compare"):
        gates.update(parse_thresholds(exp["compare"]))
    gates.update(thresholds or {})
    return gates
