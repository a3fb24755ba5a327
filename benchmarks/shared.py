"""What the benchmarks share: the hand-written reference step and re-running a module in a fresh process.

The reference step computes what the suite's steps compute (`suite.measurement.steps`: the tower,
for training CLIP's contrastive loss, backward, AdamW, zero_grad), written out the way a user's own
loop would, so a ratio suite / hand loop away from 1 is a cost or an error of the suite's harness,
not of a different workload. `bench_measure` times it on the CPU, `gpu_check`'s timing checks on CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]  # the repository root: `python -m benchmarks.…` runs from here


def reference_step(tower, phase: str, device: str = "cpu", dtype=None) -> Callable:
    """The suite's step of `phase` ('infer' or 'train') written out by hand, as `step(x)`.

    Inference: eval mode, `inference_mode`. Training: train mode, CLIP's contrastive loss, backward,
    AdamW (lr 1e-5, trainable parameters), zero_grad. Under autocast to `dtype` on `device` when
    `dtype` is given (None: plain fp32, no autocast).
    """
    import torch

    from suite.measurement.steps import contrastive_loss

    def cast():
        return nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)

    if phase == "infer":
        tower.eval()

        def infer(x):
            with torch.inference_mode(), cast():
                return tower(x)

        return infer
    tower.train()
    optimizer = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=1e-5)
    cache: dict = {}

    def train(x):
        with cast():
            emb = tower(x)
        contrastive_loss(emb, cache).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def child_env(drop_prefix: str | None = None) -> dict[str, str]:
    """This environment for a child process: the repository root first on PYTHONPATH (it imports `suite`
    from the source tree, as the parent does), unbuffered output, and no variable starting with
    `drop_prefix` (e.g. "MALLOC_": a child that must start with the C allocator's defaults)."""
    env = {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_module(module: str, args: list[str], *, timeout_s: float | None = None,
               env: dict[str, str] | None = None) -> dict:
    """Run `python -m module *args` in a fresh process from the repository root; return the JSON
    its last line of stdout holds.

    Args:
        module: e.g. "benchmarks.bench_measure" (the child re-enters the same script with its own flags).
        args: its command-line arguments.
        timeout_s: the longest the child may run (None: no limit).
        env: its environment (default `child_env()`).

    Raises:
        RuntimeError: the child exited non-zero or printed nothing (the tail of its stderr is in the
            message), or ran past `timeout_s`.
    """
    cmd = [sys.executable, "-m", module, *args]
    what = " ".join([module, *args[:2]])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                              env=child_env() if env is None else env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"child {what!r} ran past {timeout_s:.0f} s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {what!r} exited {done.returncode}: {done.stderr.strip()[-3000:]}")
    return json.loads(lines[-1])
