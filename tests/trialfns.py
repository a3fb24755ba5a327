"""Test-only trial functions for the runner tests, imported by name in worker processes.

The trial's `model` field picks the behaviour, so one function serves a whole sweep:
`ok*` returns an ok record at once, `crash*` calls `os._exit(3)`, `segv*` kills itself with
SIGSEGV, `hang*` sleeps forever, `raise*` raises, `wrong*` returns something that is not a record,
`slow*` sleeps `slow_s` then returns ok. The worker's PID, its CUDA_VISIBLE_DEVICES and
OMP_NUM_THREADS go in the record's `reason` so tests can see which worker ran what.
No torch here: the workers stay quick to start.
"""
from __future__ import annotations

import os
import signal
import time

from suite.core.records import Env, MeasureResult, ProbeResult, TrialRecord


def behave(trial, *, slow_s: float = 0.5, measured_s: float = 0.25, marker_dir: str | None = None,
           rate: float = 100.0) -> TrialRecord:
    """Act as the trial's model name says (see the module docstring)."""
    started = time.time()
    name = trial.model
    if marker_dir:  # a side file per trial that started, so a test can see what was in flight
        with open(os.path.join(marker_dir, f"{name}.{os.getpid()}"), "w"):
            pass
    if name.startswith("crash"):
        os._exit(3)
    if name.startswith("segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        while True:
            time.sleep(60)
    if name.startswith("raise"):
        raise RuntimeError(f"boom in {name}\nsecond line that must not show")
    if name.startswith("wrong"):
        return {"not": "a record"}
    if name.startswith("slow"):
        time.sleep(slow_s)
    reason = (f"pid={os.getpid()} cuda={os.environ.get('CUDA_VISIBLE_DEVICES', '-')} "
              f"threads={os.environ.get('OMP_NUM_THREADS', '-')}")
    return TrialRecord(trial, "ok", reason, MeasureResult(infer_samples_per_sec=rate, measured_time_s=measured_s),
                       ProbeResult(probe_top1=50.0, probe_time_s=0.5), fake_env("cpu"),
                       started_at=started, finished_at=time.time())


def noop(trial) -> TrialRecord:
    """The cheapest possible trial, for measuring the runner's own per-trial overhead."""
    return TrialRecord(trial, "ok")


def fake_env(device: str) -> Env:
    """A cheap stand-in for `suite.machine.env.capture_env` that marks the worker it ran in."""
    return Env(env_device=device, env_torch="fake", env_platform=f"worker-{os.getpid()}")


def broken_env(device: str) -> Env:
    raise OSError("no environment here")
