"""The project on this machine: its test suite (in the background) and the GPU sweep with its report.

The test suite runs in several pytest processes at once (pytest-xdist may not be installed): one for
`-m gpu` over every file, the others for `-m "not gpu"`, one file each, from a queue (`TestQueue`).
It starts in the background after the timing checks, so it never disturbs a timed figure.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from benchmarks.gpu_check.core import Context, Result, rounded, skipped, time_cap, verdict
from benchmarks.shared import ROOT, child_env

SWEEP_RESERVE_S = 150  # what the test suite leaves of the budget for the sweep after it
TESTS_CAP_S = 240  # the `pytest` check's cap (registry.py): the wait ends (and kills) before it
# Files that ran longest on the first GPU machine (one torch thread each): started first, so the
# slowest file is not the last to start. The rest go by size.
SLOW_FIRST = ("test_steps.py", "test_sweep.py", "test_faults.py", "test_timing.py", "test_probe.py",
              "test_weights.py", "test_trial.py", "test_plan.py")
# One BLAS thread and one inductor compile worker per test process: N processes with pools of all
# cores each starve the machine (and the checks running beside them).
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def test_order(files: list[Path]) -> list[Path]:
    """The known-slow files first (in SLOW_FIRST's order), then the others largest first."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    return sorted(files, key=lambda f: (rank.get(f.name, len(rank)), -f.stat().st_size, f.name))


class TestQueue:
    """`pytest -m gpu` over every file, and `-m "not gpu"` one file per process, `slots` at a time.

    A background thread starts the next file whenever a process ends, so an uneven file costs only
    its own time (the first GPU run split files into fixed shards by size: one shard held the two
    slowest files and the wait killed four shards). `stop()` kills what still runs.
    """

    def __init__(self, folder: Path, files: list[Path], slots: int, cuda: bool):
        self.folder, self.slots = folder, slots
        self.pending = [("gpu", "gpu", files)]
        if cuda:
            self.pending += [(f"cpu-{f.stem}", "not gpu", [f]) for f in test_order(files)]
        self.running: dict[str, tuple] = {}
        self.done: dict[str, dict] = {}
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "TestQueue":
        self._thread.start()
        return self

    def _launch(self, name: str, marker: str, group: list[Path]) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
               f"--junitxml={self.folder / (name + '.xml')}", *[str(f) for f in group]]
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
        env = {**child_env(), **SINGLE_THREADED}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = (proc, log, time.perf_counter())

    def _reap(self, name: str, rc) -> None:
        proc, log, began = self.running.pop(name)
        log.close()
        self.done[name] = {"rc": rc, "wall_s": time.perf_counter() - began, **_junit(self.folder / f"{name}.xml")}

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                for name, (proc, _, _) in list(self.running.items()):
                    if proc.poll() is not None:
                        self._reap(name, proc.returncode)
                while self.pending and len(self.running) < self.slots:
                    self._launch(*self.pending.pop(0))
                if not self.pending and not self.running:
                    return
            time.sleep(0.2)

    def wait(self, timeout_s: float) -> dict[str, dict]:
        """Wait up to `timeout_s` for every file; kill what still runs (also when the wait itself is
        interrupted: no test process outlives it); results by name."""
        try:
            self._thread.join(timeout=max(0.0, timeout_s))
        finally:
            self.stop()
        return self.done

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for name, (proc, _, _) in list(self.running.items()):
                rc = proc.poll()
                if rc is None:
                    proc.kill()
                    proc.wait()
                    rc = f"killed after {time.perf_counter() - self.started:.0f} s"
                self._reap(name, rc)
            for name, _, _ in self.pending:  # no junit file: zero counts
                self.done[name] = {"rc": "not started (out of time)", "wall_s": 0.0,
                                   **_junit(self.folder / f"{name}.xml")}
            self.pending = []


def start_tests(ctx: Context) -> None:
    """Start the test queue (GPU marker only where there is no CUDA) and leave it running."""
    folder = ctx.out / "pytest"
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((ROOT / "tests").rglob("test_*.py"))  # tests/ mirrors suite/: one folder per subpackage
    slots = max(1, min(10, (os.cpu_count() or 2) - 4))  # cores left for the checks running meanwhile
    ctx.background["pytest"] = TestQueue(folder, files, slots, ctx.cuda).start()


def _junit(path: Path) -> dict:
    """Counts, failures (id: first line) and skip reasons of one junit XML file."""
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skip_reasons": Counter()}
    if not path.exists():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                out["failures" if tag == "failure" else "errors"] += 1
                out["failed"].append(f"{name}: {(node.get('message') or '').splitlines()[0][:200] if node.get('message') else tag}")
        node = case.find("skipped")
        if node is not None:
            out["skipped"] += 1
            out["skip_reasons"][(node.get("message") or "")[:120]] += 1
    return out


