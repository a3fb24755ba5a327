"""The stable surface at `suite.*`: lazy (no torch at import), each name the object its module defines,
and the same object on every access (a submodule import must not shadow it)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import suite

EXPECTED = {"run_experiment", "load_results", "load_experiment", "Trial", "run_trial", "measure",
            "TimmTower", "build_tower", "probe_trial", "linear_probe", "compare_paths"}


def test_all_names_the_documented_api():
    assert set(suite.__all__) == EXPECTED
    assert EXPECTED <= set(dir(suite))


def test_import_suite_loads_no_torch():
    code = "import sys, suite; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_each_name_is_its_modules_object():
    for name in EXPECTED:
        module, attr = suite._LAZY[name]
        assert getattr(suite, name) is getattr(importlib.import_module(module), attr), name


def test_measure_stays_the_function_across_accesses_and_submodule_imports():
    code = """
import suite
first = suite.measure
second = suite.measure
import suite.measurement.engine as engine
import suite.measurement
third = suite.measure
assert callable(first) and first is second is third is engine.measure, (first, second, third)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_unknown_name_is_an_attribute_error():
    try:
        suite.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("suite.no_such_thing resolved")
