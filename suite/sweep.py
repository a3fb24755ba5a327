"""The main job: validate an experiment, run its missing trials, store each result, write the report.

    suite.run_experiment("experiments/smoke.yaml")   # == `suite run experiments/smoke.yaml`
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from suite.config import Experiment, load_experiment
from suite.records import TrialRecord


@dataclass(frozen=True)
class SweepSummary:
    db_path: Path
    report_path: Path | None
    ran: int  # trials run now
    reused: int  # trials already in the store (resume)
    statuses: dict  # status -> count over the trials run now
    wall_s: float
    measured_s: float
    interrupted: bool = False  # Ctrl-C / SIGTERM: what finished is stored, the rest is missing


def default_out(exp: Experiment) -> Path:
    return Path(exp.run.get("out") or Path("runs") / exp.name)


def axes_label(exp: Experiment):
    """Name trials by the model and the options this experiment sweeps, not by its fixed settings."""
    from suite.rows import trial_label

    axes = [a for a in exp.axes if a != "model"]
    return lambda trial: trial_label(trial, axes)


def known_problems(exp: Experiment) -> dict[str, str]:
    """trial_id -> reason, for trials that cannot run as configured (checked without running them)."""
    from suite.data import check_dataset
    from suite.tower import static_problems

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
    from rich.console import Console

    from suite.env import capture_env
    from suite.execute import run_trial
    from suite.measure import resolve_device
    from suite.runner import run_trials
    from suite.store import DEFAULT_NAME, ResultStore

    console = console or Console(stderr=True, quiet=False)
    exp = load_experiment(path)
    out_dir = Path(out) if out else default_out(exp)
    db_path = out_dir / DEFAULT_NAME
    skipped = known_problems(exp)

    store = ResultStore(db_path)
    try:
        env = capture_env(resolve_device(exp.trials[0].device))
        resume = resume or retry_failed
        done = store.done_ids(env.key(), statuses=("ok", "skipped") if retry_failed else None)
        if done and not resume:
            raise FileExistsError(
                f"{db_path} already holds {len(done)} result(s) of this environment; "
                "pass --resume to run only the missing trials, or --out DIR for a fresh run"
            )
        store.set_meta("experiment", {"name": exp.name, "source": exp.source, "description": exp.description,
                                      "select": exp.select, "compare": exp.compare, "axes": exp.axes})
        store.set_meta("experiment_text", exp.text)
        todo = [t for t in exp.trials if t.trial_id not in done]
        start = time.time()
        records: list[TrialRecord] = []

        def keep(record: TrialRecord) -> None:
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
            fn=f"{run_trial.__module__}:{run_trial.__name__}",
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
    measured = results.measured_time_s
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    report_path = None
    if report:
        from suite.report import write_report

        report_path = write_report(db_path, out_dir / "report.md")
    if results.interrupted:
        console.print(f"interrupted: {len(records)} results stored in {db_path}; "
                      f"`suite run {exp.source} --resume` runs the rest")
    elif report_path:
        console.print(f"report: {report_path}")
    return SweepSummary(db_path, report_path, len(records), len(done), statuses, wall, measured, results.interrupted)
