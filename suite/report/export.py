"""Exports of a results store for other tools.

    csv, parquet        every column of every row (parquet needs pyarrow)
    timm-csv            timm's benchmark.py columns, so rows line up with timm's published CSVs
    pytest-benchmark    a saved run that `pytest-benchmark compare` reads (one benchmark per ok trial
                        and phase; see `_pytest_benchmark` for what each statistic means here)
    open-clip-config    an open_clip model config ({embed_dim, vision_cfg}) of one trial, so the
                        tower trains with open_clip as it was measured, plus the matching
                        open_clip training flags in a `.train-args.txt` file beside it (and, where
                        open_clip cannot build the measured tower, what it builds instead)

This module must stay light: no torch, except open-clip-config, which builds trunks on the meta device.
"""
from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from suite.core.errors import MissingDependency, SuiteError, suggest
from suite.core.paths import check_output, output_file, write_text
from suite.experiment.criteria import parse_select
from suite.report.analysis import last_finished
from suite.report.selection import apply_select
from suite.results.rows import get, num, plain, rows_of, trial_label, varying_axes
from suite.results.store import load_meta, load_results, resolve_path

FORMATS = ("csv", "parquet", "timm-csv", "pytest-benchmark", "open-clip-config")
DEFAULT_NAMES = {
    "csv": "results.csv",
    "parquet": "results.parquet",
    "timm-csv": "results-timm.csv",
    "pytest-benchmark": "results-pytest-benchmark.json",
}
# timm benchmark.py's columns (its published CSVs use these names, units and rounding), and
# train_gmacs, the suite's own (forward + backward per image: timm's train CSVs have no MACs).
TIMM_COLUMNS = (
    ("model", None), ("infer_img_size", None), ("infer_batch_size", None), ("infer_samples_per_sec", 2),
    ("infer_step_time", 3), ("infer_gmacs", 2), ("param_count", 2), ("train_img_size", None),
    ("train_batch_size", None), ("train_samples_per_sec", 2), ("train_step_time", 3), ("train_gmacs", 2),
)
# suite precision -> open_clip training --precision (the suite's bf16/fp16 are autocast).
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}


def _filter(df, trial_id: str | None):
    if not trial_id:
        return df
    mask = [str(t).startswith(trial_id) for t in df["trial_id"]]
    if not any(mask):
        raise SuiteError(f"no trial_id starts with {trial_id!r}; stored ids: {_some_ids(df)}")
    return df[mask]


def _some_ids(df) -> str:
    ids = sorted({str(t) for t in df["trial_id"]})
    return ", ".join(ids[:8]) + (f" (+{len(ids) - 8} more)" if len(ids) > 8 else "") if ids else "none"


def _finished(df) -> str:
    when = datetime.fromtimestamp(last_finished(df) or 0, tz=timezone.utc)
    return when.isoformat()


# --- csv / parquet ---------------------------------------------------------------------------


def _parquet_safe(df):
    """Object columns holding several types (e.g. pretrained: bool or str) become JSON text."""
    out = df.copy()
    for name in out.columns:
        if out[name].dtype != object:
            continue
        kinds = {type(plain(v)) for v in out[name] if plain(v) is not None}
        if len(kinds - {int, float}) > 1 or (kinds & {int, float} and kinds - {int, float}):
            out[name] = [None if plain(v) is None else json.dumps(plain(v)) for v in out[name]]
    return out


# --- timm-csv --------------------------------------------------------------------------------


def _timm_rows(df) -> list[dict[str, Any]]:
    """Ok trials only (timm drops failures too), fastest inference first as timm sorts."""
    ok = [r for r in rows_of(df) if get(r, "status") == "ok"]
    key = "infer_samples_per_sec" if any(num(get(r, "infer_samples_per_sec")) for r in ok) else "train_samples_per_sec"
    ok.sort(key=lambda r: (-(num(get(r, key)) or 0.0), str(get(r, "trial_id"))))
    axes = varying_axes(df)
    out = []
    for r in ok:
        row = {}
        for name, digits in TIMM_COLUMNS:
            value = plain(get(r, name))
            if isinstance(value, float) and digits is None and value.is_integer():
                value = int(value)
            elif digits is not None and num(value) is not None:
                value = round(num(value), digits)
            row[name] = value
        # Several trials share a model (pool, proj, ...): these keep the rows apart.
        row["trial_id"] = get(r, "trial_id")
        row["config"] = " ".join(trial_label(r, axes).split(" ")[1:])
        out.append(row)
    return out


# --- pytest-benchmark ------------------------------------------------------------------------

