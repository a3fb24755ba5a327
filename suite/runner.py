"""Run a list of trials in isolated worker processes and stream the records back.

The driver (this module, in the calling process) never runs a trial itself: it stays light (no
torch) and survives whatever a trial does. Each trial runs in a long-lived worker process started
with the `spawn` method (`fork` after torch has started threads or CUDA is unsafe). Workers are
reused across trials because importing torch and timm costs seconds; a worker that dies mid-trial
(segfault, `os._exit`, the OOM killer) takes only its trial down, which is recorded `crashed`,
and is replaced. A trial over its time limit has its worker killed, is recorded `timeout`, and
the worker is replaced.

    from suite.runner import run_trials
    records = run_trials(trials, workers=2, timeout_s=600, on_result=store.write)

The `ray` backend (`suite.ray_backend`) runs the same trial function as Ray tasks.

Threads and GPUs: with several local workers on a CPU-only machine each worker gets
`cpu_count // workers` torch threads (OMP/MKL_NUM_THREADS), so the workers share the CPU and the
throughput of each trial is that of its share, not of the whole machine. With CUDA GPUs visible,
worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`, set before torch is imported in the worker).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from suite.errors import one_line  # noqa: F401 - re-exported for the Ray backend
from suite.records import Env, TrialRecord

BACKENDS = ("local", "ray")
DEFAULT_FN = "suite.execute:run_trial"
DEFAULT_ENV_FN = "suite.env:capture_env"
_KILL_GRACE_S = 2.0  # how long a worker asked to stop may take before it is killed


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


# --- helpers shared with the Ray backend -------------------------------------------------------

def load_fn(spec: str) -> Callable[..., Any]:
    """Import `module:function`.

    Raises:
        ValueError: `spec` is not of the form `module:function`.
        ImportError, AttributeError: the module or the function does not exist.
    """
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"fn={spec!r} must be 'module:function', e.g. {DEFAULT_FN!r}")
    return getattr(importlib.import_module(module), name)


def capture_worker_env(env_fn: str | None, device: str) -> tuple[Env, str]:
    """The worker's environment for the records the driver synthesises, and a warning ('' if none).

    A missing `suite.env` module gives `Env()` silently (it is optional for the runner); an env
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


# --- progress display --------------------------------------------------------------------------

def _details(record: TrialRecord) -> str:
    """The key numbers of a finished trial, or its reason."""
    if record.status != "ok":
        return record.reason
    m, p = record.measure, record.probe
    parts = []
    if m.infer_samples_per_sec is not None:
        parts.append(f"infer {m.infer_samples_per_sec:,.1f}/s")
    if m.train_samples_per_sec is not None:
        parts.append(f"train {m.train_samples_per_sec:,.1f}/s")
    if m.train_peak_mem_mib is not None:
        parts.append(f"train mem {m.train_peak_mem_mib:,.0f} MiB")
    if p.probe_top1 is not None:
        parts.append(f"probe top-1 {p.probe_top1:.1f}%")
    if record.reason:
        parts.append(record.reason)
    return ", ".join(parts)


def measured_time(record: TrialRecord) -> float:
    return (record.measure.measured_time_s or 0.0) + (record.probe.probe_time_s or 0.0)


_STYLE = {"ok": "green", "skipped": "yellow", "oom": "magenta", "error": "red", "crashed": "bold red",
          "timeout": "bold red"}


