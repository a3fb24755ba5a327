"""suite: benchmark and ablate timm image models as CLIP vision towers.

`import suite` stays light (no torch): the heavy entry points load on first use.

    import suite
    suite.run_experiment("experiments/smoke.yaml")   # runs the sweep, writes the store and report
    df = suite.load_results("runs/smoke/results.sqlite")
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "run_experiment": ("suite.sweep", "run_experiment"),
    "load_results": ("suite.store", "load_results"),
    "load_experiment": ("suite.config", "load_experiment"),
    "Trial": ("suite.options", "Trial"),
    "measure": ("suite.measure", "measure"),
    "TimmTower": ("suite.tower", "TimmTower"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'suite' has no attribute {name!r}")
