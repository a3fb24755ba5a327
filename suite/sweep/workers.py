"""What both backends share about running a trial away from the driver, and the local worker's loop.

The driver never runs a trial itself: it stays light (no torch) and survives whatever a trial
does. Everything that runs in a worker (a local worker process or a Ray task) goes through
`load_fn` and `call_trial`; the records the driver makes itself (crashed, timeout) come from
`synthesised`, with the environment a worker reported through `capture_worker_env`.

- `TrialResults`: what a run returns (its records, plus how it ended).
- `load_fn`, `call_trial`, `synthesised`, `capture_worker_env`, `common_device`: trial plumbing.
- `sigterm_as_interrupt`: SIGTERM stops a sweep as Ctrl-C does.
- `call_in_child`: one call in a fresh process, for the driver's own torch work (its environment).
- `worker_main`: the body of a local worker process (the pool lives in `suite.sweep.pool`).
"""
from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from suite.core.errors import SuiteError, one_line
from suite.core.records import Env, TrialRecord
from suite.sweep.trial import release_memory

DEFAULT_FN = "suite.sweep.trial:run_trial"
DEFAULT_ENV_FN = "suite.sweep.trial:trial_env"


class TrialResults(list):
    """The records of a run, in the order they finished (a plain list, plus how the run ended).

    Attributes:
        interrupted: the run was stopped (Ctrl-C / SIGTERM) before every trial finished.
        wall_time_s: wall time of the whole run, worker start-up included.
        measured_time_s: sum over records of measured time plus probe time.
    """

    interrupted: bool = False
    wall_time_s: float = 0.0
    measured_time_s: float = 0.0

    def add(self, record: TrialRecord) -> None:
        """Append a finished record and count its measured time."""
        self.append(record)
        self.measured_time_s += measured_time(record)


def measured_time(record: TrialRecord) -> float:
    """Seconds of measured work in a record (timing plus probe), 0 for what was not measured."""
    return (record.measure.measured_time_s or 0.0) + (record.probe.probe_time_s or 0.0)


# --- trial functions ------------------------------------------------------------------------------

def check_fn_spec(spec: str) -> tuple[str, str]:
    """`(module, function)` of a `module:function` spec, checked without importing anything.

    Raises:
        SuiteError: `spec` is not of the form `module:function`.
    """
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise SuiteError(f"fn={spec!r} must be 'module:function', e.g. {DEFAULT_FN!r}")
    return module, name


def load_fn(spec: str) -> Callable[..., Any]:
    """Import `module:function`.

    Raises:
        SuiteError: `spec` is not of the form `module:function`.
        ImportError, AttributeError: the module or the function does not exist.
    """
    module, name = check_fn_spec(spec)
    return getattr(importlib.import_module(module), name)


def capture_worker_env(env_fn: str | None, device: str) -> tuple[Env, str]:
    """The worker's environment for the records the driver synthesises, and a warning ('' if none).

    A missing `suite.machine.env` module gives `Env()` silently (it is optional for the runner); an env
    function that fails gives `Env()` and a warning, since it must not stop a sweep.
    """
    if env_fn is None:
        return Env(), ""
    module = env_fn.partition(":")[0]
    try:
        fn = load_fn(env_fn)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return Env(), ""
        return Env(), f"env_fn={env_fn!r} could not be imported: {one_line(exc)}"
    except Exception as exc:  # noqa: BLE001
        return Env(), f"env_fn={env_fn!r} could not be imported: {one_line(exc)}"
    try:
        return fn(device), ""
    except Exception as exc:  # noqa: BLE001
        return Env(), f"env_fn={env_fn!r} failed, crashed/timeout records carry no environment: {one_line(exc)}"


def call_trial(fn: Callable[..., Any], trial: Any, fn_kwargs: dict, env: Env) -> TrialRecord:
    """Run `fn(trial, **fn_kwargs)`; an exception or a wrong return value becomes an `error` record."""
    started = time.time()
    try:
        record = fn(trial, **fn_kwargs)
    except Exception as exc:  # noqa: BLE001 - the trial function should not raise; if it does, record it
        return synthesised(trial, "error", one_line(exc), env, started)
    if not isinstance(record, TrialRecord):
        return synthesised(trial, "error", f"trial function returned {type(record).__name__}, not a TrialRecord",
                           env, started)
    return record


def synthesised(trial: Any, status: str, reason: str, env: Env | None, started: float | None) -> TrialRecord:
    """A record made without the trial's own results (crashed, timeout, error)."""
    return TrialRecord(trial, status, reason, env=env or Env(), started_at=started, finished_at=time.time())


def common_device(trials: list) -> str:
    """The device the trials ask for when they agree (an experiment has one), else 'auto'."""
    devices = {getattr(t, "device", "auto") for t in trials}
    return devices.pop() if len(devices) == 1 else "auto"


# --- the driver's side ------------------------------------------------------------------------------

@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the driver runs, so both stop a sweep the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def call_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh spawned process, so what it imports (torch) stays out of this one.

    `fn` must be a module-level function and its arguments and result must pickle; an exception
    it raises is raised here.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- the local worker process ---------------------------------------------------------------------

def worker_main(conn: Connection, fn_spec: str, fn_kwargs: dict, env_fn: str | None, device: str,
                threads: int | None) -> None:
    """A local worker process: import the trial function once, then run trials until told to stop.

    Messages to the driver: `("fatal", reason)` when the function cannot be imported, then
    `("ready", pid, env, warning)` once, then `("done", index, record)` per trial.
    """
    # Ctrl-C in a terminal reaches the whole process group; the driver decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        fn = load_fn(fn_spec)
    except Exception as exc:  # noqa: BLE001
        conn.send(("fatal", f"cannot import the trial function fn={fn_spec!r} in the worker: {one_line(exc)}"))
        return
    if threads and "torch" in sys.modules:  # imported already; the env vars only act on a later import
        sys.modules["torch"].set_num_threads(threads)
    env, warning = capture_worker_env(env_fn, device)
    conn.send(("ready", os.getpid(), env, warning))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if message is None:
            return
        index, trial = message
        record = call_trial(fn, trial, fn_kwargs, env)
        try:
            conn.send(("done", index, record))
        except (BrokenPipeError, EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a record that does not pickle
            conn.send(("done", index, synthesised(trial, "error", f"the record could not be sent to the driver: "
                                                                  f"{one_line(exc)}", env, record.started_at)))
        release_memory()


def _exit_with_parent(parent: int) -> None:
    """End this worker when the driver is gone (e.g. `kill -9`), even in the middle of a hung trial."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # re-parented: the driver died
            os._exit(1)
