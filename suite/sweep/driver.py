"""The main job: validate an experiment, run its missing trials, store each result, write the report.

    suite.run_experiment("experiments/smoke.yaml")   # == `suite run experiments/smoke.yaml`

The driver stays light: it never imports torch. What needs torch before the trials run (checking
model names, the towers' static checks, the environment the results are stored under) runs in one
short-lived child process (`preflight`); the trials run in the runner's workers.
"""
from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from suite.core.errors import ConfigError, SuiteError
from suite.core.options import OPTIONS, config_value, trial_label
from suite.core.records import Env, TrialRecord
from suite.experiment.checks import check_models
from suite.experiment.spec import MAX_TRIALS, Experiment, load_experiment
from suite.machine.device import resolve_device
from suite.probe.datasets import check_dataset
from suite.report.render import write_report
from suite.results.store import DEFAULT_NAME, ResultStore, StoreLock
from suite.sweep.pool import run_trials
from suite.sweep.trial import trial_env
from suite.sweep.workers import call_in_child


@dataclass(frozen=True)
class SweepSummary:
    """What `run_experiment` did: where the results are, how many trials ran, and how they ended."""

    db_path: Path
    report_path: Path | None
    ran: int  # trials run now
    reused: int  # trials already in the store (resume)
    statuses: dict  # status -> count over the trials run now
    wall_s: float
    measured_s: float
    interrupted: bool = False  # Ctrl-C / SIGTERM: what finished is stored, the rest is missing


def default_out(exp: Experiment) -> Path:
    """Where a run's results go unless told: the experiment's `run.out`, else runs/<name>."""
    return Path(exp.run.get("out") or Path("runs") / exp.name)


def axes_label(exp: Experiment):
    """Name trials by the model and the options this experiment sweeps, not by its fixed settings."""
    axes = [a for a in exp.axes if a != "model"]
    return lambda trial: trial_label(trial, axes)


def known_problems(exp: Experiment) -> dict[str, str]:
    """trial_id -> reason, for trials that cannot run as configured (checked without running them).

    Raises:
        DatasetError: a trial's probe data cannot be used (bad input, not a skipped trial).
    """
    from suite.tower.plan import static_problems  # imports torch and timm: the driver calls this via preflight

    out = {}
    checked_data = {}
    for trial in exp.trials:
        problems = static_problems(trial)
        if problems:
            out[trial.trial_id] = "; ".join(problems)
    for trial in exp.trials:
        key = (trial.dataset, trial.root, trial.skip_bad_images)
        if trial.dataset != "none" and key not in checked_data:
            check_dataset(trial)  # bad input is an error before any work starts, not a skipped trial
            checked_data[key] = True
    return out


class ResultsExist(SuiteError, FileExistsError):
    """Results are stored at the output and the run was not asked to resume."""


class OtherExperiment(SuiteError):
    """The output folder's store belongs to another experiment, or to another version of this one."""


@dataclass(frozen=True)
class Preflight:
    """What the sweep must know before it runs anything, found where torch may be imported.

    Attributes:
        model_problems: unknown model names and missing checkpoints (the driver raises them as a
            ConfigError, as `load_experiment` would: returned as data because ConfigError does not
            survive pickling back from the child).
        known_problems: trial_id -> reason, for trials that cannot run as configured.
        env: the environment the trials run in (the key results are stored and resumed under).
    """

    model_problems: list[str]
    known_problems: dict[str, str] = field(default_factory=dict)
    env: Env = field(default_factory=Env)
    warnings: list[str] = field(default_factory=list)


def preflight(exp: Experiment) -> Preflight:
    """Check model names, find the known problems and capture the trials' environment.

    This is the sweep's torch work before any trial runs; the driver runs it in a child process
    (`call_in_child`) so that it never imports torch itself.

    Raises:
        DatasetError: a trial's probe data cannot be used.
        UnsupportedConfig: the trials ask for CUDA where there is none.
    """
    try:
        notes = check_models(exp)
    except ConfigError as exc:
        return Preflight(exc.problems)
    return Preflight([], known_problems(exp), trial_env(resolve_device(exp.trials[0].device)), notes)


