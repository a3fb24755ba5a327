"""What runs in a fresh Python process (`python -m benchmarks.gpu_check --child NAME --child-args JSON`).

Each case returns a JSON-able dict; the script prints it as the last line of stdout.
"""
from __future__ import annotations

import dataclasses

from benchmarks.gpu_check.memory import oom_child
from benchmarks.gpu_check.stages import cpu_trial_child


def measure_child(trial: dict, cache_dir: str) -> dict:
    """A trial measured as the first measurement of this process (the cold case)."""
    from suite.core.options import Trial
    from suite.measurement.engine import measure

    return dataclasses.asdict(measure(Trial(**trial), cache_dir=cache_dir))


CASES = {"measure": measure_child, "oom": oom_child, "cpu_trial": cpu_trial_child}
