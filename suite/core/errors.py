"""The suite's own exceptions and the two helpers every layer uses to talk about problems.

A leaf module (no torch, no other suite import), so the lowest layers can raise what the CLI
maps to "bad input" (exit 2) without importing the layers above them.

- `SuiteError`: the base of every error the suite raises on purpose about its input. The CLI
  maps these (and only these, plus missing files) to exit 2; anything else is a bug and shows
  its traceback.
- `UnsupportedConfig`: a trial cannot run as configured (the sweep records it `skipped`).
- `one_line(exc)`: `TypeName: first line`, short enough for a table cell.
- `suggest(name, valid)`: "; did you mean 'x'?" from `difflib`, or "".
"""
from __future__ import annotations

import difflib
from typing import Iterable


class SuiteError(ValueError):
    """Bad input the suite detected itself: the message names the file/key/value and the fix.

    A `ValueError` so that callers that caught ValueError before keep working.
    """


class UnsupportedConfig(SuiteError):
    """This combination cannot run as configured; the message names model, option, value and the fix."""


class WeightsError(SuiteError):
    """A checkpoint file is unreadable or does not match the tower; the message names the file and keys."""


class DatasetError(SuiteError):
    """The probe data cannot be used as given; the message names the path and the fix."""


class MissingDependency(SuiteError, ImportError):
    """An optional package a command needs is not installed; the message names the pip command."""


class ConfigError(SuiteError):
    """One or more problems in an experiment file; `problems` lists them, the message shows all."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")

    def __reduce__(self):  # picklable: raised in a child process, re-raised in the driver
        return type(self), (self.source, self.problems)


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`, short enough for a table cell."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else ""
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]


def close_matches(name: object, valid: Iterable, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The entries of `valid` closest to `name` (as strings), best first."""
    return difflib.get_close_matches(str(name), [str(v) for v in valid], n=n, cutoff=cutoff)


def suggest(name: object, valid: Iterable, n: int = 3, cutoff: float = 0.6) -> str:
    """"; did you mean 'a' or 'b'?" for a misspelled `name`, or "" when nothing is close."""
    close = close_matches(name, valid, n=n, cutoff=cutoff)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