class Reporter:
    """A rich progress bar with ETA and a line per finished trial, or plain lines (`progress=False`)."""

    def __init__(self, total: int, *, progress: bool, console=None, where: str = "", parallel: int = 1,
                 label: Callable | None = None):
        from rich.console import Console

        self.total, self.done, self.where, self.parallel = total, 0, where, parallel
        self.label = label or (lambda trial: trial.label)
        self.console = console or Console()
        self.start = time.time()
        self.bar = None
        if progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(SpinnerColumn(), TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("trials", total=total)

    def __enter__(self) -> Reporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def print(self, *parts: tuple[str, str] | str) -> None:
        from rich.text import Text

        # Text, not markup: labels and reasons may contain brackets.
        self.console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)

    def finished(self, record: TrialRecord) -> None:
        self.done += 1
        seconds = (record.finished_at or 0) - (record.started_at or 0) if record.started_at else 0.0
        self.print(f"[{self.done}/{self.total}] ", (f"{record.status:<7}", _STYLE.get(record.status, "")),
                   f" {self.label(record.trial)}  {_details(record)}  ({seconds:.1f} s)")
        if self.bar is not None:
            self.bar.advance(self.task)

    def warn(self, text: str) -> None:
        self.print(("warning: ", "yellow"), text)

    def summary(self, results: TrialResults) -> None:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        statuses = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none finished"
        wall, measured = results.wall_time_s, results.measured_time_s
        line = (f"{len(results)} of {self.total} trials in {wall:.1f} s wall time ({statuses}){self.where}; "
                f"sum of measured time {measured:.1f} s")
        if self.parallel == 1:  # with several at once the sum can exceed the wall time
            line += f" (start-up and per-trial overhead {max(0.0, wall - measured):.1f} s)"
        if results.interrupted:
            line = "interrupted: " + line + "; unfinished trials were not recorded"
        self.print(line)


# --- the local backend: worker processes ----------------------------------------------------------

def _worker_main(conn: Connection, fn_spec: str, fn_kwargs: dict, env_fn: str | None, device: str,
                 threads: int | None) -> None:
    """A worker process: import the trial function once, then run trials until told to stop."""
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
        _release_memory()


