"""torch.profiler traces of one configuration, for TensorBoard's torch-tb-profiler plugin.

    suite profile --model vit_base_patch16_224 --precision bf16 --logdir runs/prof
    tensorboard --logdir runs/prof        # the PYTORCH_PROFILER tab

The steps profiled are the very step functions `suite.measurement.engine` times, under the same rules
(steady allocator, strict fp32 on CUDA, cuDNN autotuning), so a trace explains the numbers in a
report rather than a look-alike loop.
"""
from __future__ import annotations

from pathlib import Path

from suite.core.errors import SuiteError
from suite.machine.allocator import steady_allocator
from suite.machine.device import resolve_device, strict_fp32
from suite.measurement.timing import cudnn_benchmark


def profile_trial(trial, logdir: str | Path, *, steps: int = 5, phase: str = "train", top: int = 15) -> str:
    """Profile `steps` steps (after one warm-up step) and return a markdown table of the top operators.

    Args:
        trial: the configuration (a `suite.core.options.Trial`).
        logdir: TensorBoard log folder; a `*.pt.trace.json` file is written below it.
        steps: profiled steps.
        phase: `infer` or `train`.
        top: rows of the operator table (by self time).
    """
    if phase not in ("infer", "train"):
        raise SuiteError(f"phase: {phase!r} must be 'infer' or 'train'")
    if steps < 1:
        raise SuiteError(f"steps: {steps} must be at least 1")
    device = resolve_device(trial.device)
    steady_allocator()
    with strict_fp32(device, trial.precision), cudnn_benchmark(device):
        return _profile(trial, device, Path(logdir), steps, phase, top)


def _profile(trial, device: str, logdir: Path, steps: int, phase: str, top: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from suite.measurement.steps import infer_step_fn, make_inputs, train_step_fn
    from suite.tower.model import build_tower

    torch.manual_seed(trial.seed)
    tower = build_tower(trial)
    make_step = infer_step_fn if phase == "infer" else train_step_fn
    step = make_step(tower, trial, device)
    inputs = make_inputs(trial, device, trial.batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    logdir.mkdir(parents=True, exist_ok=True)
    worker = f"{trial.model}-{phase}-{trial.trial_id[:8]}"
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(logdir), worker_name=worker),
        record_shapes=True,
        profile_memory=True,
        with_stack=False,
    ) as prof:
        for _ in range(steps + 1):
            step(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            prof.step()
    return operator_table(prof.key_averages(), device == "cuda", top, title=f"{trial.label} · {phase} · {steps} steps · {device}")


def operator_table(averages, device_time: bool, top: int, title: str) -> str:
    """Markdown table of the operators with the most self time (CUDA time when on a GPU).

    Operators only: ranges (`ProfilerStep#N`, the optimizer's `Optimizer.step#AdamW.step`, user
    `record_function`s) span their children's time, and on a GPU the kernels themselves are timed
    in the operator that launched them. Counting either as well made the first H200 table show
    `ProfilerStep*` at 63% and every kernel twice.
    """
    self_attr, total_attr = ("self_device_time_total", "device_time_total") if device_time else (
        "self_cpu_time_total", "cpu_time_total")
    events = [e for e in averages if _is_operator(e)]
    if device_time and events and not hasattr(events[0], self_attr):  # torch < 2.4 names it "cuda"
        self_attr, total_attr = "self_cuda_time_total", "cuda_time_total"
    total = sum(getattr(e, self_attr) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, self_attr), reverse=True)[:top]
    lines = [f"**Top operators by self {'CUDA' if device_time else 'CPU'} time** ({title})", "",
             "| operator | calls | self time (ms) | share | total time (ms) |", "|---|---:|---:|---:|---:|"]
    for e in rows:
        self_us = getattr(e, self_attr)
        lines.append(f"| `{_short(e.key)}` | {e.count} | {self_us / 1e3:.2f} | {self_us / total:.1%} | "
                     f"{getattr(e, total_attr) / 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def _is_operator(event) -> bool:
    """Not a range (a step, a user annotation) and not a device-side kernel, memcpy or memset."""
    if getattr(event, "is_user_annotation", False) or event.key.startswith("ProfilerStep"):
        return False
    return str(getattr(event, "device_type", "CPU")).rsplit(".", 1)[-1] == "CPU"


def _short(name: str, width: int = 90) -> str:
    """A name for a table cell: C++ template arguments can run to thousands of characters."""
    return name if len(name) <= width else name[: width - 1] + "…"
