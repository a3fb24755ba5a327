"""One trial, start to finish, turned into a record: the function every worker runs.

A failure is a record, not a crash: a configuration that cannot run as asked is `skipped`, an
out-of-memory is `oom`, any other exception is `error` with its one-line message. Whatever was
measured before the failure (e.g. the probe) is kept in the record.

Light at import (torch, timm and the measuring modules are imported on a trial's first use): the
sweep driver imports this module, through the runner's workers, for `release_memory`.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from suite.core.errors import DatasetError, UnsupportedConfig, one_line
from suite.core.records import Env, MeasureResult, ProbeResult, TrialRecord
from suite.machine.allocator import steady_allocator
from suite.machine.device import cuda_in_use, resolve_device
from suite.machine.env import capture_env


def classify(exc: BaseException) -> tuple[str, str]:
    """Map an exception to (status, reason)."""
    from suite.measurement.memory import is_oom  # imports torch

    if isinstance(exc, UnsupportedConfig):
        return "skipped", str(exc).strip().splitlines()[0]
    if is_oom(exc):
        return "oom", one_line(exc)
    if isinstance(exc, DatasetError):
        return "error", str(exc).strip().splitlines()[0]
    return "error", one_line(exc)


def trial_env(device: str) -> Env:
    """The environment this process measures trials in, for every record it makes or reports.

    Measuring holds the C allocator steady (`suite.machine.allocator`), and the allocator is part of the
    environment's key, so it is held steady here first: a worker's first record, its later ones,
    the records the driver makes for it (crashed, timeout) and the key the sweep resumes by agree.
    """
    steady_allocator()
    return capture_env(device)


def release_memory() -> None:
    """Free what a trial left behind so the next trial in this worker starts clean.

    CUDA caches are reset only where this process already uses CUDA: `synchronize()` on a GPU
    machine would otherwise give a CPU trial's worker a CUDA context of its own.
    """
    gc.collect()
    if cuda_in_use():
        torch = sys.modules["torch"]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


_FROZEN = False


def _freeze_imports() -> None:
    """Move everything imported so far (torch, timm, ...) out of the garbage collector's sight.

    A full `gc.collect()` scans every object of torch and timm (~0.1 s each time); a worker
    collects several times per trial to measure memory honestly. Frozen once per process,
    before any trial builds a tower, so nothing a trial creates is frozen with them.
    """
    global _FROZEN
    if not _FROZEN:
        import timm  # noqa: F401 - imported here so its objects are frozen too
        import torch  # noqa: F401

        import suite.measurement.engine  # noqa: F401
        import suite.probe.engine  # noqa: F401
        import suite.tower.model  # noqa: F401

        gc.collect()
        gc.freeze()
        _FROZEN = True


def run_trial(trial, *, cache_dir: str | Path | None = None) -> TrialRecord:
    """Probe (if the trial has a dataset), then measure; never raises for a trial's own failure.

    The probe runs first, on a freshly built tower: measuring a training step changes the weights,
    and the probe's feature cache assumes the untouched function.
    """
    from suite.measurement.engine import measure  # imports torch and timm

    started = time.time()
    _freeze_imports()
    probe, result = ProbeResult(), MeasureResult()
    status, reason = "ok", ""
    try:
        device = resolve_device(trial.device)
    except Exception as exc:  # e.g. cuda asked for on a machine without it
        return TrialRecord(trial, "skipped", one_line(exc), started_at=started, finished_at=time.time())
    env = trial_env(device)
    try:
        if trial.dataset != "none":
            from suite.probe.engine import probe_trial

            probe = probe_trial(trial, device=device, cache_dir=_sub(cache_dir, "features"))
        import torch

        torch.manual_seed(trial.seed)  # the same random-init weights as the probe's tower
        result = measure(trial, cache_dir=_sub(cache_dir, "roofline"))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record
        status, reason = classify(exc)
    status, reason = _cleaned_up(status, reason)
    return TrialRecord(trial, status, reason, result, probe, env, started_at=started, finished_at=time.time())


def _cleaned_up(status: str, reason: str) -> tuple[str, str]:
    """Release the trial's memory; a failing cleanup (a sticky CUDA error) never hides the real status.

    The trial's own failure stays its status, with the cleanup's failure added to the reason; an ok
    trial whose cleanup fails becomes an error (the device is unusable for the next trial).
    """
    try:
        release_memory()
    except Exception as exc:  # noqa: BLE001 - e.g. "CUDA error: an illegal memory access" again
        if status == "ok":
            return "error", f"cleanup after the trial failed: {one_line(exc)}"
        return status, f"{reason}; cleanup also failed: {one_line(exc)}"
    return status, reason


def _sub(cache_dir, name: str):
    return None if cache_dir is None else Path(cache_dir) / name
