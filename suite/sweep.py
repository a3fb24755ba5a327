"""The main job: validate an experiment, run its missing trials, store each result, write the report.

    suite.run_experiment("experiments/smoke.yaml")   # == `suite run experiments/smoke.yaml`

The driver stays light: it never imports torch. What needs torch before the trials run (checking
model names, the towers' static checks, the environment the results are stored under) runs in one
short-lived child process (`preflight`); the trials run in the runner's workers.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from suite.config import Experiment, check_models, load_experiment
from suite.data import check_dataset
from suite.device import resolve_device
from suite.errors import ConfigError
from suite.execute import trial_env
from suite.options import trial_label
from suite.records import Env, TrialRecord
from suite.report import write_report
from suite.runner import run_trials
from suite.store import DEFAULT_NAME, ResultStore
from suite.workers import call_in_child


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
    from suite.tower_plan import static_problems  # imports torch and timm: the driver calls this via preflight

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


def preflight(exp: Experiment) -> Preflight:
    """Check model names, find the known problems and capture the trials' environment.

    This is the sweep's torch work before any trial runs; the driver runs it in a child process
    (`call_in_child`) so that it never imports torch itself.

    Raises:
        DatasetError: a trial's probe data cannot be used.
        UnsupportedConfig: the trials ask for CUDA where there is none.
    """
    try:
        check_models(exp)
    except ConfigError as exc:
        return Preflight(exc.problems)
    return Preflight([], known_problems(exp), trial_env(resolve_device(exp.trials[0].device)))


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
    cache_dir: str | Path | None = None,
    console=None,
) -> SweepSummary:
    """Run every trial of an experiment file (or, with `resume`, only those not yet stored).

    With `retry_failed` (implies `resume`), trials stored as oom/error/crashed/timeout run again;
    their new rows replace the old ones.

    Raises:
        ConfigError: the file is invalid; nothing has run.
        FileExistsError: results exist at the output and neither `resume` was asked for.
    """
    console = console or Console(stderr=True, quiet=False)
    exp = load_experiment(path, check_names=False)  # names are checked with timm, in the preflight child
    checked = call_in_child(preflight, exp)
    if checked.model_problems:
        raise ConfigError(exp.source, checked.model_problems)
    skipped, env = checked.known_problems, checked.env
    out_dir = Path(out) if out else default_out(exp)
    db_path = out_dir / DEFAULT_NAME

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
            workers=workers or exp.run.get("workers", 1),
            timeout_s=timeout_s or exp.run.get("timeout_s"),
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
                      f"`suite run {exp.source} --resume` runs the rest")
    elif report_path:
        console.print(f"report: {report_path}")
    return SweepSummary(db_path, report_path, len(records), len(done), statuses, wall, results.measured_time_s,
                        results.interrupted)


def _start_store(store: ResultStore, exp: Experiment, env_key: str, *, resume: bool, retry_failed: bool) -> set[str]:
    """The ids of the trials already stored for this environment (to skip), after describing `exp` in the store.

    With `retry_failed`, only ok and skipped trials count as stored.

    Raises:
        FileExistsError: results are stored and neither `resume` nor `retry_failed` was asked for.
    """
    done = store.done_ids(env_key, statuses=("ok", "skipped") if retry_failed else None)
    if done and not (resume or retry_failed):
        raise FileExistsError(
            f"{store.path} already holds {len(done)} result(s) of this environment; "
            "pass --resume to run only the missing trials, or --out DIR for a fresh run"
        )
    store.set_meta("experiment", {"name": exp.name, "source": exp.source, "description": exp.description,
                                  "select": exp.select, "compare": exp.compare, "axes": exp.axes})
    store.set_meta("experiment_text", exp.text)
    return done
