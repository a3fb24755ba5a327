"""Run trials as Ray tasks on a Ray cluster (`suite run EXP --backend ray [--address ADDR]`).

Each trial is one task: one GPU per task when the cluster has GPUs (and the trials want one),
one CPU slot otherwise. Results stream back to the driver with `ray.wait` as tasks finish, and the
driver alone calls `on_result`, so the results database has one writer and nothing is lost or
written twice. A task whose worker or node dies is recorded `crashed` (tasks are never retried:
a retry would run the crash again); a task over `timeout_s` is cancelled with `force=True`, which
kills its worker, and is recorded `timeout`.

Notes:
- The trial function's module must be importable on the cluster's workers (`suite` installed
  there, or shipped with a runtime_env).
- Ray limits each CPU task to its slot's threads (it sets OMP_NUM_THREADS=1 for a 1-CPU task), so
  CPU throughput measured through Ray is single-threaded; use the local backend for CPU numbers.
- At most as many tasks are in flight as the cluster has slots (counted once, at the start). A
  task's time limit counts from when it begins the trial (it reports that first), so queueing and
  a fresh Ray worker's start-up are excluded, as with the local backend.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from suite.core.errors import MissingDependency, one_line
from suite.core.records import Env, TrialRecord
from suite.sweep.progress import Reporter, finish, run_reported
from suite.sweep.workers import (
    DEFAULT_ENV_FN,
    TrialResults,
    call_trial,
    capture_worker_env,
    common_device,
    load_fn,
    synthesised,
)

_ENV_WAIT_S = 120.0  # how long to wait for the environment probe task when a record needs it


def _import_ray():
    """Ray, imported on first use: it is an optional dependency and slow to import."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependency(
            f"backend='ray' needs Ray, which is not installed ({exc}); install it with: "
            "pip install 'timm-tower-suite[ray]'") from None
    return ray


class TrialFunctionImportError(RuntimeError):
    """The trial function could not be imported on a Ray worker: a setup problem, not a trial's."""


def _ray_trial(fn_spec: str, fn_kwargs: dict, trial: Any) -> Iterator[float | TrialRecord]:
    """The body of a Ray task (a streaming generator): yield the start time, then the record.

    The first item tells the driver the trial has begun, so its time limit excludes queueing and a
    fresh worker's start-up and imports, as with the local backend.
    """
    try:
        fn = load_fn(fn_spec)  # cached in sys.modules after a worker's first task
    except Exception as exc:  # noqa: BLE001
        raise TrialFunctionImportError(
            f"cannot import the trial function fn={fn_spec!r} on a Ray worker: {one_line(exc)}; the module must be "
            "importable there (installed, or shipped with a runtime_env)") from None
    yield time.time()
    yield call_trial(fn, trial, fn_kwargs, Env())


def _ray_env(env_fn: str | None, device: str) -> tuple[Env, str]:
    """The body of the environment task (a plain function: Ray wraps it)."""
    return capture_worker_env(env_fn, device)


def _failure(ray, exc: BaseException) -> tuple[str, str]:
    """(status, reason) for a task that raised in Ray rather than returning a record.

    Raises:
        RuntimeError: the trial function cannot be imported on the workers (every trial would fail).
    """
    if isinstance(exc, ray.exceptions.RayTaskError):  # the task body raised (call_trial catches fn's errors)
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, TrialFunctionImportError):
            raise RuntimeError(str(cause)) from None
        return "error", one_line(cause)
    if isinstance(exc, getattr(ray.exceptions, "OutOfMemoryError", ())):
        return "crashed", "worker killed by Ray's memory monitor (host memory exhausted)"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "crashed", "worker process died (Ray WorkerCrashedError)"
    if isinstance(exc, getattr(ray.exceptions, "NodeDiedError", ())):  # its machine, raylet or network failed
        node = re.search(r"Node IP: ([^,\s]+)", str(exc))
        return "crashed", f"the Ray node running the task died (Ray NodeDiedError{', node ' + node[1] if node else ''})"
    return "crashed", f"Ray task failed: {type(exc).__name__}"


