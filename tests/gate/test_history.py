"""`suite history`: a metric over commits, steps found and named by commit, from stores only.

Every figure is injected: one store per run, built by `factories` with the commit, time and figures
given; "realistic noise" is a seeded draw, so each test is the same on every machine.
"""
from __future__ import annotations

import random

import pytest
from factories import make_record, run_cli, write_store

from suite.core.errors import SuiteError
from suite.gate.history import find_steps, history, short

COMMITS = [f"{i:x}" * 40 for i in range(1, 7)]  # six 40-character "commits", oldest first


def run_store(tmp_path, i: int, commit: str, rates: dict, iqr: float = 0.02, experiment="ci", meta=None):
    """One run (store) measured by `commit`: {model: train img/s}, each with step-time IQR `iqr` of the median."""
    records = [make_record(m, env_git_commit=commit, finished_at=1_700_000_000.0 + 3600 * i,
                           train_samples_per_sec=r, train_step_time=32_000.0 / r, train_step_time_iqr=32_000.0 / r * iqr)
               for m, r in rates.items()]
    return write_store(tmp_path / f"run{i}" / "results.sqlite", records,
                       {"experiment": {"name": experiment}, **(meta or {})})


def test_a_planted_ten_percent_step_is_named_by_its_commit(tmp_path):
    # test_vit drops 10% at the third commit; test_resnet stays put.
    stores = [run_store(tmp_path, i, c, {"test_vit": 100.0 if i < 2 else 90.0, "test_resnet": 200.0})
              for i, c in enumerate(COMMITS[:3])]
    h = history(stores)
    assert h.metric == "train_samples_per_sec" and h.commits == COMMITS[:3]
    steps = {s.label.split("`")[1]: s for s in h.series}
    assert steps["test_resnet"].steps == []
    (step,) = steps["test_vit"].steps
    assert steps["test_vit"].commit_range(step) == (COMMITS[1], COMMITS[2])
    assert step.rel == pytest.approx(-0.10)
    assert f"between `{short(COMMITS[1])}` and `{short(COMMITS[2])}`" in h.markdown
    assert f"**-10.0%** at `{short(COMMITS[2])}`" in h.markdown


def test_identical_reruns_with_realistic_noise_are_not_flagged(tmp_path):
    rng = random.Random(26)
    stores = [run_store(tmp_path, i, c, {m: base * (1 + rng.gauss(0, 0.015)) for m, base in
                                         (("test_vit", 100.0), ("test_resnet", 200.0), ("test_convnext", 50.0))},
                        iqr=0.03)
              for i, c in enumerate(COMMITS)]
    h = history(stores)
    assert [s.steps for s in h.series] == [[], [], []]
    assert "### Steps (0)" in h.markdown and "No step beyond threshold and noise." in h.markdown


def test_a_step_must_exceed_the_figures_own_noise():
    values = [100.0, 100.0, 100.0, 90.0, 90.0, 90.0]
    assert [s.index for s in find_steps(values, [0.02] * 6)] == [3]
    assert find_steps(values, [0.06] * 6) == []  # -10% inside a ±12% band: noise, not a step
    assert find_steps(values, [0.0] * 6, threshold=0.12) == []  # quiet, but under the threshold
    # Two steps, each found on its own side of the other; a slow drift of 1%/commit shows over the range.
    assert [s.index for s in find_steps([100, 100, 90, 90, 120, 120], [0.01] * 6)] == [2, 4]


def test_repeated_runs_of_one_commit_are_one_point_and_the_project_commit_wins(tmp_path):
    stores = [run_store(tmp_path, 0, "suite-a", {"test_vit": 100.0}, meta={"project_commit": "proj1"}),
              run_store(tmp_path, 1, "suite-a", {"test_vit": 102.0}, meta={"project_commit": "proj1"}),
              run_store(tmp_path, 2, "suite-a", {"test_vit": 80.0}, meta={"project_commit": "proj2"})]
    h = history(stores)
    (s,) = h.series
    assert h.commits == ["proj1", "proj2"] and [p.runs for p in s.points] == [2, 1]
    assert s.points[0].value == pytest.approx(101.0) and s.commit_range(s.steps[0]) == ("proj1", "proj2")


