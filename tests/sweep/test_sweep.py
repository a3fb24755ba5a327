"""The main job end to end: run an experiment in workers, store, resume, survive kill -9 of the driver."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from suite.core.errors import ConfigError, UnsupportedConfig
from suite.experiment.spec import load_experiment
from suite.results.store import load_results
from suite.sweep.driver import known_problems, preflight, run_experiment

EXPERIMENT = """
name: tiny
device: cpu
measure: {mode: both, batch_size: 4, warmup: 1, iters: 2}
grid:
  model: [test_resnet, test_vit]
  image_size: 64
  embed_dim: 16
  pool: [avg, abs_attn]
include:
  - {model: test_convnext, image_size: 64, embed_dim: 16, dataset: digits, max_per_class: 12}
run: {timeout_s: 120}
"""


def write_experiment(tmp_path: Path, text: str = EXPERIMENT, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.slow
def test_sweep_with_two_workers_stores_every_trial_then_resume_runs_nothing(tmp_path):
    exp = write_experiment(tmp_path)
    out = tmp_path / "out"
    summary = run_experiment(exp, out=out, workers=2, quiet=True)  # caches: the test run's (tests/conftest.py)
    df = load_results(summary.db_path)
    assert len(df) == 5 and df["trial_id"].is_unique
    by = {(r.model, r.pool): r for r in df.itertuples()}
    # attention pooling on a token trunk is known invalid before running: skipped with the reason
    assert by[("test_vit", "abs_attn")].status == "skipped"
    assert "token" in by[("test_vit", "abs_attn")].reason
    for key in [("test_resnet", "avg"), ("test_resnet", "abs_attn"), ("test_vit", "avg"), ("test_convnext", "avg")]:
        row = by[key]
        assert row.status == "ok", (key, row.reason)
        assert row.train_samples_per_sec > 0 and row.infer_samples_per_sec > 0
        assert row.env_torch and row.env_device == "cpu"
    assert by[("test_convnext", "avg")].probe_top1 > 0
    assert pd_isnull(by[("test_resnet", "avg")].probe_top1)  # no dataset, no probe
    assert summary.report_path and summary.report_path.exists()
    assert summary.statuses == {"ok": 4, "skipped": 1}

    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(exp, out=out, quiet=True, report=False)
    again = run_experiment(exp, out=out, resume=True, quiet=True, report=False)
    assert again.ran == 0 and again.reused == 5
    assert len(load_results(summary.db_path)) == 5

    # --retry-failed reruns only the failures (here: a row marked as crashed) and replaces them
    victim = by[("test_resnet", "avg")].trial_id
    with sqlite3.connect(summary.db_path) as conn:
        conn.execute("update trials set status = 'crashed' where trial_id = ?", (victim,))
    retried = run_experiment(exp, out=out, retry_failed=True, quiet=True, report=False)
    assert retried.ran == 1 and retried.statuses == {"ok": 1}
    after = load_results(summary.db_path)
    assert len(after) == 5 and set(after["status"]) == {"ok", "skipped"}


def pd_isnull(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from trials").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_kill_9_of_the_driver_loses_only_trials_in_flight_and_resume_completes(tmp_path):
    exp = write_experiment(tmp_path, """
        name: killme
        device: cpu
        measure: {mode: infer, batch_size: 2, warmup: 1, iters: 3}
        grid:
          model: test_resnet
          image_size: 64
          embed_dim: [8, 16, 24, 32]
    """)
    out = tmp_path / "out"
    db = out / "results.sqlite"
    cmd = [sys.executable, "-m", "suite.cli.main", "run", str(exp), "--out", str(out), "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while count_rows(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its worker must notice and exit by itself
    proc.wait()
    before = load_results(db)
    assert 1 <= len(before) < 4, "the run should have been killed mid-way"
    kept = dict(zip(before["trial_id"], before["finished_at"]))

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    after = load_results(db)
    assert len(after) == 4 and after["trial_id"].is_unique
    assert set(after["status"]) == {"ok"}
    # rows stored before the kill were not run again
    for trial_id, finished in kept.items():
        assert after.loc[after["trial_id"] == trial_id, "finished_at"].item() == finished


SMALL = """
name: small
device: cpu
measure: {mode: infer, batch_size: 2, warmup: 1, iters: 2}
grid: {model: test_vit, image_size: 64, embed_dim: 8, pool: [avg, abs_attn]}
"""

DRIVER = """
import sys
from suite.sweep.driver import run_experiment
summary = run_experiment(sys.argv[1], out=sys.argv[2], quiet=True)
assert summary.statuses == {"ok": 1, "skipped": 1}, summary.statuses
assert summary.report_path.exists()
heavy = [m for m in ("torch", "timm") if m in sys.modules]
assert not heavy, f"the sweep driver imported {heavy}"
"""


@pytest.mark.slow
def test_the_driver_never_imports_torch_and_its_records_share_the_workers_env(tmp_path):
    exp = write_experiment(tmp_path, SMALL)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", DRIVER, str(exp), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    df = load_results(out / "results.sqlite")
    assert sorted(df["status"]) == ["ok", "skipped"]
    # the skipped record is made by the driver, the ok one by a worker: one environment, so resume finds both
    assert df["env_key"].nunique() == 1 and df["env_torch"].notna().all()


def test_preflight_gives_the_known_problems_and_the_trials_env(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, SMALL))
    checked = preflight(exp)
    assert checked.model_problems == [] and checked.known_problems == known_problems(exp)
    (bad,) = [t for t in exp.trials if t.pool == "abs_attn"]
    assert list(checked.known_problems) == [bad.trial_id] and "token" in checked.known_problems[bad.trial_id]
    assert checked.env.env_device == "cpu" and checked.env.env_torch


def test_an_unknown_model_is_a_config_error_before_anything_is_written(tmp_path):
    exp = write_experiment(tmp_path, SMALL.replace("model: test_vit", "model: test_vitt"))
    with pytest.raises(ConfigError, match="'test_vitt' is not a timm model; did you mean 'test_vit'") as info:
        run_experiment(exp, out=tmp_path / "out", quiet=True)
    assert len(info.value.problems) == 1 and info.value.source == str(exp)
    assert not (tmp_path / "out").exists()


def test_a_valid_experiment_has_no_known_problems(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, SMALL.replace("pool: [avg, abs_attn]", "pool: [avg, token]")))
    assert len(exp.trials) == 2 and known_problems(exp) == {}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_fails_before_anything_is_written(tmp_path):
    exp = write_experiment(tmp_path, SMALL.replace("device: cpu", "device: cuda"))
    with pytest.raises(UnsupportedConfig, match="CUDA is not available"):  # raised in the preflight child
        run_experiment(exp, out=tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
