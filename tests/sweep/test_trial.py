"""One trial as a record: failures mapped to statuses, cleanup that never touches an unused GPU, the env."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import suite.sweep.trial as execute
from suite.core.errors import DatasetError, SuiteError, UnsupportedConfig
from suite.core.options import Trial
from suite.sweep.trial import classify, release_memory, run_trial


def test_classify_maps_each_failure_to_its_status():
    assert classify(UnsupportedConfig("vit: pool='abs_attn' needs a feature map\nmore")) == \
        ("skipped", "vit: pool='abs_attn' needs a feature map")
    assert classify(DatasetError("root /x does not exist\nhint")) == ("error", "root /x does not exist")
    assert classify(MemoryError()) == ("oom", "MemoryError")
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == \
        ("oom", "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")
    assert classify(KeyError("x")) == ("error", "KeyError: 'x'")


@pytest.fixture
def cuda_calls(monkeypatch):
    """Record what release_memory asks of CUDA, on a machine that has a GPU (faked)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: calls.append(_name))
    return calls


def test_cleanup_after_a_cpu_trial_leaves_cuda_alone(monkeypatch, cuda_calls):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_memory()
    assert cuda_calls == []  # synchronize() here would create a CUDA context in a CPU-only worker


def test_cleanup_after_a_cuda_trial_resets_caches_and_peaks(monkeypatch, cuda_calls):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    release_memory()
    assert cuda_calls == ["synchronize", "empty_cache", "reset_peak_memory_stats"]


def test_cuda_without_cuda_is_a_skipped_record(monkeypatch):
    monkeypatch.setattr(execute, "_freeze_imports", lambda: None)  # no gc.freeze of the test process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = run_trial(Trial(model="test_vit", device="cuda"))
    assert record.status == "skipped"
    assert record.reason.startswith("UnsupportedConfig: device='cuda' but CUDA is not available")
    assert record.finished_at >= record.started_at


def test_an_unknown_device_is_a_suite_error():
    with pytest.raises(SuiteError, match="did you mean 'cuda'"):
        execute.resolve_device("cdua")


def test_trial_env_is_the_env_of_the_measuring_process():
    # Measuring holds the allocator steady; the env a worker reports before its first measurement
    # must already have the key its measured records will have.
    code = ("from suite.sweep.trial import trial_env; from suite.machine.env import capture_env; "
            "from suite.machine.allocator import steady_allocator; "
            "before = trial_env('cpu'); steady_allocator(); after = capture_env('cpu'); "
            "assert before.key() == after.key(), (before.key(), after.key()); "
            "assert type(before.env_torch) is str, type(before.env_torch); "  # unpickles without torch
            "print(before.env_device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"


def test_a_failing_cleanup_never_hides_the_trials_status(monkeypatch):
    """A sticky CUDA error raises again in cleanup: the trial's own failure must stay its status."""
    import suite.sweep.trial as ex

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ex, "release_memory", sticky)
    assert ex._cleaned_up("oom", "OutOfMemoryError: x") == (
        "oom", "OutOfMemoryError: x; cleanup also failed: RuntimeError: CUDA error: an illegal memory access was encountered")
    status, reason = ex._cleaned_up("ok", "")
    assert status == "error" and reason.startswith("cleanup after the trial failed")
