"""Measure one trial: throughput, step time, peak memory, FLOPs and MFU, for inference and training.

timm's `benchmark.py` is the reference this improves on: it reports means over a fixed warm-up and
no memory. Per phase (inference, training) here:

1. with `compile`, dynamo is reset and the tower compiled; the compile (its first call) is timed
   and reported apart;
2. a memory pass, untimed: two steps with peak live-tensor memory tracked and broken down, and a
   second pass at half the batch for the capacity line (see `suite.measurement.memory`, `suite.measurement.footprint`);
3. the timed loop: steady-state warm-up, then rounds of `iters` steps each timed on its own until
   two rounds agree (at least two), reported as the median and IQR of the agreeing rounds' steps
   and flagged noisy when IQR/median exceeds `trial.noise_threshold` or no rounds agreed
   (see `suite.measurement.timing`).

Before anything is timed the process is put into a steady state (`suite.machine.allocator`: the C allocator
held steady; the common kernels run once) and, on CUDA, cuDNN's autotuner is on and fp32 means
strict fp32. FLOPs per image come from `FlopCounterMode` (see `suite.measurement.flops`), MFU divides the
achieved rate by the device's measured matmul peak (see `suite.measurement.roofline`).

Exceptions propagate (the sweep turns them into statuses); the one caught is OOM, and only when
`trial.auto_batch_size` asks to back off.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from suite.core.errors import UnsupportedConfig
from suite.core.options import options_in
from suite.core.records import MeasureResult
from suite.machine.allocator import steady_allocator
from suite.machine.device import autocast, autocast_dtype, place, resolve_device, strict_fp32
from suite.measurement.footprint import (
    PhaseMemory,
    budget_mib,
    capacity_fields,
    lock_check,
    phase_memory,
    search_batch,
    state_check,
)
from suite.measurement.memory import MemoryBaseline, is_oom, recover, settle
from suite.measurement.steps import compile_stats, make_inputs, reset_compiler, step_fn
from suite.measurement.timing import Timing, cudnn_benchmark, time_steps

_FLOP_BATCH = 2  # FLOPs are counted on a small batch and scaled: they are linear in the batch

# --- one phase --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Phase:
    batch_size: int
    timing: Timing
    memory: PhaseMemory
    compile_s: float
    wall_s: float
    skipped_steps: int | None  # training: optimizer steps the fp16 scaler skipped while timing
    graphs: int
    graph_breaks: int


def _compile(phase: str, tower, trial, device: str, inputs) -> float:
    """Compile from a clean slate and run the first (compiling) call; return its wall time."""
    reset_compiler()
    step = step_fn(phase, tower, trial, device)
    t0 = time.perf_counter()
    step(inputs)
    settle(device)
    return time.perf_counter() - t0


def _run_phase(phase: str, tower, trial, device: str, batch_size: int, baseline: MemoryBaseline) -> _Phase:
    inputs = make_inputs(trial, device, batch_size)
    measured = None
    if trial.max_batch:  # before compiling: the search recompiles per batch size
        budget = budget_mib(trial, device)
        measured = search_batch(phase, tower, trial, device, baseline, budget, batch_size)
    compile_s = _compile(phase, tower, trial, device, inputs) if trial.compile else 0.0
    memory = phase_memory(phase, tower, trial, device, inputs, baseline)  # untimed, see suite.measurement.footprint
    if measured is not None:
        memory = dataclasses.replace(memory, max_batch_measured=measured)
    settle(device)
    step = step_fn(phase, tower, trial, device)
    t0 = time.perf_counter()
    timing = time_steps(step, inputs, warmup=trial.warmup, iters=trial.iters, device=device,
                        min_time_s=trial.min_time_s)
    wall_s = time.perf_counter() - t0
    skipped = None
    if phase == "train":
        skipped = timing.warmup_steps + timing.steps - step.optimizer_steps()
    graphs = breaks = 0
    if trial.compile:
        stats = compile_stats()
        graphs, breaks = stats.graphs, stats.graph_breaks
        if graphs == 0:
            raise RuntimeError(f"compile=True but torch.compile produced no graph for the {phase} step; "
                               "the tower ran eagerly, so its numbers would not be compiled numbers")
    del step
    tower.zero_grad(set_to_none=True)
    return _Phase(batch_size, timing, memory, compile_s, wall_s, skipped, graphs, breaks)


def _run_phase_fitting(phase: str, tower, trial, device: str, baseline: MemoryBaseline) -> _Phase:
    """Run a phase at `trial.batch_size`; with `auto_batch_size`, halve the batch on OOM until it fits."""
    batch = trial.batch_size
    while True:
        try:
            return _run_phase(phase, tower, trial, device, batch, baseline)
        except Exception as exc:  # noqa: BLE001 - the CPU allocator's OOM is a plain RuntimeError
            if not is_oom(exc) or not trial.auto_batch_size or batch <= 1:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        recover(tower, device)
        batch //= 2


# --- FLOPs and the precision check -----------------------------------------------------------

class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes matmul-like ops compute in (to prove autocast took effect)."""

    _OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "linear",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self._OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.dtypes.add(first.dtype)
        return out