def test_cli_writes_markdown_and_a_plot_per_trial(tmp_path):
    stores = [run_store(tmp_path, i, c, {"test_vit": 100.0 if i < 2 else 90.0, "test_resnet": 200.0})
              for i, c in enumerate(COMMITS[:3])]
    out = tmp_path / "hist"
    done = run_cli("history", *map(str, stores), "--metric", "train_samples_per_sec", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("## History of `train_samples_per_sec` over 3 commits")
    assert sorted(p.suffix for p in out.iterdir()) == [".md", ".png", ".png"]
    assert (out / "history.md").read_text().startswith(done.stdout.rstrip("\n"))


def test_bad_input_names_the_fix(tmp_path):
    a = run_store(tmp_path, 0, COMMITS[0], {"test_vit": 100.0})
    b = run_store(tmp_path, 1, COMMITS[1], {"test_vit": 100.0})
    unknown = run_cli("history", str(a), str(b), "--metric", "train_samples_per_secc")
    assert unknown.returncode == 2 and "did you mean" in unknown.stderr and "train_samples_per_sec" in unknown.stderr
    other = run_store(tmp_path, 2, COMMITS[2], {"test_vit": 100.0}, experiment="another")
    with pytest.raises(SuiteError, match="different experiments.*pass the stores of one experiment"):
        history([a, other])
    elsewhere = write_store(tmp_path / "gpu.sqlite", [make_record("test_vit", env_git_commit=COMMITS[3],
                                                                  env_device="NVIDIA H100", env_cuda="12.8")])
    with pytest.raises(SuiteError, match="two commits in the same environment"):
        history([a, elsewhere])
    with pytest.raises(SuiteError, match="two commits"):
        history([a])
    assert run_cli("history", str(a), str(b), "--step", "lots").returncode == 2


SIX = {"test_vit": 100.0, "test_resnet": 200.0, "test_convnext": 50.0, "vit_a": 80.0, "vit_b": 120.0, "vit_c": 60.0}


def test_a_whole_run_moving_together_is_drift_not_a_step_of_each_trial(tmp_path):
    rng = random.Random(7)
    machine = [1.0, 1.15, 0.88, 1.0]  # each run measured while the machine was faster or slower
    stores = [run_store(tmp_path, i, c, {m: r * machine[i] * (1 + rng.gauss(0, 0.01)) for m, r in SIX.items()})
              for i, c in enumerate(COMMITS[:4])]
    h = history(stores)
    assert all(s.steps == [] for s in h.series)
    assert h.common[COMMITS[1]] == pytest.approx(0.15, abs=0.04)
    assert "### Drift between runs" in h.markdown and "every trial moved by **" in h.markdown


def test_one_trial_stepping_against_a_drifting_machine_is_named(tmp_path):
    rng = random.Random(8)
    machine = [1.0, 1.12, 0.9, 1.05]
    stores = [run_store(tmp_path, i, c, {m: r * machine[i] * (1 + rng.gauss(0, 0.01)) * (0.85 if m == "vit_b" and i >= 2
                                                                                          else 1.0)
                                         for m, r in SIX.items()})
              for i, c in enumerate(COMMITS[:4])]
    h = history(stores)
    stepped = {s.label.split("`")[1]: s.steps for s in h.series if s.steps}
    assert list(stepped) == ["vit_b"]
    (step,) = stepped["vit_b"]
    assert next(s for s in h.series if "vit_b" in s.label).commit_range(step) == (COMMITS[1], COMMITS[2])


def test_recorded_identical_reruns_of_this_machine_name_no_step(tmp_path):
    """Four identical smoke runs of one commit on the 2-core dev VM (recorded figures), labelled as four
    commits: whole runs moved by several percent and single trials scatter by 10-20% between runs, which
    the per-run IQR does not cover. Nothing changed, so no step may be named, for either metric."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "data" / "smoke-reruns.json").read_text())
    stores = []
    for i, run in enumerate(recorded["runs"]):
        records = [make_record(**{k: v for k, v in row.items() if k != "finished_at"}, env_git_commit=COMMITS[i],
                               finished_at=1_700_000_000.0 + 3600 * i) for row in run["rows"]]
        stores.append(write_store(tmp_path / f"run{i}" / "results.sqlite", records, {"experiment": {"name": "smoke"}}))
    for metric in ("train_samples_per_sec", "infer_samples_per_sec"):
        h = history(stores, metric)
        assert len(h.commits) == len(recorded["runs"]) >= 4 and len(h.series) >= 40
        assert [s.label for s in h.series if s.steps] == [], h.markdown
        assert h.common and h.scatter is not None
