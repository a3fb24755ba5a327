"""suite: benchmark and ablate timm image models as CLIP vision towers.

`import suite` stays light (no torch): the heavy entry points load on first use.

    import suite
    suite.run_experiment("experiments/smoke.yaml")   # runs the sweep, writes the store and report
    df = suite.load_results("runs/smoke/results.sqlite")
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "run_experiment": ("suite.sweep.driver", "run_experiment"),
    "load_results": ("suite.results.store", "load_results"),
    "load_experiment": ("suite.experiment.spec", "load_experiment"),
    "Trial": ("suite.core.options", "Trial"),
    "run_trial": ("suite.sweep.trial", "run_trial"),
    "measure": ("suite.measurement.engine", "measure"),
    "TimmTower": ("suite.tower.model", "TimmTower"),
    "build_tower": ("suite.tower.model", "build_tower"),
    "probe_trial": ("suite.probe.engine", "probe_trial"),
    "linear_probe": ("suite.probe.classifier", "linear_probe"),
    "compare_paths": ("suite.gate.compare", "compare_paths"),
}

__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        # Cached as a real attribute: later lookups no longer reach __getattr__, so no submodule
        # that an import sets on the package can shadow a public name.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'suite' has no attribute {name!r}")
