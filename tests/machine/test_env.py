"""The environment record: 'auto' must describe the device the trials actually run on."""
from __future__ import annotations

import pytest
import torch

import suite.machine.env as env_mod
from suite.machine.env import capture_env


@pytest.fixture
def fresh_cache():
    env_mod._capture_env.cache_clear()
    yield
    env_mod._capture_env.cache_clear()


def test_auto_is_resolved_like_the_trials_resolve_it(monkeypatch, fresh_cache):
    # A GPU machine, faked: the runner's crashed/timeout records of an 'auto' sweep must land in the
    # same environment (env_key) as the ok records, which were measured on 'cuda'.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(env_mod, "device_name", lambda device: "Fake GPU" if device == "cuda" else "cpu")
    monkeypatch.setattr(env_mod, "_nvidia_driver", lambda: "555.1")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)
    auto, cuda = capture_env("auto"), capture_env("cuda")
    assert auto.env_device == "Fake GPU" and auto.key() == cuda.key()


def test_auto_on_a_cpu_machine_is_cpu(monkeypatch, fresh_cache):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert capture_env("auto").key() == capture_env("cpu").key()
    assert capture_env("auto").env_device == "cpu" and capture_env("auto").env_cuda is None


def test_the_allocator_is_part_of_the_environment(fresh_cache):
    from suite.machine.allocator import allocator

    env = capture_env("cpu")
    assert env.env_allocator == allocator() and env.env_allocator in env.key()
    assert isinstance(env.env_torch, str) and type(env.env_torch) is str  # not a TorchVersion: pickles light


def test_cuda_without_cuda_is_refused(monkeypatch, fresh_cache):
    from suite.core.errors import UnsupportedConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedConfig):
        capture_env("cuda")
