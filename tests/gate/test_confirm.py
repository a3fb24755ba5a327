"""Confirming flagged throughput regressions by re-measuring them before failing the gate."""
from __future__ import annotations

from pathlib import Path

import pytest
from factories import make_record, write_store
from trialfns import fake_env

from suite.gate.compare import apply_confirmation, compare_paths, gates_of
from suite.gate.confirm import confirm_paths

FAKE_ENV = {k: v for k, v in vars(fake_env("cpu")).items() if v is not None and k != "env_platform"}
FAST = dict(infer_samples_per_sec=100.0, infer_step_time=160.0, infer_step_time_iqr=1.0)
SLOW = dict(infer_samples_per_sec=80.0, infer_step_time=200.0, infer_step_time_iqr=1.0)


@pytest.fixture()
def in_process(monkeypatch):
    """Run the confirmation's A/B schedule in this process, in order, with the stub trial functions of
    `trialfns` (their figures are injected: `rate`). The decision logic is what these tests check;
    worker processes are the runner's tests' business (a worker would import torch: seconds a test)."""
    import suite.gate.confirm as confirm
    from suite.sweep.workers import load_fn

    def run_trials(trials, *, fn, fn_kwargs, **_):
        return [load_fn(fn)(t, **fn_kwargs) for t in trials]

    monkeypatch.setattr(confirm, "run_trials", run_trials)


def _stores(tmp_path, base: dict, cur: dict):
    a = write_store(tmp_path / "a" / "results.sqlite", [make_record("ok_tower", env=FAKE_ENV, **base)])
    b = write_store(tmp_path / "b" / "results.sqlite", [make_record("ok_tower", env=FAKE_ENV, **cur)])
    return a, b


def test_a_flag_that_does_not_reproduce_is_not_confirmed(tmp_path, in_process):
    base, cur = _stores(tmp_path, FAST, SLOW)
    assert compare_paths(base, cur).exit_code == 1  # -20%: flagged
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 99.0})
    change = next(ch for ch in result.changes if ch.metric == "infer_samples_per_sec")
    assert change.verdict == "not confirmed" and change.remeasured == (99.0, 99.0)
    assert result.exit_code == 0 and "1 did not" in result.markdown


def test_a_real_slowdown_is_confirmed(tmp_path, in_process):
    base, cur = _stores(tmp_path, FAST, SLOW)
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 89.0})  # 11% slower
    change = next(ch for ch in result.changes if ch.metric == "infer_samples_per_sec")
    assert change.verdict == "regression" and result.exit_code == 1
    assert "confirmed: re-measured" in result.regressions[0]


def test_without_remeasurements_a_flag_stays_a_regression(tmp_path):
    """A trial that cannot be re-measured here (another environment) must not pass silently."""
    base, cur = _stores(tmp_path, FAST, SLOW)
    result = apply_confirmation(compare_paths(base, cur), {}, gates_of(cur))
    assert result.exit_code == 1


def test_status_regressions_survive_confirmation(tmp_path):
    a = write_store(tmp_path / "a" / "results.sqlite", [make_record("ok_tower", env=FAKE_ENV, **FAST)])
    b = write_store(tmp_path / "b" / "results.sqlite", [make_record("ok_tower", "error", "boom", env=FAKE_ENV)])
    result = apply_confirmation(compare_paths(a, b), {}, gates_of(b))
    assert result.exit_code == 1 and "status ok → error" in result.regressions[0]


def _lucky_stores(tmp_path, commit_a: str, commit_b: str):
    """A baseline whose figure was a lucky 25% high; the current run measured the true 100 img/s."""
    lucky = dict(infer_samples_per_sec=125.0, infer_step_time=128.0, infer_step_time_iqr=1.0)
    a = write_store(tmp_path / "a" / "results.sqlite",
                    [make_record("ok_tower", env={**FAKE_ENV, "env_git_commit": commit_a}, **lucky)])
    b = write_store(tmp_path / "b" / "results.sqlite",
                    [make_record("ok_tower", env={**FAKE_ENV, "env_git_commit": commit_b}, **FAST)])
    return a, b


def test_a_lucky_baseline_from_the_same_commit_is_rebuilt_and_the_flag_dropped(tmp_path, in_process):
    base, cur = _lucky_stores(tmp_path, "abc123", "abc123")
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 100.0})
    assert result.exit_code == 0  # re-measured both sides, interleaved: 100 vs 100


def test_a_baseline_from_another_commit_is_not_rebuilt(tmp_path, in_process):
    base, cur = _lucky_stores(tmp_path, "abc123", "def456")
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 100.0})
    assert result.exit_code == 1  # the stored 125 stands: 100 still fails -5%


def test_a_rebuilt_baseline_with_other_code_still_catches_the_slowdown(tmp_path, in_process):
    base, cur = _lucky_stores(tmp_path, "abc123", "abc123")
    result = confirm_paths(base, cur, rounds=2, fn="trialfns:behave", fn_kwargs={"rate": 89.0},
                           baseline_fn="trialfns:behave", baseline_kwargs={"rate": 100.0})
    assert result.exit_code == 1


