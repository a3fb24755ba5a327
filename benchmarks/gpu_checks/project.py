"""The project on this machine: its test suite (sharded, in the background) and the GPU sweep with its report.

The test suite runs in several pytest processes at once (pytest-xdist may not be installed): one for
`-m gpu` over every file, the others for `-m "not gpu"` over a share of the files each. It starts in
the background after the timing checks, so it never disturbs a timed figure.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from gpu_checks.core import ROOT, Context, Result, child_env, rounded, skipped, time_cap, verdict

SHARDS = 6  # CPU test processes besides the GPU one (each runs one torch thread: see tests/conftest.py)
SWEEP_RESERVE_S = 150  # what the test suite leaves of the budget for the sweep after it
TESTS_CAP_S = 240  # the `pytest` check's cap in gpu_check.py: the wait ends (and kills) before it


def _shards(files: list[Path], n: int) -> list[list[Path]]:
    """Files split into `n` groups of similar total size (a proxy for run time)."""
    groups: list[list[Path]] = [[] for _ in range(n)]
    sizes = [0] * n
    for f in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        i = sizes.index(min(sizes))
        groups[i].append(f)
        sizes[i] += f.stat().st_size
    return [g for g in groups if g]


def start_tests(ctx: Context) -> None:
    """Start the pytest processes (GPU marker only where there is no CUDA) and leave them running."""
    folder = ctx.out / "pytest"
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((ROOT / "tests").glob("test_*.py"))
    jobs = [("gpu", "gpu", files)]
    if ctx.cuda:
        n = max(1, min(SHARDS, (os.cpu_count() or 2) // 2))
        jobs += [(f"cpu-{i}", "not gpu", group) for i, group in enumerate(_shards(files, n))]
    procs = {}
    for name, marker, group in jobs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
               f"--junitxml={folder / (name + '.xml')}", *[str(f.relative_to(ROOT)) for f in group]]
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed when the job is collected
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT), log)
    ctx.background["pytest"] = {"procs": procs, "started": time.perf_counter(), "folder": folder}


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


def _collect(job: dict, timeout_s: float) -> dict[str, dict]:
    """Wait for every pytest process (killing those past `timeout_s`); their results by name."""
    deadline = time.perf_counter() + timeout_s
    results = {}
    try:
        for name, (proc, log) in job["procs"].items():
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = f"killed after {time.perf_counter() - job['started']:.0f} s"
            log.close()
            results[name] = {"rc": rc, **_junit(job["folder"] / f"{name}.xml")}
    finally:  # even when the check's own cap interrupts the wait: no test process outlives the check
        for proc, log in job["procs"].values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return results


def check_tests(ctx: Context) -> Result:
    """`pytest -m gpu` passes (at least one GPU test really ran), and so does every other test here."""
    if "pytest" not in ctx.background:
        start_tests(ctx)
    job = ctx.background.pop("pytest")
    reserve = SWEEP_RESERVE_S if "sweep" in ctx.selected else 0
    results = _collect(job, timeout_s=max(10.0, min(TESTS_CAP_S - 10, ctx.remaining() - reserve - 10)))
    total = {k: sum(r[k] for r in results.values()) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f for r in results.values() for f in r["failed"]]
    reasons = sum((r["skip_reasons"] for r in results.values()), Counter())
    bad_rc = {n: r["rc"] for n, r in results.items() if r["rc"] not in (0, 5)}  # 5: nothing collected
    gpu = results["gpu"]
    gpu_ran = gpu["tests"] - gpu["skipped"]
    figures = {"total": total, "gpu_tests_run": gpu_ran, "failed": failed[:50], "bad_exit_codes": bad_rc,
               "skip_reasons": dict(reasons.most_common(20)), "wall_s": time.perf_counter() - job["started"],
               "shards": {n: {k: r[k] for k in ("rc", "tests", "failures", "errors", "skipped")} for n, r in results.items()}}
    figure = (f"{total['tests']} tests: {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped; "
              f"{gpu_ran} GPU tests ran")
    if not ctx.cuda:
        ok = not failed and not bad_rc
        return skipped(f"no CUDA: only `-m gpu` collected ({figure}){'' if ok else ' - FAILURES'}", rounded(figures))
    ok = not failed and not bad_rc and gpu_ran > 0
    return verdict(ok, figure, rounded(figures), ["logs and junit XML in pytest/"])


def check_sweep(ctx: Context) -> Result:
    """experiments/gpu-check.yaml through `suite.run_experiment`; its report as reports/gpu-<card>.md."""
    from suite.config import load_experiment
    from suite.sweep import run_experiment

    exp = load_experiment(ctx.experiment, check_names=False)
    if {t.device for t in exp.trials} & {"cuda"} and not ctx.cuda:
        return skipped(f"no CUDA: {ctx.experiment.name} asks for device cuda")
    from gpu_checks.basics import card_slug

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
    from suite.report import render, write_report
    from suite.store import load_meta, load_results

    title = f"GPU check on {card}"
    if importlib.util.find_spec("matplotlib") is None:
        meta = load_meta(db_path)
        meta["title"] = title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(load_results(db_path), meta, plots={}))
        return path, ["matplotlib is not installed: the report has no plots"]
    return write_report(db_path, path, title=title), []


def _rows(db_path: Path) -> list[dict]:
    from suite.store import load_results

    keep = ["model", "pool", "precision", "grad_checkpointing", "unlocked_groups", "status", "reason",
            "infer_samples_per_sec", "train_samples_per_sec", "infer_batch_size", "train_batch_size",
            "train_peak_mem_mib", "infer_mfu", "train_mfu", "probe_top1"]
    df = load_results(db_path)
    return df[[c for c in keep if c in df.columns]].to_dict("records")
