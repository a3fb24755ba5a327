"""The markdown report: what a user reads after a sweep, and pastes into a PR.

`render(df, meta)` is a pure function of the results (no clock, no environment reads, no torch):
the same results give the same text whatever their row order, so reports can be diffed.
`write_report(db)` loads a store, draws the plots beside the report and writes it.

Order of sections (the reader's questions, most urgent first, so 500 trials stay readable):
header and environment, weights warning, recommendation (the `select` block), Pareto fronts,
ablations (one axis changed, everything else fixed), plots, failed and skipped trials, and last
the full table of every trial. The maths behind the fronts and ablations is `suite.report.analysis`;
metric names and number formats come from `suite.experiment.criteria`, so every table shows them alike.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from suite.core.errors import SuiteError
from suite.core.options import SHORT, config_value, trial_label
from suite.core.paths import output_file, write_text
from suite.core.records import STATUSES
from suite.experiment.criteria import format_metric, metric_header, parse_select
from suite.report.analysis import EFFECT_METRICS, ablation_effects, last_finished, pareto_front
from suite.report.memory import breakdown_phase, memory_section, part_values
from suite.report.plots import write_plots
from suite.report.probe import acc_cell, probe_section
from suite.report.selection import apply_select
from suite.results.rows import (
    delta_points,
    fold,
    get,
    mib,
    num,
    pct,
    pick_metric,
    plain,
    plural,
    rate_with_spread,
    ratio,
    row_key,
    rows_of,
    sig,
    sort_key,
    table,
    varying_axes,
)
from suite.results.store import load_meta, load_results, resolve_path

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
    end = last_finished(df)
    if end is None:
        return "unknown"
    return datetime.fromtimestamp(end, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _distinct(rows: list, name: str) -> list:
    seen = {}
    for r in rows:
        v = get(r, name)
        if v is not None and v != "":
            seen.setdefault(repr(v), v)
    return sorted(seen.values(), key=sort_key)


def _env_lines(rows: list) -> list[str]:
    """One bullet per environment fact; several values are listed (one per environment)."""
    def joined(name: str) -> str:
        return ", ".join(str(v) for v in _distinct(rows, name)) or "—"

    def some(*pairs: tuple[str, str]) -> str:
        """'label value' for each fact that was recorded."""
        return ", ".join(f"{label} {joined(n)}".strip() for label, n in pairs if joined(n) != "—")

    driver = joined("env_driver")
    min_times = [v for v in _distinct(rows, "min_time_s") if v]
    min_time = f", or as many as last {', '.join(map(str, min_times))} s (`min_time_s`)" if min_times else ""
    lines = [
        f"- **Device:** {joined('env_device')}" + (f" (driver {driver})" if driver != "—" else ""),
        "- **Software:** " + (some(("torch", "env_torch"), ("timm", "env_timm"), ("CUDA", "env_cuda"),
                                   ("cuDNN", "env_cudnn"), ("Python", "env_python")) or "—"),
        f"- **CPU:** {joined('env_cpu')}, {joined('env_threads')} threads"
        + (f"; platform {joined('env_platform')}" if joined("env_platform") != "—" else ""),
        f"- **Precision:** {joined('precision')}"
        + (f"; memory measured as {joined('mem_method')}" if joined("mem_method") != "—" else ""),
        f"- **Timing:** at least {joined('warmup')} warm-up steps (until the step time is steady), then rounds of "
        f"{joined('iters')} timed steps per phase{min_time} (at least two, until two agree within 5%); median step time "
        f"over the agreeing rounds, ± is its IQR relative to the median, ⚠ marks IQR/median above "
        f"`noise_threshold` ({joined('noise_threshold')}) or rounds that never agreed",
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
            parts.append(text.format(format_metric(name, x)))
    return ", ".join(parts)


def _recommendation(rows: list, df, meta: dict, axes: list[str]) -> list[str]:
    block = meta.get("select")
    if not block:
        return ["No `select` block in the experiment, so no recommendation. Add one, e.g. "
                "`select: {objective: max probe_top1, constraints: [\"train_peak_mem_mib <= 20480\"]}`."]
    try:
        select = parse_select(block)
    except SuiteError as e:
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
        out += [f"{result.tie_note}."] if result.tie_note else []
        out += [f"Ranked on the {result.dataset} probe; see *Probe* for every data set."] if result.dataset else []
        shown = result.ranked[: select.top]
        context = [m for m in ("probe_top1", "train_samples_per_sec", "train_peak_mem_mib")
                   if pick_metric(df, m)]
        metrics = list(dict.fromkeys([select.metric] + [c.metric for c in select.constraints] + context))
        body = [[i + 1, f"`{trial_label(r, axes)}`"] + [acc_cell(r, m) for m in metrics]
                for i, r in enumerate(shown)]
        out += ["", table(["rank", "trial"] + metrics, body, "rl" + "r" * len(metrics))]
        if len(result.ranked) > len(shown):
            extra = len(result.ranked) - len(shown)
            out += ["", f"{plural(extra, 'more trial')} {'meets' if extra == 1 else 'meet'} the constraints "
                    f"but {'ranks' if extra == 1 else 'rank'} lower."]
    failed_constraints = [(r, why) for r, why in result.excluded if get(r, "status") == "ok"]
    not_ok = len(result.excluded) - len(failed_constraints)
    if failed_constraints:
        failed_constraints.sort(key=lambda rw: row_key(rw[0]))
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
        body = [[f"`{trial_label(r, axes)}`"] + [format_metric(c, num(get(r, c))) for c in cols] for r in front]
        heads = ["trial"] + [metric_header(c) for c in cols]
        out += [f"**{title}** ({'higher' if maximize else 'lower'} {metric_header(other)} and higher "
                f"{metric_header(speed)} are better): {len(front)} of {len(ok)} ok trials are on the front.", "",
                table(heads, body, "l" + "r" * len(cols)), ""]
    return out[:-1] if out and out[-1] == "" else out


def _ablation_section(df, axes: list[str]) -> list[str]:
    effects = ablation_effects(df, axes)
    if not effects:
        return ["No option was varied, so there are no ablations."]
    body = []
    for e in effects:
        cells = [e.axis, f"{config_value(e.axis, e.ref)} → {config_value(e.axis, e.value)}", e.n]
        for metric, kind in EFFECT_METRICS:
            x = e.medians.get(metric)
            cells.append(ratio(x) if kind == "ratio" else delta_points(x))
        body.append(cells)
    heads = ["axis", "change", "n"] + [metric_header(m, unit=False) for m, _ in EFFECT_METRICS]
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


def _parts_cell(row) -> str:
    """Weights / grads / optimizer / activations at the peak of the train phase (else inference)."""
    phase = breakdown_phase(row)
    return "—" if phase is None else f"{phase}: " + " / ".join(mib(x) for x in part_values(row, phase))


def _full_table(rows: list, axes: list[str], multi_env: bool) -> str:
    mems = ("train_peak_mem_mib", "infer_peak_mem_mib")
    heads = ["#", "model"] + [SHORT.get(a, a) for a in axes] + (["device"] if multi_env else []) + ["status"] + [
        metric_header(m) for m in ("train_samples_per_sec", "infer_samples_per_sec") + mems] + [
        "GFLOPs/img (fwd)", "MFU train/infer (%)", metric_header("probe_top1"), "mem at peak W / G / O / A (MiB)"]
    body = []
    for i, r in enumerate(rows, 1):
        mfu = [num(get(r, "train_mfu")), num(get(r, "infer_mfu"))]
        body.append(
            [i, get(r, "model")] + [config_value(a, get(r, a)) for a in axes]
            + ([get(r, "env_device") or "—"] if multi_env else [])
            + [get(r, "status"), rate_with_spread(r, "train"), rate_with_spread(r, "infer"),
               *(format_metric(m, num(get(r, m))) for m in mems), sig(num(get(r, "infer_gflops"))),
               "—" if mfu == [None, None] else " / ".join(pct(m, 100) for m in mfu),
               acc_cell(r), _parts_cell(r)]
        )
    n_fixed = 2 + len(axes) + (1 if multi_env else 0) + 1
    return table(heads, body, "r" + "l" * (n_fixed - 1) + "r" * (len(heads) - n_fixed))


# --- the report ------------------------------------------------------------------------------


def render(df, meta: dict | None = None, *, plots: dict[str, str] | None = None) -> str:
    """The markdown report of a results frame (see the module docstring for its sections).

    Args:
        df: rows as from `suite.results.store.load_results` (or `TrialRecord.flat()` dicts).
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
    probe = probe_section(rows, axes)
    out += (["## Probe", ""] + probe + [""]) if probe else []
    memory = memory_section(rows, axes)
    out += (["## Memory", ""] + memory + [""]) if memory else []
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
        out_path: the markdown file, or a folder for report.md in it (default: report.md beside the database).
        title: overrides the experiment name in the heading.

    Returns:
        The path of the written report.
    """
    db = resolve_path(db_path)
    df, meta = load_results(db), load_meta(db)
    if title:
        meta["title"] = title
    out = output_file(out_path, "report.md") if out_path else db.parent / "report.md"
    write_text(out, "\n")  # the report's own path is checked first, before plots are written beside it
    try:
        plots = write_plots(df, out.parent, out.stem) if len(df) else {}
    except OSError as e:
        raise SuiteError(f"cannot write the report's plots beside {out} ({e.filename or out.parent}: "
                         f"{e.strerror or e}); give -o a file in a writable folder") from None
    write_text(out, render(df, meta, plots=plots))
    return out
