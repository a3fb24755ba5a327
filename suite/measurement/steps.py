"""The two steps a trial times, exactly as `suite.measurement.engine` runs them and `suite.measurement.profile` traces them.

- inference: eval mode, `inference_mode`, autocast at the trial's precision;
- training: forward under autocast, CLIP's contrastive loss against fixed random "text"
  embeddings, backward, AdamW step over the trainable parameters only, `zero_grad`.

With `trial.compile`, the tower is compiled per trial from a clean slate: dynamo's caches are
reset first (in a reused worker every tower would otherwise share one cache, hit the recompile
limit after a few trials and silently run eager), shapes are static (`dynamic=False`), and hitting
the recompile limit is an error, never a quiet fallback to eager.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from suite.core.errors import UnsupportedConfig
from suite.machine.device import autocast, autocast_dtype, place

_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


def make_inputs(trial, device: str, batch_size: int) -> torch.Tensor:
    """A fresh random image batch (N(0,1), like normalized pixels; never zeros, which some kernels
    shortcut), float32 (autocast casts inside), in channels_last when the trial asks for it."""
    x = torch.randn(batch_size, 3, trial.image_size, trial.image_size, device=device)
    if trial.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --- compiling -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileStats:
    """What dynamo did for one trial: graphs compiled and graph breaks (since the last reset)."""

    graphs: int
    graph_breaks: int


def reset_compiler() -> None:
    """Forget every compiled graph and dynamo's counters: the next compile starts from scratch."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_stats() -> CompileStats:
    from torch._dynamo.utils import counters

    return CompileStats(int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values())))


def compile_tower(tower: torch.nn.Module, backend: str = "inductor") -> Callable:
    """`torch.compile(tower, dynamic=False)`, failing loudly (not running eager) at the recompile limit."""
    import torch._dynamo.config as config

    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(tower, dynamic=False, backend=backend)


def prepare_tower(tower: torch.nn.Module, trial, device: str, *, eager: bool = False) -> torch.nn.Module | Callable:
    """Place `tower` (device, memory format) and return what to call: the compiled tower if asked."""
    place(tower, device, trial.channels_last)
    return compile_tower(tower, trial.compile_backend) if trial.compile and not eager else tower


# --- the two steps ---------------------------------------------------------------------------

def infer_step_fn(tower: torch.nn.Module, trial, device: str, *, eager: bool = False) -> Callable[[torch.Tensor], Any]:
    """One inference step: eval mode, `inference_mode`, autocast at the trial's precision.

    `eager` builds the uncompiled step even for a compiled trial (the CPU memory pass).
    """
    module = prepare_tower(tower, trial, device, eager=eager)
    tower.eval()
    dtype = autocast_dtype(trial.precision, device)

    def step(x: torch.Tensor):
        with torch.inference_mode(), autocast(device, dtype):
            return module(x)

    return step


def contrastive_loss(emb: torch.Tensor, cache: dict) -> torch.Tensor:
    """CLIP's symmetric InfoNCE against fixed random unit "text" embeddings (one per image).

    The targets are seeded, so two towers with the same weights get the same loss (the
    checkpointing invariance test relies on it), and cached per shape: no allocation per step.
    """
    emb = emb.float().flatten(1)
    key = tuple(emb.shape)
    if key not in cache:
        g = torch.Generator().manual_seed(0)
        target = F.normalize(torch.randn(key, generator=g), dim=-1).to(emb.device)
        cache[key] = (target, torch.arange(key[0], device=emb.device))
    target, labels = cache[key]
    logits = _LOGIT_SCALE * F.normalize(emb, dim=-1) @ target.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class TrainStep:
    """One training step (callable): forward under autocast, contrastive loss, backward, AdamW, zero_grad.

    Only trainable parameters (after the tower's lock) go to the optimizer, so a locked trunk
    costs neither gradients nor optimizer state. fp16 uses a gradient scaler, as real training
    must; `optimizer_steps()` counts the steps the optimizer really took, so steps the scaler
    skipped (inf/NaN gradients) can be detected without a host sync inside the loop.
    """

    def __init__(self, tower: torch.nn.Module, trial, device: str, *, eager: bool = False):
        self.module = prepare_tower(tower, trial, device, eager=eager)
        tower.train()
        self.device = device
        self.dtype = autocast_dtype(trial.precision, device)
        self.params = [p for p in tower.parameters() if p.requires_grad]
        if not self.params:
            raise UnsupportedConfig(
                f"mode={trial.mode!r} trains nothing: the tower has no trainable parameters "
                f"(unlocked_groups={trial.unlocked_groups}, proj={trial.proj!r}); use mode='infer' or unlock groups"
            )
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.scaler = _grad_scaler(device) if trial.precision == "fp16" else None
        self._cache: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            emb = self.module(x)
        loss = contrastive_loss(emb, self._cache)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def optimizer_steps(self) -> int:
        """Steps the optimizer took so far (AdamW's per-parameter `step` of the first parameter)."""
        state = self.optimizer.state.get(self.params[0], {})
        step = state.get("step", 0)
        return int(step.item() if isinstance(step, torch.Tensor) else step)


def _grad_scaler(device: str):
    """fp16's gradient scaler (`torch.amp.GradScaler` from torch 2.3; the CUDA one before)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device)
    return torch.cuda.amp.GradScaler()


def train_step_fn(tower: torch.nn.Module, trial, device: str, *, eager: bool = False) -> TrainStep:
    """The training step of `trial` (see `TrainStep`)."""
    return TrainStep(tower, trial, device, eager=eager)


def step_fn(phase: str, tower: torch.nn.Module, trial, device: str, *, eager: bool = False):
    """The step of `phase` ('infer' or 'train'): `infer_step_fn` or `train_step_fn`."""
    return (infer_step_fn if phase == "infer" else train_step_fn)(tower, trial, device, eager=eager)
