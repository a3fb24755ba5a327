"""The plumbing both backends share: trial functions by name, records made for a trial, the driver's helpers.

The worker loop itself (`worker_main`) runs in real worker processes in tests/sweep/test_pool.py.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]  # tests/: trialfns, factories
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import trialfns  # noqa: E402
from factories import make_record  # noqa: E402

from suite.core.errors import SuiteError  # noqa: E402
from suite.core.options import Trial  # noqa: E402
from suite.core.records import Env, TrialRecord  # noqa: E402
from suite.sweep.workers import (  # noqa: E402
    TrialResults,
    call_in_child,
    call_trial,
    capture_worker_env,
    check_fn_spec,
    common_device,
    load_fn,
    measured_time,
    sigterm_as_interrupt,
    synthesised,
)

ENV = Env(env_torch="fake")


def test_fn_specs_are_checked_before_anything_is_imported():
    assert check_fn_spec("trialfns:behave") == ("trialfns", "behave")
    for bad in ("trialfns.behave", ":behave", "trialfns:", ""):
        with pytest.raises(SuiteError, match="must be 'module:function'"):
            check_fn_spec(bad)
    assert load_fn("trialfns:behave") is trialfns.behave
    with pytest.raises(ModuleNotFoundError):
        load_fn("no_such_module_here:fn")
    with pytest.raises(AttributeError):
        load_fn("trialfns:nope")


def test_worker_env_never_stops_a_sweep():
    assert capture_worker_env(None, "cpu") == (Env(), "")
    env, warning = capture_worker_env("trialfns:fake_env", "cuda")
    assert env.env_device == "cuda" and env.env_torch == "fake" and warning == ""
    assert capture_worker_env("no_such_module_here:capture", "cpu") == (Env(), "")  # optional: silent
    env, warning = capture_worker_env("trialfns:nope", "cpu")
    assert env == Env() and "could not be imported" in warning and "AttributeError" in warning
    env, warning = capture_worker_env("trialfns:broken_env", "cpu")
    assert env == Env() and warning.endswith("OSError: no environment here")


def test_call_trial_turns_a_raise_or_a_wrong_return_into_an_error_record():
    ok = call_trial(trialfns.behave, Trial(model="ok1"), {}, ENV)
    assert ok.status == "ok" and ok.reason.startswith(f"pid={os.getpid()}")
    raised = call_trial(trialfns.behave, Trial(model="raise1"), {}, ENV)
    assert (raised.status, raised.reason, raised.env) == ("error", "RuntimeError: boom in raise1", ENV)
    assert raised.finished_at >= raised.started_at
    wrong = call_trial(trialfns.behave, Trial(model="wrong1"), {}, ENV)
    assert wrong.status == "error" and wrong.reason == "trial function returned dict, not a TrialRecord"


def test_synthesised_records_carry_the_given_env_and_start():
    record = synthesised(Trial(model="x"), "timeout", "too slow", None, started=123.0)
    assert isinstance(record, TrialRecord) and record.env == Env()
    assert record.started_at == 123.0 and record.finished_at > 123.0
    assert synthesised(Trial(model="x"), "crashed", "", ENV, None).env == ENV


def test_common_device_is_auto_unless_the_trials_agree():
    assert common_device([Trial(model="a", device="cpu"), Trial(model="b", device="cpu")]) == "cpu"
    assert common_device([Trial(model="a", device="cpu"), Trial(model="b", device="cuda")]) == "auto"
    assert common_device([]) == "auto"


def test_results_count_measured_and_probe_time():
    results = TrialResults()
    results.add(make_record("a", measured_time_s=1.5, probe_time_s=0.5))
    results.add(make_record("b", "crashed"))  # nothing measured: counts 0
    assert [r.trial.model for r in results] == ["a", "b"]
    assert results.measured_time_s == pytest.approx(2.0) == measured_time(results[0])
    assert measured_time(results[1]) == 0.0


def test_sigterm_becomes_a_keyboard_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) is before

    seen = []

    def in_thread():  # no handler can be installed here: the block just runs
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [before]


def test_call_in_child_runs_elsewhere_and_raises_here():
    assert call_in_child(os.getpid) != os.getpid()
    assert call_in_child(trialfns.fake_env, "cpu").env_platform != f"worker-{os.getpid()}"
    with pytest.raises(OSError, match="no environment here"):
        call_in_child(trialfns.broken_env, "cpu")
