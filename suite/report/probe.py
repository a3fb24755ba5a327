"""The report's probe sections: accuracy with its interval, what was probed, data sets, few-shot.

`acc_cell` is how every report table shows a probe accuracy (`88.6 ± 1.7`: the half-width of the
95% interval stored with it, `suite.core.stats`). `probe_section` is the report's "Probe" section:
which features were probed (pooled before the projection head, or projected), accuracy per data
set with the aggregate across data sets (`suite.report.ranking`), and few-shot accuracy per k (plotted
by `suite.report.plots`).

Light: no torch, no matplotlib.
"""
from __future__ import annotations

from suite.core.options import trial_label
from suite.core.stats import half_width
from suite.experiment.criteria import format_metric
from suite.report.ranking import aggregate, dataset_of
from suite.results.rows import fold, get, num, table

FEATURE_WORDS = {
    "pooled": "pooled trunk features, before the projection head",
    "projected": "projected features, after the projection head",
    None: "features after the projection head (recorded before `probe_features` existed)",
}


def acc_cell(row, metric: str = "probe_top1") -> str:
    """'88.6 ± 1.7' (95% interval half-width) when the row has the interval, else the plain value."""
    x = num(get(row, metric))
    hw = half_width(num(get(row, f"{metric}_lo")), num(get(row, f"{metric}_hi")))
    if x is None or hw is None:
        return format_metric(metric, x)
    return f"{x:.1f} ± {hw:.1f}"


def shot_keys(rows: list) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in (get(r, "probe_shots") or {}):
            if k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k == "all", int(k) if k.isdigit() else 0))


def few_shot_rows(rows: list) -> list:
    """The ok rows with a few-shot curve."""
    return [r for r in rows if get(r, "status") == "ok" and get(r, "probe_shots")]


def _features_lines(rows: list) -> list[str]:
    probed = [r for r in rows if get(r, "status") == "ok" and num(get(r, "probe_top1")) is not None]
    kinds = sorted({get(r, "probe_features") for r in probed}, key=str)
    if not kinds:
        return []
    out = ["Features probed: " + "; ".join(
        f"{sum(get(r, 'probe_features') == k for r in probed)} trials on {FEATURE_WORDS.get(k, k)}" for k in kinds)
        + ". A freshly initialized projection head is a random map: pooled features compare trunks, "
        "projected ones matter for a head that comes with pretrained weights."]
    out += ["Accuracies are shown as value ± half-width of the 95% interval over test images (Wilson for "
            "top-1, per-class normal approximation for balanced accuracy)."]
    return out


def _datasets_lines(rows: list, axes: list[str]) -> list[str]:
    agg = aggregate(rows)
    if len(agg.datasets) < 2:
        return []
    order = sorted(agg.rows, key=lambda c: (agg.mean_rank.get(c, float("inf")), -agg.mean_z.get(c, 0.0)))
    body = []
    for c in order:
        by = agg.rows[c]
        first = next(iter(by.values()))
        body.append([f"`{trial_label(first, [a for a in axes if a != 'dataset'])}`"]
                    + [acc_cell(by[d]) if d in by else "—" for d in agg.datasets]
                    + [f"{agg.mean_rank[c]:.2f}" if c in agg.mean_rank else "—",
                       f"{agg.mean_z[c]:+.2f}" if c in agg.mean_z else "—"])
    heads = ["configuration"] + [f"{d} top-1 (%)" for d in agg.datasets] + ["mean rank", "mean z"]
    return ["", f"### Accuracy per data set ({len(agg.datasets)} data sets)", "",
            "Mean rank (1 = best) and mean z-score across data sets, over the configurations probed on every "
            "one (as *Battle of the Backbones* ranks backbones); `select: {objective: max probe_mean_z}` ranks "
            "by it.", "", fold(f"{len(body)} configurations", table(heads, body, "l" + "r" * (len(heads) - 1)),
                               len(body))]


def shot_cell(entry: dict) -> str:
    """'85.0 ± 1.2', with '(capped: 6/class)' when k was more than a class had (`suite.probe.engine.shots_used`)."""
    text = f"{entry['mean']:.1f} ± {entry['std']:.1f}"
    if entry.get("capped"):
        low, high = entry.get("per_class") or ("?", "?")
        text += f" (capped: {low}/class)" if low == high else f" (capped: {low}–{high}/class)"
    return text


def _few_shot_lines(rows: list, axes: list[str]) -> list[str]:
    curves = few_shot_rows(rows)
    if not curves:
        return []
    keys = shot_keys(curves)
    body = []
    for r in curves:
        shots = get(r, "probe_shots")
        cells = [shot_cell(shots[k]) if k in shots else "—" for k in keys]
        body.append([f"`{trial_label(r, axes)}`", dataset_of(r)] + cells)
    seeds = max(len(v.get("seeds", [])) for r in curves for v in get(r, "probe_shots").values())
    return ["", "### Few-shot probes", "",
            f"Top-1 (%) with k labeled training images per class: mean ± standard deviation over up to {seeds} "
            "seeded samples of the training split (C chosen on the validation split, which never adds labels; "
            "`all`: the whole training split, fitted the same way). A k above a class's training images takes all "
            "of them: such a cell says `capped` and the images per class actually used.", "",
            table(["trial", "data set"] + [f"k={k}" for k in keys], body, "ll" + "r" * len(keys))]


def probe_section(rows: list, axes: list[str]) -> list[str]:
    """The report's probe section (empty when no trial was probed)."""
    lines = _features_lines(rows)
    if not lines:
        return []
    return lines + _datasets_lines(rows, axes) + _few_shot_lines(rows, axes)
