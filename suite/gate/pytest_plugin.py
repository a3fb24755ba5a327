"""The pytest plugin (entry point `pytest11`): a tower benchmark inside a project's own test suite.

```python
def test_tower(tower_bench):
    record = tower_bench(model="vit_base_patch16_224", pool="token", precision="bf16", device="cuda",
                         expect=["infer_samples_per_sec >= 2000", "infer_peak_mem_mib <= 4096"])
```

`tower_bench(**trial_fields, expect=[...], phase=None)` measures the configuration through the suite
(`suite.sweep.trial.run_trial`: the same Trial fields, timing and memory as `suite bench`), fails the test
when the trial does not run as configured or a `METRIC OP NUMBER` expectation does not hold, and
records into pytest-benchmark's `benchmark` fixture: its stats (from the suite's median step time and
IQR) and `extra_info` (every figure of the record: throughput, memory, FLOPs, MFU, environment), so
`--benchmark-autosave`, `--benchmark-compare`, `--benchmark-json` and `--benchmark-histogram` work as
they do for any benchmark.

Options:
- `--tower-baseline PATH`: gate each measured trial against a stored run (a results store) with
  `suite compare`'s thresholds and noise band; flagged throughput regressions are re-measured
  (`--tower-confirm N`, default 2) and fail only when they hold;
- `--tower-store PATH`: also store every record in a results store (a later baseline; `suite history`
  reads the measured project's commit from its `project_commit` entry).

Importing this module is light (pytest loads it in every run): torch is imported when a test
measures, not before.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

EXTRA_FIELDS = ("samples_per_sec", "step_time", "step_time_iqr", "peak_mem_mib", "gflops", "tflops", "mfu",
                "batch_size", "timed_steps")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("tower-bench", "timm tower benchmarks (suite)")
    group.addoption("--tower-baseline", metavar="PATH",
                    help="gate tower_bench measurements against this results store (suite compare's noise handling)")
    group.addoption("--tower-confirm", type=int, default=2, metavar="N",
                    help="re-measurements of a flagged throughput regression before it fails (default 2; 0: none)")
    group.addoption("--tower-store", metavar="PATH", help="also store every tower_bench record in this results store")


def pytest_configure(config) -> None:
    """A --tower-confirm outside 0..MAX_CONFIRM_ROUNDS is refused before any test runs, as `suite compare
    --confirm` refuses it (each round re-measures a flagged tower once)."""
    from suite.experiment.criteria import MAX_CONFIRM_ROUNDS

    rounds = config.getoption("tower_confirm")
    if not 0 <= rounds <= MAX_CONFIRM_ROUNDS:
        raise pytest.UsageError(f"--tower-confirm {rounds}: give a whole number from 0 to {MAX_CONFIRM_ROUNDS}")


def _trial(fields: dict):
    from suite.core.options import Trial

    return Trial(**fields)


def _synthetic_steps(median: float, iqr: float, n: int) -> list[float]:
    """`n` step times (seconds) whose median is `median` and whose spread is `iqr`: the suite stores the
    median and IQR of its timed steps, not each step."""
    n = max(n, 1)
    return [max(median + iqr * (2 * (i + 0.5) / n - 1), 1e-12) for i in range(n)] if n > 1 else [median]


def record_into(benchmark, record, phase: str) -> None:
    """The record's figures into pytest-benchmark's fixture: stats of `phase`, every figure in extra_info."""
    flat = record.flat()
    benchmark.extra_info.update({k: v for k, v in flat.items() if v is not None and (
        k.startswith(("env_", "param_count", "trainable_param_count", "device_peak")) or
        any(k == f"{p}_{f}" for p in ("infer", "train") for f in EXTRA_FIELDS))})
    benchmark.extra_info.update(trial_id=flat["trial_id"], model=flat["model"], phase=phase,
                                stats_from="the suite's median step time and IQR (steps reconstructed)")
    benchmark._mode = "tower_bench(...)"  # the fixture was used: no "not used at all" warning
    if benchmark.disabled:
        return
    median_ms, iqr_ms = flat.get(f"{phase}_step_time"), flat.get(f"{phase}_step_time_iqr") or 0.0
    steps = int(flat.get(f"{phase}_timed_steps") or flat.get("iters") or 1)
    stats = benchmark._make_stats(1)
    for seconds in _synthetic_steps(median_ms / 1000.0, iqr_ms / 1000.0, steps):
        stats.update(seconds)


def check_expectations(record, expect) -> list[str]:
    """The `METRIC OP NUMBER` expectations that do not hold (a figure not measured fails too)."""
    from suite.experiment.criteria import parse_constraint

    flat, failed = record.flat(), []
    for text in expect or ():
        c = parse_constraint(text, "tower_bench(expect=...)")
        value = flat.get(c.metric)
        if value is None or not c.holds(float(value)):
            failed.append(f"{c.text}: measured {value if value is not None else 'nothing'}")
    return failed


def gate(record, baseline: str | Path, remeasure=None, rounds: int = 2, thresholds: dict | None = None):
    """`suite compare` of one record against its trial in the stored `baseline`; flagged throughput
    regressions re-measured `rounds` times with `remeasure()` (a new record) and kept only if they hold.
    None when the baseline does not hold the trial."""
    import pandas as pd

    from suite.gate.compare import apply_confirmation, compare, flagged_timing, gates_of
    from suite.results.store import load_results

    base = load_results(baseline)
    base = base[base["trial_id"] == record.trial.trial_id] if len(base) else base
    if not len(base):
        return None
    gates = gates_of(baseline, thresholds)
    result = compare(base, pd.DataFrame([record.flat()]), gates)
    flagged = flagged_timing(result)
    if flagged and remeasure is not None and rounds > 0:
        again = [remeasure() for _ in range(rounds)]
        values = {(ch.trial_id, ch.metric): [v for r in again if (v := r.flat().get(ch.metric)) is not None]
                  for ch in flagged}
        apply_confirmation(result, values, gates)
    return result


def _project_commit(root: Path) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _store(config, record) -> None:
    from suite.results.store import ResultStore

    path = Path(config.getoption("tower_store"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with ResultStore(path) as store:
        store.write(record)
        commit = _project_commit(Path(config.rootpath))
        if commit:
            store.set_meta("project_commit", commit)


@pytest.fixture
def tower_bench(request, benchmark):
    """`tower_bench(**trial_fields, expect=(...), phase=None) -> TrialRecord`: measure a tower through the
    suite, fail on a failed trial, an expectation or a regression against `--tower-baseline`."""
    config = request.config

    def run(*, expect=(), phase: str | None = None, **fields):
        from suite.sweep.trial import run_trial

        trial = _trial(fields)
        record = run_trial(trial)
        if record.status != "ok":
            pytest.fail(f"tower_bench: {trial.label} did not run as configured: {record.status}: {record.reason}")
        flat = record.flat()
        chosen = phase or ("infer" if flat.get("infer_step_time") else "train")
        record_into(benchmark, record, chosen)
        if config.getoption("tower_store"):
            _store(config, record)
        failed = check_expectations(record, expect)
        if failed:
            pytest.fail("tower_bench: expectations not met:\n  " + "\n  ".join(failed), pytrace=False)
        if config.getoption("tower_baseline"):
            result = gate(record, config.getoption("tower_baseline"), lambda: run_trial(trial),
                          config.getoption("tower_confirm"))
            if result is None:
                request.node.warn(pytest.PytestWarning(
                    f"tower_bench: {trial.label} is not in --tower-baseline: not gated"))
            elif result.exit_code:
                pytest.fail("tower_bench: regression against --tower-baseline:\n  "
                            + "\n  ".join(result.regressions + result.env_uncompared), pytrace=False)
        return record

    return run