_FLOP_CACHE: dict[tuple, tuple[int, int | None]] = {}


def _flop_key(trial, device: str) -> tuple:
    """What the FLOPs of a tower built from `trial` depend on (batch size, iters etc. do not)."""
    return tuple(getattr(trial, o.name) for o in options_in("tower")) + (trial.precision, trial.mode, device)


def trial_flops(tower, trial, device: str, dtype: torch.dtype | None, *, cache: bool) -> tuple[int, int | None]:
    """(inference, training) FLOPs per image; also checks that the precision took effect.

    With `cache` (the tower was built from the trial here, so the trial describes it fully),
    counts are reused within the process: a sweep over batch sizes or memory formats pays once.
    """
    from suite.measurement.flops import count_flops

    key = _flop_key(trial, device)
    if cache and key in _FLOP_CACHE:
        return _FLOP_CACHE[key]
    x = make_inputs(trial, device, _FLOP_BATCH)
    seen = MatmulDtypes()
    with autocast(device, dtype), seen:
        infer = count_flops(tower, x, train=False)
        # Training too under autocast: the same count, and flash attention has no fp32 kernel.
        train = count_flops(tower, x, train=True) // _FLOP_BATCH if trial.mode in ("both", "train") else None
    if dtype is not None and dtype not in seen.dtypes:
        raise UnsupportedConfig(
            f"precision={trial.precision!r} did not take effect on {device}: the matmuls ran in "
            f"{sorted(str(d) for d in seen.dtypes)}; use precision='fp32'"
        )
    result = (infer // _FLOP_BATCH, train)
    if cache:
        _FLOP_CACHE[key] = result
    return result


# --- the process ------------------------------------------------------------------------------

@contextmanager
def _frozen_gc() -> Iterator[None]:
    """Collect everything once, then freeze the survivors for the duration of a measurement.

    A full `gc.collect()` scans every object of torch and timm (~0.3 s); after `gc.freeze()`
    the per-phase collections scan only what the measurement itself created, which is where
    the garbage of interest is. The freeze is undone on exit (and left alone if the caller
    froze objects already).
    """
    gc.collect()
    own = gc.get_freeze_count() == 0
    if own:
        gc.freeze()
    try:
        yield
    finally:
        if own:
            gc.unfreeze()


_WARMED: set[tuple[str, torch.dtype | None]] = set()


def _warm_process(device: str, dtype: torch.dtype | None) -> None:
    """Run the common kernels once per process, before the first memory baseline.

    The first convolution, attention or optimizer step of a process pages in library code
    and sets up thread pools (~50 MiB of RSS on CPU); without this, only the first trial of
    each worker process would be charged for it.
    """
    if (device, dtype) in _WARMED:
        return
    # Our own RNG draws must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Flatten(2),
        ).to(device)
        norm, linear = torch.nn.LayerNorm(8).to(device), torch.nn.Linear(8, 24).to(device)
        optimizer = torch.optim.AdamW([*net.parameters(), *norm.parameters(), *linear.parameters()])
        x = torch.randn(2, 3, 8, 8, device=device)
        with autocast(device, dtype):
            tokens = linear(norm(net(x).transpose(1, 2)))  # (2, 64, 24)
            q, k, v = tokens.view(2, 64, 3, 2, 4).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
        out.float().square().mean().backward()
        optimizer.step()
        with torch.inference_mode(), autocast(device, dtype):
            net(x)
    _WARMED.add((device, dtype))


