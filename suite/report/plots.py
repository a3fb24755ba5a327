"""PNG plots for the report, drawn headless with matplotlib's Agg canvas.

matplotlib is imported inside the functions (it costs ~0.5 s) and pyplot is never used: a
`Figure` on an Agg canvas needs no display, no backend switch and no global figure state.
"""
from __future__ import annotations

from pathlib import Path

from suite.core.options import config_value, trial_label
from suite.experiment.criteria import metric_header, metric_label
from suite.measurement.capacity import PARTS
from suite.report.analysis import EFFECT_METRICS, ablation_effects, pareto_front
from suite.report.memory import breakdown_phase, part_values
from suite.report.probe import few_shot_rows, shot_keys
from suite.report.ranking import dataset_of
from suite.results.rows import get, num, pick_metric, rows_of, varying_axes

MAX_BARS = 60  # above this a bar per configuration is unreadable; the scatter plots still show all


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: Path, name: str) -> str:
    # No metadata: the same results give byte-identical PNGs, so committed reports diff cleanly.
    fig.savefig(out_dir / name, metadata={"Software": None})
    return name


def _scatter_with_front(ax, rows: list, x: str, y: str, max_y: bool, axes: list[str]) -> None:
    models = sorted({str(get(r, "model")) for r in rows})
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for m in models:
        pts = [(num(get(r, x)), num(get(r, y))) for r in rows if str(get(r, "model")) == m]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, color=colors[m], label=m, alpha=0.8)
    front = pareto_front(rows, x, y, max_x=True, max_y=max_y)
    if front:
        fx, fy = [num(get(r, x)) for r in front], [num(get(r, y)) for r in front]
        ax.step(fx, fy, where="post", color="black", lw=1, ls="--", label="Pareto front")
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", lw=1.2)
        if len(front) <= 8:
            for r, a, b in zip(front, fx, fy):
                ax.annotate(trial_label(r, axes), (a, b), xytext=(4, 4), textcoords="offset points", fontsize=7)
    xs = [num(get(r, x)) for r in rows if num(get(r, x))]
    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(metric_label(x))
    ax.set_ylabel(metric_label(y))
    ax.grid(alpha=0.3)
    if len(models) <= 12:
        ax.legend(fontsize=7, loc="best")


