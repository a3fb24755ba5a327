"""Rebuild a baseline from another commit of the suite: measure a trial with that commit's code.

`suite compare` re-measures flagged throughput regressions A/B (`suite.gate.confirm`). When the baseline
was measured by another clean commit of this repository (the usual CI case: main vs a branch), its
side is measured by that commit's code, interleaved with the current side in the same worker, so
the machine's drift between the two stored runs does not count as change:

- `export_commit` writes the commit's files to a temporary folder once (`git archive`: the
  repository and its work tree are not touched);
- `measure_at` (a trial function for `suite.sweep.pool.run_trials`) runs one trial there as
  `python -m suite bench ... --json` in a fresh process with that tree first on the path, and turns
  the printed record back into a `TrialRecord`.

A trial the old code cannot run as asked (an option it does not know yet) comes back as an error
and is not counted; the stored baseline figure stands for it. Light: no torch.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from suite.core.errors import one_line
from suite.core.options import OPTIONS, canonical
from suite.core.records import Env, MeasureResult, TrialRecord, field_names

REPO = Path(__file__).resolve().parents[2]
_GIT_TIMEOUT_S = 60


def _git(*args: str, repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=_GIT_TIMEOUT_S)


def export_commit(commit: str, repo: Path = REPO) -> Path | None:
    """The files of `commit` in a new temporary folder, or None when this checkout does not have it."""
    if not commit or commit.endswith("+dirty"):
        return None
    try:
        if _git("cat-file", "-e", f"{commit}^{{commit}}", repo=repo).returncode != 0:
            return None
        archive = _git("archive", "--format=tar", commit, repo=repo)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if archive.returncode != 0:
        return None
    dest = Path(tempfile.mkdtemp(prefix=f"suite-{commit[:8]}-"))
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: refuse links out of the folder
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # noqa: S202 - our own repository's archive
    return dest


def bench_flags(trial) -> list[str]:
    """`suite bench` flags that give `trial` (options at their default are left out)."""
    flags = []
    for option in OPTIONS:
        if option.group not in ("tower", "measure"):
            continue  # probe options: `suite bench` does not take them, and they do not change a timing
        value = getattr(trial, option.name)
        same = canonical(option, value)  # YAML `min_time_s: 0` is the default 0.0: an older commit may not know the flag
        if same == option.default and type(same) is type(option.default):
            continue
        flag = "--" + option.name.replace("_", "-")
        if option.types == (bool,):
            flags.append(flag if value else "--no-" + option.name.replace("_", "-"))
        else:
            flags += [flag, "null" if value is None else str(value)]
    return flags


def measure_at(trial, *, tree: str, timeout_s: float = 900) -> TrialRecord:
    """Measure `trial` (timing only) with the suite code in `tree`, in a fresh process, with this process's
    torch threads (the A/B worker set them to the stored row's: the two sides must not differ in them)."""
    env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1")
    if "torch" in sys.modules:
        env["OMP_NUM_THREADS"] = str(sys.modules["torch"].get_num_threads())
    cmd = [sys.executable, "-m", "suite", "bench", *bench_flags(trial), "--json"]
    done = None
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s)
        row = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        stderr = done.stderr.strip() if done is not None else ""
        why = one_line(stderr.splitlines()[-1]) if stderr else one_line(exc)
        return TrialRecord(trial, "error", f"the baseline commit's code could not measure this trial: {why}")
    part = lambda cls: cls(**{k: row[k] for k in field_names(cls) if k in row})  # noqa: E731
    return TrialRecord(trial, str(row.get("status")), str(row.get("reason") or ""), measure=part(MeasureResult),
                       env=part(Env))

