"""The timm vision tower: open_clip's `TimmModel`, compatible and fixed.

`TimmTower` takes open_clip's constructor and keeps its module names (`trunk.*`, `head.pool|drop|
proj|mlp.*`), so state dicts move between the two with `strict=True`, and for every configuration
open_clip builds and runs, both give the same outputs. Where open_clip is wrong or fragile this
module differs on purpose, and says so with a clear error instead of an assertion or a warning:

1. `abs_attn`/`rot_attn` pooling sizes itself from the trunk's real output at `image_size` and
   picks a head count that divides the channels; token (ViT-like) trunks get a clear error.
2. `image_size` reaches timm for models that take `img_size`.
3. Every pool timm supports for the trunk works (ViT `map` included, built at creation, and
   `catavgmax`, whose doubled width sizes the projection); others list the valid values.
4. Gradient checkpointing that cannot take effect raises, and can be read back.
5. `lock()` uses timm's `group_parameters`/`group_modules`, checks the range, and freezes fused
   norm+act layers (`BatchNormAct2d`) without dropping their activation.
6. `drop_path`/`patch_drop` go only to models that take them.
7. Weights from timm's hub, a local trunk checkpoint, or an open_clip checkpoint's `visual.` tower.

Two deliberate differences from open_clip's outputs (the configurations are degenerate there):
`pool=''` always means "the trunk's default pooling" (open_clip returns an unpooled feature map
when there is no extra projection), and `drop`/`proj_bias` with no projection layer raise
instead of being ignored.

The tower inspects its real trunk once (one zero image through `forward_features`) for the
feature shape, pooled width, layer groups and checkpointing support. How a trunk is built and
inspected, and the static checks (`static_problems`, the same inspection on the meta device) live
in `suite.tower.plan`; where weights come from and how a checkpoint is fitted, in `suite.tower.weights`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d, freeze_batch_norm_2d, to_2tuple
from timm.models import group_modules, group_parameters
from torch import nn

from suite.core.errors import UnsupportedConfig, WeightsError, one_line
from suite.core.options import Trial
from suite.tower.plan import (
    ATTN_POOLS,
    BUILD_ERRORS,
    CHECKPOINTING_NOT_SET,
    TrunkInfo,
    checkpointing_message,
    create_kwargs,
    create_trunk,
    grad_checkpointing_active,
    head_branch,
    head_problems,
    inspect_trunk,
    lock_problem,
    lock_without_groups,
    model_class,
    probe,
    static_problems,
    trunk_classifier_projects,
    trunk_problem,
)
from suite.tower.weights import load_checkpoint, timm_weight_kwargs, weights_problem, weights_source

# Re-exported: callers import the tower's errors and static checks from here.
__all__ = ["TimmTower", "TowerInfo", "UnsupportedConfig", "WeightsError", "build_tower", "static_problems"]


@dataclass(frozen=True)
class TowerInfo:
    """What `TimmTower.describe()` reports.

    `param_count` counts parameters plus the affine buffers of frozen norms, so it does not change
    when `freeze_bn_stats` turns BatchNorm parameters into buffers.
    """

    param_count: int
    trainable_param_count: int
    layer_groups: int | None
    feature_shape: tuple[int, ...]  # trunk features before any pooling, for one image
    output_dim: int
    supports_grad_checkpointing: bool
    grad_checkpointing: bool
    locked_groups: int | None = None  # None when lock() was not called
    unlocked_groups: int | None = None
    weights_notes: tuple[str, ...] = ()  # what loading the weights changed (e.g. a resampled pos_embed)


# --- the tower -----------------------------------------------------------------------------------

class TimmTower(nn.Module):
    """A timm trunk plus open_clip's pooling/projection head.

    Args:
        model_name: timm model name (a `name.tag` form is accepted by timm).
        embed_dim: output width of the projection (and of attention pooling).
        image_size: input resolution, int or (h, w); passed to timm models that take `img_size`.
        pool: a timm pool (`avg`, `max`, `avgmax`, `catavgmax`, `token`, `map`, `''` = trunk default)
            or an attention pool on CNN feature maps (`abs_attn`, `rot_attn`).
        proj: `linear`, `mlp`, `none` (trunk width out), or `''`/None (the trunk's classifier projects).
        proj_bias: bias in the projection.
        drop: dropout before the projection.
        drop_path: stochastic depth rate (models that accept it).
        patch_drop: patch dropout rate (ViT-like models).
        pretrained: False, True (timm hub), a timm tag, a hub id (`timm/...`), or a local checkpoint
            path: a timm trunk state dict, or an open_clip (`visual.`) / tower (`trunk.`) checkpoint,
            which also loads the head.

    Raises:
        UnsupportedConfig: the combination cannot run as configured.
        WeightsError: the checkpoint file is unreadable or does not match.
    """

    def __init__(
        self,
        model_name: str,
        embed_dim: int,
        image_size: int | tuple[int, int] = 224,
        pool: str = "avg",
        proj: str | None = "linear",
        proj_bias: bool = False,
        drop: float = 0.0,
        drop_path: float | None = None,
        patch_drop: float | None = None,
        pretrained: bool | str = False,
    ):
        super().__init__()
        if not isinstance(model_name, str) or not model_name:
            raise UnsupportedConfig(f"model={model_name!r}: name a timm model, e.g. 'vit_base_patch16_224'")
        self.model_name = model_name
        self.image_size = to_2tuple(image_size)
        self.embed_dim = embed_dim
        problems = head_problems(model_name, pool, proj, drop, proj_bias)
        if problems:
            raise UnsupportedConfig(problems[0])
        source = weights_source(pretrained)
        problem = weights_problem(model_name, pretrained)
        if problem:  # a missing file is a weights error; an impossible timm request is a config one
            raise (WeightsError if source[0] == "file" else UnsupportedConfig)(problem)

        num_classes = embed_dim if trunk_classifier_projects(proj) else 0
        self.trunk, info = _build_trunk(
            model_name, self.image_size, pool, head_branch(pool, proj), num_classes, drop_path, patch_drop, pretrained,
        )
        self.head, self._output_dim = _build_head(info, pool, proj, embed_dim, drop, proj_bias)
        self._feature_shape = info.feature_shape
        self._checkpointing_problem = info.checkpointing_problem
        self._lock_state: tuple[int | None, int] | None = None
        self._groups = info.layer_groups
        if source[0] == "file":
            load_checkpoint(self, source[1])

    # --- lock ---
    @property
    def layer_groups(self) -> int | None:
        """Number of timm layer groups of the trunk (None if the model defines no group matcher)."""
        return self._groups

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk but its last `unlocked_groups` layer groups; the head stays trainable.

        Calling it again sets the lock anew (parameters of now-unlocked groups train again);
        frozen BatchNorm layers stay frozen.

        Args:
            unlocked_groups: 0..layer_groups; 0 freezes the whole trunk.
            freeze_bn_stats: also freeze the BatchNorm statistics of the locked groups, keeping
                fused activations (timm `BatchNormAct2d` -> `FrozenBatchNormAct2d`).
        """
        groups = self._groups
        problem = lock_problem(self.model_name, unlocked_groups, groups)
        if problem:
            raise UnsupportedConfig(problem)
        if groups is None:  # only a full lock is possible
            locked, param_group, module_group = 0, {}, {}
        else:
            locked = groups - unlocked_groups
            matcher = self.trunk.group_matcher()
            param_group = group_parameters(self.trunk, matcher, reverse=True)
            module_group = group_modules(self.trunk, matcher, reverse=True)
        lock_all = unlocked_groups == 0
        for name, param in self.trunk.named_parameters():
            param.requires_grad = not lock_all and param_group[name] >= locked
        if freeze_bn_stats:
            self._freeze_norms(None if lock_all else {n for n, g in module_group.items() if g < locked})
        self._lock_state = (groups - unlocked_groups if groups is not None else None, unlocked_groups)

    def _freeze_norms(self, names: set[str] | None) -> None:
        """Swap BatchNorm layers (all, or those named) for timm's frozen versions, in place."""
        norm_types = (nn.BatchNorm2d, nn.SyncBatchNorm)  # BatchNormAct2d/SyncBatchNormAct subclass these
        for name, module in list(self.trunk.named_modules()):
            if not isinstance(module, norm_types) or (names is not None and name not in names):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = self.trunk.get_submodule(parent_name) if parent_name else self.trunk
            frozen = freeze_batch_norm_2d(module)  # keeps .act/.drop of BatchNormAct2d
            setattr(parent, attr, frozen)

    # --- gradient checkpointing ---
    @property
    def supports_grad_checkpointing(self) -> bool:
        """Whether `set_grad_checkpointing(True)` can take effect on this trunk."""
        return self._checkpointing_problem is None

    @property
    def grad_checkpointing(self) -> bool:
        """Whether checkpointing is active in the trunk (read from the trunk, not remembered)."""
        return grad_checkpointing_active(self.trunk)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn trunk checkpointing on or off; raises instead of silently staying off (fix 4)."""
        setter = getattr(self.trunk, "set_grad_checkpointing", None)
        if not enable:
            if setter is not None and self.grad_checkpointing:
                setter(False)
            return
        problem = self._checkpointing_problem
        if problem is None:
            try:
                setter(True)
            except Exception as exc:  # noqa: BLE001
                problem = one_line(exc)
        if problem is None and not self.grad_checkpointing:
            problem = CHECKPOINTING_NOT_SET
        if problem is not None:
            raise UnsupportedConfig(checkpointing_message(self.model_name, problem))

    # --- reporting and forward ---
    def describe(self) -> TowerInfo:
        """Sizes, shapes, lock and checkpointing state, as measured results record them."""
        frozen_affine = sum(
            m.weight.numel() + m.bias.numel()
            for m in self.modules()
            if type(m).__name__.startswith("FrozenBatchNorm")  # timm's and torchvision's: affine as buffers
            and isinstance(getattr(m, "weight", None), torch.Tensor)
        )
        params = list(self.parameters())
        locked, unlocked = self._lock_state or (None, None)
        return TowerInfo(
            param_count=sum(p.numel() for p in params) + frozen_affine,
            trainable_param_count=sum(p.numel() for p in params if p.requires_grad),
            layer_groups=self._groups,
            feature_shape=tuple(self._feature_shape),
            output_dim=self._output_dim,
            supports_grad_checkpointing=self.supports_grad_checkpointing,
            grad_checkpointing=self.grad_checkpointing,
            locked_groups=locked,
            unlocked_groups=unlocked,
            weights_notes=tuple(getattr(self, "weights_notes", ()) or ()),
        )

    @property
    def output_dim(self) -> int:
        """Width of the tower's output: embed_dim, or the pooled trunk width with proj='none'."""
        return self._output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


# --- building the trunk and the head ---------------------------------------------------------------

def _build_trunk(
    model_name: str, image_size: tuple[int, int], pool: str, branch: str, num_classes: int,
    drop_path: float | None, patch_drop: float | None, pretrained: bool | str,
) -> tuple[nn.Module, TrunkInfo]:
    """The real trunk (with timm's weights when asked) and its description; UnsupportedConfig when
    the options cannot build, with the same message `static_problems` gives."""
    cls = model_class(model_name)
    if isinstance(cls, str):
        raise UnsupportedConfig(cls)
    kw, problems = create_kwargs(model_name, cls, image_size, drop_path, patch_drop)
    if problems:
        raise UnsupportedConfig(problems[0])
    name, weight_kwargs = timm_weight_kwargs(model_name, pretrained)
    try:
        trunk = create_trunk(name, branch, pool, dict(kw), num_classes, **weight_kwargs)
        info = inspect_trunk(trunk, image_size, pool, branch)
    except BUILD_ERRORS as exc:
        if isinstance(probe(model_name, image_size, pool, branch, kw), TrunkInfo):
            raise  # the configuration builds on meta: this failure is not about the options (weights, memory)
        raise UnsupportedConfig(
            trunk_problem(model_name, cls, image_size, pool, branch, kw, one_line(exc), meta=False)
        ) from exc
    problem = trunk_problem(model_name, cls, image_size, pool, branch, kw, info, meta=False)
    if problem:
        raise UnsupportedConfig(problem)
    return trunk, info


def _build_head(
    info: TrunkInfo, pool: str, proj: str | None, embed_dim: int, drop: float, proj_bias: bool,
) -> tuple[nn.Sequential, int]:
    """open_clip's head (same module names and layer arguments, so state dicts line up), and its output width."""
    head: OrderedDict[str, nn.Module] = OrderedDict()
    width = info.feature_shape[0] if pool in ATTN_POOLS else info.pooled_width
    if pool in ATTN_POOLS:
        heads = _attn_heads(width)
        heads_kw = {} if heads is None else {"num_heads": heads}
        if pool == "abs_attn":  # fix 1: the real feature size at image_size, not default_cfg['pool_size']
            head["pool"] = AttentionPool2d(width, feat_size=info.feature_shape[1:], out_features=embed_dim, **heads_kw)
        else:
            head["pool"] = RotAttentionPool2d(width, out_features=embed_dim, **heads_kw)
        width = embed_dim
    if proj == "linear":
        head["drop"] = nn.Dropout(drop)
        head["proj"] = nn.Linear(width, embed_dim, bias=proj_bias)
    elif proj == "mlp":
        head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(drop, 0), bias=(True, proj_bias))
    output_dim = embed_dim if (proj != "none" or pool in ATTN_POOLS) else width
    return nn.Sequential(head), output_dim