def _effects_plot(df, axes: list[str]):
    effects = [e for e in ablation_effects(df, axes) if e.n]
    metrics = [(m, metric_header(m, unit=False)) for m, kind in EFFECT_METRICS if kind == "ratio"
               and any(e.medians.get(m) is not None for e in effects)]
    if not effects or not metrics:
        return None
    fig = _figure(7.5, 1.4 + 0.18 * len(effects) * len(metrics))
    ax = fig.add_subplot()
    labels = [f"{e.axis}: {config_value(e.axis, e.ref)} → {config_value(e.axis, e.value)} (n={e.n})" for e in effects]
    height = 0.8 / len(metrics)
    for j, (m, header) in enumerate(metrics):
        ys = [i + (j - (len(metrics) - 1) / 2) * height for i in range(len(effects))]
        vals = [e.medians.get(m) for e in effects]
        # Bars grow from 1.0 (no change), so a 0.97x and a 1.35x read as small and large.
        ax.barh(ys, [(v or 1.0) - 1.0 for v in vals], left=1.0, height=height, color=f"C{j}", label=header)
        for y, v in zip(ys, vals):
            if v is not None:
                ax.annotate(f"{v:.2f}x", (v, y), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                            ha="left" if v >= 1 else "right", va="center", fontsize=6)
    ax.axvline(1.0, color="black", lw=1)
    lo = min([e.medians.get(m) or 1.0 for e in effects for m, _ in metrics] + [0.9])
    hi = max([e.medians.get(m) or 1.0 for e in effects for m, _ in metrics] + [1.1])
    pad = 0.12 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(range(len(effects)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median ratio variant / reference over matched pairs (1.0 = no change)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _front_plot(rows: list, x: str, y: str, max_y: bool, axes: list[str], title: str):
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    _scatter_with_front(ax, rows, x, y, max_y, axes)
    ax.set_title(f"{title} (circled: Pareto front)")
    return fig


def _memory_plot(rows: list, mem: str, axes: list[str]):
    """A bar per configuration, smallest first; past MAX_BARS a row of dots per model."""
    bars = [r for r in rows if num(get(r, mem)) is not None]
    bars.sort(key=lambda r: (num(get(r, mem)), str(get(r, "trial_id"))))
    if len(bars) <= MAX_BARS:
        fig = _figure(7.5, 1.0 + 0.22 * len(bars))
        ax = fig.add_subplot()
        ax.barh(range(len(bars)), [num(get(r, mem)) for r in bars], color="C0")
        ax.set_yticks(range(len(bars)), [trial_label(r, axes) for r in bars], fontsize=7)
    else:
        models = sorted({str(get(r, "model")) for r in bars})
        fig = _figure(7.5, 1.2 + 0.4 * len(models))
        ax = fig.add_subplot()
        for i, m in enumerate(models):
            xs = [num(get(r, mem)) for r in bars if str(get(r, "model")) == m]
            ax.scatter(xs, [i] * len(xs), s=18, alpha=0.6, color=f"C{i % 10}")
        ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric_label(mem))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Peak memory per configuration")
    return fig


def _few_shot_plot(rows: list, axes: list[str]):
    """Top-1 vs k labeled images per class, one line per trial with a curve (error bars: std); None without any."""
    curves = few_shot_rows(rows)
    if not curves:
        return None
    keys = shot_keys(curves)
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, r in enumerate(curves):
        shots = get(r, "probe_shots")
        ks = [k for k in keys if k in shots]
        xs = [keys.index(k) for k in ks]
        ax.errorbar(xs, [shots[k]["mean"] for k in ks], yerr=[shots[k]["std"] for k in ks], marker="o",
                    capsize=3, color=f"C{i % 10}", label=f"{trial_label(r, axes)} ({dataset_of(r)})")
    ax.set_xticks(range(len(keys)), [f"k={k}" for k in keys])
    ax.set_xlabel("labeled training images per class")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title("Few-shot probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def _breakdown_plot(rows: list, axes: list[str]):
    """Stacked bars: weights, gradients, optimizer state, activations at each trial's peak; None without any."""
    bars = [(r, breakdown_phase(r)) for r in rows if breakdown_phase(r) is not None]
    if not bars:
        return None
    bars.sort(key=lambda rp: (sum(x or 0.0 for x in part_values(*rp)), str(get(rp[0], "trial_id"))))
    bars = bars[-MAX_BARS:]  # the largest, when there are too many to read
    fig = _figure(7.5, 1.2 + 0.22 * len(bars))
    ax = fig.add_subplot()
    left = [0.0] * len(bars)
    for j, part in enumerate(PARTS):
        widths = [part_values(r, phase)[j] or 0.0 for r, phase in bars]
        ax.barh(range(len(bars)), widths, left=left, color=f"C{j}", label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(bars)), [f"{trial_label(r, axes)} ({phase})" for r, phase in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("memory at the peak (MiB)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Where peak memory goes")
    return fig


def write_plots(df, out_dir: str | Path, stem: str) -> dict[str, str]:
    """Draw the report's plots as PNG files in `out_dir`, named `{stem}-*.png`.

    Returns:
        {title: file name relative to out_dir}, in the order the report shows them; a plot with
        nothing to show (e.g. accuracy without a probe) is left out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows_of(df) if get(r, "status") == "ok"]
    axes = varying_axes(df)
    speed = pick_metric(df, "train_samples_per_sec", "infer_samples_per_sec")
    mem = pick_metric(df, "train_peak_mem_mib", "infer_peak_mem_mib")
    plots: dict[str, str] = {}
    if not rows or speed is None:
        return plots
    if pick_metric(df, "probe_top1"):
        fig = _front_plot(rows, speed, "probe_top1", True, axes, "Probe accuracy vs throughput")
        plots["Probe accuracy vs throughput"] = _save(fig, out_dir, f"{stem}-accuracy-vs-throughput.png")
    if mem:
        fig = _front_plot(rows, speed, mem, False, axes, "Peak memory vs throughput")
        plots["Peak memory vs throughput"] = _save(fig, out_dir, f"{stem}-memory-vs-throughput.png")
        plots["Peak memory per configuration"] = _save(_memory_plot(rows, mem, axes), out_dir, f"{stem}-memory.png")
        fig = _breakdown_plot(rows, axes)
        if fig is not None:
            plots["Where peak memory goes"] = _save(fig, out_dir, f"{stem}-memory-breakdown.png")
    fig = _effects_plot(df, axes)
    if fig is not None:
        fig.get_axes()[0].set_title("Per-axis effects (ablations)")
        plots["Per-axis effects"] = _save(fig, out_dir, f"{stem}-effects.png")
    fig = _few_shot_plot(rows, axes)
    if fig is not None:
        plots["Few-shot probe accuracy"] = _save(fig, out_dir, f"{stem}-few-shot.png")
    return plots