def test_rows_from_another_environment_are_not_remeasured(tmp_path, monkeypatch):
    """The default gate re-measures flags, but never builds towers for rows this machine did not measure."""
    import suite.gate.confirm as confirm

    base, cur = _stores(tmp_path, FAST, SLOW)  # env_torch "fake": not this machine
    monkeypatch.setattr(confirm, "run_trials", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran trials")))
    result = confirm_paths(base, cur, rounds=2)  # the real trial function
    assert result.exit_code == 1 and "1 could not be re-measured here" in result.markdown


# --- a baseline from another commit: rebuilt from that commit's files -----------------------------


def test_bench_flags_give_the_trial_back():
    from suite.cli.main import build_parser, trial_from_args
    from suite.core.options import Trial
    from suite.gate.rebuild import bench_flags

    t = Trial(model="test_resnet", image_size=32, embed_dim=16, pool="abs_attn", unlocked_groups=0,
              grad_checkpointing=True, drop=0.25, device="cpu", mode="infer", batch_size=4, warmup=1, iters=2)
    flags = bench_flags(t)
    assert flags[:2] == ["--model", "test_resnet"] and "--grad-checkpointing" in flags and "--seed" not in flags
    back = trial_from_args(build_parser().parse_args(["bench", *flags]))
    assert back == t
    # an integer given for a float option at its default (YAML `min_time_s: 0`) is the default: no flag
    # an older baseline commit may not know
    assert "--min-time-s" not in bench_flags(Trial(model="test_resnet", min_time_s=0))
    assert bench_flags(Trial(model="test_resnet", min_time_s=1))[-2:] == ["--min-time-s", "1"]


def test_export_commit_writes_the_commits_files_or_says_none(tmp_path):
    from suite.gate.rebuild import export_commit
    from suite.machine.env import git_commit

    head = (git_commit() or "").removesuffix("+dirty")
    if not head:
        pytest.skip("not a git checkout: no commit to export")
    assert export_commit("0" * 40) is None and export_commit(head + "+dirty") is None
    tree = export_commit(head)
    assert tree is not None and (tree / "suite" / "__main__.py").is_file() and not (tree / ".git").exists()


def test_a_baseline_from_another_commit_is_rebuilt_from_its_files(tmp_path, monkeypatch):
    """CURRENT measured by this checkout's commit, BASELINE by the commit before it: the baseline side is
    re-measured by that commit's own files, the current side by this code, both for real, in one A/B run.

    Both stored figures are absurdly fast; the re-measured ones are real. Only what holds on any machine
    is asserted (both sides re-measured, finite, positive, far from the stored figures): which side is
    faster on a loaded 2-core machine is noise, and the verdict on given figures is tested above.
    """
    import shutil
    import subprocess

    import suite.gate.confirm as confirm
    from suite.gate.confirm import remeasure
    from suite.machine.env import git_commit
    from suite.sweep.trial import trial_env

    head = (git_commit() or "").removesuffix("+dirty")
    parent = subprocess.run(["git", "rev-parse", "HEAD~1"], capture_output=True, text=True,
                            cwd=Path(confirm.__file__).parent).stdout.strip()
    if not head or not parent:
        pytest.skip("not a git checkout with two commits: no other commit to rebuild from")
    monkeypatch.setattr(confirm, "checkout_commit", lambda: head)  # this code is HEAD's (a dev tree may be dirty)
    env = {k: v for k, v in vars(trial_env("cpu")).items() if v is not None}
    tiny = dict(image_size=32, embed_dim=16, batch_size=4, warmup=1, iters=2, device="cpu", mode="infer")
    a = write_store(tmp_path / "a" / "results.sqlite", [make_record(
        "test_resnet", env={**env, "env_git_commit": parent}, **tiny,
        infer_samples_per_sec=1e7, infer_step_time=0.0004, infer_step_time_iqr=0.0)])
    b = write_store(tmp_path / "b" / "results.sqlite", [make_record(
        "test_resnet", env={**env, "env_git_commit": head}, **tiny,
        infer_samples_per_sec=8e6, infer_step_time=0.0005, infer_step_time_iqr=0.0)])
    comparison = compare_paths(a, b)
    assert comparison.exit_code == 1  # -20%: flagged
    from suite.gate.ab_confirm import has_ab_worker
    from suite.gate.rebuild import export_commit

    tree = export_commit(parent)
    try:
        # An older baseline commit (no A/B worker): its side is one `suite bench` process of its own files
        # per measurement; here that process is checked alone.
        from suite.core.options import Trial
        from suite.gate.rebuild import measure_at

        record = measure_at(Trial(model="test_resnet", **tiny), tree=str(tree))
        assert record.status == "ok" and 0 < record.measure.infer_samples_per_sec < 1e6, record.reason
        parent_has_blocks = has_ab_worker(tree)
    finally:
        shutil.rmtree(tree)
    if parent_has_blocks:  # both commits' code runs in blocks of fresh processes, within the budget
        assert remeasure(comparison, a, b, rounds=1, budget_s=0.5) == {}  # one block: the budget is checked after it
        (ch,) = [c for c in comparison.changes if c.ab is not None]
        assert ch.ab["pairs"] >= 1 and comparison.ab["time_s"] < 0.5 + 30, ch.ab  # one block past the budget at most
        assert any("BASELINE rebuilt from its own code" in note for note in comparison.notes), comparison.notes
