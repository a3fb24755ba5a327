"""`suite`: a thin command line over the library.

Each command is one library call. The flags of `bench`, `probe` and `profile` are derived from
`suite.core.options.OPTIONS` (the same schema as the experiment files), never written twice.
Exit codes: 0 success, 1 a failed trial or a regression, 2 bad input (nothing ran), 3 `compare --strict`: cannot tell.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from suite.cli.flags import add_option_flags, confirm_rounds, positive_int, positive_seconds, trial_from_args
from suite.core.errors import SuiteError
from suite.core.options import Trial
from suite.core.paths import check_output
from suite.experiment.criteria import MAX_CONFIRM_ROUNDS
from suite.report.export import FORMATS

EXIT_BAD_INPUT = 2
EXIT_CANNOT_TELL = 3  # compare --strict: a change the noise of this machine hides
GATES = ("compare",)  # commands whose exit code is a verdict: a closed stdout never changes it
DEFAULT_CONFIRM_ROUNDS = 3



# --- commands ----------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(stderr=True)


def cmd_run(args) -> int:
    from suite.sweep.driver import run_experiment

    summary = run_experiment(args.experiment, out=args.out, resume=args.resume, retry_failed=args.retry_failed,
                             backend=args.backend,
                             address=args.address, workers=args.workers, timeout_s=args.timeout,
                             quiet=args.quiet, report=not args.no_report, yes=args.yes)
    if summary.interrupted:
        return 130
    return 0 if summary.statuses.get("ok", 0) or not summary.ran else 1


def cmd_validate(args) -> int:
    from suite.experiment.spec import MAX_TRIALS, load_experiment
    from suite.sweep.driver import default_out, known_problems

    exp = load_experiment(args.experiment, max_trials=None if args.yes else MAX_TRIALS)
    bad = known_problems(exp)
    print(f"{exp.source}: experiment {exp.name!r}, {len(exp.trials)} trials"
          f" over axes {', '.join(exp.axes) or '(none)'}; {len(bad)} known invalid before running")
    for warning in exp.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for trial in exp.trials:
        if trial.trial_id in bad:
            print(f"  skip {trial.trial_id}  {trial.label}: {bad[trial.trial_id]}")
    from suite.experiment.estimate import estimate_cost

    print(estimate_cost(exp, Path(args.out) if args.out else default_out(exp), skip=set(bad)))
    return 0


def _check_model(trial: Trial) -> None:
    """Model name, weights and device, checked before any work (bad input: exit 2)."""
    from suite.experiment.checks import check_models
    from suite.experiment.spec import Experiment
    from suite.machine.device import resolve_device

    for note in check_models(Experiment(name="cli", source="command line", trials=(trial,))):
        print(f"warning: {note}", file=sys.stderr)
    resolve_device(trial.device)  # --device cuda without CUDA: an error now, not a record without an environment


def cmd_bench(args) -> int:
    from suite.sweep.trial import run_trial

    trial = trial_from_args(args)
    _check_model(trial)
    return _print_record(run_trial(trial), args.json, phase="measure")


def cmd_probe(args) -> int:
    from suite.core.records import TrialRecord
    from suite.machine.device import resolve_device
    from suite.probe.datasets import check_dataset
    from suite.probe.engine import probe_trial
    from suite.sweep.trial import classify, trial_env

    trial = trial_from_args(args)
    _check_model(trial)
    check_dataset(trial)
    device = resolve_device(trial.device)
    try:
        record = TrialRecord(trial, "ok", probe=probe_trial(trial, device=device), env=trial_env(device))
    except Exception as exc:  # noqa: BLE001 - shown as a record like any trial
        record = TrialRecord(trial, *classify(exc), env=trial_env(device))
    return _print_record(record, args.json, phase="probe")


def _print_record(record, as_json: bool, phase: str) -> int:
    """The record as JSON or a table; exit code 0 only when the trial ran as configured."""
    if record.measure.mfu_note:  # a figure that cannot be right is not shown: say why, on stderr
        print(f"warning: {record.measure.mfu_note}", file=sys.stderr)
    if as_json:
        print(json.dumps(record.flat(), indent=2, default=str))
    else:
        from suite.cli.show import show_record

        show_record(record, phase=phase)
    return 0 if record.status == "ok" else 1


def _results(text: str) -> Path:
    """The results database named by a file or a run folder (FileNotFoundError, exit 2, if none)."""
    from suite.results.store import resolve_path

    return resolve_path(text)


def cmd_report(args) -> int:
    from suite.report.render import write_report

    db = _results(args.results)
    if args.output:
        check_output(args.output, protect=(db,), folder_name="report.md")
    path = write_report(db, args.output)
    print(path)
    return 0


def cmd_compare(args) -> int:
    from suite.experiment.criteria import parse_thresholds
    from suite.gate.compare import compare_paths

    thresholds = parse_thresholds(args.threshold) if args.threshold else None
    baseline, current = _results(args.baseline), _results(args.current)
    for out in (args.output, args.junit):  # before any work: a folder, an input or a store in the way is found now
        if out:
            check_output(out, protect=(baseline, current))
    rounds = DEFAULT_CONFIRM_ROUNDS if args.confirm is None else args.confirm
    if rounds:
        from suite.gate.confirm import confirm_paths

        result = confirm_paths(baseline, current, thresholds, rounds=rounds, console=_console(),
                               budget_s=args.confirm_budget)
    else:
        result = compare_paths(baseline, current, thresholds)
    from suite.gate.ci_output import markdown, render, write_junit

    text, notes = render(result, args.format)
    if args.output:
        Path(args.output).write_text(result.markdown if args.format == "text" else markdown(result))
    if args.junit:
        write_junit(result, args.junit)
    _print_verdict(text)
    for note in notes:
        print(note, file=sys.stderr)
    if args.strict and not result.exit_code and result.cannot_tell:
        return EXIT_CANNOT_TELL
    return result.exit_code


def _print_verdict(text: str) -> None:
    """Print the gate's report; a reader that went away (`| head`) loses the rest, the exit code stays the verdict."""
    try:
        print(text)
        sys.stdout.flush()  # here, not at interpreter exit (where a failed flush would make the exit code 120)
    except BrokenPipeError:
        stdout_to_devnull()


