"""Run a list of trials in isolated worker processes and stream the records back.

The driver (this module, in the calling process) never runs a trial itself: it stays light (no
torch) and survives whatever a trial does. Each trial runs in a long-lived worker process started
with the `spawn` method (`fork` after torch has started threads or CUDA is unsafe). Workers are
reused across trials because importing torch and timm costs seconds; a worker that dies mid-trial
(segfault, `os._exit`, the OOM killer) takes only its trial down, which is recorded `crashed`,
and is replaced. A trial over its time limit has its worker killed, is recorded `timeout`, and
the worker is replaced.

    from suite.sweep.pool import run_trials
    records = run_trials(trials, workers=2, timeout_s=600, on_result=store.write)

The `ray` backend (`suite.sweep.ray_pool`) runs the same trial function as Ray tasks; what the two
share lives in `suite.sweep.workers` (trial plumbing, the worker's loop) and `suite.sweep.progress` (display).

Threads and GPUs: with several local workers on a CPU-only machine each worker gets
`cpu_count // workers` torch threads (OMP/MKL_NUM_THREADS), so the workers share the CPU and the
throughput of each trial is that of its share, not of the whole machine. With CUDA GPUs visible,
worker i sees only GPU i (`CUDA_VISIBLE_DEVICES`, set before torch is imported in the worker).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from suite.core.errors import SuiteError, suggest
from suite.core.options import BACKENDS
from suite.core.records import Env, TrialRecord
from suite.sweep.progress import Reporter, finish, run_reported
from suite.sweep.ray_pool import run_trials_ray
from suite.sweep.workers import (
    DEFAULT_ENV_FN,
    DEFAULT_FN,
    TrialResults,
    check_fn_spec,
    common_device,
    synthesised,
    worker_main,
)

_KILL_GRACE_S = 2.0  # how long a worker asked to stop may take before it is killed


# --- where each worker runs: GPUs and threads -----------------------------------------------------

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
        SuiteError: more workers than visible GPUs for trials that use a GPU.
    """
    wants_gpu = any(getattr(t, "device", "auto") != "cpu" for t in trials)
    gpus = visible_gpus() if wants_gpu else []
    if gpus and workers > 1:
        if workers > len(gpus):
            raise SuiteError(
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


# --- the pool ----------------------------------------------------------------------------------------

@dataclass
class _Worker:
    """The driver's view of one worker process and the trial it runs."""

    slot: int
    process: Any
    conn: Connection
    ready: bool = False
    pid: int | None = None
    env: Env = field(default_factory=Env)
    job: tuple[int, Any, float] | None = None  # (index, trial, dispatched at)
    deadline: float | None = None


def _exit_reason(exitcode: int | None) -> str:
    """A crashed record's reason: how the worker process ended."""
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
        """Spawn the worker of `slot` with that slot's environment (its GPU or its thread count)."""
        parent, child = self.ctx.Pipe()
        with _environ(self.slot_envs[slot]):
            process = self.ctx.Process(target=worker_main, name=f"suite-worker-{slot}",
                                       args=(child, self.fn, self.fn_kwargs, self.env_fn, self.device, self.threads))
            process.start()
        child.close()  # so the worker's death shows as EOF here, and the driver's as EOF there
        self.workers[slot] = _Worker(slot, process, parent)

    def remove(self, worker: _Worker, *, kill: bool) -> None:
        """Reap a worker (killing it first if asked) and free its slot."""
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


def _run_local(pool: _LocalPool, trials: list, workers: int, timeout_s: float | None,
               done: Callable[[TrialRecord], None], warn: Callable[[str], None]) -> None:
    """Keep up to `workers` workers busy until every trial is done; stop them all on the way out."""
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
                _collect(pool, w, done, warn)
    except BaseException:
        pool.stop_all()
        raise
    pool.stop_all()


def _collect(pool: _LocalPool, w: _Worker, done: Callable[[TrialRecord], None], warn: Callable[[str], None]) -> None:
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
                warn(warning)
        elif kind == "done":
            w.job, w.deadline = None, None
            done(message[2])
    if dead or not w.process.is_alive():
        w.process.join(timeout=_KILL_GRACE_S)
        if not w.ready:
            raise RuntimeError(f"a worker process failed while starting ({_exit_reason(w.process.exitcode)}); "
                               f"check that fn={pool.fn!r} imports cleanly in a fresh interpreter")
        job = w.job
        pool.remove(w, kill=True)
        if job:
            done(synthesised(job[1], "crashed", _exit_reason(w.process.exitcode), w.env, job[2]))
        return
    if w.deadline is not None and time.time() >= w.deadline:
        job = w.job
        pool.remove(w, kill=True)
        limit = w.deadline - job[2]
        done(synthesised(job[1], "timeout", f"exceeded the time limit timeout_s={limit:g} (worker killed)",
                         w.env, job[2]))


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
        trials: the `suite.core.options.Trial`s to run.
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
        SuiteError: an invalid fn, backend, workers, timeout_s or address, or more workers than GPUs.
        RuntimeError: the trial function cannot be imported in a worker.
    """
    _check_args(fn, backend, workers, timeout_s, address)
    fn_kwargs = dict(fn_kwargs or {})
    trials = list(trials)
    if backend == "ray":
        return run_trials_ray(trials, fn=fn, fn_kwargs=fn_kwargs, address=address, timeout_s=timeout_s,
                              on_result=on_result, progress=progress, console=console, env_fn=env_fn,
                              label=label)
    slot_envs, threads, where = _worker_environments(workers, trials)
    pool = _LocalPool(fn, fn_kwargs, env_fn, common_device(trials), slot_envs, threads)

    def body(reporter: Reporter, results: TrialResults) -> None:
        _run_local(pool, trials, min(workers, len(trials)), timeout_s,
                   lambda record: finish(record, results, on_result, reporter), reporter.warn)

    return run_reported(len(trials), body, progress=progress, console=console, where=where, parallel=workers,
                        label=label)


def _check_args(fn: str, backend: str, workers: int, timeout_s: float | None, address: str | None) -> None:
    """Reject bad arguments in the driver, before any worker starts (importing `fn` is the worker's job).

    Raises:
        SuiteError: the first problem found.
    """
    if backend not in BACKENDS:
        raise SuiteError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}{suggest(backend, BACKENDS, n=1)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SuiteError(f"workers={workers!r} must be a positive integer")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
        raise SuiteError(f"timeout_s={timeout_s!r} must be a positive number of seconds, or None for no limit")
    check_fn_spec(fn)
    if backend == "ray" and workers != 1:
        raise SuiteError(f"workers={workers} applies to the local backend; with backend='ray' every free "
                         "slot of the cluster runs a trial: drop --workers")
    if backend != "ray" and address is not None:
        raise SuiteError(f"address={address!r} is only used with backend='ray'; add --backend ray or drop --address")