def check_tests(ctx: Context) -> Result:
    """`pytest -m gpu` passes (at least one GPU test really ran), and so does every other test here."""
    if "pytest" not in ctx.background:
        start_tests(ctx)
    queue = ctx.background.pop("pytest")
    reserve = SWEEP_RESERVE_S if "sweep" in ctx.selected else 0
    results = queue.wait(timeout_s=max(10.0, min(TESTS_CAP_S - 10, ctx.remaining() - reserve - 10)))
    total = {k: sum(r[k] for r in results.values()) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f for r in results.values() for f in r["failed"]]
    reasons = sum((r["skip_reasons"] for r in results.values()), Counter())
    bad_rc = {n: r["rc"] for n, r in results.items() if r["rc"] not in (0, 5)}  # 5: nothing collected
    gpu = results["gpu"]
    gpu_ran = gpu["tests"] - gpu["skipped"]
    figures = {"total": total, "gpu_tests_run": gpu_ran, "failed": failed[:50], "bad_exit_codes": bad_rc,
               "skip_reasons": dict(reasons.most_common(20)), "wall_s": time.perf_counter() - queue.started,
               "files": {n: {k: r[k] for k in ("rc", "wall_s", "tests", "failures", "errors", "skipped")}
                         for n, r in results.items()}}
    figure = (f"{total['tests']} tests: {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped; "
              f"{gpu_ran} GPU tests ran")
    if not ctx.cuda:
        ok = not failed and not bad_rc
        return skipped(f"no CUDA: only `-m gpu` collected ({figure}){'' if ok else ' - FAILURES'}", rounded(figures))
    ok = not failed and not bad_rc and gpu_ran > 0
    return verdict(ok, figure, rounded(figures), ["logs and junit XML in pytest/"])


def check_sweep(ctx: Context) -> Result:
    """experiments/gpu-check.yaml through `suite.run_experiment`; its report as reports/gpu-<card>.md."""
    from suite.experiment.spec import load_experiment
    from suite.sweep.driver import run_experiment

    exp = load_experiment(ctx.experiment, check_names=False)
    if {t.device for t in exp.trials} & {"cuda"} and not ctx.cuda:
        return skipped(f"no CUDA: {ctx.experiment.name} asks for device cuda")
    from benchmarks.gpu_check.basics import card_slug

    out = ctx.out / "sweep"
    try:  # past the deadline the sweep stops as on Ctrl-C: what finished is stored and reported
        with time_cap(max(10.0, ctx.remaining() - 25), exc=KeyboardInterrupt):
            summary = run_experiment(ctx.experiment, out=out, resume=True, report=False, cache_dir=ctx.cache_dir)
    except KeyboardInterrupt:
        return verdict(False, "the budget ran out outside the sweep's trial loop (nothing to report)", {})
    slug = card_slug(ctx.card) if ctx.cuda else "cpu"
    report, notes = _write_report(summary.db_path, ctx.out / "reports" / f"gpu-{slug}.md", ctx.card)
    rows = _rows(summary.db_path)
    bad = {k: v for k, v in summary.statuses.items() if k not in ("ok", "skipped")}
    figures = {"statuses": summary.statuses, "wall_s": summary.wall_s, "measured_s": summary.measured_s,
               "report": str(report.relative_to(ctx.out)), "trials": rows, "interrupted": summary.interrupted}
    ok = not bad and summary.statuses.get("ok", 0) > 0 and not summary.interrupted
    return verdict(ok, f"{summary.ran} trials {summary.statuses} in {summary.wall_s:.0f} s -> "
                       f"{figures['report']}", rounded(figures, 2), notes)


def _write_report(db_path: Path, path: Path, card: str) -> tuple[Path, list[str]]:
    """The sweep's report (with plots) at `path`; without matplotlib, the markdown alone, said so."""
    from suite.report.render import render, write_report
    from suite.results.store import load_meta, load_results

    title = f"GPU check on {card}"
    if importlib.util.find_spec("matplotlib") is None:
        meta = load_meta(db_path)
        meta["title"] = title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(load_results(db_path), meta, plots={}))
        return path, ["matplotlib is not installed: the report has no plots"]
    return write_report(db_path, path, title=title), []


def _rows(db_path: Path) -> list[dict]:
    from suite.results.store import load_results

    keep = ["model", "pool", "precision", "grad_checkpointing", "unlocked_groups", "status", "reason",
            "infer_samples_per_sec", "train_samples_per_sec", "infer_batch_size", "train_batch_size",
            "train_peak_mem_mib", "infer_mfu", "train_mfu", "probe_top1"]
    df = load_results(db_path)
    return df[[c for c in keep if c in df.columns]].to_dict("records")
