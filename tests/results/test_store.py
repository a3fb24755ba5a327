"""The SQLite results store: round trips, upserts, environments, kill-safety, loading errors.

Records are built with `factories.make_record` (shared with the other read-side tests).
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from factories import CPU, GPU, make_record, write_store  # noqa: F401

from suite.core.errors import SuiteError
from suite.core.records import Env, TrialRecord
from suite.results.store import ResultStore, load_meta, load_results


def test_round_trip_keeps_types(tmp_path):
    recs = [
        make_record(pool="", pretrained="laion2b_s34b_b88k", unlocked_groups=0, infer_noisy=True, drop=0.1),
        make_record("test_resnet", pretrained=True, grad_checkpointing=True, proj_bias=True, unlocked_groups=None),
        make_record("test_convnext", "oom", "CUDA out of memory"),
    ]
    df = load_results(write_store(tmp_path / "r" / "results.sqlite", recs))
    assert len(df) == 3
    rows = {r.model: r for r in df.itertuples()}
    vit, resnet, convnext = rows["test_vit"], rows["test_resnet"], rows["test_convnext"]
    assert vit.pool == "" and resnet.pool == "avg"
    assert vit.pretrained == "laion2b_s34b_b88k" and resnet.pretrained is True and convnext.pretrained is False
    assert vit.unlocked_groups == 0 and resnet.unlocked_groups is None  # "locked, 0 unlocked" != "not locked"
    assert df["grad_checkpointing"].dtype == bool and bool(resnet.grad_checkpointing)
    assert vit.infer_noisy is True and convnext.infer_noisy is None
    assert convnext.status == "oom" and convnext.reason == "CUDA out of memory"
    assert vit.train_samples_per_sec == 100.0 and convnext.train_samples_per_sec != convnext.train_samples_per_sec
    assert vit.trial_id == recs[0].trial.trial_id and vit.env_key == recs[0].env.key()
    # Every column of TrialRecord.flat() is there, in its order.
    assert list(df.columns) == list(recs[0].flat())


def test_rewrite_replaces_and_envs_stay_apart(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write(make_record(status="error", reason="boom"))
        store.write(make_record(train_samples_per_sec=123.0))  # same trial, same env: replaces
        store.write(make_record(train_samples_per_sec=999.0, env=GPU))  # another GPU: kept apart
        cpu_key, gpu_key = Env(**CPU).key(), Env(**GPU).key()
        tid = make_record().trial.trial_id
        assert store.done_ids(cpu_key) == {tid} and store.done_ids(gpu_key) == {tid}
        assert store.done_ids(cpu_key, statuses=["error"]) == set()
        assert store.done_ids(cpu_key, statuses=["ok"]) == {tid}
        assert store.done_ids("other|env") == set()
        with pytest.raises(ValueError, match="unknown status 'okay'"):
            store.done_ids(cpu_key, statuses=["okay"])
    df = load_results(path)
    assert len(df) == 2
    assert sorted(df["train_samples_per_sec"]) == [123.0, 999.0]
    assert set(df["status"]) == {"ok"}
    # WAL while a sweep writes (a report can read meanwhile); a closed store is one plain file again.
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_invalid_status_is_refused(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as store:
        with pytest.raises(ValueError, match="status 'failed' is not one of ok, skipped"):
            store.write(make_record(status="failed"))
        assert store.done_ids(Env(**CPU).key()) == set()


def test_new_fields_become_new_columns(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class FutureRecord(TrialRecord):
        def flat(self):
            return {**super().flat(), "future_metric": 1.5, "future_flag": True}

    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write(make_record("test_resnet"))
        base = make_record()
        store.write(FutureRecord(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}))
    df = load_results(path)
    assert list(df.columns[-2:]) == ["future_metric", "future_flag"]
    row = df.set_index("model").loc["test_vit"]
    assert row["future_metric"] == 1.5 and row["future_flag"] is True
    assert df.set_index("model").loc["test_resnet", "future_flag"] is None


def test_meta_round_trip(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.set_meta("experiment", {"name": "smoke", "select": {"objective": "max probe_top1"}})
        store.set_meta("experiment", {"name": "smoke2"})  # replaces
        assert store.get_meta("experiment") == {"name": "smoke2"}
        assert store.get_meta("missing", 7) == 7
        with pytest.raises(ValueError, match="meta 'bad': value must be JSON-serialisable"):
            store.set_meta("bad", object())
    assert load_meta(path) == {"experiment": {"name": "smoke2"}}


def test_row_order_is_deterministic(tmp_path):
    recs = [make_record(m, pool=p) for m in ("test_vit", "test_resnet") for p in ("avg", "max", "")]
    frames = []
    for i in range(2):
        random.Random(i).shuffle(recs)
        frames.append(load_results(write_store(tmp_path / f"{i}.sqlite", recs)))
    assert frames[0].equals(frames[1])
    assert list(frames[0]["model"]) == sorted(frames[0]["model"])


def test_empty_store_loads_with_schema(tmp_path):
    df = load_results(write_store(tmp_path / "results.sqlite", []))
    assert len(df) == 0 and "train_samples_per_sec" in df.columns and "trial_id" in df.columns


def test_folder_path_and_clear_errors(tmp_path):
    write_store(tmp_path / "run" / "results.sqlite", [make_record()])
    assert len(load_results(tmp_path / "run")) == 1  # the folder that holds results.sqlite
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.sqlite")):
        load_results(tmp_path / "nope.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(SuiteError, match=f"{other} is not a results store"):
        load_results(other)
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, not a database " * 100)
    with pytest.raises(SuiteError, match=f"{text} is not a results store"):
        load_results(text)
    assert not (tmp_path / "nope.sqlite").exists()  # reading never creates a file


def test_committed_rows_survive_kill_9(tmp_path):
    """A driver killed with SIGKILL right after writing loses nothing it committed."""
    path = tmp_path / "results.sqlite"
    here = Path(__file__).parents[1]  # tests/: factories
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(here)!r})
        from factories import make_record
        from suite.results.store import ResultStore
        store = ResultStore({str(path)!r})
        for model in ("test_vit", "test_resnet", "test_convnext"):
            store.write(make_record(model))
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit, no flush of anything
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "written" in proc.stdout
    df = load_results(path)
    assert sorted(df["model"]) == ["test_convnext", "test_resnet", "test_vit"]
    # Resuming after the kill: the same trials rewrite in place, no duplicates.
    with ResultStore(path) as store:
        store.write(make_record("test_vit"))
    assert len(load_results(path)) == 3


def test_read_side_imports_no_torch():
    code = ("import suite.report.render, suite.gate.compare, suite.report.export, suite.results.store, suite.report.selection, suite.report.plots, "
            "suite.experiment.criteria, suite.report.analysis, suite.cli.show, suite.experiment.estimate, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'matplotlib' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 0, proc.stderr


# --- issue 14 -------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path):
    import os

    from suite.results.store import StoreLock, StoreLocked

    db = tmp_path / "out" / "results.sqlite"
    with StoreLock(db):
        with pytest.raises(StoreLocked, match=f"PID {os.getpid()}.*another --out"):
            StoreLock(db)
    StoreLock(db).release()  # released: the next sweep takes it


def test_a_damaged_store_is_a_message_not_a_traceback(tmp_path):
    from factories import make_record, write_store

    from suite.core.errors import SuiteError

    path = write_store(tmp_path / "results.sqlite", [make_record(seed=i) for i in range(200)])
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page:8 * page] = b"\xff" * (5 * page)  # trash table pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(SuiteError, match="results.sqlite is damaged and cannot be read|is not a results store"):
        load_results(path)


def test_reading_a_read_only_store_leaves_no_wal_or_shm_files(tmp_path):
    import os

    from factories import make_record, write_store

    folder = tmp_path / "ro"
    path = write_store(folder / "results.sqlite", [make_record()])
    os.chmod(path, 0o444)
    before = sorted(p.name for p in folder.iterdir())
    assert len(load_results(path)) == 1
    assert sorted(p.name for p in folder.iterdir()) == before == ["results.sqlite"]


def test_a_value_edited_into_a_typed_column_is_a_clear_error(tmp_path):
    """`UPDATE trials SET train_samples_per_sec = 'abc'` by hand: a SuiteError naming the file, the column
    and the value (the CLI's exit 2), not a pandas traceback."""
    import sqlite3

    from suite.core.errors import SuiteError

    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.write(make_record("test_vit"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trials SET train_samples_per_sec = 'abc'")
    with pytest.raises(SuiteError, match=r"column 'train_samples_per_sec' \(float\) holds 'abc'") as info:
        load_results(path)
    assert str(path) in str(info.value)
