"""A phase's memory footprint: the peak and its breakdown, the capacity line, and settings checks.

Everything here runs untimed, before a phase's timed loop (see `suite.measurement.engine`):

1. the memory pass: `_MEMORY_STEPS` steps of a fresh step (fresh optimizer) under
   `MemoryBaseline.track`, with gradients tagged as they are accumulated (a post-accumulate-grad
   hook) and optimizer state tagged after each step, so the peak splits into weights, gradients,
   optimizer state and activations (`suite.measurement.capacity.PARTS`);
2. a second, smaller pass at another batch size (half the batch; 2 for a batch of one): two
   points of the line `peak = fixed + per_sample * batch`, and the largest batch under the
   budget (`suite.measurement.capacity`);
3. with `max_batch: true`, a search for the largest batch that really fits (GPU: real
   out-of-memory errors under a memory fraction equal to the budget, then `iters` steps at the
   batch found to confirm it; CPU: the live-tensor peak against the budget, no real OOM).

And the checks that the tower's settings took effect, as record fields: the trainable parameter
count matches the lock depth (`lock_ok`), and the gradients and optimizer state the train pass
held are exactly those of the trainable parameters (`train_state_ok`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from suite.measurement.capacity import PARTS, affine_fit, predict_max_batch, search_max_batch
from suite.measurement.memory import MIB, MemoryBaseline, PassMemory, is_oom, recover, settle, tensor_mib
from suite.measurement.steps import make_inputs, reset_compiler, step_fn

_MEMORY_STEPS = 2  # steps of the memory pass: the second runs with the optimizer state in place
_ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, each the size of its parameter


@dataclass(frozen=True)
class StateSeen:
    """Bytes of gradients and optimizer state a train pass held (whatever the moment)."""

    grads: int  # one gradient per parameter that got one
    optimizer: int  # AdamW moments (the per-parameter `step` counters left out)
    trainable: int  # bytes of the parameters that require grad
    stepped: bool = True  # False: the fp16 scaler skipped every optimizer step (no state to check)


@dataclass(frozen=True)
class PhaseMemory:
    """What the untimed memory work of one phase found."""

    peak: PassMemory
    state: StateSeen | None = None
    fixed_mib: float | None = None
    per_sample_mib: float | None = None
    budget_mib: float | None = None
    max_batch: int | None = None  # predicted from the line
    max_batch_measured: int | None = None  # max_batch: true


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _mib(t: torch.Tensor) -> float:
    return _nbytes(t) / MIB


def memory_pass(phase: str, tower, trial, device: str, inputs: torch.Tensor, baseline: MemoryBaseline,
                *, held_mib: float = 0.0) -> tuple[PassMemory, StateSeen | None]:
    """Peak memory of `_MEMORY_STEPS` steps of a fresh step, untimed, broken down by `PARTS`.

    On CPU the pass runs eagerly: compiled code allocates outside the dispatcher, where the
    live-tensor count cannot see it. On CUDA the allocator counts compiled code too, but the
    breakdown then cannot be watched (`parts` is None).
    """
    eager = device != "cuda"
    watch = eager or not trial.compile
    grads: dict[int, int] = {}
    hooks = []
    with baseline.track(tensor_mib(tower), _mib(inputs), held_mib=held_mib, watch=watch) as tracking:
        step = step_fn(phase, tower, trial, device, eager=eager)
        optimizer = getattr(step, "optimizer", None)

        def on_grad(p: torch.Tensor) -> None:
            grads[id(p)] = max(grads.get(id(p), 0), _nbytes(p.grad))
            if tracking.live is not None:
                tracking.live.tag(p.grad, "grads")

        if optimizer is not None:
            hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in step.params]
        for _ in range(_MEMORY_STEPS):
            step(inputs)
            for state in (optimizer.state.values() if optimizer is not None else ()):
                for v in state.values():
                    if isinstance(v, torch.Tensor) and tracking.live is not None:
                        tracking.live.tag(v, "optimizer")
        seen = None
        if optimizer is not None:
            moments = sum(_nbytes(v) for s in optimizer.state.values() for k, v in s.items()
                          if k != "step" and isinstance(v, torch.Tensor))
            trainable = sum(_nbytes(p) for p in tower.parameters() if p.requires_grad)
            seen = StateSeen(sum(grads.values()), moments, trainable, step.optimizer_steps() > 0)
        for h in hooks:
            h.remove()
        del step, optimizer
    tower.zero_grad(set_to_none=True)
    return tracking.result, seen


def budget_mib(trial, device: str) -> float | None:
    """The memory budget of capacity figures: `mem_budget_mib`, else the device's memory
    (the GPU's total memory; on CPU the machine's RAM, MemTotal)."""
    if trial.mem_budget_mib is not None:
        return float(trial.mem_budget_mib)
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / MIB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def phase_memory(phase: str, tower, trial, device: str, inputs: torch.Tensor,
                 baseline: MemoryBaseline) -> PhaseMemory:
    """The memory pass at the phase's batch, then a second point of the capacity line.

    The second pass is left out (capacity fields None) for compiled CUDA trials, where a new
    batch size would mean another compile; and when it runs out of memory (batch 1 -> 2).
    """
    batch = inputs.shape[0]
    peak, seen = memory_pass(phase, tower, trial, device, inputs, baseline)
    budget = budget_mib(trial, device)
    if device == "cuda" and trial.compile:
        return PhaseMemory(peak, seen, budget_mib=budget)
    other = batch // 2 if batch >= 2 else 2
    try:
        x = make_inputs(trial, device, other)
        second, _ = memory_pass(phase, tower, trial, device, x, baseline, held_mib=_mib(inputs))
    except Exception as exc:  # noqa: BLE001 - the CPU allocator's OOM is a plain RuntimeError
        if not is_oom(exc):
            raise
        second = None
    recover(tower, device)
    fit = affine_fit([(batch, peak.peak_mib), (other, second.peak_mib)]) if second else None
    fixed, per_sample = fit if fit else (None, None)
    return PhaseMemory(peak, seen, fixed, per_sample, budget, predict_max_batch(fixed, per_sample, budget))


def search_batch(phase: str, tower, trial, device: str, baseline: MemoryBaseline, budget: float,
                 start: int) -> int:
    """The largest batch that fits `budget` MiB, found by search (`max_batch: true`).

    CUDA: real out-of-memory errors, with the caching allocator capped at the budget
    (`set_per_process_memory_fraction`), each try `_MEMORY_STEPS` steps as the trial runs them;
    the batch found must then run `trial.iters` steps, else the search steps down. UNTESTED on a
    GPU in this repository's CI (no GPU there). CPU: the measured live-tensor peak of a memory
    pass against the budget; nothing is allowed to really run out of memory.
    """
    if device != "cuda":
        def fits_cpu(b: int) -> bool:
            peak, _ = memory_pass(phase, tower, trial, device, make_inputs(trial, device, b), baseline)
            return peak.peak_mib <= budget
        return search_max_batch(fits_cpu, start)

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / MIB
    before = _memory_fraction()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    try:
        def runs(b: int, steps: int = _MEMORY_STEPS) -> bool:
            ok = _try_steps(phase, tower, trial, device, b, steps)
            recover(tower, device)
            return ok
        found = search_max_batch(runs, start)
        while found > 0 and not runs(found, trial.iters):  # confirm: the found batch must run iters steps
            found -= max(1, found // 20)
        return found
    finally:
        torch.cuda.set_per_process_memory_fraction(before)  # the caller's cap, not 1.0


def _memory_fraction() -> float:
    """The CUDA caching allocator's current cap (1.0 on torch versions that cannot say)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get()) if get is not None else 1.0


