"""The device's measured dense matmul peak: the denominator of MFU.

Vendor peak figures are not reachable for a CPU (they depend on cores, clocks and the ISA) and
are optimistic for GPUs, so we measure: square matmuls at the trial's precision, as large as a
short time budget allows, best of several repetitions. The figure is cached on disk per device
name, precision, torch version and thread count (what changes it), so a sweep pays once.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from suite.core.options import sha256_json
from suite.core.paths import cache_dir as default_cache_dir
from suite.machine.device import AUTOCAST_DTYPES, check_precision
from suite.machine.env import cpu_model, device_name

_MEMO: dict[str, float] = {}  # per process and folder, so repeated trials do not even read the file


def _cache_key(device: str, precision: str) -> dict:
    key = {
        "device": device_name(device) if device == "cuda" else f"cpu: {cpu_model()}",
        "precision": precision,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if precision == "fp32":
        # TF32 changes the fp32 peak several-fold on NVIDIA GPUs. torch's newer `fp32_precision`
        # API says what is in force ("ieee" under strict fp32); the legacy query can be stale.
        mode = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
        key["float32_matmul_precision"] = mode if mode != "none" else torch.get_float32_matmul_precision()
    return key


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_matmul(a, b, out, reps: int, device: str) -> float:
    """Seconds for `reps` matmuls into a preallocated `out` (no allocation in the loop)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    _sync(device)
    return time.perf_counter() - start


def measure_peak_tflops(device: str, precision: str, *, budget_s: float = 1.5) -> float:
    """Measure the dense matmul peak now (uncached).

    Grows the matrix until one product takes about 1/30 of the budget (so it is compute bound),
    then times repetitions until the budget is spent and keeps the best.

    Args:
        device: 'cpu' or 'cuda'.
        precision: 'fp32', 'bf16' or 'fp16'.
        budget_s: rough wall-time budget of the timed part.
    """
    dtype = getattr(torch, AUTOCAST_DTYPES[precision] or "float32")  # fp32 runs no autocast: plain float32
    max_n = 8192 if device == "cuda" else 4096
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        _time_matmul(a, b, out, 1, device)  # first call: kernel selection, page faults
        one = _time_matmul(a, b, out, 1, device)
        if one >= budget_s / 30 or n >= max_n:
            break
        n *= 2
    reps = max(1, int(budget_s / 10 / max(one, 1e-6)))  # each repetition ~ a tenth of the budget
    best = one
    deadline = time.perf_counter() + budget_s
    for _ in range(10):
        best = min(best, _time_matmul(a, b, out, reps, device) / reps)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e12


def device_peak_tflops(device: str, precision: str, *, cache_dir: str | Path | None = None) -> float:
    """The device's dense matmul peak at `precision`, in TFLOP/s, measured once and cached.

    Args:
        device: 'cpu' or 'cuda' (already resolved, not 'auto').
        precision: 'fp32', 'bf16' or 'fp16'.
        cache_dir: where the JSON files go; default `suite.core.paths.cache_dir('roofline')`.

    Raises:
        SuiteError: not a precision name.
    """
    check_precision(precision)
    key = _cache_key(device, precision)
    folder = Path(default_cache_dir("roofline") if cache_dir is None else cache_dir)
    memo = f"{folder.resolve()}|{json.dumps(key, sort_keys=True)}"
    if memo in _MEMO:
        return _MEMO[memo]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"peak-{sha256_json(key)}.json"  # the same name as json.dumps(key, sort_keys=True) hashed
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            _MEMO[memo] = float(cached["tflops"])
            return _MEMO[memo]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: measure again
    tflops = measure_peak_tflops(device, precision)
    record = {"key": key, "tflops": tflops, "measured_at": time.time()}
    # Write then rename: parallel workers never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    _MEMO[memo] = tflops
    return tflops


def forget_peaks() -> None:
    """Forget the peaks this process has looked up: the next lookup reads the cache file (as a new process would)."""
    _MEMO.clear()


def fast_cpu_fp16() -> bool:
    """Whether this CPU multiplies fp16 in hardware (AMX-FP16); elsewhere fp16 matmuls are emulated."""
    check = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001 - a private probe: unknown means "no"
        return False


def utilisation(phase: str, tflops: float, peak_tflops: float, device: str, precision: str,
                *, fast_fp16: bool | None = None) -> tuple[float | None, str | None]:
    """MFU (achieved / measured peak) of a phase, or None and the reason it would not be a utilisation.

    A figure above 100% cannot be right: the measured matmul peak does not describe what ran (fp16 on a
    CPU without fast fp16 is the usual case: the emulated fp16 matmul is slow, and CPU autocast runs
    convolutions and most other ops in fp32). Such an MFU is left empty with the reason, never shown.
    """
    if device == "cpu" and precision == "fp16" and not (fast_cpu_fp16() if fast_fp16 is None else fast_fp16):
        return None, (f"{phase} MFU not shown: fp16 on a CPU without fast fp16 (no AMX-FP16): its fp16 matmul is "
                      f"emulated (measured peak {peak_tflops:.3g} TFLOP/s) and autocast runs most ops in fp32, so "
                      "no peak describes this run; use bf16 or fp32 on CPU")
    if not peak_tflops or peak_tflops <= 0 or peak_tflops != peak_tflops:
        return None, f"{phase} MFU not shown: no valid device peak was measured ({peak_tflops!r})"
    mfu = tflops / peak_tflops
    if mfu > 1.0:
        return None, (f"{phase} MFU not shown: achieved {tflops:.3g} TFLOP/s is {mfu:.0%} of the measured {precision} "
                      f"matmul peak ({peak_tflops:.3g} TFLOP/s), which cannot be: the peak does not describe what ran")
    return mfu, None