def _attn_heads(channels: int) -> int | None:
    """Head count for attention pooling: timm's default 64-wide heads when they divide the channels
    (open_clip parity), else the divisor of `channels` closest to channels/64 (open_clip fails here)."""
    if channels % 64 == 0:
        return None
    target = max(1, round(channels / 64))
    return min((d for d in range(1, channels + 1) if channels % d == 0), key=lambda d: (abs(d - target), d))


# --- from trials -------------------------------------------------------------------------------

def _tower_args(trial: Trial) -> dict[str, Any]:
    return dict(
        model_name=trial.model, embed_dim=trial.embed_dim, image_size=trial.image_size, pool=trial.pool,
        proj=trial.proj, proj_bias=trial.proj_bias, drop=trial.drop, drop_path=trial.drop_path,
        patch_drop=trial.patch_drop, pretrained=trial.pretrained,
    )


def build_tower(trial: Trial) -> TimmTower:
    """Build, lock and set checkpointing for a `suite.core.options.Trial` (no device placement)."""
    problem = lock_without_groups(trial)
    if problem:
        raise UnsupportedConfig(problem)
    tower = TimmTower(**_tower_args(trial))
    if trial.unlocked_groups is not None:
        tower.lock(trial.unlocked_groups, trial.freeze_bn_stats)
    if trial.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    return tower