def _try_steps(phase: str, tower, trial, device: str, batch: int, steps: int) -> bool:
    """Whether `steps` steps at `batch` run without running out of memory (compiled trials recompile)."""
    if trial.compile:
        reset_compiler()  # every batch size is a new graph: never hit the recompile limit
    try:
        step = step_fn(phase, tower, trial, device)
        x = make_inputs(trial, device, batch)
        for _ in range(steps):
            step(x)
        settle(device)
        return True
    except Exception as exc:  # noqa: BLE001 - OOM shows up as several exception types
        if not is_oom(exc):
            raise
    return False


def capacity_fields(phase: str, mem: PhaseMemory) -> dict[str, Any]:
    """The record fields of a phase's breakdown and capacity (None where not measured)."""
    parts = mem.peak.parts or {}
    fields = {f"{phase}_{name}_mib": parts.get(name) for name in
              (PARTS if phase == "train" else ("weights", "activations"))}
    fields.update({
        f"{phase}_fixed_mem_mib": mem.fixed_mib,
        f"{phase}_mem_per_sample_mib": mem.per_sample_mib,
        f"{phase}_max_batch": mem.max_batch,
        f"{phase}_max_batch_measured": mem.max_batch_measured,
        f"{phase}_max_batch_error": (mem.max_batch / mem.max_batch_measured - 1
                                     if mem.max_batch is not None and mem.max_batch_measured else None),
    })
    return fields


def lock_check(tower, trial) -> tuple[bool | None, str]:
    """Whether the trainable parameters are exactly the head plus the last `unlocked_groups` groups.

    Recomputed from timm's own grouping of the trunk (`group_parameters`), not from the lock's
    bookkeeping. (None, why) for a module that is not a `TimmTower`.
    """
    trunk, head = getattr(tower, "trunk", None), getattr(tower, "head", None)
    if trunk is None or head is None:
        return None, "not a TimmTower: lock not checked"
    from timm.models import group_parameters

    unlocked = trial.unlocked_groups  # what the trial asked for; else a lock the caller set on its tower
    if unlocked is None and hasattr(tower, "describe"):
        unlocked = tower.describe().unlocked_groups
    params = dict(trunk.named_parameters())
    if unlocked is None:
        expected = set(params)
    elif unlocked == 0 or not hasattr(trunk, "group_matcher"):
        expected = set()
    else:
        groups = group_parameters(trunk, trunk.group_matcher())
        keep = sorted(groups)[len(groups) - unlocked:]
        expected = {n for g in keep for n in groups[g]} & set(params)
    actual = {n for n, p in params.items() if p.requires_grad}
    head_frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    if actual == expected and not head_frozen:
        return True, ""
    count = lambda names: sum(params[n].numel() for n in names)  # noqa: E731
    return False, (f"lock: {count(actual) / 1e6:.3f}M trunk parameters trainable, "
                   f"{count(expected) / 1e6:.3f}M expected for unlocked_groups={unlocked}"
                   + (f"; {len(head_frozen)} head parameters frozen" if head_frozen else ""))


def state_check(seen: StateSeen | None) -> tuple[bool | None, str]:
    """Whether the train pass held gradients and AdamW moments for the trainable parameters only:
    gradients = their size, moments = twice it. None without a train phase."""
    if seen is None:
        return None, ""
    moments = _ADAM_MOMENTS * seen.trainable if seen.stepped else 0
    if seen.grads == seen.trainable and seen.optimizer == moments:
        return True, ""
    return False, (f"train state: gradients {seen.grads / MIB:.2f} MiB and optimizer moments "
                   f"{seen.optimizer / MIB:.2f} MiB, for {seen.trainable / MIB:.2f} MiB of trainable parameters "
                   f"(expected equal and {_ADAM_MOMENTS}x): some trainable parameters got no gradient, "
                   "or frozen ones did")
