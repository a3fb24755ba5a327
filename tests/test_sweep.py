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

from suite.store import load_results
from suite.sweep import run_experiment

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


def test_sweep_with_two_workers_stores_every_trial_then_resume_runs_nothing(tmp_path):
    exp = write_experiment(tmp_path)
    out = tmp_path / "out"
    summary = run_experiment(exp, out=out, workers=2, quiet=True, cache_dir=tmp_path / "cache")
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


def test_kill_9_of_the_driver_loses_only_trials_in_flight_and_resume_completes(tmp_path):
    exp = write_experiment(tmp_path, """
        name: killme
        device: cpu
        measure: {mode: train, batch_size: 2, warmup: 1, iters: 3}
        grid:
          model: test_resnet
          image_size: 64
          embed_dim: [8, 16, 24, 32, 40, 48]
    """)
    out = tmp_path / "out"
    db = out / "results.sqlite"
    cmd = [sys.executable, "-m", "suite.cli", "run", str(exp), "--out", str(out), "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while count_rows(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: its worker must notice and exit by itself
    proc.wait()
    before = load_results(db)
    assert 2 <= len(before) < 6, "the run should have been killed mid-way"
    kept = dict(zip(before["trial_id"], before["finished_at"]))

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    after = load_results(db)
    assert len(after) == 6 and after["trial_id"].is_unique
    assert set(after["status"]) == {"ok"}
    # rows stored before the kill were not run again
    for trial_id, finished in kept.items():
        assert after.loc[after["trial_id"] == trial_id, "finished_at"].item() == finished
