"""Print one trial record as a rich table (for `suite bench` and `suite probe`). Light: no torch."""
from __future__ import annotations

import dataclasses

from suite.core.records import TrialRecord

# (label, field, format) per phase; fields that are None are left out.
ROWS = {
    "measure": [
        ("parameters (M)", "param_count", "{:.2f}"),
        ("trainable (M)", "trainable_param_count", "{:.2f}"),
        ("layer groups", "layer_groups", "{}"),
        ("features before head", "feature_shape", "{}"),
        ("weights", "weights_note", "{}"),
        ("infer samples/s", "infer_samples_per_sec", "{:,.1f}"),
        ("infer step ms (median ± IQR)", ("infer_step_time", "infer_step_time_iqr"), "{:.2f} ± {:.2f}"),
        ("infer batch", "infer_batch_size", "{}"),
        ("infer GMACs / image", "infer_gmacs", "{:.3f}"),
        ("infer TFLOP/s (MFU)", ("infer_tflops", "infer_mfu"), "{:.3f} ({:.1%})"),
        ("infer peak memory MiB", "infer_peak_mem_mib", "{:,.1f}"),
        ("train samples/s", "train_samples_per_sec", "{:,.1f}"),
        ("train step ms (median ± IQR)", ("train_step_time", "train_step_time_iqr"), "{:.2f} ± {:.2f}"),
        ("train batch", "train_batch_size", "{}"),
        ("train GMACs / image", "train_gmacs", "{:.3f}"),
        ("train TFLOP/s (MFU)", ("train_tflops", "train_mfu"), "{:.3f} ({:.1%})"),
        ("train peak memory MiB", "train_peak_mem_mib", "{:,.1f}"),
        ("device peak TFLOP/s", "device_peak_tflops", "{:.3f}"),
        ("MFU", "mfu_note", "{}"),
        ("memory method", "mem_method", "{}"),
        ("compile time s", "compile_time_s", "{:.1f}"),
    ],
    "probe": [
        ("top-1 %", "probe_top1", "{:.2f}"),
        ("top-5 %", "probe_top5", "{:.2f}"),
        ("balanced accuracy %", "probe_balanced_accuracy", "{:.2f}"),
        ("kNN top-1 %", "probe_knn_top1", "{:.2f}"),
        ("chosen C", "probe_C", "{:g}"),
        ("train / val / test", ("probe_n_train", "probe_n_val", "probe_n_test"), "{} / {} / {}"),
        ("classes", "probe_n_classes", "{}"),
        ("extraction images/s", "probe_extract_samples_per_sec", "{:,.1f}"),
        ("feature cache hit", "probe_cache_hit", "{}"),
        ("skipped images", "probe_skipped_images", "{}"),
    ],
}


def record_rows(record: TrialRecord, phase: str) -> list[tuple[str, str]]:
    """(label, text) for each `ROWS[phase]` entry whose fields were all measured, then any noisy phase."""
    values = {**dataclasses.asdict(record.measure), **dataclasses.asdict(record.probe)}
    rows = []
    for label, fields, fmt in ROWS[phase]:
        fields = (fields,) if isinstance(fields, str) else fields
        got = [values.get(f) for f in fields]
        if fields[-1].endswith("_mfu") and got[0] is not None and got[1] is None:
            rows.append((label, f"{got[0]:.3f} (MFU not shown)"))  # an impossible MFU is left empty: see mfu_note
            continue
        if any(v is None for v in got):
            continue
        rows.append((label, fmt.format(*got)))
    noisy = [p for p in ("infer", "train") if values.get(f"{p}_noisy")]
    if noisy:
        rows.append(("noisy timing", ", ".join(noisy) + " (IQR/median above the threshold)"))
    return rows


def show_record(record: TrialRecord, phase: str, console=None) -> None:
    """Print the record's rows, reason and environment as a table titled with its label and status."""
    # rich only when printing: `suite run --json` and the library never need it.
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    style = "green" if record.status == "ok" else "red"
    table = Table(title=f"{record.trial.label}  [{style}]{record.status}[/]", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, text in record_rows(record, phase):
        table.add_row(label, text)
    if record.reason:
        table.add_row("reason", record.reason)
    env = record.env
    table.add_row("environment",
                  f"{env.env_device} · torch {env.env_torch} · timm {env.env_timm} · {env.env_threads} threads")
    console.print(table)
