"""Issue 27: the regression gate never passes a planted regression (docs/gate.md).

Every figure here is injected: stores built from `factories.make_record`, re-measurements by the
stub trial function `trialfns:behave`, and the suite's own trial function replaced by one that fails
the test if it runs. No tower is built and nothing is timed.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from factories import CPU, make_record, write_store
from trialfns import fake_env

import suite.gate.confirm as confirm
from suite.cli.main import main
from suite.core.errors import SuiteError
from suite.experiment.criteria import parse_thresholds
from suite.gate.compare import compare_paths
from suite.gate.confirm import confirm_paths

FAKE_ENV = {k: v for k, v in vars(fake_env("cpu")).items() if v is not None and k != "env_platform"}
FAST = dict(infer_samples_per_sec=100.0, infer_step_time=160.0, infer_step_time_iqr=1.0)
SLOW = dict(infer_samples_per_sec=50.0, infer_step_time=320.0, infer_step_time_iqr=1.0)  # halved
OLD, NEW = "a" * 40, "b" * 40


def _store(path, env: dict, **fields):
    return write_store(path / "results.sqlite", [make_record("ok_tower", env=env, **fields)])


def _pair(tmp_path, base_env: dict, cur_env: dict, base=FAST, cur=SLOW):
    return _store(tmp_path / "base", base_env, **base), _store(tmp_path / "cur", cur_env, **cur)


@pytest.fixture
def inline(monkeypatch):
    """Re-measurements run in this process, in schedule order (`run_trials` would spawn a worker and
    import torch there: seconds per test for a stub that returns a fixed figure)."""
    from suite.sweep.workers import load_fn

    def run_trials(schedule, *, fn, fn_kwargs, **_):
        return [load_fn(fn)(trial, **fn_kwargs) for trial in schedule]

    monkeypatch.setattr(confirm, "run_trials", run_trials)


def _no_measuring(monkeypatch):
    """The suite's own trial function must not run: building a tower here would be a real timing."""
    monkeypatch.setattr(confirm, "run_trials", lambda *a, **k: pytest.fail("trials were re-measured"))


# --- 1. the exit code is the verdict, whatever happens to stdout --------------------------------------


def test_a_closed_stdout_never_turns_a_failing_gate_into_a_pass(tmp_path, monkeypatch):
    """`suite compare A B --no-confirm | head -3`: the reader goes away, the regression still fails."""
    base, cur = _pair(tmp_path, CPU, CPU)
    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write is EPIPE (line-buffered: the first line raises, as in a pipe)
    monkeypatch.setattr(sys, "stdout", open(write, "w", buffering=1))
    assert main(["compare", str(base), str(cur), "--no-confirm"]) == 1
    same = main(["compare", str(base), str(base), "--no-confirm"])
    assert same == 0  # and a pass stays a pass


