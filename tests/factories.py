"""What tests share: records built from the contract dataclasses directly (no torch), stores, trials,
an image folder of digits, and the command line run in process."""
from __future__ import annotations

from pathlib import Path

from suite.core.options import Trial
from suite.core.records import Env, MeasureResult, ProbeResult, TrialRecord, field_names
from suite.results.store import ResultStore

CPU = dict(env_device="cpu", env_torch="2.14.1", env_timm="1.0.31", env_cpu="AMD EPYC", env_threads=2,
           env_python="3.11.7", env_platform="Linux")
GPU = dict(CPU, env_device="NVIDIA H100 80GB HBM3", env_cuda="12.8", env_driver="570.86")

_TRIAL = set(field_names(Trial))
_MEASURE, _PROBE, _ENV = set(field_names(MeasureResult)), set(field_names(ProbeResult)), set(field_names(Env))


def make_record(model: str = "test_vit", status: str = "ok", reason: str = "", *, env: dict | None = None,
                finished_at: float = 1_700_000_000.0, **fields) -> TrialRecord:
    """A TrialRecord from keyword fields, each routed to Trial, MeasureResult, ProbeResult or Env.

    An ok record gets plausible results unless given: throughput 100/300 img/s with 2% step-time
    IQR, 1000/300 MiB, probe top-1 50%.
    """
    unknown = set(fields) - _TRIAL - _MEASURE - _PROBE - _ENV
    assert not unknown, f"make_record: unknown fields {unknown}"
    if status == "ok":
        train, infer = fields.get("train_samples_per_sec", 100.0), fields.get("infer_samples_per_sec", 300.0)
        defaults = dict(
            train_samples_per_sec=train, train_step_time=32_000.0 / train, train_step_time_iqr=640.0 / train,
            infer_samples_per_sec=infer, infer_step_time=32_000.0 / infer, infer_step_time_iqr=640.0 / infer,
            train_peak_mem_mib=1000.0, infer_peak_mem_mib=300.0, infer_gflops=1.5, train_mfu=0.1, infer_mfu=0.2,
            train_batch_size=32, infer_batch_size=32, param_count=5.0, probe_top1=50.0,
        )
        fields = {**defaults, **fields}
    pick = lambda names: {k: v for k, v in fields.items() if k in names}  # noqa: E731
    return TrialRecord(
        Trial(model=model, **pick(_TRIAL)), status, reason,
        measure=MeasureResult(**pick(_MEASURE)), probe=ProbeResult(**pick(_PROBE)),
        env=Env(**{**(env or CPU), **pick(_ENV)}), started_at=finished_at - 10, finished_at=finished_at,
    )


def write_store(path: Path, records, meta: dict | None = None) -> Path:
    with ResultStore(path) as store:
        for r in records:
            store.write(r)
        for k, v in (meta or {}).items():
            store.set_meta(k, v)
    return path


def data_trial(**kw) -> Trial:
    kw.setdefault("model", "test_vit")
    kw.setdefault("image_size", 32)
    return Trial(**kw)


def digits_trial(**kw) -> Trial:
    base = dict(model="test_vit", image_size=32, dataset="digits", max_per_class=20, device="cpu",
                probe_batch_size=64)
    base.update(kw)
    return Trial(**base)


def write_digits_folder(root: Path, classes=(0, 1, 2), per_class: int = 6, splits: tuple[str, ...] = (),
                        size: int = 16) -> Path:
    """Write digits as PNG files: root/<class>/<i>.png, or root/<split>/<class>/<i>.png."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for split in splits or ("",):
        for c in classes:
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(d.target == c)
            offset = {"": 0, "train": 0, "val": per_class, "test": 2 * per_class}[split]
            for i in idx[offset:offset + per_class]:
                img = np.round(d.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((size, size)).save(folder / f"{i}.png")
    return root


def run_cli(*argv: str):
    """`suite ARGV` in this process (the command line is `suite.cli.main.main`; a fresh interpreter would only
    import torch again): its exit code and what it printed. `test_import_suite_and_cli_help_do_not_import_torch`
    and the sweep tests run the real executable."""
    import contextlib
    import io
    import subprocess

    from suite.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["suite", *argv], code, out.getvalue(), err.getvalue())
