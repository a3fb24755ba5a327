"""What every check shares: its record, the run context, time caps, child processes, helpers.

A check is a function `fn(ctx) -> Result`. It never needs to catch its own failures: the runner
(`run_check`) turns an exception into a FAIL with the one-line reason and the traceback, and a
check that runs past its cap into a FAIL naming the cap.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmarks.shared import run_module

STATUSES = ("PASS", "FAIL", "SKIP")


@dataclass
class Result:
    """The outcome of one check: a status, its headline figure, every figure, and notes."""

    status: str
    figure: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the traceback of a check that raised


def verdict(ok: bool, figure: str, figures: dict[str, Any], notes: list[str] | None = None) -> Result:
    """PASS when `ok`, else FAIL, with the same figure either way."""
    return Result("PASS" if ok else "FAIL", figure, figures, list(notes or []))


def skipped(reason: str, figures: dict[str, Any] | None = None, notes: list[str] | None = None) -> Result:
    return Result("SKIP", reason, dict(figures or {}), list(notes or []))


@dataclass(frozen=True)
class Check:
    """One entry of the registry.

    Attributes:
        name: short id (`--only NAME`).
        criterion: the pass criterion in a line (`--list`, gpu_check.md).
        fn: the check.
        cap_s: the longest it may run; past it the check FAILs.
        needs_cuda: without CUDA the check is a SKIP and `fn` is not called.
        stage: `timed` checks run first on a quiet machine; the test suite starts in the background
            before the `untimed` ones; `final` ones run last (the test suite's result, the sweep).
        detail: the criterion in full where the line leaves something out (the README's table).
    """

    name: str
    criterion: str
    fn: Callable[["Context"], Result]
    cap_s: float
    needs_cuda: bool = True
    stage: str = "timed"
    detail: str = ""


@dataclass
class Context:
    """The state of one run of the script."""

    out: Path
    cuda: bool
    budget_s: float
    experiment: Path
    started: float = field(default_factory=time.perf_counter)
    memo: dict = field(default_factory=dict)  # measured results shared between checks
    card: str = "cpu"
    selected: tuple[str, ...] = ()  # the names of the checks this run runs
    background: dict = field(default_factory=dict)  # name -> background job (the test suite)

    @property
    def cache_dir(self) -> Path:
        """Roofline and feature caches of this run (kept under --out, so they come back too)."""
        return self.out / "cache"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


class CheckTimeout(BaseException):
    """A check ran past its cap. BaseException: the suite's `except Exception` must not record it."""


@contextmanager
def time_cap(seconds: float, exc: type[BaseException] = CheckTimeout) -> Iterator[None]:
    """Raise `exc` in this (main) thread after `seconds` (between Python bytecodes).

    One timer per process: a nested cap replaces the outer one (give it the shorter time).
    """
    def _raise(signum, frame):
        raise exc(f"ran past its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release() -> None:
    """Free what a check left (garbage, the CUDA cache) without creating a CUDA context."""
    from suite.sweep.trial import release_memory

    release_memory()


def run_check(ctx: Context, check: Check) -> tuple[Result, float, float]:
    """Run one check under its cap; return (result, elapsed seconds, the cap it ran under)."""
    cap = min(check.cap_s, ctx.remaining())
    t0 = time.perf_counter()
    if check.needs_cuda and not ctx.cuda:
        return skipped("no CUDA: GPU check not run"), 0.0, cap
    if cap < 5:
        return skipped(f"out of the overall budget ({ctx.budget_s:.0f} s)"), 0.0, cap
    try:
        with time_cap(cap):
            result = check.fn(ctx)
    except (Exception, CheckTimeout) as exc:  # noqa: BLE001 - a failing check is a record
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = Result("FAIL", f"{type(exc).__name__}: {text}"[:300], error=traceback.format_exc()[-4000:])
    try:
        release()
    except Exception as exc:  # noqa: BLE001 - e.g. a sticky CUDA error: every later check will say so
        result.notes.append(f"cleanup after the check failed: {exc}")
    return result, time.perf_counter() - t0, cap


# --- child processes ----------------------------------------------------------------------------

def run_child(ctx: Context, case: str, args: dict, timeout_s: float) -> dict:
    """Run `child_cases.CASES[case](**args)` in a fresh Python process; return its JSON result.

    Raises:
        RuntimeError: the child failed (its stderr's tail is in the message) or ran past `timeout_s`.
    """
    return run_module("benchmarks.gpu_check", ["--child", case, "--child-args", json.dumps(args), "--out", str(ctx.out)],
                      timeout_s=timeout_s)


# --- small numeric and torch helpers ----------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def within(r: float | None, tolerance: float) -> bool:
    """Whether a ratio is within `tolerance` of 1 (None never is)."""
    return r is not None and abs(r - 1) <= tolerance


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded for the JSON and the tables (recursively); everything else as is."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def trial(**kw):
    """A `suite.core.options.Trial` on CUDA with random init (no network on the GPU machine)."""
    from suite.core.options import Trial

    kw.setdefault("device", "cuda")
    kw.setdefault("pretrained", False)
    return Trial(**kw)


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def sdpa_backend(name: str):
    """A context that forces one SDPA backend, or None where this torch does not have it.

    `torch.nn.attention.sdpa_kernel` (torch >= 2.3), else `torch.backends.cuda.sdp_kernel` (2.0-2.2,
    which has no cuDNN backend).
    """
    import torch

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        if name == "cudnn":
            return None
        return torch.backends.cuda.sdp_kernel(enable_flash=name == "flash", enable_mem_efficient=name == "efficient",
                                              enable_math=False)
    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    return None if backend is None else sdpa_kernel(backend)


def gpu_state() -> dict[str, str] | None:
    """The card's temperature, clocks, power and clock-event (throttle) reasons now (nvidia-smi), or None."""
    def query(fields: tuple[str, ...]) -> dict[str, str] | None:
        try:
            done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                   "--id=0"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        values = [v.strip() for v in done.stdout.strip().split(",")]
        return dict(zip(fields, values)) if done.returncode == 0 and len(values) == len(fields) else None

    state = query(("temperature.gpu", "clocks.sm", "clocks.mem", "power.draw"))
    if state is not None:  # the reasons' field was renamed (driver 535+); either name, where known
        state.update(query(("clocks_event_reasons.active",)) or query(("clocks_throttle_reasons.active",)) or {})
    return state


def gpu_event_rate(step: Callable, x, warmup: int, iters: int) -> float:
    """Samples/s of `step(x)` timed with one CUDA event pair around `iters` steps (no host sync inside)."""
    import torch

    for _ in range(warmup):
        step(x)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        step(x)
    end.record()
    end.synchronize()
    return x.shape[0] * iters / (begin.elapsed_time(end) / 1e3)