def stdout_to_devnull() -> None:
    """After EPIPE: point stdout at /dev/null so that later writes and the flush at exit cannot fail
    (the Python docs' recipe, `signal` module: "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (a test's capture)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    finally:
        os.close(devnull)


def cmd_history(args) -> int:
    from suite.gate.history import parse_step, write_history

    step = parse_step(args.step)
    print(write_history([_results(p) for p in args.results], args.output, metric=args.metric, threshold=step).markdown)
    return 0


def cmd_export(args) -> int:
    from suite.report.export import export

    print(export(_results(args.results), args.format, args.output, trial_id=args.trial))
    return 0


def cmd_profile(args) -> int:
    from suite.measurement.profile import profile_trial

    trial = trial_from_args(args)
    if Path(args.logdir).exists() and not Path(args.logdir).is_dir():
        raise SuiteError(f"--logdir {args.logdir} is a file; give a folder for the TensorBoard traces")
    _check_model(trial)
    print(profile_trial(trial, args.logdir, steps=args.steps, phase=args.phase))
    return 0


# --- the parser ----------------------------------------------------------------------------------

def _add_compare(sub) -> None:
    """The gate's flags (`suite compare`)."""
    p = sub.add_parser("compare", help="regression gate: exit 1 when CURRENT is worse than BASELINE beyond noise")
    p.add_argument("baseline")
    p.add_argument("current")
    p.add_argument("--threshold", action="append", metavar="METRIC=CHANGE",
                   help="e.g. train_samples_per_sec=-3%% or probe_top1=-0.5 (repeatable)")
    p.add_argument("-o", "--output", help="also write the markdown table here")
    p.add_argument("--format", choices=("text", "markdown", "github"), default="text",
                   help="text: the full report; markdown: the pull request's table; github: that table appended to "
                        "$GITHUB_STEP_SUMMARY and ::error/::warning lines (docs/ci.md)")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML: one test case per trial and metric")
    p.add_argument("--strict", action="store_true", help="exit 3 when the gate cannot tell: a change worse than "
                   "its threshold inside a noise band wider than it (default: a warning, exit 0)")
    confirm = p.add_mutually_exclusive_group()
    confirm.add_argument("--confirm", type=confirm_rounds, nargs="?", const=DEFAULT_CONFIRM_ROUNDS, default=None, metavar="ROUNDS",
                         help="re-measure flagged throughput changes on this machine, with the code that measured "
                              "CURRENT only (docs/gate.md): where the baseline's code can be rebuilt, as an A/B "
                              "experiment that adds pairs until decided or out of --confirm-budget; otherwise the "
                              f"current side ROUNDS times (default {DEFAULT_CONFIRM_ROUNDS}, at most "
                              f"{MAX_CONFIRM_ROUNDS}) against the stored baseline. Fail only on those that hold")
    p.add_argument("--confirm-budget", type=positive_seconds, metavar="SECONDS",
                   help="time limit of the A/B re-measurement (default: twice the flagged trials' original "
                        "measuring time); what it cannot decide within it is 'cannot tell'")
    confirm.add_argument("--no-confirm", dest="confirm", action="store_const", const=0,
                         help="judge the stored figures only (no re-measurement)")
    p.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    from suite import __version__

    parser = argparse.ArgumentParser(prog="suite", description="Benchmark and ablate timm models as CLIP vision towers.")
    parser.add_argument("--version", action="version", version=f"suite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run an experiment file: every trial, stored as it finishes, then the report")
    p.add_argument("experiment", help="experiments/NAME.yaml")
    p.add_argument("--out", help="output folder (default: runs/<experiment name>)")
    p.add_argument("--resume", action="store_true", help="run only the trials not yet in the results database")
    p.add_argument("--retry-failed", action="store_true",
                   help="with resume: also rerun trials stored as oom, error, crashed or timeout")
    p.add_argument("--backend", choices=("local", "ray"), help="where trials run (default: the file's run.backend or local)")
    p.add_argument("--address", help="Ray cluster address (with --backend ray)")
    p.add_argument("--workers", type=positive_int, help="local worker processes (one per GPU on multi-GPU machines)")
    p.add_argument("--timeout", type=positive_seconds, help="per-trial timeout in seconds")
    p.add_argument("--yes", action="store_true", help="run a grid above the trial limit (the count is shown first)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar (CI)")
    p.add_argument("--no-report", action="store_true", help="do not write the markdown report at the end")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check an experiment file and list its trials known to be invalid")
    p.add_argument("experiment")
    p.add_argument("--out", help="where earlier results are, for the cost estimate")
    p.add_argument("--yes", action="store_true", help="expand a grid above the trial limit")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="measure one configuration (throughput, memory, FLOPs, MFU)")
    add_option_flags(p, ("tower", "measure"))
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("probe", help="linear-probe one tower on a labeled data set")
    add_option_flags(p, ("tower", "probe"), also=("device", "precision"), defaults={"dataset": "digits"})
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("report", help="write the markdown report of a results database")
    p.add_argument("results", help="results.sqlite or the run folder")
    p.add_argument("-o", "--output", help="report file (default: report.md beside the database)")
    p.set_defaults(func=cmd_report)

    _add_compare(sub)

    p = sub.add_parser("history", help="a metric of each trial over the commits of result stores, with its steps")
    p.add_argument("results", nargs="+", help="results stores (or run folders), from one experiment")
    p.add_argument("--metric", help="default: train_samples_per_sec, else infer_samples_per_sec")
    p.add_argument("--step", default="5%", help="smallest step named (it must also exceed the noise; default 5%%)")
    p.add_argument("-o", "--output", help="folder for history.md and one PNG per trial")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("export", help="export results: " + ", ".join(FORMATS))
    p.add_argument("results")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--output", help="output file (default: beside the database)")
    p.add_argument("--trial", help="trial_id (prefix) for open-clip-config (default: the select block's best)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("profile", help="torch.profiler traces of one configuration for TensorBoard")
    add_option_flags(p, ("tower", "measure"))
    p.add_argument("--logdir", required=True, help="TensorBoard log folder")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after one warm-up)")
    p.add_argument("--phase", choices=("infer", "train"), default="train")
    p.set_defaults(func=cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Only the suite's own input errors (and a missing input file) are exit 2:
    any other exception is a bug, and shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SuiteError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # output piped into `head` and the like: not an error of the command
        stdout_to_devnull()
        if args.command in GATES:  # a gate that could not finish its report has no verdict to give
            print("error: the output stream closed before the gate finished", file=sys.stderr)
            return 1
        return 0
    except OSError as exc:  # a file the command must write: full disk, no permission, a folder in the way
        print(f"error: cannot write {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # `run` prints its own resume command (with the --out it used) before this is reached.
        print("interrupted" + ("" if args.command != "run" else ": the results stored so far are kept"),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
