"""Does the regression gate cry wolf? Identical runs must pass; an injected 10% slowdown must fail.

    python -m benchmarks.bench_gate                           # experiments/smoke.yaml, 3 pairs
    python -m benchmarks.bench_gate --pairs 1 --slowdown 0.10 --confirm 3

1. Runs the experiment `pairs + 1` times in a row (same machine, same commit) and compares each
   run with the one before: `suite compare` must pass (no throughput or memory regression), first
   as it is, then with `--confirm` where it flagged something.
2. Runs the same trials once more with every timed step made `slowdown` slower on purpose (a trial
   function that busy-waits that fraction of each step's own duration), and compares it with the
   last identical run: the gate must fail, with and without `--confirm` (which re-measures the
   slowed steps against the baseline rebuilt with the unslowed ones, as CI would with two commits).

Prints figures; exits non-zero only on an error. Needs an idle machine (several minutes).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SLOWER_TRIAL = "benchmarks.bench_gate:slower_trial"  # the trial function workers import (from the repository root)


class _Slowed:
    """A step that busy-waits `factor` of its own duration after each call (other attributes pass through)."""

    def __init__(self, step, factor: float):
        self._step, self._factor = step, factor

    def __call__(self, x):
        t0 = time.perf_counter()
        out = self._step(x)
        end = time.perf_counter() + self._factor * (time.perf_counter() - t0)
        while time.perf_counter() < end:
            pass
        return out

    def __getattr__(self, name):
        return getattr(self._step, name)


def slower_trial(trial, factor: float = 0.10):
    """`suite.sweep.trial.run_trial` with every measured step `factor` slower (runs in a worker)."""
    import suite.measurement.engine as measure
    from suite.sweep.trial import run_trial

    make_step = measure.step_fn

    def slowed(*args, **kwargs):
        return _Slowed(make_step(*args, **kwargs), factor)

    # Only for this trial: --confirm runs the rebuilt (unslowed) baseline in the same worker.
    measure.step_fn = slowed
    try:
        return run_trial(trial)
    finally:
        measure.step_fn = make_step


def _gate(base: Path, cur: Path, confirm: int, fn: str, fn_kwargs: dict | None, baseline_fn: str | None = None) -> str:
    from suite.gate.compare import compare_paths, is_timing
    from suite.gate.confirm import confirm_paths

    plain = compare_paths(base, cur)
    timing = sum(is_timing(ch.metric) and ch.verdict == "regression" for ch in plain.changes)
    memory = sum("mem" in ch.metric and ch.verdict == "regression" for ch in plain.changes)
    text = (f"{'FAIL' if plain.exit_code else 'PASS'}: {plain.n_compared} trials compared, "
            f"{timing} throughput and {memory} memory regressions")
    if confirm and timing:
        confirmed = confirm_paths(base, cur, rounds=confirm, fn=fn, fn_kwargs=fn_kwargs, baseline_fn=baseline_fn)
        held = sum(ch.verdict == "regression" and is_timing(ch.metric) for ch in confirmed.changes)
        text += f"; with --confirm {confirm}: {'FAIL' if confirmed.exit_code else 'PASS'} ({held} held)"
    return text


def _slow_run(exp_path: str, out: Path, like: Path, slowdown: float) -> Path:
    """The experiment's trials through `slower_trial`, stored like a sweep stores them."""
    from suite.experiment.spec import load_experiment
    from suite.results.store import ResultStore, load_meta
    from suite.sweep.pool import run_trials

    exp = load_experiment(exp_path)
    db = out / "results.sqlite"
    out.mkdir(parents=True)
    with ResultStore(db) as store:
        for key, value in load_meta(like).items():
            store.set_meta(key, value)
        run_trials(list(exp.trials), fn=SLOWER_TRIAL, fn_kwargs={"factor": slowdown},
                   on_result=store.write, progress=False)
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/smoke.yaml")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--slowdown", type=float, default=0.10)
    parser.add_argument("--confirm", type=int, default=3, help="rounds of --confirm (0: off)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    from suite.sweep.driver import run_experiment
    from suite.sweep.workers import DEFAULT_FN

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-gate-"))
    runs = []
    for i in range(args.pairs + 1):
        start = time.perf_counter()
        summary = run_experiment(args.experiment, out=root / f"run{i}", quiet=True, report=False)
        runs.append(summary.db_path)
        print(f"run {i}: {summary.ran} trials, {summary.statuses} in {time.perf_counter() - start:.0f} s", flush=True)
        if i:
            print(f"  compare run{i - 1} run{i}: " + _gate(runs[i - 1], runs[i], args.confirm, DEFAULT_FN, None),
                  flush=True)
    slow = _slow_run(args.experiment, root / "slow", runs[-1], args.slowdown)
    print(f"injected {args.slowdown:.0%} slowdown: compare run{args.pairs} slow: "
          + _gate(runs[-1], slow, args.confirm, SLOWER_TRIAL, {"factor": args.slowdown}, DEFAULT_FN))


if __name__ == "__main__":
    main()
