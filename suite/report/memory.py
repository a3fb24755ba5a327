"""The report's memory section: where each trial's peak goes, what fits where, and what checkpointing saved.

Pure functions of result rows (no torch), like the rest of the read side: `memory_section(rows,
axes)` returns markdown lines, `breakdown_phase(row)` tells the plot which phase to draw.
"""
from __future__ import annotations

from suite.core.options import config_value, trial_label
from suite.measurement.capacity import MIB_PER_GIB, PARTS, predict_max_batch
from suite.results.rows import IDENTITY, fold, get, mib, num, pct, plural, table

FITS_ON_GIB = (24, 40, 80)  # the "fits on" columns: common accelerator memory sizes

_CHECKS = (("lock_ok", "lock"), ("train_state_ok", "train state"))


def fits_on(row, phase: str, gib: tuple[int, ...] = FITS_ON_GIB) -> list[int | None]:
    """Predicted largest batch of a result row's `phase` on cards of `gib` GiB (None: no line measured)."""
    fixed, per_sample = num(get(row, f"{phase}_fixed_mem_mib")), num(get(row, f"{phase}_mem_per_sample_mib"))
    return [predict_max_batch(fixed, per_sample, g * MIB_PER_GIB) for g in gib]


def ckpt_twins(rows: list) -> list[tuple]:
    """(without, with) gradient checkpointing: ok trials that differ in nothing else, same environment.

    Checkpointing should lower the activations of the train phase; a pair where it did not means
    the setting did not take effect (open_clip swallows checkpointing failures with a warning).
    """
    groups: dict[tuple, dict[bool, dict]] = {}
    for r in rows:
        if get(r, "status") != "ok" or num(get(r, "train_activations_mib")) is None:
            continue
        key = (get(r, "env_key"),) + tuple(config_value(a, get(r, a)) for a in IDENTITY if a != "grad_checkpointing")
        groups.setdefault(key, {})[bool(get(r, "grad_checkpointing"))] = r
    return [(g[False], g[True]) for _, g in sorted(groups.items(), key=lambda kv: str(kv[0])) if len(g) == 2]


def breakdown_phase(row) -> str | None:
    """The phase whose breakdown a row shows: train when measured, else inference; None without one."""
    for phase in ("train", "infer"):
        if num(get(row, f"{phase}_activations_mib")) is not None:
            return phase
    return None


def part_values(row, phase: str) -> list[float | None]:
    """The breakdown of `phase` in `PARTS` order (inference has no gradients or optimizer state: 0)."""
    return [num(get(row, f"{phase}_{p}_mib")) if phase == "train" or p in ("weights", "activations") else 0.0
            for p in PARTS]


def _checks_cell(row) -> str:
    failed = [name for field, name in _CHECKS if get(row, field) is False]
    if failed:
        return "⚠ " + ", ".join(failed)
    return "ok" if any(get(row, field) is True for field, _ in _CHECKS) else "—"


def _capacity_cell(row, phase: str) -> str:
    pred, meas = num(get(row, f"{phase}_max_batch")), num(get(row, f"{phase}_max_batch_measured"))
    if pred is None:
        return "—"
    text = f"{int(pred)}"
    if meas is not None:
        text += f" / {int(meas)} ({pct(num(get(row, f'{phase}_max_batch_error')), 100)}%)"
    return text


def _breakdown_table(rows: list, axes: list[str]) -> list[str]:
    body = []
    for r in rows:
        phase = breakdown_phase(r)
        if phase is None:
            continue
        fits = [("—" if b is None else str(b)) for b in fits_on(r, phase)]
        body.append([f"`{trial_label(r, axes)}`", phase, mib(num(get(r, f"{phase}_peak_mem_mib")))]
                    + [mib(x) for x in part_values(r, phase)]
                    + [mib(num(get(r, f"{phase}_fixed_mem_mib"))), mib(num(get(r, f"{phase}_mem_per_sample_mib")))]
                    + fits + [_capacity_cell(r, phase), _checks_cell(r)])
    if not body:
        return []
    budget = sorted({mib(num(get(r, "capacity_budget_mib"))) for r in rows if num(get(r, "capacity_budget_mib"))})
    heads = (["trial", "phase", "peak (MiB)"] + [f"{p} (MiB)" for p in PARTS]
             + ["fixed (MiB)", "per sample (MiB)"] + [f"fits on {g} GiB" for g in FITS_ON_GIB]
             + [f"max batch at {' / '.join(budget) or '—'} MiB (pred / measured)", "checks"])
    text = table(heads, body, "ll" + "r" * (len(heads) - 3) + "l")
    return [fold(plural(len(body), "trial"), text, len(body) if len(body) > 50 else 0)]


def _ckpt_lines(rows: list, axes: list[str]) -> list[str]:
    pairs = ckpt_twins(rows)
    if not pairs:
        return []
    body, flagged = [], 0
    for off, on in pairs:
        a_off, a_on = num(get(off, "train_activations_mib")), num(get(on, "train_activations_mib"))
        saved = a_off - a_on
        ok = saved > 0
        flagged += not ok
        batches = [num(get(r, "train_max_batch")) for r in (off, on)]
        body.append([f"`{trial_label(off, axes)}`", mib(a_off), mib(a_on),
                     f"{mib(saved)} ({pct(saved / a_off, 100) if a_off else '—'}%)"
                     + ("" if ok else " ⚠ not lower"),
                     " → ".join("—" if b is None else str(int(b)) for b in batches)])
    out = ["", "**Gradient checkpointing** (train activations at the peak, trials that differ only in `ckpt`):", "",
           table(["trial (ckpt off)", "activations off (MiB)", "on (MiB)", "ckpt saves", "max batch off → on"],
                 body, "lrrrr")]
    if flagged:
        out += ["", f"⚠ {plural(flagged, 'pair')}: checkpointing did not lower the activations, so it did not take "
                "effect, or the peak falls where activations are not at their largest (the optimizer step of a "
                "small batch)."]
    return out


def memory_section(rows: list, axes: list[str]) -> list[str]:
    """The '## Memory' section's lines (empty when no trial recorded a breakdown)."""
    ok = [r for r in rows if get(r, "status") == "ok"]
    table_lines = _breakdown_table(ok, axes)
    if not table_lines:
        return []
    out = ["Peak live tensor memory of each phase (its own untimed pass; see docs/memory.md)"
           ", split at the peak into weights, gradients, optimizer state and activations (the rest: "
           "activations, the input batch, temporaries). Capacity: the largest batch on a card of that size, predicted "
           "from the line fixed + per sample x batch measured at two batch sizes (an extrapolation: the CUDA context "
           "and allocator fragmentation are not in it). Checks: the lock and the train state took effect.", ""]
    out += table_lines
    bad = [r for r in ok if any(get(r, f) is False for f, _ in _CHECKS)]
    if bad:
        out += ["", f"⚠ {plural(len(bad), 'trial')} failed a settings check:"]
        out += [f"- `{trial_label(r, axes)}`: {get(r, 'check_reason') or 'no reason recorded'}" for r in bad]
    return out + _ckpt_lines(ok, axes)