STATS_NOTE = (
    "Exported by timm-tower-suite, which stores the median step time and its IQR, not every step. "
    "Times are seconds per step (one batch). median and iqr are measured; q1/q3 = median -/+ iqr/2 "
    "(symmetric quartiles assumed); min/max and ld15iqr/hd15iqr are q1/q3 (the extremes were not "
    "stored); mean = median; stddev = iqr/1.349 (normal-equivalent); rounds = timed iterations; "
    "outlier counts unknown (0). Gate on median and iqr."
)


def _benchmark(r, phase: str, axes: list[str]) -> dict[str, Any] | None:
    """One pytest-benchmark entry: a trial's phase, or None when the phase was not timed."""
    med = num(get(r, f"{phase}_step_time"))
    if med is None or med <= 0:
        return None
    med /= 1000.0
    iqr = (num(get(r, f"{phase}_step_time_iqr")) or 0.0) / 1000.0
    q1, q3 = max(med - iqr / 2, 0.0), med + iqr / 2
    rounds = int(num(get(r, f"{phase}_timed_steps")) or num(get(r, "iters")) or 1)
    label = trial_label(r, axes)
    return {
        "group": phase,
        "name": f"{phase}[{label}]",
        "fullname": f"suite::{get(r, 'model')}::{get(r, 'trial_id')}::{phase}",
        "params": {a: plain(get(r, a)) for a in axes},
        "param": label,
        "extra_info": {
            "trial_id": get(r, "trial_id"),
            "samples_per_sec": num(get(r, f"{phase}_samples_per_sec")),
            "batch_size": plain(get(r, f"{phase}_batch_size")),
            "peak_mem_mib": num(get(r, f"{phase}_peak_mem_mib")),
            "note": STATS_NOTE,
        },
        "options": {"disable_gc": False, "timer": "suite (median step time)", "min_rounds": rounds,
                    "max_time": None, "min_time": None, "warmup": plain(get(r, "warmup"))},
        "stats": {
            "min": q1, "max": q3, "mean": med, "stddev": iqr / 1.349, "rounds": rounds, "median": med,
            "iqr": iqr, "q1": q1, "q3": q3, "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0",
            "ld15iqr": q1, "hd15iqr": q3, "ops": 1.0 / med, "total": med * rounds, "iterations": 1,
        },
    }


def _env(row, name: str) -> Any:
    """An environment field of `row`, None without a row (an empty store)."""
    return plain(get(row, name)) if row is not None else None


def _machine_info(first) -> dict[str, Any]:
    """pytest-benchmark's machine_info from the environment of the run's first trial."""
    def env(name: str) -> Any:
        return _env(first, name)

    return {
        "node": "", "processor": env("env_cpu") or "", "machine": "", "python_compiler": "",
        "python_implementation": "CPython", "python_implementation_version": env("env_python") or "",
        "python_version": env("env_python") or "", "python_build": [], "release": "",
        "system": env("env_platform") or "",
        "cpu": {"brand_raw": env("env_cpu") or "", "count": env("env_threads")},
        "suite_env": {k: env(f"env_{k}") for k in ("device", "driver", "torch", "timm", "cuda", "cudnn")},
    }


def _pytest_benchmark(df) -> dict[str, Any]:
    rows = rows_of(df)
    envs = sorted({str(get(r, "env_key")) for r in rows})
    if len(envs) > 1:
        raise SuiteError(
            f"the results hold {len(envs)} environments ({'; '.join(envs)}); a pytest-benchmark file describes "
            "one machine: export each environment's results from its own store"
        )
    axes = varying_axes(df)
    benchmarks = [b for r in rows if get(r, "status") == "ok"
                  for b in (_benchmark(r, phase, axes) for phase in ("infer", "train")) if b is not None]
    try:
        pb_version = version("pytest-benchmark")
    except PackageNotFoundError:  # the format, not the package, matters; 4.x and 5.x read the same layout
        pb_version = "4.0.0"
    first = rows[0] if rows else None
    return {
        "machine_info": _machine_info(first),
        "commit_info": {"id": _env(first, "env_git_commit") or "unknown", "time": None, "author_time": None,
                        "dirty": False, "project": "timm-tower-suite", "branch": "(unknown)"},
        "benchmarks": benchmarks,
        "datetime": _finished(df),
        "version": pb_version,
        "note": STATS_NOTE,
    }


# --- open-clip-config ------------------------------------------------------------------------


