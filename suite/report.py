"""The markdown report: what a user reads after a sweep, and pastes into a PR.

`render(df, meta)` is a pure function of the results (no clock, no environment reads, no torch):
the same results give the same text whatever their row order, so reports can be diffed.
`write_report(db)` loads a store, draws the plots beside the report and writes it.

Order of sections (the reader's questions, most urgent first, so 500 trials stay readable):
header and environment, weights warning, recommendation (the `select` block), Pareto fronts,
ablations (one axis changed, everything else fixed), plots, failed and skipped trials, and last
the full table of every trial.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from suite.options import OPTION_BY_NAME, OPTIONS
from suite.records import STATUSES
from suite.rows import (  # noqa: F401 - re-exported: the report's vocabulary
    AXES,
    DETAILS_AFTER,
    IDENTITY,
    NOT_AXES,
    SHORT,
    _row_key,
    _sort_key,
    cell,
    config_value,
    delta_points,
    fold,
    get,
    is_noisy,
    mib,
    num,
    number,
    pct,
    pick_metric,
    plain,
    plural,
    rate,
    rate_with_spread,
    ratio,
    rel_iqr,
    rows_of,
    same_config,
    sig,
    table,
    trial_label,
    varying_axes,
)

# The metrics of an ablation row: (column, header, kind) with kind "ratio" or "delta" (points).
EFFECT_METRICS = (
    ("train_samples_per_sec", "train img/s", "ratio"),
    ("infer_samples_per_sec", "infer img/s", "ratio"),
    ("train_peak_mem_mib", "train mem", "ratio"),
    ("infer_peak_mem_mib", "infer mem", "ratio"),
    ("probe_top1", "probe top-1", "delta"),
)

# --- analyses --------------------------------------------------------------------------------


def pareto_front(rows: list, x: str, y: str, *, max_x: bool = True, max_y: bool = True) -> list:
    """Rows not dominated in (x, y); a row with either value missing is left out.

    Returned sorted by x, best x first (ties: by trial_id), so a plot can draw the front in order.
    """
    sx, sy = (1 if max_x else -1), (1 if max_y else -1)
    pts = [(sx * num(get(r, x)), sy * num(get(r, y)), r) for r in rows
           if num(get(r, x)) is not None and num(get(r, y)) is not None]
    front = []
    for a in pts:
        dominated = any(b[0] >= a[0] and b[1] >= a[1] and (b[0] > a[0] or b[1] > a[1]) for b in pts)
        if not dominated:
            front.append(a)
    front.sort(key=lambda p: (-p[0], -p[1], str(get(p[2], "trial_id"))))
    return [p[2] for p in front]


@dataclass
class Effect:
    """Changing one axis from `ref` to `value` with everything else fixed."""

    axis: str
    ref: Any
    value: Any
    n: int = 0  # matched pairs where both ran ok
    medians: dict[str, float | None] = field(default_factory=dict)


def reference_value(name: str, values: list) -> Any:
    """The baseline of an axis: its default when swept, else its most common value."""
    default = OPTION_BY_NAME[name].default
    if any(same_config(name, v, default) for v in values):
        return default
    counts: dict[str, tuple[int, Any]] = {}
    for v in values:
        c = counts.get(config_value(name, v), (0, v))
        counts[config_value(name, v)] = (c[0] + 1, v)
    return sorted(counts.values(), key=lambda cv: (-cv[0], _sort_key(cv[1])))[0][1]


def ablation_effects(df, axes: list[str] | None = None) -> list[Effect]:
    """Median effect of each axis over pairs of ok trials that differ only in that axis.

    Ratios are variant / reference (e.g. train memory 0.58x); probe top-1 is a difference in points.
    Pairs are matched within one environment: every other identity option and env_key equal.
    """
    all_rows = rows_of(df)
    rows = [r for r in all_rows if get(r, "status") == "ok"]
    axes = varying_axes(df) if axes is None else axes
    effects = []
    for axis in axes:
        all_values = [get(r, axis) for r in all_rows]
        ref = reference_value(axis, all_values)
        # Pairs: same environment, model and every other identity option; only `axis` differs.
        groups: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            key = (get(r, "env_key"),) + tuple(config_value(a, get(r, a)) for a in IDENTITY if a != axis)
            groups.setdefault(key, {})[config_value(axis, get(r, axis))] = r
        ref_key = config_value(axis, ref)
        variants = {config_value(axis, v): v for v in all_values if config_value(axis, v) != ref_key}
        for vkey, value in sorted(variants.items(), key=lambda kv: _sort_key(kv[1])):
            pairs = [(g[ref_key], g[vkey]) for g in groups.values() if ref_key in g and vkey in g]
            eff = Effect(axis, ref, value, len(pairs))
            for metric, _, kind in EFFECT_METRICS:
                vals = []
                for a, b in pairs:
                    xa, xb = num(get(a, metric)), num(get(b, metric))
                    if xa is None or xb is None or (kind == "ratio" and xa <= 0):
                        continue
                    vals.append(xb / xa if kind == "ratio" else xb - xa)
                eff.medians[metric] = statistics.median(vals) if vals else None
            effects.append(eff)
    return effects


# --- sections --------------------------------------------------------------------------------


def _meta(meta: dict | None) -> dict:
    """Flatten the store's meta (`experiment` holds name/select/...) under the caller's keys."""
    meta = dict(meta or {})
    exp = meta.get("experiment")
    flat = dict(exp) if isinstance(exp, dict) else {}
    flat.update({k: v for k, v in meta.items() if k != "experiment"})
    return flat


def _date(meta: dict, df) -> str:
    if meta.get("date"):
        return str(meta["date"])
    # Derived from the data (latest finish), never from the clock: rendering stays pure.
    ends = [num(v) for v in df["finished_at"]] if "finished_at" in df.columns else []
    ends = [e for e in ends if e is not None]
    if not ends:
        return "unknown"
    return datetime.fromtimestamp(max(ends), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _distinct(rows: list, name: str) -> list:
    seen = {}
    for r in rows:
        v = get(r, name)
        if v is not None and v != "":
            seen.setdefault(repr(v), v)
    return sorted(seen.values(), key=_sort_key)


def _env_lines(rows: list) -> list[str]:
    """One bullet per environment fact; several values are listed (one per environment)."""
    def joined(name: str) -> str:
        return ", ".join(str(v) for v in _distinct(rows, name)) or "—"

    def some(*pairs: tuple[str, str]) -> str:
        """'label value' for each fact that was recorded."""
        return ", ".join(f"{label} {joined(n)}".strip() for label, n in pairs if joined(n) != "—")

    driver = joined("env_driver")
    lines = [
        f"- **Device:** {joined('env_device')}" + (f" (driver {driver})" if driver != "—" else ""),
        "- **Software:** " + (some(("torch", "env_torch"), ("timm", "env_timm"), ("CUDA", "env_cuda"),
                                   ("cuDNN", "env_cudnn"), ("Python", "env_python")) or "—"),
        f"- **CPU:** {joined('env_cpu')}, {joined('env_threads')} threads"
        + (f"; platform {joined('env_platform')}" if joined("env_platform") != "—" else ""),
        f"- **Precision:** {joined('precision')}"
        + (f"; memory measured as {joined('mem_method')}" if joined("mem_method") != "—" else ""),
        f"- **Timing:** {joined('warmup')} warm-up + {joined('iters')} timed iterations per phase; "
        f"median step time, ± is its IQR relative to the median, ⚠ marks IQR/median above "
        f"`noise_threshold` ({joined('noise_threshold')})",
    ]
    commits = joined("env_git_commit")
    if commits != "—":
        lines.append(f"- **Suite commit:** {commits}")
    return lines


def _weights_section(rows: list) -> list[str]:
    counts: dict[str, int] = {}
    for r in rows:
        p = get(r, "pretrained")
        if p is False or p is None:
            name = "random init"
        elif p is True:
            name = "pretrained (timm default weights)"
        else:
            name = f"pretrained: `{p}`"
        counts[name] = counts.get(name, 0) + 1
    out = ["**Weights:** " + ", ".join(f"{k} ({plural(v, 'trial')})" for k, v in sorted(counts.items()))]
    n_random = counts.get("random init", 0)
    if n_random:
        out += ["", f"> **Warning: {n_random} of {len(rows)} trials use randomly initialized weights.** Their "
                "throughput and memory are real, but their probe accuracy says nothing about how the pretrained "
                "tower would do: do not pick a tower by these probe numbers."]
    return out


def _status_line(rows: list) -> str:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[str(get(r, "status"))] = counts.get(str(get(r, "status")), 0) + 1
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return f"**{len(rows)} trials:** " + ", ".join(parts) + "."


def _brief(row) -> str:
    """Key numbers of one trial, for the recommendation."""
    parts = []
    for name, text in (("probe_top1", "probe top-1 {}%"), ("train_samples_per_sec", "train {} img/s"),
                       ("infer_samples_per_sec", "infer {} img/s"), ("train_peak_mem_mib", "train mem {} MiB")):
        x = num(get(row, name))
        if x is not None:
            parts.append(text.format(pct(x) if name == "probe_top1" else rate(x) if "samples" in name else mib(x)))
    return ", ".join(parts)


def _fmt_metric(name: str, x: float | None) -> str:
    if x is None:
        return "—"
    if "samples_per_sec" in name:
        return rate(x)
    if "mem_mib" in name:
        return mib(x)
    if name.endswith("_mfu"):
        return pct(x, 100) + "%"
    if name.startswith("probe_") and not name.startswith("probe_n_"):
        return pct(x)
    return sig(x)


def _recommendation(rows: list, df, meta: dict, axes: list[str]) -> list[str]:
    from suite.select import apply_select, parse_select

    block = meta.get("select")
    if not block:
        return ["No `select` block in the experiment, so no recommendation. Add one, e.g. "
                "`select: {objective: max probe_top1, constraints: [\"train_peak_mem_mib <= 20480\"]}`."]
    try:
        select = parse_select(block)
    except ValueError as e:
        return [f"The experiment's `select` block is invalid, so no recommendation: {e}"]
    result = apply_select(df, select)
    cons = ", ".join(f"`{c.text}`" for c in select.constraints) or "no constraints"
    out = [f"Objective: **{select.objective}** subject to {cons}."]
    n_ok = sum(get(r, "status") == "ok" for r in rows)
    if result.best is None:
        out += ["", f"**No trial meets the constraints:** all {n_ok} trials that ran ok were excluded "
                f"({len(rows) - n_ok} did not run ok). Relax a constraint or add smaller configurations."]
    else:
        best = result.best
        out += ["", f"**Recommended: `{trial_label(best, axes)}`** (trial `{get(best, 'trial_id')}`): {_brief(best)}."]
        shown = result.ranked[: select.top]
        context = [m for m in ("probe_top1", "train_samples_per_sec", "train_peak_mem_mib")
                   if pick_metric(df, m)]
        metrics = list(dict.fromkeys([select.metric] + [c.metric for c in select.constraints] + context))
        body = [[i + 1, f"`{trial_label(r, axes)}`"] + [_fmt_metric(m, num(get(r, m))) for m in metrics]
                for i, r in enumerate(shown)]
        out += ["", table(["rank", "trial"] + metrics, body, "rl" + "r" * len(metrics))]
        if len(result.ranked) > len(shown):
            extra = len(result.ranked) - len(shown)
            out += ["", f"{plural(extra, 'more trial')} {'meets' if extra == 1 else 'meet'} the constraints "
                    f"but {'ranks' if extra == 1 else 'rank'} lower."]
    failed_constraints = [(r, why) for r, why in result.excluded if get(r, "status") == "ok"]
    not_ok = len(result.excluded) - len(failed_constraints)
    if failed_constraints:
        failed_constraints.sort(key=lambda rw: _row_key(rw[0]))
        body = table(["excluded trial", "why"], [[f"`{trial_label(r, axes)}`", why] for r, why in failed_constraints])
        n = len(failed_constraints)
        out += ["", fold(f"{plural(n, 'ok trial')} excluded by the constraints", body, n)]
    if not_ok:
        out += ["", f"{plural(not_ok, 'trial')} did not run ok and {'was' if not_ok == 1 else 'were'} not considered "
                "(see *Failed and skipped trials*)."]
    return out


def _pareto_section(rows: list, df, axes: list[str]) -> list[str]:
    ok = [r for r in rows if get(r, "status") == "ok"]
    speed = pick_metric(df, "train_samples_per_sec", "infer_samples_per_sec")
    mem = pick_metric(df, "train_peak_mem_mib", "infer_peak_mem_mib")
    if speed is None:
        return ["No throughput was measured, so there is no Pareto front."]
    out = []
    fronts = []
    if pick_metric(df, "probe_top1"):
        fronts.append(("Probe top-1 vs throughput", "probe_top1", True))
    else:
        out += ["No probe accuracy was measured (dataset `none`), so only the memory front is shown.", ""]
    if mem:
        fronts.append(("Peak memory vs throughput", mem, False))
    for title, other, maximize in fronts:
        front = pareto_front(ok, speed, other, max_x=True, max_y=maximize)
        cols = [speed, other] + [m for m in ("probe_top1", mem) if m and m not in (speed, other)]
        body = [[f"`{trial_label(r, axes)}`"] + [_fmt_metric(c, num(get(r, c))) for c in cols] for r in front]
        heads = ["trial"] + [_header(c) for c in cols]
        out += [f"**{title}** ({'higher' if maximize else 'lower'} {_header(other)} and higher "
                f"{_header(speed)} are better): {len(front)} of {len(ok)} ok trials are on the front.", "",
                table(heads, body, "l" + "r" * len(cols)), ""]
    return out[:-1] if out and out[-1] == "" else out


def _header(metric: str) -> str:
    names = {
        "train_samples_per_sec": "train img/s", "infer_samples_per_sec": "infer img/s",
        "train_peak_mem_mib": "train mem (MiB)", "infer_peak_mem_mib": "infer mem (MiB)",
        "probe_top1": "probe top-1 (%)",
    }
    return names.get(metric, metric)


def _ablation_section(df, axes: list[str]) -> list[str]:
    effects = ablation_effects(df, axes)
    if not effects:
        return ["No option was varied, so there are no ablations."]
    body = []
    for e in effects:
        cells = [e.axis, f"{config_value(e.axis, e.ref)} → {config_value(e.axis, e.value)}", e.n]
        for metric, _, kind in EFFECT_METRICS:
            x = e.medians.get(metric)
            cells.append(ratio(x) if kind == "ratio" else delta_points(x))
        body.append(cells)
    heads = ["axis", "change", "n"] + [h for _, h, _ in EFFECT_METRICS]
    return [
        "Effect of changing one option with everything else fixed: the median over n matched pairs of "
        "ok trials of variant / reference (probe top-1: difference in points). n = 0: no pair ran ok.",
        "",
        table(heads, body, "llr" + "r" * len(EFFECT_METRICS)),
    ]


def _failures_section(rows: list, axes: list[str]) -> list[str]:
    bad = [r for r in rows if get(r, "status") != "ok"]
    if not bad:
        return ["None: every trial ran ok."]
    groups: dict[tuple[str, str], list] = {}
    for r in bad:
        reason = str(get(r, "reason") or "").strip() or "(no reason recorded)"
        if len(reason) > 200:
            reason = reason[:197] + "..."
        groups.setdefault((str(get(r, "status")), reason), []).append(r)
    body = []
    for (status, reason), members in sorted(groups.items(), key=lambda kv: (STATUSES.index(kv[0][0])
                                                                           if kv[0][0] in STATUSES else 99, kv[0][1])):
        labels = [f"`{trial_label(r, axes)}`" for r in members[:5]]
        more = f" +{len(members) - 5} more" if len(members) > 5 else ""
        body.append([status, reason, len(members), ", ".join(labels) + more])
    return [table(["status", "reason", "n", "trials"], body, "llrl")]


def _full_table(rows: list, axes: list[str], multi_env: bool) -> str:
    heads = ["#", "model"] + [SHORT.get(a, a) for a in axes] + (["device"] if multi_env else []) + [
        "status", "train img/s", "infer img/s", "train mem (MiB)", "infer mem (MiB)", "GFLOPs/img (fwd)",
        "MFU train/infer (%)", "probe top-1 (%)"]
    body = []
    for i, r in enumerate(rows, 1):
        mfu = [num(get(r, "train_mfu")), num(get(r, "infer_mfu"))]
        body.append(
            [i, get(r, "model")] + [config_value(a, get(r, a)) for a in axes]
            + ([get(r, "env_device") or "—"] if multi_env else [])
            + [get(r, "status"), rate_with_spread(r, "train"), rate_with_spread(r, "infer"),
               mib(num(get(r, "train_peak_mem_mib"))), mib(num(get(r, "infer_peak_mem_mib"))),
               sig(num(get(r, "infer_gflops"))),
               "—" if mfu == [None, None] else " / ".join(pct(m, 100) for m in mfu),
               pct(num(get(r, "probe_top1")))]
        )
    n_fixed = 2 + len(axes) + (1 if multi_env else 0) + 1
    return table(heads, body, "r" + "l" * (n_fixed - 1) + "r" * (len(heads) - n_fixed))


# --- the report ------------------------------------------------------------------------------


def render(df, meta: dict | None = None, *, plots: dict[str, str] | None = None) -> str:
    """The markdown report of a results frame (see the module docstring for its sections).

    Args:
        df: rows as from `suite.store.load_results` (or `TrialRecord.flat()` dicts).
        meta: the store's meta (or a flat dict): `name`/`title`, `date`, `select`, `description`.
        plots: {title: relative PNG path} to link, as `plots.write_plots` returns.
    """
    meta = _meta(meta)
    title = meta.get("title") or meta.get("name") or "results"
    rows = rows_of(df)
    out = [f"# {title}: timm tower sweep", ""]
    if meta.get("description"):
        out += [str(meta["description"]).strip(), ""]
    out += [f"Date: {_date(meta, df)}. " + (_status_line(rows) if rows else "**No trials stored.**"), ""]
    if not rows:
        return "\n".join(out).rstrip() + "\n"
    axes = varying_axes(df)
    envs = sorted({str(get(r, "env_key")) for r in rows})

    out += ["## Environment", ""] + _env_lines(rows) + [""] + _weights_section(rows) + [""]
    if len(envs) > 1:
        out += [f"> Results come from {len(envs)} environments; the recommendation, fronts and ablations below "
                "are computed within each one.", ""]
    for env in envs:
        sub_rows = [r for r in rows if str(get(r, "env_key")) == env]
        sub_df = df[[str(plain(k)) == env for k in df["env_key"].tolist()]]
        suffix = f" ({_distinct(sub_rows, 'env_device')[0] if _distinct(sub_rows, 'env_device') else env})" \
            if len(envs) > 1 else ""
        out += [f"## Recommendation{suffix}", ""] + _recommendation(sub_rows, sub_df, meta, axes) + [""]
        out += [f"## Pareto fronts{suffix}", ""] + _pareto_section(sub_rows, sub_df, axes) + [""]
        out += [f"## Ablations{suffix}", ""] + _ablation_section(sub_df, axes) + [""]
    if plots:
        out += ["## Plots", ""]
        for name, path in plots.items():
            out += [f"![{name}]({path})", ""]
    out += ["## Failed and skipped trials", ""] + _failures_section(rows, axes) + [""]
    out += ["## All trials", "",
            "Labels elsewhere in this report name the model and the swept options that differ from their defaults "
            f"({', '.join(f'`{SHORT.get(a, a)}`' for a in axes) or 'none swept'}); `lock=off`: not locked; "
            "`pool=''`: no pooling; `proj=''`: the trunk's own head as projection; `proj=none`: no projection.", ""]
    out += [fold(f"{len(rows)} trials", _full_table(rows, axes, len(envs) > 1), len(rows) if len(rows) > 50 else 0)]
    return "\n".join(out).rstrip() + "\n"


def write_report(db_path: str | Path, out_path: str | Path | None = None, *, title: str | None = None) -> Path:
    """Render the report of a results store, with its plots beside it.

    Args:
        db_path: results.sqlite, or the folder that holds it.
        out_path: the markdown file (default: report.md beside the database).
        title: overrides the experiment name in the heading.

    Returns:
        The path of the written report.
    """
    from suite.plots import write_plots
    from suite.store import load_meta, load_results, resolve_path

    db = resolve_path(db_path)
    df, meta = load_results(db), load_meta(db)
    if title:
        meta["title"] = title
    out = Path(out_path) if out_path else db.parent / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(df, out.parent, out.stem) if len(df) else {}
    out.write_text(render(df, meta, plots=plots))
    return out
