"""The allocator's steady state and how the environment records it."""
from __future__ import annotations

import os
import subprocess
import sys

from suite.machine import allocator as steady


def _in_fresh_process(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env})
    return out.stdout.strip()


def test_steady_allocator_is_applied_and_recorded():
    code = "from suite.machine import allocator as steady; print(steady.allocator()); print(steady.steady_allocator())"
    before, after = _in_fresh_process(code).splitlines()
    if steady._glibc() is None:
        assert before == after and before.startswith("system")
        return
    assert "default" in before and "steady" in after


def test_allocator_environment_variables_count_as_steady():
    if steady._glibc() is None:
        return
    text = _in_fresh_process("from suite.machine import allocator as steady; print(steady.allocator())", **steady.ALLOCATOR_ENV)
    assert "steady" in text


def test_a_preloaded_allocator_is_named_and_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert steady.preloaded_allocator() == "jemalloc"
    assert steady.allocator() == "jemalloc (LD_PRELOAD)"


def test_environment_key_separates_allocators():
    from suite.core.records import Env

    a = Env(env_device="cpu", env_torch="2.14", env_allocator="glibc 2.36 steady (...)")
    b = Env(env_device="cpu", env_torch="2.14", env_allocator="jemalloc (LD_PRELOAD)")
    assert a.key() != b.key()
