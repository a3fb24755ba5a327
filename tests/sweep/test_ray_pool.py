"""The Ray backend against a real local Ray cluster: same trials and statuses as the local backend."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console

HERE = Path(__file__).resolve().parents[1]  # tests/: trialfns, factories
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from suite.core.errors import SuiteError  # noqa: E402
from suite.core.options import Trial  # noqa: E402
from suite.sweep.pool import run_trials  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]  # one Ray cluster at a time

NAMES = ["ok1", "crash2", "ok3", "hang4", "raise5", "ok6"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # Ray's workers get the driver's cwd, not its sys.path: give them this folder for `trialfns`.
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def sweep(backend: str):
    seen = []
    console = Console(file=io.StringIO(), width=200)
    records = run_trials([Trial(model=n) for n in NAMES], fn="trialfns:behave", backend=backend, timeout_s=2,
                         env_fn="trialfns:fake_env", on_result=seen.append, progress=False, console=console)
    assert [r.trial.trial_id for r in seen] == [r.trial.trial_id for r in records]  # the driver wrote each once
    return records, console.file.getvalue()


def test_ray_records_match_the_local_backend(ray_cluster):
    ray_records, text = sweep("ray")
    local_records, _ = sweep("local")
    rows = lambda records: sorted((r.trial.trial_id, r.trial.model, r.status) for r in records)  # noqa: E731
    assert rows(ray_records) == rows(local_records)
    got = {r.trial.model: r for r in ray_records}
    assert {m: r.status for m, r in got.items()} == {
        "ok1": "ok", "crash2": "crashed", "ok3": "ok", "hang4": "timeout", "raise5": "error", "ok6": "ok"}
    assert got["raise5"].reason == "RuntimeError: boom in raise5"
    assert "timeout_s=2" in got["hang4"].reason
    assert got["crash2"].env.env_torch == "fake"  # the environment of a Ray worker, for records made by the driver
    assert "Ray cluster: 2 CPU slot(s)" in text
    assert ray_cluster.is_initialized()  # a connection made by the caller is left to the caller


def test_ray_setup_errors_are_clear(ray_cluster):
    with pytest.raises(SuiteError, match="workers=2 applies to the local backend"):
        run_trials([Trial(model="ok1")], fn="trialfns:behave", backend="ray", workers=2)
    with pytest.raises(RuntimeError, match="cannot import the trial function fn='trialfns:nope' on a Ray worker"):
        run_trials([Trial(model="ok1")], fn="trialfns:nope", backend="ray", progress=False, env_fn=None)
