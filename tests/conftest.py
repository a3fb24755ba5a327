"""Shared test settings and fixtures.

Tests never depend on a real timing: where a decision depends on measured figures, the test
injects them (`fake_clock` below, a stub trial function from `trialfns`, recorded records from
`factories`). See docs/testing.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

XDIST_WORKERS = 2  # the CI machine's cores; more workers only queue on them


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run in `XDIST_WORKERS` processes by default when pytest-xdist is installed (the `test` extra),
    with `--dist loadgroup` so that tests marked `xdist_group(name)` share one worker and never run at
    the same time (the Ray clusters). `-n N` given on the command line wins (`-n 0`: one process, for a
    single test or a debugger); without pytest-xdist (a GPU machine's bare python) the run is serial.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") or hasattr(config, "workerinput"):
        return  # a worker: it runs tests, it starts none
    if config.pluginmanager.hasplugin("xdist") and config.option.numprocesses is None \
            and not config.option.usepdb and not config.option.collectonly:
        config.option.numprocesses = XDIST_WORKERS
        if config.option.dist == "no":
            config.option.dist = "loadgroup"


def pytest_configure(config):
    """One cache folder for the whole run (the device-peak measurement, extracted features), shared by
    the xdist workers and every process they start, and never the user's own `~/.cache`.

    Set in the controlling process before xdist starts its workers, which inherit it; a test that
    checks cache behaviour passes its own `cache_dir`.
    """
    if not hasattr(config, "workerinput"):
        config._suite_cache = os.environ["SUITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="suite-test-cache-")


def pytest_unconfigure(config):
    if getattr(config, "_suite_cache", None):
        shutil.rmtree(config._suite_cache, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription,
    which can make small kernels tens of times slower when another process holds a core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeClock:
    """A `perf_counter` that moves only when told, so a step "takes" exactly what a test says.

    `sleep(s)` advances it by `s` seconds at once: a test of warm-up, rounds or time limits runs
    instantly and gives the same verdict on an idle laptop and on a CI runner under load.
    """

    def __init__(self, start: float = 0.0):
        self.now = start

    def perf_counter(self) -> float:
        return self.now

    time = monotonic = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def fake_clock(monkeypatch) -> FakeClock:
    """Replace the clock of `suite.measurement.timing` (the module that times steps) with a `FakeClock`."""
    import suite.measurement.timing

    clock = FakeClock()
    monkeypatch.setattr(suite.measurement.timing, "time", clock)
    return clock