# --- the measurement -------------------------------------------------------------------------

def _cuda_weights_mib(tower: torch.nn.Module) -> float:
    """MiB of `tower`'s tensors already on the GPU (a tower passed in after being placed)."""
    tensors = [t for t in [*tower.parameters(), *tower.buffers()] if t.device.type == "cuda"]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _describe(tower) -> dict[str, Any]:
    """Model fields of the record, from `tower.describe()` (a `TimmTower`) or counted directly."""
    describe = getattr(tower, "describe", None)
    if describe is None:  # a plain module (benchmarks, tests): count what we can
        params = list(tower.parameters())
        return {
            "param_count": sum(p.numel() for p in params) / 1e6,
            "trainable_param_count": sum(p.numel() for p in params if p.requires_grad) / 1e6,
        }
    info = describe()
    return {
        "param_count": info.param_count / 1e6,
        "trainable_param_count": info.trainable_param_count / 1e6,
        "layer_groups": info.layer_groups,
        "feature_shape": "x".join(str(n) for n in info.feature_shape) or None,
        "grad_checkpointing_active": info.grad_checkpointing,
        "weights_note": "; ".join(info.weights_notes) or None,
    }


def measure(trial, *, tower: torch.nn.Module | None = None, cache_dir: str | Path | None = None) -> MeasureResult:
    """Measure `trial`'s tower: inference and/or training throughput, memory, FLOPs and MFU.

    Args:
        trial: the configuration (`suite.core.options.Trial`).
        tower: an already built tower (moved to the device in place; its weights, statistics and
            mode are given back as they came); built from `trial` when None.
        cache_dir: folder of the device-peak cache (default `suite.core.paths.cache_dir('roofline')`).

    Returns:
        A frozen `MeasureResult`; fields of a phase `trial.mode` leaves out are None.

    Raises:
        torch.OutOfMemoryError: the batch does not fit (and `trial.auto_batch_size` is off, or
            even a batch of one does not fit).
        suite.core.errors.UnsupportedConfig: a setting cannot take effect (no CUDA, bf16 unsupported,
            autocast without effect, nothing to train).
    """
    if trial.mode not in ("both", "infer", "train"):
        raise ValueError(f"mode={trial.mode!r} is not one of 'both', 'infer', 'train'")
    if trial.batch_size < 1:
        raise ValueError(f"batch_size={trial.batch_size} must be at least 1")
    device = resolve_device(trial.device)
    dtype = autocast_dtype(trial.precision, device)
    steady_allocator()
    with _frozen_gc(), strict_fp32(device, trial.precision), cudnn_benchmark(device):
        return _measure(trial, tower, device, dtype, cache_dir)


def _phase_fields(phase: str, p: _Phase, flops: int, peak_tflops: float, trial, device: str) -> dict[str, Any]:
    from suite.measurement.roofline import utilisation

    samples_per_sec = p.batch_size / (p.timing.median_ms / 1e3)
    tflops = flops * samples_per_sec / 1e12
    mfu, why = utilisation(phase, tflops, peak_tflops, device, trial.precision)
    return {
        f"{phase}_mfu_note": why,
        f"{phase}_samples_per_sec": samples_per_sec,
        f"{phase}_step_time": p.timing.median_ms,
        f"{phase}_step_time_iqr": p.timing.iqr_ms,
        f"{phase}_batch_size": p.batch_size,
        f"{phase}_img_size": trial.image_size,
        f"{phase}_gmacs": flops / 2 / 1e9,
        f"{phase}_gflops": flops / 1e9,
        f"{phase}_tflops": tflops,
        f"{phase}_mfu": mfu,
        f"{phase}_peak_mem_mib": p.memory.peak.peak_mib,
        f"{phase}_peak_reserved_mib": p.memory.peak.reserved_mib,
        f"{phase}_rss_growth_mib": p.memory.peak.rss_growth_mib,
        **capacity_fields(phase, p.memory),
        f"{phase}_noisy": p.timing.iqr_ms / p.timing.median_ms > trial.noise_threshold or not p.timing.steady,
        f"{phase}_warmup_steps": p.timing.warmup_steps,
        f"{phase}_warmup_steady": p.timing.warmup_steady,
        f"{phase}_timed_rounds": p.timing.rounds,
        f"{phase}_timed_steps": p.timing.steps,
        f"{phase}_timing_steady": p.timing.steady,
    }


