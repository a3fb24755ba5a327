"""GPU proof: one command that checks every GPU path of the suite on a real card.

    PYTHONUNBUFFERED=1 python -m benchmarks.gpu_check --out DIR [--bundle FILE.tar.gz]   # from the repository root

Prints PASS / FAIL / SKIP per check with its figure and elapsed time, writes DIR/gpu_check.json
(every figure) and DIR/gpu_check.md (the summary), runs the sweep experiments/gpu-check.yaml and
writes its report to DIR/reports/gpu-<card>.md (with plots), and exits 1 when a check FAILs.
With `--bundle FILE.tar.gz`, all of DIR is also packed into that one file after every check (the
GPU machine this is run on returns only a few files; a run cut short keeps what it had).
Sized for under 8 minutes on one H100. Without CUDA the GPU checks are SKIPped (the script says
so) and what can run on a CPU still runs; the exit code is then 0 unless a CPU part fails.
`--list` prints the checks (with `--markdown`, as the table in benchmarks/README.md).

Needs only torch (>= 2.1), timm, pandas, rich, scikit-learn and pytest: no network (random init
everywhere), no open_clip, ray or torch-tb-profiler (the tests that need them skip).

Order: the timed checks run first on a quiet machine; then the test suite starts in the
background (a queue of pytest processes) while the untimed checks run; then its result, then the sweep.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.gpu_check import project
from benchmarks.gpu_check.core import Check, Context, run_check
from benchmarks.gpu_check.registry import CHECKS, NAMES, STAGES, listing, markdown_table
from benchmarks.gpu_check.summary import line, write_json, write_markdown
from benchmarks.shared import ROOT


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md, reports/ (required unless --list)")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated check names not to run")
    parser.add_argument("--budget-s", type=float, default=460, help="overall time budget; checks past it SKIP")
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "gpu-check.yaml",
                        help="the sweep the `sweep` check runs")
    parser.add_argument("--bundle", type=Path, help="also pack DIR into this .tar.gz after every check")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--markdown", action="store_true", help="with --list: as a markdown table (benchmarks/README.md's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("only", "skip"):
        unknown = sorted(set(filter(None, getattr(args, option).split(","))) - set(NAMES))
        if unknown:
            parser.error(f"--{option}: unknown check(s) {unknown}; known: {', '.join(NAMES)}")
    if args.out is None and not args.list:
        parser.error("--out DIR is required (unless --list)")
    if args.markdown and not args.list:
        parser.error("--markdown goes with --list")
    return args


def selected(args) -> list[Check]:
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    return [c for c in CHECKS if (not only or c.name in only) and c.name not in skip]


def run_all(ctx: Context, checks: list[Check], save=lambda rows: None) -> list[dict]:
    """Every selected check in stage order; `save(rows)` after each one."""
    rows = []
    for stage in STAGES:
        if stage == "untimed" and ctx.cuda and any(c.name == "pytest" for c in checks):
            project.start_tests(ctx)
            print(f"[{0:6.1f}s | {ctx.elapsed():6.1f}s] ....  pytest           started in the background")
        for check in (c for c in checks if c.stage == stage):
            result, elapsed, cap = run_check(ctx, check)
            print(line(check.name, result.status, result.figure, elapsed, ctx.elapsed()), flush=True)
            rows.append({"name": check.name, "criterion": check.criterion, "status": result.status,
                         "figure": result.figure, "figures": result.figures, "notes": result.notes,
                         "error": result.error, "elapsed_s": elapsed, "cap_s": cap})
            save(rows)
    return rows


def save_results(args, ctx: Context, started_at: float, rows: list[dict]) -> dict:
    """gpu_check.json and gpu_check.md as they stand (and the bundle); the header."""
    counts = Counter(r["status"] for r in rows)
    env = next((r["figures"].get("env") for r in rows if r["name"] == "env"), None)
    pending = [n for n in ctx.selected if n not in {r["name"] for r in rows}]
    header = {"card": ctx.card if ctx.cuda else "no CUDA (CPU only)", "verdict": "FAIL" if counts["FAIL"] else "PASS",
              "counts": ", ".join(f"{counts[s]} {s}" for s in ("PASS", "FAIL", "SKIP")), "wall_s": ctx.elapsed(),
              "budget_s": args.budget_s, "started_at": started_at, "finished_at": time.time(), "env": env,
              "argv": sys.argv[1:], "not_yet_run": pending}
    write_json(args.out / "gpu_check.json", header, rows)
    write_markdown(args.out / "gpu_check.md", header, rows)
    if args.bundle:
        bundle(args.out, args.bundle)
    return header


def bundle(folder: Path, path: Path) -> None:
    """Pack `folder` into the .tar.gz `path` (written aside, then renamed: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(folder, arcname=folder.name, filter=_bundled)
    partial.replace(path)


def _bundled(info: tarfile.TarInfo):
    """What the bundle leaves out: the feature cache (megabytes of arrays) and a bundle in the making."""
    parts = Path(info.name).parts
    return None if info.name.endswith(".partial") or parts[1:3] == ("cache", "features") else info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(markdown_table() if args.markdown else listing())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        from benchmarks.gpu_check.child_cases import CASES

        print(json.dumps(CASES[args.child](**json.loads(args.child_args))))
        return 0
    import torch

    ctx = Context(out=args.out, cuda=torch.cuda.is_available(), budget_s=args.budget_s, experiment=args.experiment)
    if ctx.cuda:
        ctx.card = torch.cuda.get_device_name()
    checks = selected(args)
    ctx.selected = tuple(c.name for c in checks)
    started_at = time.time()
    print(f"gpu_check: {'CUDA: ' + torch.cuda.get_device_name() if ctx.cuda else 'no CUDA here: GPU checks SKIP'}"
          f" · torch {torch.__version__} · budget {args.budget_s:.0f} s · out {args.out}", flush=True)
    headers = []  # saved after every check; once more only when no check ran
    rows = run_all(ctx, checks, save=lambda rows: headers.append(save_results(args, ctx, started_at, rows)))
    header = headers[-1] if headers else save_results(args, ctx, started_at, rows)
    print(f"{header['verdict']}: {header['counts']} in {ctx.elapsed():.0f} s -> {args.out / 'gpu_check.md'}"
          + (f" (all of it in {args.bundle})" if args.bundle else ""))
    return 1 if header["verdict"] == "FAIL" else 0
