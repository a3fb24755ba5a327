"""Planning a tower: how open_clip builds a trunk, what a built trunk looks like, and static checks.

`TimmTower` builds its trunk with `create_trunk` and describes it with `inspect_trunk` (one zero
image through `forward_features`: feature shape, pooled width, layer groups, checkpointing
support). `static_problems` runs the same inspection on a trunk built on the meta device (cached,
no weights allocated, nothing downloaded), so a sweep can vet a large grid of big models before
running any; the meta device is also where the valid alternatives for an error message are found.

The messages here are the ones `TimmTower`/`build_tower` raise as `UnsupportedConfig`, so a trial
vetted statically and one that fails at build time read the same.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import to_2tuple
from timm.models import group_parameters
from torch import nn

from suite.core.errors import close_matches, one_line
from suite.core.options import PROJS, Trial
from suite.tower.weights import weights_problem

# Pools timm implements inside the trunk; `''` means "the trunk's default pooling" here.
TIMM_POOLS = ("avg", "max", "avgmax", "catavgmax", "token", "map", "")
# Pools the tower adds as `head.pool` on a CNN feature map (open_clip's names).
ATTN_POOLS = ("abs_attn", "rot_attn")
# Projections built as head layers; the others ('none', and ''/None: the trunk's classifier) add none.
PROJ_LAYERS = ("linear", "mlp")

# Why checkpointing is off although timm's setter returned without complaint.
CHECKPOINTING_NOT_SET = "set_grad_checkpointing(True) left no grad_checkpointing flag set"

# Exceptions timm raises for a configuration it cannot build (it mostly uses `assert`).
BUILD_ERRORS = (AssertionError, ValueError, TypeError, KeyError, RuntimeError, NotImplementedError, IndexError)


def _quote(values) -> str:
    return ", ".join(repr(v) for v in values)


def known_proj(proj) -> bool:
    """Whether `proj` names a projection: `options.PROJS`, or None (the Python API's spelling of '')."""
    return proj is None or proj in PROJS


def trunk_classifier_projects(proj) -> bool:
    """`''`/None: the trunk's own classifier, resized to embed_dim, is the projection (open_clip `timm_proj: null`)."""
    return proj in ("", None)


# --- building a trunk the way open_clip does -------------------------------------------------

def head_branch(pool: str, proj: str | None) -> str:
    """Which of open_clip's construction paths applies (module names and math depend on it).

    `attn`: trunk with no pool or classifier, attention pool in the head. `reset`: trunk built with
    its defaults, then `reset_classifier(0, global_pool=pool)`, projection in the head. `create`:
    trunk built with `num_classes`/`global_pool` (e.g. ViT `avg` then uses `fc_norm`, not `norm`).
    """
    if pool in ATTN_POOLS:
        return "attn"
    return "reset" if proj in PROJ_LAYERS else "create"


def create_trunk(
    model_name: str, branch: str, pool: str, kwargs: dict, num_classes: int = 0, **weights: Any,
) -> nn.Module:
    """`timm.create_model` as open_clip's `branch` does it, with `kwargs` and weight arguments."""
    if branch == "create":
        pool_kw = {"global_pool": pool} if pool else {}  # '' keeps the trunk's default pooling
        return timm.create_model(model_name, num_classes=num_classes, **pool_kw, **kwargs, **weights)
    trunk = timm.create_model(model_name, **kwargs, **weights)
    if branch == "attn":
        trunk.reset_classifier(0, global_pool="")
    elif not pool:
        trunk.reset_classifier(0)
    else:
        try:
            trunk.reset_classifier(0, global_pool=pool)
        except BUILD_ERRORS:
            # Some pools can only be set at creation (timm ViT 'map' adds a module); open_clip
            # asserts here. The pool asked for is still the pool we build.
            trunk = timm.create_model(model_name, num_classes=0, global_pool=pool, **kwargs, **weights)
    return trunk


def _accepted_kwargs(cls: type) -> set[str]:
    """Constructor argument names of a timm model class, following `**kwargs` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break  # keyword arguments stop here
    return names


def create_kwargs(
    model_name: str, cls: type, image_size: tuple[int, int], drop_path: float | None, patch_drop: float | None,
) -> tuple[tuple, list[str]]:
    """Extra `timm.create_model` arguments (sorted items), and the options this model cannot take."""
    accepted = _accepted_kwargs(cls)
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    if "img_size" in accepted:  # fix 2: open_clip never passes the size, so a ViT ran at its default
        kwargs["img_size"] = image_size if image_size[0] != image_size[1] else image_size[0]
    rates = (("drop_path", drop_path, "drop_path_rate"), ("patch_drop", patch_drop, "patch_drop_rate"))
    for option, value, arg in rates:
        if value is None:
            continue
        if arg in accepted:
            kwargs[arg] = value
        elif value:  # a rate of 0 is the same as none: nothing to pass
            problems.append(
                f"{model_name}: {option}={value} is not accepted by this timm model ({cls.__name__} has no "
                f"{arg} argument); set {option} to null"
            )
    return tuple(sorted(kwargs.items())), problems


# --- inspecting a built trunk ---------------------------------------------------------------------

@dataclass(frozen=True)
class TrunkInfo:
    """What a built trunk looks like for one (pool, branch)."""

    cls_name: str
    feature_shape: tuple[int, ...]  # forward_features of one image, without batch dim
    token_features: bool  # (N, C) tokens rather than a (C, H, W) map
    channels_last: bool  # (H, W, C) map (e.g. Swin)
    pooled_width: int | None  # width after the trunk's own pool (None for the attn branch)
    layer_groups: int | None
    checkpointing_problem: str | None


def _effective_pool(trunk: nn.Module) -> str | None:
    """The pool type a timm trunk ended up with, when it exposes it (None when it does not)."""
    for owner in (trunk, getattr(trunk, "head", None)):
        gp = getattr(owner, "global_pool", None)
        if isinstance(gp, str):
            return gp
        if isinstance(getattr(gp, "pool_type", None), str):
            return gp.pool_type
    return None


def grad_checkpointing_active(trunk: nn.Module) -> bool:
    """Whether checkpointing is on: timm keeps the switch in `grad_checkpointing` attributes (model or stages)."""
    return any(getattr(m, "grad_checkpointing", False) is True for m in trunk.modules())


def _checkpointing_problem(trunk: nn.Module) -> str | None:
    """Why `set_grad_checkpointing(True)` cannot take effect on `trunk`, or None when it can."""
    setter = getattr(trunk, "set_grad_checkpointing", None)
    if setter is None:
        return "the model has no set_grad_checkpointing"
    try:
        setter(True)
    except Exception as exc:  # noqa: BLE001 - timm uses `assert not enable` for unsupported models
        return one_line(exc)
    active = grad_checkpointing_active(trunk)
    try:
        setter(False)
    except Exception:  # noqa: BLE001 - restoring the default is best effort on a probe copy
        pass
    return None if active else CHECKPOINTING_NOT_SET


def _group_count(trunk: nn.Module) -> int | None:
    try:
        return len(group_parameters(trunk, trunk.group_matcher()))
    except Exception:  # noqa: BLE001 - models without a group matcher
        return None


def inspect_trunk(trunk: nn.Module, image_size: tuple[int, int], pool: str, branch: str) -> TrunkInfo:
    """Describe a built trunk; ValueError when its pooling is not what was asked for."""
    pool_kind = _effective_pool(trunk)
    if pool and branch != "attn" and pool_kind is not None and pool_kind != pool:
        raise ValueError(f"the trunk kept pool {pool_kind!r}")  # a model that quietly ignored the pool
    param = next(iter(trunk.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            feats = trunk.forward_features(torch.zeros(1, 3, *image_size, device=device))
            pooled = None if branch == "attn" else trunk.forward_head(feats)
    finally:
        trunk.train(was_training)
    if isinstance(feats, (tuple, list)):
        feats = feats[0]
    channels_last = feats.ndim == 4 and getattr(trunk, "output_fmt", "NCHW") != "NCHW"
    if pooled is not None and pooled.ndim != 2:
        raise ValueError(f"the trunk output stays unpooled with shape {tuple(pooled.shape[1:])}")
    return TrunkInfo(
        cls_name=type(trunk).__name__,
        feature_shape=tuple(feats.shape[1:]),
        token_features=feats.ndim == 3,
        channels_last=channels_last,
        pooled_width=None if pooled is None else int(pooled.shape[-1]),
        layer_groups=_group_count(trunk),
        checkpointing_problem=_checkpointing_problem(trunk),
    )


# --- the meta-device plan, used for checks and error messages ------------------------------------

@functools.lru_cache(maxsize=1024)
def probe(model_name: str, image_size: tuple[int, int], pool: str, branch: str, kwargs: tuple) -> TrunkInfo | str:
    """Build the trunk on the meta device and inspect it; a `TrunkInfo`, or the one-line reason it fails."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a probe must not move the caller's RNG
        try:
            return inspect_trunk(create_trunk(model_name, branch, pool, dict(kwargs)), image_size, pool, branch)
        except BUILD_ERRORS as exc:
            return one_line(exc)


def _valid_pools(model_name: str, image_size, branch: str, kwargs: tuple) -> list[str]:
    valid = [p for p in TIMM_POOLS if isinstance(probe(model_name, image_size, p, branch, kwargs), TrunkInfo)]
    spatial = probe(model_name, image_size, "abs_attn", "attn", kwargs)
    if isinstance(spatial, TrunkInfo) and not (spatial.token_features or spatial.channels_last):
        valid += list(ATTN_POOLS)
    return valid


@functools.lru_cache(maxsize=256)
def model_class(model_name: str) -> type | str:
    """The timm class behind a model name (built once on the meta device), or why there is none."""
    if not timm.is_model(model_name.split(".", 1)[0]):
        close = close_matches(model_name, timm.list_models(), n=3)
        hint = f"; did you mean {_quote(close)}?" if close else "; see timm.list_models()"
        return f"model={model_name!r} is not a timm model{hint}"
    for device in ("meta", "cpu"):  # the CPU build is the slow fallback for models meta cannot build
        try:
            with torch.random.fork_rng(devices=[]), torch.device(device):
                return type(timm.create_model(model_name))
        except Exception:  # noqa: BLE001
            if device == "cpu":
                raise  # the model does not build at all: a real error, not a configuration to skip
    raise AssertionError("unreachable")


def trunk_problem(
    model_name: str, cls: type, image_size: tuple[int, int], pool: str, branch: str, kw: tuple,
    got: TrunkInfo | str, meta: bool = True,
) -> str | None:
    """The message for a trunk that failed to build (`got` is the reason) or cannot take the pool.

    Valid alternatives are found by probing on the meta device, only on this error path. When no
    pool builds on meta and `got` is itself a meta result, the model may simply not support the
    meta device: no problem is claimed then (the real build decides).
    """
    if isinstance(got, str):
        valid = _valid_pools(model_name, image_size, branch, kw)
        if not valid and meta:
            return None
        if valid and pool not in valid:
            return (
                f"{model_name}: pool={pool!r} is not supported by this timm model ({cls.__name__}: {got}); "
                f"valid pools: {_quote(valid)}; set pool to one of them"
            )
        settings = ", ".join(f"{k}={v}" for k, v in kw) or "its defaults"
        return f"{model_name}: cannot be built with pool={pool!r} and {settings} ({got}); change these options"
    if branch == "attn" and (got.token_features or got.channels_last):
        what = f"tokens {got.feature_shape}" if got.token_features else f"a channels-last map {got.feature_shape}"
        fits = [p for p in ("token", "avg", "map") if isinstance(probe(model_name, image_size, p, "reset", kw), TrunkInfo)]
        return (
            f"{model_name}: pool={pool!r} needs a (C, H, W) feature map but this timm model ({got.cls_name}) "
            f"outputs {what}; use pool={' or '.join(repr(p) for p in fits or ('token', 'avg', 'map'))} instead"
        )
    return None


@functools.lru_cache(maxsize=1024)
def _plan(
    model_name: str, image_size: tuple[int, int], pool: str, branch: str,
    drop_path: float | None, patch_drop: float | None,
) -> tuple[tuple[str, ...], TrunkInfo | None]:
    """(problems, trunk description) of a configuration, from a meta-device build."""
    cls = model_class(model_name)
    if isinstance(cls, str):
        return (cls,), None
    kw, problems = create_kwargs(model_name, cls, image_size, drop_path, patch_drop)
    got = probe(model_name, image_size, pool, branch, kw)
    problem = trunk_problem(model_name, cls, image_size, pool, branch, kw, got)
    if problem:
        problems.append(problem)
    return tuple(problems), got if isinstance(got, TrunkInfo) else None


# --- option checks shared by the tower and the static plan ----------------------------------------

def head_problems(model_name: str, pool: str, proj, drop: float, proj_bias: bool) -> list[str]:
    """Head options that cannot take effect (open_clip silently ignores them)."""
    if not known_proj(proj):
        return [f"{model_name}: proj={proj!r} is not a projection; use 'linear', 'mlp' or 'none'"]
    if not isinstance(pool, str):
        return [f"{model_name}: pool={pool!r} must be a string, e.g. 'avg'"]
    if proj in PROJ_LAYERS:
        return []
    what = "the trunk's classifier" if trunk_classifier_projects(proj) else f"proj={proj!r}"
    out = []
    if drop:
        out.append(
            f"{model_name}: drop={drop} has no effect with {what} (no projection layer); set drop=0 or proj='linear'"
        )
    if proj_bias:
        out.append(f"{model_name}: proj_bias=True has no effect with {what}; set proj_bias=false or proj='linear'")
    return out


def lock_problem(model_name: str, unlocked_groups: int, groups: int | None) -> str | None:
    """Why `lock(unlocked_groups)` cannot apply to a trunk with `groups` layer groups, or None."""
    if isinstance(unlocked_groups, bool) or not isinstance(unlocked_groups, int):
        return f"{model_name}: unlocked_groups={unlocked_groups!r} must be an integer"
    if groups is None and unlocked_groups != 0:
        return (
            f"{model_name}: unlocked_groups={unlocked_groups} needs layer groups, but this timm model has no "
            "group_matcher; use unlocked_groups=0 (lock the whole trunk) or null"
        )
    if groups is not None and not 0 <= unlocked_groups <= groups:
        return (
            f"{model_name}: unlocked_groups={unlocked_groups} is outside 0..{groups} (the trunk has {groups} "
            "layer groups); set it within that range"
        )
    return None


def lock_without_groups(trial: Trial) -> str | None:
    """freeze_bn_stats on a trial that locks nothing: the setting could not take effect."""
    if trial.freeze_bn_stats and trial.unlocked_groups is None:
        return (
            f"{trial.model}: freeze_bn_stats=True only applies to locked groups, but the trunk is not locked "
            "(unlocked_groups=null); set unlocked_groups (0 locks the whole trunk) or freeze_bn_stats=false"
        )
    return None


def checkpointing_message(model_name: str, reason: str) -> str:
    """The one message for `grad_checkpointing=True` on a trunk where it cannot take effect."""
    return (
        f"{model_name}: grad_checkpointing=True is not supported by this timm model ({reason}); "
        "set grad_checkpointing to false"
    )


def static_problems(trial: Trial) -> list[str]:
    """Why `trial` cannot run as configured (the messages `build_tower` would raise), [] if fine.

    Cheap for big models too: structure is checked on the meta device (cached per model, size,
    pool and head kind), nothing is downloaded and checkpoint files are only checked to exist.
    A model that cannot be built on the meta device gets only the checks that need no build.
    """
    if not isinstance(trial.model, str) or not trial.model:
        return [f"model={trial.model!r}: name a timm model, e.g. 'vit_base_patch16_224'"]
    problems = head_problems(trial.model, trial.pool, trial.proj, trial.drop, trial.proj_bias)
    if not known_proj(trial.proj) or not isinstance(trial.pool, str):
        return problems
    for problem in (lock_without_groups(trial), weights_problem(trial.model, trial.pretrained)):
        if problem:
            problems.append(problem)
    plan_problems, trunk = _plan(trial.model, to_2tuple(trial.image_size), trial.pool,
                                 head_branch(trial.pool, trial.proj), trial.drop_path, trial.patch_drop)
    problems.extend(plan_problems)
    if trunk is None:
        return problems
    if trial.unlocked_groups is not None:
        problem = lock_problem(trial.model, trial.unlocked_groups, trunk.layer_groups)
        if problem:
            problems.append(problem)
    if trial.grad_checkpointing and trunk.checkpointing_problem:
        problems.append(checkpointing_message(trial.model, trunk.checkpointing_problem))
    return problems