def _checks(tower, trial, phases: dict) -> dict[str, Any]:
    """Whether the lock and the train state took effect (`suite.measurement.footprint`), and the capacity budget."""
    lock_ok, lock_why = lock_check(tower, trial)
    state_ok, state_why = state_check(phases["train"].memory.state if "train" in phases else None)
    budgets = [p.memory.budget_mib for p in phases.values()]
    return {"lock_ok": lock_ok, "train_state_ok": state_ok, "capacity_budget_mib": budgets[0] if budgets else None,
            "check_reason": "; ".join(w for ok, w in ((lock_ok, lock_why), (state_ok, state_why)) if ok is False)}


@contextmanager
def _state_kept(tower: torch.nn.Module, keep: bool) -> Iterator[None]:
    """Give a caller's tower back as it came: the train phase's steps change its weights, its norm
    statistics and its mode. Measured on test_resnet: inference after an earlier `measure` of the
    same tower ran ~4% slower than on the untouched tower, so without this a figure would depend on
    what was measured before it. The copy is kept in host memory, outside any memory pass."""
    if not keep:
        yield
        return
    saved = {k: v.detach().to("cpu", copy=True) for k, v in tower.state_dict().items()}
    was_training = tower.training
    try:
        yield
    finally:
        with torch.no_grad():
            tower.load_state_dict(saved)
        tower.train(was_training)


def _measure(trial, tower, device: str, dtype, cache_dir) -> MeasureResult:
    """`measure` after the argument checks: baseline, build, count, then the phases."""
    from suite.measurement.roofline import device_peak_tflops
    from suite.tower.model import build_tower

    _warm_process(device, dtype)
    built_here = tower is None
    if built_here:
        baseline = MemoryBaseline(device)  # before the weights exist
        tower = build_tower(trial)
    else:
        baseline = MemoryBaseline(device, weights_mib=_cuda_weights_mib(tower))
    fields = _describe(tower)
    place(tower, device, trial.channels_last)  # compiling happens per phase
    infer_flops, train_flops = trial_flops(tower, trial, device, dtype, cache=built_here)

    phases = {}
    with _state_kept(tower, keep=not built_here and trial.mode != "infer"):
        for phase in ("infer", "train"):
            if trial.mode in ("both", phase):
                phases[phase] = _run_phase_fitting(phase, tower, trial, device, baseline)
    # After the timed phases: measuring the peak (a first trial, an empty cache) runs large matmuls on
    # every core, and a process whose timing came right after them measured low (test_resnet, CPU).
    peak_tflops = device_peak_tflops(device, trial.precision, cache_dir=cache_dir)
    for phase, flops in (("infer", infer_flops), ("train", train_flops)):
        if phase in phases:
            fields.update(_phase_fields(phase, phases[phase], flops, peak_tflops, trial, device))
    notes = [fields.pop(f"{phase}_mfu_note", None) for phase in ("infer", "train")]
    fields["mfu_note"] = "; ".join(n for n in notes if n) or None
    if "train" in phases:
        fields["train_skipped_steps"] = phases["train"].skipped_steps
    fields.update(_checks(tower, trial, phases))
    if trial.compile:
        fields.update(compile_time_s=sum(p.compile_s for p in phases.values()),
                      compile_graphs=sum(p.graphs for p in phases.values()),
                      compile_graph_breaks=sum(p.graph_breaks for p in phases.values()))
    return MeasureResult(
        **fields,
        device_peak_tflops=peak_tflops,
        mem_method=baseline.method,
        measured_time_s=sum(p.wall_s for p in phases.values()),
    )
