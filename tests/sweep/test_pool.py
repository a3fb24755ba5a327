"""The local backend: every status, worker reuse and replacement, two workers, GPU pinning, interrupts.

Trial functions live in tests/trialfns.py (no torch), imported by name in spawned workers; spawn
copies the driver's sys.path, so putting this folder on it makes `trialfns` importable there.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

HERE = Path(__file__).resolve().parents[1]  # tests/: trialfns, factories
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from suite.core.errors import SuiteError  # noqa: E402
from suite.core.options import Trial  # noqa: E402
from suite.core.records import Env  # noqa: E402
from suite.sweep.pool import run_trials  # noqa: E402

FN = "trialfns:behave"


def trials(*names: str, device: str = "cpu") -> list:
    """CPU trials by default: "auto" would mean the GPU on a CUDA machine (one GPU refuses two workers)."""
    return [Trial(model=n, device=device) for n in names]


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def run(names, device="cpu", **kw):
    kw.setdefault("fn", FN)
    kw.setdefault("env_fn", "trialfns:fake_env")
    kw.setdefault("progress", False)
    kw.setdefault("console", quiet_console())
    return run_trials(trials(*names, device=device), **kw)


def pid_of(record) -> int:
    return int(record.reason.split()[0].removeprefix("pid="))


def by_model(records) -> dict:
    return {r.trial.model: r for r in records}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_status_and_replacement_after_failures():
    seen = []
    names = ["ok1", "ok2", "crash3", "ok4", "raise5", "segv6", "wrong7", "hang8", "ok9"]
    # The ok trials return at once; the limit only has to outlast a worker's reply on a loaded machine.
    records = run(names, timeout_s=5, on_result=seen.append, fn_kwargs={"measured_s": 0.25})
    got = by_model(records)
    assert [r.trial.model for r in seen] == [r.trial.model for r in records]  # on_result once per trial
    assert sorted(got) == sorted(names)
    assert {m: r.status for m, r in got.items()} == {
        "ok1": "ok", "ok2": "ok", "crash3": "crashed", "ok4": "ok", "raise5": "error", "segv6": "crashed",
        "wrong7": "error", "hang8": "timeout", "ok9": "ok"}
    assert got["crash3"].reason == "worker process exited with code 3"
    assert got["segv6"].reason == "worker process killed by SIGSEGV"
    assert got["raise5"].reason == "RuntimeError: boom in raise5"  # one line only
    assert "TrialRecord" in got["wrong7"].reason
    assert "timeout_s=5" in got["hang8"].reason
    # the same worker serves several trials; a crash or timeout gets a fresh one
    assert pid_of(got["ok1"]) == pid_of(got["ok2"])
    assert pid_of(got["ok4"]) != pid_of(got["ok1"])
    assert pid_of(got["ok9"]) != pid_of(got["ok4"])
    # synthesised records carry the environment of the worker that ran them, and timestamps
    for name in ("crash3", "segv6", "hang8", "raise5"):
        r = got[name]
        assert r.env.env_torch == "fake" and r.env.env_platform.startswith("worker-")
        assert r.started_at is not None and r.finished_at >= r.started_at
        assert r.measure.measured_time_s is None and r.probe.probe_top1 is None
    assert got["hang8"].finished_at - got["hang8"].started_at >= 5
    assert records.measured_time_s == pytest.approx(4 * (0.25 + 0.5))
    assert not records.interrupted
    for r in records:  # no worker outlives the run
        if r.status == "ok":
            assert not alive(pid_of(r))


def test_two_workers_run_in_parallel_and_return_each_trial_once():
    names = [f"slow{i}" for i in range(6)]
    seen = []
    records = run(names, workers=2, on_result=seen.append, fn_kwargs={"slow_s": 0.4}, env_fn=None)
    assert sorted(r.trial.trial_id for r in records) == sorted(t.trial_id for t in trials(*names))
    assert len(seen) == 6
    assert len({pid_of(r) for r in records}) == 2
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(f"threads={threads}" in r.reason for r in records)  # the two workers split the CPU
    spans = sorted((r.started_at, r.finished_at) for r in records)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials overlapped"


def test_one_gpu_per_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    records = run(["slow1", "slow2", "slow3", "slow4"], device="cuda", workers=2, env_fn=None,
                  fn_kwargs={"slow_s": 0.3})
    cuda_of_pid = {}
    for r in records:
        cuda = r.reason.split()[1]
        assert cuda_of_pid.setdefault(pid_of(r), cuda) == cuda  # a worker keeps its GPU
    assert sorted(cuda_of_pid.values()) == ["cuda=5", "cuda=7"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"  # the driver's environment is restored
    with pytest.raises(SuiteError, match=r"workers=3 but only 2 CUDA GPU"):
        run(["ok1"], device="cuda", workers=3)


def test_interrupt_returns_finished_trials_and_ends_workers(tmp_path):
    def stop(record):
        raise KeyboardInterrupt  # as if Ctrl-C arrived while the first result was being stored

    names = ["ok1", "hang2", "hang3", "ok4"]
    records = run(names, workers=2, on_result=stop, fn_kwargs={"marker_dir": str(tmp_path)}, env_fn=None)
    assert records.interrupted
    assert [r.trial.model for r in records] == ["ok1"]  # stored before the interrupt; the rest are not
    pids = [int(p.name.split(".")[1]) for p in tmp_path.iterdir()]
    assert pids and not any(alive(p) for p in pids)


def test_sigterm_stops_the_run_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    records = run(["ok1", "ok2", "ok3"], on_result=lambda r: os.kill(os.getpid(), signal.SIGTERM), env_fn=None)
    assert records.interrupted and len(records) == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_output_lines_and_summary():
    console = quiet_console()
    records = run(["ok1", "crash2"], console=console)
    text = console.file.getvalue()
    assert "[1/2] ok      ok1  infer 100.0/s, probe top-1 50.0%" in text
    assert "crashed crash2  worker process exited with code 3" in text
    assert "2 of 2 trials in" in text and "1 ok, 1 crashed" in text and "sum of measured time 0.8 s" in text
    assert len(records) == 2
    # the rich progress bar variant prints the same lines
    console = quiet_console()
    run(["ok1"], console=console, progress=True)
    assert "ok1  infer 100.0/s" in console.file.getvalue()


def test_broken_env_fn_warns_and_leaves_env_empty():
    console = quiet_console()
    records = run(["crash1"], env_fn="trialfns:broken_env", console=console)
    assert records[0].status == "crashed" and records[0].env == Env()
    assert "OSError: no environment here" in console.file.getvalue()


def test_bad_arguments_are_clear_errors():
    # SuiteError: bad input the CLI reports as such (exit 2), not a crash
    with pytest.raises(SuiteError, match="did you mean 'ray'"):
        run(["ok1"], backend="rya")
    with pytest.raises(SuiteError, match="workers=0"):
        run(["ok1"], workers=0)
    with pytest.raises(SuiteError, match="timeout_s=0"):
        run(["ok1"], timeout_s=0)
    with pytest.raises(SuiteError, match="module:function"):
        run(["ok1"], fn="trialfns.behave")
    with pytest.raises(SuiteError, match="backend='ray'"):
        run(["ok1"], address="ray://x:10001")
    with pytest.raises(RuntimeError, match="trialfns:nope"):
        run(["ok1"], fn="trialfns:nope")
    assert run([]) == []


def test_runner_does_not_import_torch():
    code = ("import sys, suite.sweep.pool, suite.sweep.ray_pool, suite.sweep.workers, suite.sweep.progress, suite.sweep.trial, suite.sweep.driver; "
            "heavy = [m for m in ('torch', 'timm', 'ray') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_failing_on_result_stops_the_run_and_propagates(tmp_path):
    def disk_full(record):
        raise OSError("disk full")  # e.g. the database cannot be written: not a dead worker

    with pytest.raises(OSError, match="disk full"):
        run(["ok1", "hang2", "ok3"], workers=2, on_result=disk_full, fn_kwargs={"marker_dir": str(tmp_path)},
            env_fn=None)
    pids = [int(p.name.split(".")[1]) for p in tmp_path.iterdir()]
    assert pids and not any(alive(p) for p in pids)