def _exit_with_parent(parent: int) -> None:
    """End this worker when the driver is gone (e.g. `kill -9`), even in the middle of a hung trial."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # re-parented: the driver died
            os._exit(1)


def _release_memory() -> None:
    """Between trials: drop garbage and reset CUDA caches and peak counters, if torch is in use here."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def visible_gpus() -> list[str]:
    """The CUDA devices a child process could use, without importing torch in the driver.

    `CUDA_VISIBLE_DEVICES` when set (its entries, which may be indices or UUIDs), else the GPUs
    `nvidia-smi` lists; none when neither says there are any.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        entries = [e.strip() for e in env.split(",") if e.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
        out = []
        for e in entries:
            if e.startswith("-"):
                break
            out.append(e)
        return out
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().isdigit()] if proc.returncode == 0 else []


def _worker_environments(workers: int, trials: list) -> tuple[list[dict[str, str]], int | None, str]:
    """Environment variables for each worker slot, torch threads per worker, and a note for the summary.

    Raises:
        ValueError: more workers than visible GPUs for trials that use a GPU.
    """
    wants_gpu = any(getattr(t, "device", "auto") != "cpu" for t in trials)
    gpus = visible_gpus() if wants_gpu else []
    if gpus and workers > 1:
        if workers > len(gpus):
            raise ValueError(
                f"workers={workers} but only {len(gpus)} CUDA GPU(s) are visible ({', '.join(gpus)}); each local "
                f"worker gets one GPU: use --workers {len(gpus)} or fewer, or the ray backend for more machines")
        return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(workers)], None, f", one GPU per worker x {workers}"
    if not gpus and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        n = str(threads)
        envs = [{"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n} for _ in range(workers)]
        return envs, threads, f", {workers} CPU workers x {threads} threads sharing the CPU"
    return [{} for _ in range(workers)], None, ""


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while a child is spawned (it copies the environment at start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Connection
    ready: bool = False
    pid: int | None = None
    env: Env = field(default_factory=Env)
    job: tuple[int, Any, float] | None = None  # (index, trial, dispatched at)
    deadline: float | None = None


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker process died (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (possibly the OS out-of-memory killer)" if name == "SIGKILL" else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode}"


class _LocalPool:
    """The driver's side of the worker processes: start, dispatch, collect, replace, stop."""

    def __init__(self, fn: str, fn_kwargs: dict, env_fn: str | None, device: str, slot_envs: list[dict],
                 threads: int | None):
        self.ctx = mp.get_context("spawn")
        self.fn, self.fn_kwargs, self.env_fn, self.device = fn, fn_kwargs, env_fn, device
        self.slot_envs, self.threads = slot_envs, threads
        self.workers: dict[int, _Worker] = {}

    def start(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        with _environ(self.slot_envs[slot]):
            process = self.ctx.Process(target=_worker_main, name=f"suite-worker-{slot}",
                                       args=(child, self.fn, self.fn_kwargs, self.env_fn, self.device, self.threads))
            process.start()
        child.close()  # so the worker's death shows as EOF here, and the driver's as EOF there
        self.workers[slot] = _Worker(slot, process, parent)

    def remove(self, worker: _Worker, *, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=_KILL_GRACE_S)
        worker.conn.close()
        self.workers.pop(worker.slot, None)

    def stop_all(self) -> None:
        """Ask idle workers to exit, kill busy ones (their trial is abandoned), and reap them all."""
        for w in self.workers.values():
            if w.job is None and w.ready:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            else:
                w.process.terminate()
        deadline = time.time() + _KILL_GRACE_S
        for w in list(self.workers.values()):
            w.process.join(timeout=max(0.0, deadline - time.time()))
            if w.process.is_alive():
                w.process.kill()
            self.remove(w, kill=True)


def _run_local(trials: list, fn: str, fn_kwargs: dict, workers: int, timeout_s: float | None, env_fn: str | None,
               on_result, reporter: Reporter, results: TrialResults, slot_envs: list[dict],
               threads: int | None) -> None:
    pool = _LocalPool(fn, fn_kwargs, env_fn, common_device(trials), slot_envs, threads)
    queue = deque(enumerate(trials))
    try:
        while queue or any(w.job for w in pool.workers.values()):
            busy = sum(1 for w in pool.workers.values() if w.job)
            wanted = min(workers, busy + len(queue))
            for slot in range(workers):  # keep as many workers as there is work for
                if len(pool.workers) >= wanted:
                    break
                if slot not in pool.workers:
                    pool.start(slot)
            for w in pool.workers.values():
                if w.ready and w.job is None and queue:
                    index, trial = queue.popleft()
                    try:
                        w.conn.send((index, trial))
                    except OSError:  # died while idle: the trial goes back, the worker is replaced below
                        queue.appendleft((index, trial))
                        continue
                    now = time.time()
                    w.job = (index, trial, now)
                    w.deadline = now + timeout_s if timeout_s else None
            deadlines = [w.deadline for w in pool.workers.values() if w.deadline]
            wait_s = max(0.0, min(deadlines) - time.time()) if deadlines else None
            wait([w.conn for w in pool.workers.values()] + [w.process.sentinel for w in pool.workers.values()],
                 timeout=wait_s)
            for w in list(pool.workers.values()):
                _collect(pool, w, on_result, reporter, results)
    except BaseException:
        pool.stop_all()
        raise
    pool.stop_all()


def _collect(pool: _LocalPool, w: _Worker, on_result, reporter: Reporter, results: TrialResults) -> None:
    """Read what a worker sent; handle its death or its trial's timeout."""
    messages, dead = [], False
    try:
        while w.conn.poll():
            messages.append(w.conn.recv())
    except (EOFError, OSError):  # the pipe closed: the worker is gone
        dead = True
    for message in messages:  # outside the try: an OSError from on_result is not a dead worker
        kind = message[0]
        if kind == "fatal":
            raise RuntimeError(message[1])
        if kind == "ready":
            _, w.pid, w.env, warning = message
            w.ready = True
            if warning:
                reporter.warn(warning)
        elif kind == "done":
            w.job, w.deadline = None, None
            _finish(message[2], on_result, reporter, results)
    if dead or not w.process.is_alive():
        w.process.join(timeout=_KILL_GRACE_S)
        if not w.ready:
            raise RuntimeError(f"a worker process failed while starting ({_exit_reason(w.process.exitcode)}); "
                               f"check that fn={pool.fn!r} imports cleanly in a fresh interpreter")
        job = w.job
        pool.remove(w, kill=True)
        if job:
            _finish(synthesised(job[1], "crashed", _exit_reason(w.process.exitcode), w.env, job[2]),
                    on_result, reporter, results)
        return
    if w.deadline is not None and time.time() >= w.deadline:
        job = w.job
        pool.remove(w, kill=True)
        limit = w.deadline - job[2]
        _finish(synthesised(job[1], "timeout", f"exceeded the time limit timeout_s={limit:g} (worker killed)",
                            w.env, job[2]), on_result, reporter, results)


def _finish(record: TrialRecord, on_result, reporter: Reporter, results: TrialResults) -> None:
    results.append(record)
    results.measured_time_s += measured_time(record)
    if on_result is not None:
        on_result(record)
    reporter.finished(record)


# --- the entry point ---------------------------------------------------------------------------

def run_trials(
    trials: list,
    *,
    fn: str = DEFAULT_FN,
    fn_kwargs: dict | None = None,
    workers: int = 1,
    timeout_s: float | None = None,
    backend: str = "local",
    address: str | None = None,
    on_result: Callable[[TrialRecord], None] | None = None,
    progress: bool = True,
    console=None,
    env_fn: str | None = DEFAULT_ENV_FN,
    label: Callable | None = None,
) -> TrialResults:
    """Run trials in worker processes (or Ray tasks) and return their records as they finish.

    Args:
        trials: the `suite.options.Trial`s to run.
        fn: `module:function` imported in each worker; `fn(trial, **fn_kwargs)` returns a TrialRecord.
        fn_kwargs: keyword arguments for `fn` (must pickle).
        workers: local worker processes; with CUDA GPUs visible, one per GPU.
        timeout_s: per-trial time limit; the worker is killed and the trial recorded `timeout`.
        backend: `local` (worker processes on this machine) or `ray`.
        address: the Ray cluster to attach to (`ray` backend only); None starts a local one.
        on_result: called in the driver with each record as soon as it finishes (e.g. to store it).
        progress: a rich progress bar and a line per trial; False prints plain lines (CI logs).
        console: the rich Console to print to (default: a new one on stdout).
        env_fn: `module:function(device) -> Env` run once per worker, for the environment of the
            records the driver makes itself (crashed, timeout); None leaves those with `Env()`.
        label: how a trial is named in the live lines (default `trial.label`).

    Returns:
        The records in the order they finished. When interrupted (Ctrl-C, SIGTERM) the run stops
        dispatching, ends the workers, and returns what finished with `interrupted=True`;
        trials in flight are not recorded.

    Raises:
        ValueError: an invalid backend, workers, timeout_s or address, or more workers than GPUs.
        RuntimeError: the trial function cannot be imported in a worker.
    """
    if backend not in BACKENDS:
        close = difflib.get_close_matches(str(backend), BACKENDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}{hint}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
        raise ValueError(f"timeout_s={timeout_s!r} must be a positive number of seconds, or None for no limit")
    _check_fn_spec(fn)
    fn_kwargs = dict(fn_kwargs or {})
    trials = list(trials)

    if backend == "ray":
        if workers != 1:
            raise ValueError(f"workers={workers} applies to the local backend; with backend='ray' every free "
                             "slot of the cluster runs a trial: drop --workers")
        from suite.ray_backend import run_trials_ray

        return run_trials_ray(trials, fn=fn, fn_kwargs=fn_kwargs, address=address, timeout_s=timeout_s,
                              on_result=on_result, progress=progress, console=console, env_fn=env_fn,
                              label=label)
    if address is not None:
        raise ValueError(f"address={address!r} is only used with backend='ray'; add --backend ray or drop --address")

    slot_envs, threads, where = _worker_environments(workers, trials)
    results = TrialResults()
    start = time.time()
    with Reporter(len(trials), progress=progress, console=console, where=where, parallel=workers,
                  label=label) as reporter:
        if trials:
            try:
                with sigterm_as_interrupt():
                    _run_local(trials, fn, fn_kwargs, min(workers, len(trials)), timeout_s, env_fn, on_result,
                               reporter, results, slot_envs, threads)
            except KeyboardInterrupt:
                results.interrupted = True
        results.wall_time_s = time.time() - start
    reporter.summary(results)
    return results


def _check_fn_spec(spec: str) -> None:
    """Reject a malformed `fn` in the driver, before any worker starts (importing it is the worker's job)."""
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"fn={spec!r} must be 'module:function', e.g. {DEFAULT_FN!r}")