def _preflight(exp: Experiment) -> Preflight:
    """`preflight` in a child process, so the driver never imports torch; in this process when torch
    is already imported here (a notebook, a test run): the child would only import it again (~5 s).
    In this process, capturing the environment holds its C allocator steady (`suite.machine.allocator`)."""
    if "torch" in sys.modules:
        return preflight(exp)
    return call_in_child(preflight, exp)


def check_run_args(workers: int | None, timeout_s: float | None) -> None:
    """The same rules as the file's `run:` block, for the arguments that override it (0 is not "unset").

    Raises:
        SuiteError: workers below 1, or a timeout that is not a positive, finite number of seconds.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SuiteError(f"workers={workers!r}: must be a positive integer (1 for CPU timings)")
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
        raise SuiteError(f"timeout_s={timeout_s!r}: must be a positive, finite number of seconds (leave it out for "
                         "the file's run.timeout_s, or no limit)")


def run_experiment(
    path: str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    backend: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    timeout_s: float | None = None,
    quiet: bool = False,
    report: bool = True,
    yes: bool = False,
    cache_dir: str | Path | None = None,
    console=None,
) -> SweepSummary:
    """Run every trial of an experiment file (or, with `resume`, only those not yet stored).

    With `retry_failed` (implies `resume`), trials stored as oom/error/crashed/timeout run again;
    their new rows replace the old ones. `yes` confirms a grid above `config.MAX_TRIALS` trials.

    Raises:
        ConfigError: the file is invalid; nothing has run.
        ResultsExist (a FileExistsError): results exist at the output and `resume` was not asked for.
        OtherExperiment: the output holds another experiment's results, or another version of this one.
        StoreLocked: another sweep is writing the same output.
    """
    console = console or Console(stderr=True, quiet=False)
    check_run_args(workers, timeout_s)
    # names are checked with timm, in the preflight child
    exp = load_experiment(path, check_names=False, max_trials=None if yes else MAX_TRIALS)
    checked = _preflight(exp)
    if checked.model_problems:
        raise ConfigError(exp.source, checked.model_problems)
    for warning in (*exp.warnings, *checked.warnings):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out_dir = Path(out) if out else default_out(exp)
    db_path = out_dir / DEFAULT_NAME
    lock = StoreLock(db_path)  # before any trial: a second sweep on this output stops here
    try:
        return _run_locked(exp, checked, out_dir, db_path, console=console, resume=resume, retry_failed=retry_failed,
                           backend=backend, address=address, workers=workers, timeout_s=timeout_s, quiet=quiet,
                           report=report, cache_dir=cache_dir)
    finally:
        lock.release()


def _run_locked(exp: Experiment, checked: Preflight, out_dir: Path, db_path: Path, *, console, resume: bool,
                retry_failed: bool, backend, address, workers, timeout_s, quiet: bool, report: bool,
                cache_dir) -> SweepSummary:
    """`run_experiment` once the preflight passed and the output's lock is held."""
    skipped, env = checked.known_problems, checked.env

    store = ResultStore(db_path)
    try:
        done = _start_store(store, exp, env.key(), resume=resume, retry_failed=retry_failed)
        todo = [t for t in exp.trials if t.trial_id not in done]
        start = time.time()
        records: list[TrialRecord] = []

        def keep(record: TrialRecord) -> None:  # the driver is the store's only writer
            store.write(record)
            records.append(record)

        runnable = []
        for trial in todo:
            if trial.trial_id in skipped:
                now = time.time()
                keep(TrialRecord(trial, "skipped", skipped[trial.trial_id], env=env, started_at=now, finished_at=now))
            else:
                runnable.append(trial)
        if not quiet:
            console.print(f"[bold]{exp.name}[/]: {len(exp.trials)} trials, {len(done)} already stored, "
                          f"{len(skipped)} known invalid, {len(runnable)} to run -> {db_path}")
        results = run_trials(
            runnable,
            fn_kwargs={"cache_dir": str(cache_dir) if cache_dir else None},
            workers=workers if workers is not None else exp.run.get("workers", 1),
            timeout_s=timeout_s if timeout_s is not None else exp.run.get("timeout_s"),
            backend=backend or exp.run.get("backend", "local"),
            address=address or exp.run.get("address"),
            on_result=keep,
            progress=not quiet,
            console=console,
            label=axes_label(exp),
        )
        wall = time.time() - start
    finally:
        store.close()
    statuses = dict(Counter(r.status for r in records))
    report_path = write_report(db_path, out_dir / "report.md") if report else None
    if results.interrupted:
        console.print(f"interrupted: {len(records)} results stored in {db_path}; "
                      f"`{resume_command(exp, out_dir)}` runs the rest")
    elif report_path:
        console.print(f"report: {report_path}")
    return SweepSummary(db_path, report_path, len(records), len(done), statuses, wall, results.measured_time_s,
                        results.interrupted)