def run_trials_ray(
    trials: list,
    *,
    fn: str,
    fn_kwargs: dict | None = None,
    address: str | None = None,
    timeout_s: float | None = None,
    on_result: Callable[[TrialRecord], None] | None = None,
    progress: bool = True,
    console=None,
    env_fn: str | None = DEFAULT_ENV_FN,
    label=None,
) -> TrialResults:
    """Run trials as Ray tasks; the arguments and result are those of `suite.sweep.pool.run_trials`.

    With `address=None` and no Ray connection yet, a local cluster is started (and shut down at
    the end); a driver already connected (`ray.init` called before) uses that connection.

    Raises:
        ImportError: Ray is not installed.
    """
    ray = _import_ray()
    trials, fn_kwargs = list(trials), dict(fn_kwargs or {})
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level=logging.WARNING)
    start = time.time()
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 and any(getattr(t, "device", "auto") != "cpu" for t in trials)
        options = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
        slots = max(1, gpus if use_gpu else int(resources.get("CPU", 1)))
        where = f", Ray cluster: {slots} {'GPU' if use_gpu else 'CPU'} slot(s)"

        def body(reporter: Reporter, results: TrialResults) -> None:
            _run(ray, trials, fn, fn_kwargs, timeout_s, env_fn, options, slots,
                 lambda record: finish(record, results, on_result, reporter), reporter.warn)

        return run_reported(len(trials), body, progress=progress, console=console, where=where, parallel=slots,
                            label=label, start=start)
    finally:
        if started_here:
            ray.shutdown()


@dataclass
class _Task:
    trial: Any
    submitted: float
    started: float | None = None  # driver's clock when the task said it began


def _run(ray, trials: list, fn: str, fn_kwargs: dict, timeout_s: float | None, env_fn: str | None, options: dict,
         slots: int, done: Callable[[TrialRecord], None], warn: Callable[[str], None]) -> None:
    """Keep up to `slots` tasks in flight until every trial is done; cancel what runs on the way out."""
    task = ray.remote(max_retries=0, num_returns="streaming", **options)(_ray_trial)
    # The environment of a worker like the trials' ones, for the records made here (crashed, timeout).
    env_ref = ray.remote(max_retries=0, **options)(_ray_env).remote(env_fn, common_device(trials)) if env_fn else None
    env_cache: list[Env] = []

    def worker_env() -> Env:
        if not env_cache:
            env = Env()
            if env_ref is not None:
                try:
                    env, warning = ray.get(env_ref, timeout=_ENV_WAIT_S)
                    if warning:
                        warn(warning)
                except Exception as exc:  # noqa: BLE001 - the environment must not stop the sweep
                    warn(f"could not capture the Ray workers' environment: {one_line(exc)}")
            env_cache.append(env)
        return env_cache[0]

    queue = list(reversed(trials))
    in_flight: dict[Any, _Task] = {}  # streaming generator -> its trial
    try:
        while queue or in_flight:
            while queue and len(in_flight) < slots:
                trial = queue.pop()
                in_flight[task.remote(fn, fn_kwargs, trial)] = _Task(trial, time.time())
            deadlines = [t.started + timeout_s for t in in_flight.values() if timeout_s and t.started]
            wait_s = max(0.0, min(deadlines) - time.time()) if deadlines else None
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            if ready:  # take everything that is ready, not just the first
                ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for gen in ready:
                t = in_flight[gen]
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    del in_flight[gen]
                    done(synthesised(t.trial, "crashed", "Ray task ended without a record", worker_env(),
                                       t.started or t.submitted))
                    continue
                except ray.exceptions.RayError as exc:
                    del in_flight[gen]
                    status, reason = _failure(ray, exc)
                    done(synthesised(t.trial, status, reason, worker_env(), t.started or t.submitted))
                    continue
                if isinstance(item, TrialRecord):
                    del in_flight[gen]
                    done(item)
                else:
                    t.started = time.time()
            now = time.time()
            for gen, t in list(in_flight.items()):
                if timeout_s and t.started and now - t.started >= timeout_s:
                    ray.cancel(gen, force=True)  # kills the worker: the only way to stop a hung trial
                    del in_flight[gen]
                    reason = f"exceeded the time limit timeout_s={timeout_s:g} (Ray task cancelled, worker killed)"
                    done(synthesised(t.trial, "timeout", reason, worker_env(), t.started))
    finally:
        for gen in in_flight:  # interrupted or failed: stop what still runs
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