def test_a_closed_stdout_in_a_real_process_keeps_the_verdict(tmp_path):
    """The interpreter's own flush at exit must not fail either (it made the exit code 120)."""
    base, cur = _pair(tmp_path, CPU, CPU)
    code = ("import os, sys; from suite.cli.main import main; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            f"sys.exit(main(['compare', {str(base)!r}, {str(cur)!r}, '--no-confirm']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_closed_stdout_is_still_a_clean_exit_for_other_commands(tmp_path, monkeypatch):
    base = _store(tmp_path / "base", CPU, **FAST)
    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stdout", open(write, "w", buffering=1))
    assert main(["report", str(base)]) == 0


# --- 2. re-measurement runs only the code that produced the figures ------------------------------------


def test_current_measured_by_another_commit_is_not_remeasured_with_this_code(tmp_path, monkeypatch, capsys):
    """The issue's `othercur`: rows of an older commit, train throughput halved, `--confirm 1`."""
    env = {**CPU, "env_git_commit": OLD}
    base = _store(tmp_path / "base", env)
    cur = _store(tmp_path / "cur", env, train_samples_per_sec=50.0)
    _no_measuring(monkeypatch)
    monkeypatch.setattr(confirm, "checkout_commit", lambda: NEW)
    monkeypatch.setattr(confirm, "measurable_here", lambda row: True)  # only the commit decides here
    assert main(["compare", str(base), str(cur), "--confirm", "1"]) == 1
    out = capsys.readouterr().out
    assert f"CURRENT was measured by commit {OLD[:12]}, this checkout is {NEW[:12]}" in out
    assert "the stored figures stand" in out and "Regression gate: FAIL" in out


@pytest.mark.parametrize("here, why", [(NEW + "+dirty", "has uncommitted changes"), ("", "is not a git checkout")])
def test_a_dirty_or_unknown_checkout_never_remeasures(tmp_path, monkeypatch, here, why):
    env = {**CPU, "env_git_commit": NEW}
    base, cur = _pair(tmp_path, env, env)
    _no_measuring(monkeypatch)
    monkeypatch.setattr(confirm, "checkout_commit", lambda: here)
    result = confirm_paths(base, cur, rounds=2)
    assert result.exit_code == 1 and why in result.markdown


def test_current_measured_dirty_is_not_remeasured(tmp_path, inline):
    env = {**FAKE_ENV, "env_git_commit": NEW + "+dirty"}
    base, cur = _pair(tmp_path, env, env)
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 99.0}, code=NEW)
    assert result.exit_code == 1 and "uncommitted changes" in result.markdown


def test_current_of_this_clean_commit_is_remeasured(tmp_path, inline):
    """The positive control: the same clean commit re-measures (a stub that runs at 99 img/s: noise)."""
    env = {**FAKE_ENV, "env_git_commit": NEW}
    base, cur = _pair(tmp_path, env, env, cur=dict(infer_samples_per_sec=80.0, infer_step_time=200.0,
                                                   infer_step_time_iqr=1.0))
    result = confirm_paths(base, cur, rounds=1, fn="trialfns:behave", fn_kwargs={"rate": 99.0}, code=NEW,
                           baseline_fn="trialfns:behave", baseline_kwargs={"rate": 100.0})
    assert result.exit_code == 0, result.markdown
    assert f"CURRENT re-measured with this checkout's code (commit {NEW[:12]})" in result.markdown


def test_the_report_names_the_code_each_side_was_measured_with(tmp_path):
    base, cur = _pair(tmp_path, {**CPU, "env_git_commit": OLD}, {**CPU, "env_git_commit": NEW + "+dirty"})
    text = compare_paths(base, cur).markdown
    assert f"Code measured: baseline `{OLD[:12]}` (clean); current `{NEW[:12]}` with uncommitted changes" in text
    unknown = compare_paths(*_pair(tmp_path / "u", CPU, CPU)).markdown
    assert "baseline unknown commit (not measured in a git checkout)" in unknown


@pytest.mark.parametrize("commit, why", [
    (None, "BASELINE's rows do not say which commit measured them"),
    (OLD + "+dirty", "BASELINE was measured with uncommitted changes"),
    (OLD, f"BASELINE was measured by commit {OLD[:12]}, which could not be rebuilt here"),
])
def test_a_baseline_that_cannot_be_rebuilt_says_so(tmp_path, inline, commit, why):
    """Its stored figure stands (a lucky 125 img/s against a true 100: the flag holds), and the report says why."""
    lucky = dict(infer_samples_per_sec=125.0, infer_step_time=128.0, infer_step_time_iqr=1.0)
    base, cur = _pair(tmp_path, {**FAKE_ENV, "env_git_commit": commit}, {**FAKE_ENV, "env_git_commit": NEW},
                      base=lucky, cur=FAST)
    result = confirm_paths(base, cur, rounds=1, fn="trialfns:behave", fn_kwargs={"rate": 100.0}, code=NEW)
    assert result.exit_code == 1 and why in result.markdown
    assert "the stored figures stand" in result.markdown


# --- 3. a gated metric missing on one side fails ---------------------------------------------------------


def _null(db, column: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(f'UPDATE trials SET "{column}" = NULL')


def test_a_gated_metric_null_in_current_fails(tmp_path):
    base, cur = _pair(tmp_path, CPU, CPU, cur=FAST)
    _null(cur, "train_samples_per_sec")
    result = compare_paths(base, cur)
    assert result.exit_code == 1
    assert "train_samples_per_sec missing: not compared (no value stored in current)" in result.markdown
    dropped = compare_paths(base, cur, parse_thresholds(["train_samples_per_sec=off"]))
    assert dropped.exit_code == 0  # the user turned that threshold off


def test_a_gated_metric_null_in_baseline_fails(tmp_path):
    base, cur = _pair(tmp_path, CPU, CPU, cur=FAST)
    _null(base, "infer_samples_per_sec")
    result = compare_paths(base, cur)
    assert result.exit_code == 1 and "infer_samples_per_sec missing: not compared (no value stored in baseline)" \
        in result.markdown


def test_a_baseline_without_the_column_fails(tmp_path):
    """An older store that never had `probe_top1`: absent, not silently dropped."""
    base, cur = _pair(tmp_path, CPU, CPU, cur=FAST)
    with sqlite3.connect(base) as conn:
        conn.execute('ALTER TABLE trials DROP COLUMN "probe_top1"')
        conn.execute("DELETE FROM columns WHERE name = 'probe_top1'")
    result = compare_paths(base, cur)
    assert result.exit_code == 1 and "probe_top1 missing: not compared (no value stored in baseline)" \
        in result.markdown


def test_a_metric_neither_run_measured_is_not_a_failure(tmp_path):
    """mode: infer on both sides has no train figures: nothing missing, and the report says it was not gated."""
    import dataclasses

    record = make_record("ok_tower", mode="infer", **FAST)
    train = {f.name: None for f in dataclasses.fields(record.measure) if f.name.startswith("train_")}
    record = dataclasses.replace(record, measure=dataclasses.replace(record.measure, **train))
    base = write_store(tmp_path / "base.sqlite", [record])
    cur = write_store(tmp_path / "cur.sqlite", [record])
    result = compare_paths(base, cur)
    assert result.exit_code == 0, result.markdown
    assert "(nothing to gate): `train_samples_per_sec`, `train_peak_mem_mib`." in result.markdown


# --- 4 and 8. counts and flags checked before any work ---------------------------------------------------


def test_absurd_confirm_rounds_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    base, cur = _pair(tmp_path, CPU, CPU)
    monkeypatch.setattr(confirm, "compare_paths", lambda *a, **k: pytest.fail("the stores were read"))
    with pytest.raises(SystemExit) as info:
        main(["compare", str(base), str(cur), "--confirm", "1000000000000000000000"])
    assert info.value.code == 2 and "from 1 to 100" in capsys.readouterr().err
    with pytest.raises(SuiteError, match="from 1 to 100"):
        confirm_paths(base, cur, rounds=10**21)


@pytest.mark.parametrize("flags", [["--confirm", "2", "--no-confirm"], ["--no-confirm", "--confirm", "2"],
                                   ["--confirm", "--no-confirm"]])
def test_confirm_and_no_confirm_exclude_each_other(tmp_path, flags, capsys):
    base, cur = _pair(tmp_path, CPU, CPU)
    with pytest.raises(SystemExit) as info:
        main(["compare", str(base), str(cur), *flags])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [(["compare", "a", "b", "--confirm", "abc"], "re-measurement rounds"),
                                         (["run", "x.yaml", "--workers", "abc"], "whole number of workers"),
                                         (["run", "x.yaml", "--timeout", "abc"], "number of seconds")])
def test_bad_numbers_get_readable_messages(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "_positive" not in err and "_rounds" not in err


def test_an_output_folder_is_refused_before_remeasuring(tmp_path, monkeypatch, capsys):
    base, cur = _pair(tmp_path, CPU, CPU)
    monkeypatch.setattr(confirm, "confirm_paths", lambda *a, **k: pytest.fail("re-measured before checking -o"))
    assert main(["compare", str(base), str(cur), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["compare", str(base), str(cur), "-o", str(cur)]) == 2  # an input, never overwritten
    assert "is an input of this command" in capsys.readouterr().err


# --- 8. environments -------------------------------------------------------------------------------------


def test_another_cpu_or_thread_count_is_another_environment(tmp_path):
    """A 64-thread Xeon baseline against a 2-core run: said, not gated on speed, and the gate cannot pass."""
    xeon = {**CPU, "env_cpu": "Intel Xeon Platinum 8380", "env_threads": 64}
    base, cur = _pair(tmp_path, xeon, CPU, cur=FAST)
    result = compare_paths(base, cur)
    assert result.exit_code == 1 and not result.changes
    assert "cpu Intel Xeon Platinum 8380 vs AMD EPYC; threads 64 vs 2" in result.markdown
    threads_only = compare_paths(*_pair(tmp_path / "t", {**CPU, "env_threads": 1}, CPU, cur=FAST))
    assert threads_only.exit_code == 1 and "threads 1 vs 2" in threads_only.markdown


def test_one_trial_moved_to_another_environment_still_fails(tmp_path):
    """Relabelling the regressed trial's environment must not hide it while the others pass."""
    base = write_store(tmp_path / "b.sqlite", [make_record("test_vit"), make_record("test_resnet")])
    cur = write_store(tmp_path / "c.sqlite", [make_record("test_vit"),
                                              make_record("test_resnet", env={**CPU, "env_threads": 3},
                                                          train_samples_per_sec=50.0)])
    result = compare_paths(base, cur)
    assert result.n_compared == 1 and result.exit_code == 1
    assert "1 trials were measured in another environment" in result.markdown


def test_an_old_store_without_the_new_environment_fields_still_compares(tmp_path):
    """Rows stored before the CPU model and threads counted (and with the old env_key): compared, noted."""
    base, cur = _pair(tmp_path, CPU, CPU, base=FAST, cur=FAST)
    with sqlite3.connect(base) as conn:
        conn.execute("UPDATE trials SET env_cpu = NULL, env_threads = NULL, env_key = 'cpu|2.14.1|1.0.31|None'")
    result = compare_paths(base, cur)
    assert result.n_compared == 1 and result.exit_code == 0, result.markdown
    assert "Not recorded by one side (an older store): env_cpu, env_threads" in result.markdown
    slow = _store(tmp_path / "slow", CPU, **SLOW)
    assert compare_paths(base, slow).exit_code == 1  # and a regression against it still fails


def test_strict_turns_cannot_tell_into_exit_3_and_github_warns(tmp_path, capsys):
    """A slowdown beyond the threshold hidden in wider noise passes with a warning; `--strict` exits 3 (a
    regression still exits 1, a clean pass 0), and `--format github` warns about it."""
    from factories import make_record, write_store

    from suite.cli.main import main

    def store(name, rate, iqr_rel):
        return write_store(tmp_path / name / "results.sqlite", [make_record(
            "test_vit", train_samples_per_sec=rate, train_step_time=32_000.0 / rate,
            train_step_time_iqr=iqr_rel * 32_000.0 / rate)]).parent

    base, noisy, tight = store("base", 100.0, 0.05), store("noisy", 92.0, 0.05), store("tight", 80.0, 0.0)
    assert main(["compare", str(base), str(noisy), "--no-confirm"]) == 0
    assert "Cannot tell on this machine" in capsys.readouterr().out
    assert main(["compare", str(base), str(noisy), "--no-confirm", "--strict"]) == 3
    assert main(["compare", str(base), str(base), "--no-confirm", "--strict"]) == 0
    assert main(["compare", str(base), str(tight), "--no-confirm", "--strict"]) == 1
    capsys.readouterr()
    assert main(["compare", str(base), str(noisy), "--no-confirm", "--format", "github"]) == 0
    out = capsys.readouterr().out
    assert "::warning title=suite compare%3A cannot tell::" in out and "::error" not in out
    assert "### Flagged, not failing (1)" in out