def resume_command(exp: Experiment, out_dir: Path) -> str:
    """The command that continues this run, with the output folder it used."""
    return f"suite run {exp.source} --out {out_dir} --resume"


def _start_store(store: ResultStore, exp: Experiment, env_key: str, *, resume: bool, retry_failed: bool) -> set[str]:
    """The ids of the trials already stored for this environment (to skip), after describing `exp` in the store.

    With `retry_failed`, only ok and skipped trials count as stored.

    Raises:
        OtherExperiment: the store holds another experiment, or trials this version of it no longer has.
        ResultsExist: results are stored and neither `resume` nor `retry_failed` was asked for.
    """
    _check_same_experiment(store, exp)
    done = store.done_ids(env_key, statuses=("ok", "skipped") if retry_failed else None)
    if done and not (resume or retry_failed):
        raise ResultsExist(
            f"{store.path} already holds {len(done)} result(s) of this environment; "
            "pass --resume to run only the missing trials, or --out DIR for a fresh run"
        )
    store.set_meta("experiment", {"name": exp.name, "source": exp.source, "description": exp.description,
                                  "select": exp.select, "compare": exp.compare, "axes": exp.axes})
    store.set_meta("experiment_text", exp.text)
    return done


def _check_same_experiment(store: ResultStore, exp: Experiment) -> None:
    """A store belongs to one experiment: refuse another's name, or stored trials this file no longer makes."""
    fresh = f"run it with --out {Path('runs') / exp.name} (or another new folder)"
    stored = store.get_meta("experiment") or {}
    if stored.get("name") not in (None, exp.name):
        raise OtherExperiment(f"{store.path} holds the results of experiment {stored['name']!r} "
                              f"({stored.get('source')}), not {exp.name!r} ({exp.source}); a store belongs to one "
                              f"experiment: {fresh}")
    current = {t.trial_id for t in exp.trials}
    stale = [cfg for tid, cfg in store.stored_trials().items() if tid not in current]
    if not stale:
        return
    changed = []
    for o in OPTIONS:
        before = {config_value(o.name, o.default if c.get(o.name) is None and not o.nullable else c.get(o.name))
                  for c in stale}
        now = {config_value(o.name, getattr(t, o.name)) for t in exp.trials}
        if before - now:
            changed.append(f"{o.name}: {', '.join(sorted(before - now))} -> {', '.join(sorted(now))}")
    raise OtherExperiment(
        f"{store.path} holds {len(stale)} trial(s) that {exp.source} no longer has; what changed: "
        f"{'; '.join(changed) or 'trials were removed'}. Resuming would mix both versions in one report: "
        f"restore the file as it was, or {fresh}"
    )