def _chosen_trial(df, db_path: Path, trial_id: str | None):
    if trial_id:
        rows = rows_of(_filter(df, trial_id))
        ids = sorted({str(get(r, "trial_id")) for r in rows})
        if len(ids) > 1:
            raise SuiteError(f"trial_id prefix {trial_id!r} matches {len(ids)} trials ({', '.join(ids[:5])}); "
                             "give more characters")
    else:
        block = (load_meta(db_path).get("experiment") or {}).get("select")
        if not block:
            raise SuiteError(f"{db_path}: the experiment has no select block, so there is no best trial; "
                             "pass trial_id (see the report's tables)")
        best = apply_select(df, parse_select(block)).best
        if best is None:
            raise SuiteError(f"{db_path}: no trial meets the select block's constraints; pass trial_id")
        rows = [best]
    row = rows[0]
    if get(row, "status") != "ok":
        raise SuiteError(f"trial {get(row, 'trial_id')} has status {get(row, 'status')} "
                         f"({get(row, 'reason')}): export a trial that ran ok")
    return row


def open_clip_config(row) -> tuple[dict[str, Any], list[str]]:
    """The open_clip model config of a trial, and the notes/flags that the config cannot hold."""
    model, pretrained = str(get(row, "model")), plain(get(row, "pretrained"))
    notes = []
    timm_pretrained = False
    if pretrained is True:
        timm_pretrained = True
    elif isinstance(pretrained, str) and pretrained:
        if "/" in pretrained or "\\" in pretrained or pretrained.endswith((".pth", ".pt", ".bin", ".safetensors")):
            notes.append(f"# measured with trunk weights from the file {pretrained}; the config cannot name a file: "
                         "load them yourself (e.g. open_clip.create_model(..., pretrained_image_path=...))")
        else:  # a hub tag: timm takes it as part of the model name
            model, timm_pretrained = f"{model}.{pretrained}", True
    drop_path, patch_drop = num(get(row, "drop_path")), num(get(row, "patch_drop"))
    vision = {
        "timm_model_name": model,
        "timm_model_pretrained": timm_pretrained,
        "timm_pool": str(get(row, "pool") if get(row, "pool") is not None else ""),
        "timm_proj": str(get(row, "proj")),
        "timm_proj_bias": bool(get(row, "proj_bias")),
        "timm_drop": float(num(get(row, "drop")) or 0.0),
        "timm_drop_path": drop_path,
        "patch_dropout": float(patch_drop or 0.0),
        "image_size": int(num(get(row, "image_size"))),
    }
    config = {"embed_dim": int(num(get(row, "embed_dim"))), "vision_cfg": vision}

    flags = []
    lock = num(get(row, "unlocked_groups"))
    if lock is not None:  # None: not locked; 0: locked with no group unlocked
        flags += ["--lock-image", f"--lock-image-unlocked-groups {int(lock)}"]
        if get(row, "freeze_bn_stats"):
            flags.append("--lock-image-freeze-bn-stats")
    if get(row, "grad_checkpointing"):
        flags.append("--grad-checkpointing")
    precision = str(get(row, "precision"))
    flags.append(f"--precision {OPEN_CLIP_PRECISION.get(precision, precision)}")
    batch = num(get(row, "train_batch_size")) or num(get(row, "batch_size"))
    if batch:
        flags.append(f"--batch-size {int(batch)}")
    if get(row, "compile"):
        flags.append("--torchcompile")
    if get(row, "channels_last"):
        notes.append("# measured with channels_last memory format (open_clip training has no flag for it)")
    return config, [" ".join(flags)] + notes


def open_clip_build_note(row) -> str | None:
    """What open_clip builds from the exported config, when that is not the tower that was measured.

    open_clip's `TimmModel` (3.3) never passes `image_size` to timm, so a trunk whose weights depend on
    the input size (a ViT's position embedding; `abs_attn` pooling) is built at timm's default size.
    Imports timm (and torch); the trunks are built on the meta device, so this is quick and allocates nothing.
    """
    import timm
    import torch

    model, size, pool = str(get(row, "model")), int(num(get(row, "image_size"))), get(row, "pool")
    cfg = timm.models.get_pretrained_cfg(model)
    default = int(cfg.input_size[-1]) if cfg is not None else 224
    if size == default:
        return None
    with torch.device("meta"):
        built = timm.create_model(model).state_dict()
        try:
            measured = timm.create_model(model, img_size=size).state_dict()
        except TypeError:  # the model takes no img_size: its weights do not depend on it
            measured = built
    diff = [f"{k} {tuple(built[k].shape)} vs {tuple(v.shape)} measured" for k, v in measured.items()
            if k in built and built[k].shape != v.shape]
    if pool == "abs_attn":
        diff.append("the abs_attn pool's positional embedding, sized from timm's default pool_size")
    if not diff:
        return None
    tower = (f"suite.tower.model.TimmTower({model!r}, embed_dim={int(num(get(row, 'embed_dim')))}, image_size={size}, "
             f"pool={pool!r}, proj={get(row, 'proj')!r}, proj_bias={bool(get(row, 'proj_bias'))})")
    return (f"open_clip does not build the measured tower from this config: its TimmModel does not pass image_size "
            f"to timm, so it builds {model} at timm's default {default} px ({'; '.join(diff[:2])}), and the weights "
            f"of the {size}-px tower that was measured do not load into it. To train the measured tower, replace "
            f"open_clip's: model.visual = {tower} (open_clip TimmModel-compatible); or measure at {default} px.")


# --- entry point -----------------------------------------------------------------------------


def _write_open_clip(df, db: Path, out_path: str | Path | None, trial_id: str | None) -> Path:
    """The chosen trial's open_clip config, and its training flags in a `.train-args.txt` beside it."""
    row = _chosen_trial(df, db, trial_id)
    name = f"open_clip-{str(get(row, 'trial_id'))[:8]}.json"
    out = check_output(out_path, protect=(db,), folder_name=name) if out_path else db.parent / name
    check_output(out.with_name(out.stem + ".train-args.txt"), protect=(db,))
    out = output_file(out, name)
    config, extra = open_clip_config(row)
    note = open_clip_build_note(row)
    if note:
        extra.append(f"# WARNING: {note}")
        print(f"warning: {out}: {note}", file=sys.stderr)
    write_text(out, json.dumps(config, indent=4) + "\n")
    args = out.with_name(out.stem + ".train-args.txt")
    write_text(args, f"# open_clip training flags for trial {get(row, 'trial_id')} "
                    f"({trial_label(row, varying_axes(df))}), as it was measured\n" + "\n".join(extra) + "\n")
    return out


def _require_rows(df, db: Path, fmt: str, trial_id: str | None) -> None:
    """Refuse an export that would write no result (an empty file with exit 0 looked like a success):
    csv and parquet hold every row, whatever its status; timm-csv and pytest-benchmark only ok trials."""
    statuses = Counter(str(get(r, "status")) for r in rows_of(df))
    if statuses.get("ok") or (statuses and fmt in ("csv", "parquet")):
        return
    held = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no trials at all"
    what = "no trial" if not statuses else f"no trial that ran ok, and {fmt} exports only those"
    raise SuiteError(f"{db}{f' (trials {trial_id}*)' if trial_id else ''} holds {what} ({held}): nothing to "
                     "export" + ("; `suite report` shows why the trials failed" if statuses else ""))


def _write_table(df, fmt: str, out: Path) -> None:
    """Every row (csv, parquet), timm's columns (timm-csv) or a pytest-benchmark run."""
    if fmt == "csv":
        df.to_csv(out, index=False)
    elif fmt == "parquet":
        try:
            _parquet_safe(df).to_parquet(out, index=False)
        except ImportError as e:
            raise MissingDependency(f"parquet export needs pyarrow: pip install 'timm-tower-suite[parquet]' ({e})") from None
    elif fmt == "timm-csv":
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[c for c, _ in TIMM_COLUMNS] + ["trial_id", "config"])
            writer.writeheader()
            writer.writerows(_timm_rows(df))
    elif fmt == "pytest-benchmark":
        out.write_text(json.dumps(_pytest_benchmark(df), indent=2) + "\n")


def export(db_path: str | Path, fmt: str, out_path: str | Path | None = None, *, trial_id: str | None = None) -> Path:
    """Write the results of a store in another tool's format.

    Args:
        db_path: results.sqlite or the folder that holds it.
        fmt: one of FORMATS.
        out_path: the file to write, or a folder to write it in (default: beside the database); never
            the database itself, another results store, or a folder in the way.
        trial_id: only trials whose id starts with this; for open-clip-config, the trial to export
            (default: the select block's best).

    Returns:
        The path written.

    Raises:
        SuiteError: an unknown format, an output path that cannot or must not be written, or a store
            without any ok trial (exit 2 on the CLI).
    """
    if fmt not in FORMATS:
        raise SuiteError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}{suggest(fmt, FORMATS, n=1)}")
    db = resolve_path(db_path)
    df = load_results(db)
    if fmt == "open-clip-config":  # checks its own outputs (named after the trial) before writing
        return _write_open_clip(df, db, out_path, trial_id)
    if out_path:  # before any work: never a folder in the way, the database itself or another store
        check_output(out_path, protect=(db,), folder_name=DEFAULT_NAMES[fmt])
    df = _filter(df, trial_id)
    _require_rows(df, db, fmt, trial_id)
    out = output_file(out_path, DEFAULT_NAMES[fmt]) if out_path else db.parent / DEFAULT_NAMES[fmt]
    try:
        _write_table(df, fmt, out)
    except OSError as e:
        raise SuiteError(f"cannot write {out}: {e.strerror or e}; choose another output path") from None
    return out
