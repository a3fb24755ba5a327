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
feature shape, pooled width, layer groups and checkpointing support. `static_problems` runs the
same inspection on a trunk built on the meta device (cached, no weights allocated, nothing
downloaded), so it can vet a large grid of big models; the meta device is also where the valid
alternatives for an error message are found.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d, freeze_batch_norm_2d, to_2tuple
from timm.models import group_modules, group_parameters
from torch import nn

from suite.errors import UnsupportedConfig, WeightsError  # noqa: F401 - re-exported

# Pools timm implements inside the trunk; `''` means "the trunk's default pooling" here.
TIMM_POOLS = ("avg", "max", "avgmax", "catavgmax", "token", "map", "")
# Pools this tower adds as `head.pool` on a CNN feature map (open_clip's names).
ATTN_POOLS = ("abs_attn", "rot_attn")
# `''`/None: the trunk's own classifier (num_classes=embed_dim) is the projection (open_clip's `timm_proj: null`).
PROJS = ("linear", "mlp", "none", "", None)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# Exceptions timm raises for a configuration it cannot build (it mostly uses `assert`).
_BUILD_ERRORS = (AssertionError, ValueError, TypeError, KeyError, RuntimeError, NotImplementedError, IndexError)


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _quote(values) -> str:
    return ", ".join(repr(v) for v in values)


# --- building a trunk the way open_clip does -------------------------------------------------

def _branch(pool: str, proj: str | None) -> str:
    """Which of open_clip's construction paths applies (module names and math depend on it).

    `attn`: trunk with no pool or classifier, attention pool in the head. `reset`: trunk built with
    its defaults, then `reset_classifier(0, global_pool=pool)`, projection in the head. `create`:
    trunk built with `num_classes`/`global_pool` (e.g. ViT `avg` then uses `fc_norm`, not `norm`).
    """
    if pool in ATTN_POOLS:
        return "attn"
    return "reset" if proj in ("linear", "mlp") else "create"


def _create_trunk(
    model_name: str, branch: str, pool: str, kwargs: dict, num_classes: int = 0, **weights: Any,
) -> nn.Module:
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
        except _BUILD_ERRORS:
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


def _effective_pool(trunk: nn.Module) -> str | None:
    """The pool type a timm trunk ended up with, when it exposes it (None when it does not)."""
    for owner in (trunk, getattr(trunk, "head", None)):
        gp = getattr(owner, "global_pool", None)
        if isinstance(gp, str):
            return gp
        if isinstance(getattr(gp, "pool_type", None), str):
            return gp.pool_type
    return None


def _grad_checkpointing_active(trunk: nn.Module) -> bool:
    # timm models keep the switch in `grad_checkpointing` attributes (on the model or its stages).
    return any(getattr(m, "grad_checkpointing", False) is True for m in trunk.modules())


def _checkpointing_problem(trunk: nn.Module) -> str | None:
    """Why `set_grad_checkpointing(True)` cannot take effect on `trunk`, or None when it can."""
    setter = getattr(trunk, "set_grad_checkpointing", None)
    if setter is None:
        return "the model has no set_grad_checkpointing"
    try:
        setter(True)
    except Exception as exc:  # noqa: BLE001 - timm uses `assert not enable` for unsupported models
        return _one_line(exc)
    active = _grad_checkpointing_active(trunk)
    try:
        setter(False)
    except Exception:  # noqa: BLE001 - restoring the default is best effort on a probe copy
        pass
    return None if active else "set_grad_checkpointing(True) left no grad_checkpointing flag set"


def _group_count(trunk: nn.Module) -> int | None:
    try:
        return len(group_parameters(trunk, trunk.group_matcher()))
    except Exception:  # noqa: BLE001 - models without a group matcher
        return None


# --- inspecting a trunk, and the meta-device plan used for checks and error messages ----------

@dataclass(frozen=True)
class _Trunk:
    """What a built trunk looks like for one (pool, branch)."""

    cls_name: str
    feature_shape: tuple[int, ...]  # forward_features of one image, without batch dim
    token_features: bool  # (N, C) tokens rather than a (C, H, W) map
    channels_last: bool  # (H, W, C) map (e.g. Swin)
    pooled_width: int | None  # width after the trunk's own pool (None for the attn branch)
    layer_groups: int | None
    checkpointing_problem: str | None


def _inspect(trunk: nn.Module, image_size: tuple[int, int], pool: str, branch: str) -> _Trunk:
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
    return _Trunk(
        cls_name=type(trunk).__name__,
        feature_shape=tuple(feats.shape[1:]),
        token_features=feats.ndim == 3,
        channels_last=channels_last,
        pooled_width=None if pooled is None else int(pooled.shape[-1]),
        layer_groups=_group_count(trunk),
        checkpointing_problem=_checkpointing_problem(trunk),
    )


@functools.lru_cache(maxsize=1024)
def _probe(model_name: str, image_size: tuple[int, int], pool: str, branch: str, kwargs: tuple):
    """Build the trunk on the meta device and inspect it; a `_Trunk`, or the one-line reason it fails."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a probe must not move the caller's RNG
        try:
            return _inspect(_create_trunk(model_name, branch, pool, dict(kwargs)), image_size, pool, branch)
        except _BUILD_ERRORS as exc:
            return _one_line(exc)


def _valid_pools(model_name: str, image_size, branch: str, kwargs: tuple) -> list[str]:
    valid = [p for p in TIMM_POOLS if isinstance(_probe(model_name, image_size, p, branch, kwargs), _Trunk)]
    spatial = _probe(model_name, image_size, "abs_attn", "attn", kwargs)
    if isinstance(spatial, _Trunk) and not (spatial.token_features or spatial.channels_last):
        valid += list(ATTN_POOLS)
    return valid


@functools.lru_cache(maxsize=256)
def _model_class(model_name: str) -> type | str:
    """The timm class behind a model name (built once on the meta device), or why there is none."""
    if not timm.is_model(model_name.split(".", 1)[0]):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
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


def _create_kwargs(
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


def _trunk_problem(
    model_name: str, cls: type, image_size: tuple[int, int], pool: str, branch: str, kw: tuple, got: _Trunk | str,
    meta: bool = True,
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
        suggest = [
            p for p in ("token", "avg", "map") if isinstance(_probe(model_name, image_size, p, "reset", kw), _Trunk)
        ]
        return (
            f"{model_name}: pool={pool!r} needs a (C, H, W) feature map but this timm model ({got.cls_name}) "
            f"outputs {what}; use pool={' or '.join(repr(p) for p in suggest or ('token', 'avg', 'map'))} instead"
        )
    return None


@functools.lru_cache(maxsize=1024)
def _plan(
    model_name: str, image_size: tuple[int, int], pool: str, branch: str,
    drop_path: float | None, patch_drop: float | None,
) -> tuple[tuple[str, ...], _Trunk | None]:
    """(problems, trunk description) of a configuration, from a meta-device build."""
    cls = _model_class(model_name)
    if isinstance(cls, str):
        return (cls,), None
    kw, problems = _create_kwargs(model_name, cls, image_size, drop_path, patch_drop)
    got = _probe(model_name, image_size, pool, branch, kw)
    problem = _trunk_problem(model_name, cls, image_size, pool, branch, kw, got)
    if problem:
        problems.append(problem)
    return tuple(problems), got if isinstance(got, _Trunk) else None


def _attn_heads(channels: int) -> int | None:
    """Head count for attention pooling: timm's default 64-wide heads when they divide the channels
    (open_clip parity), else the divisor of `channels` closest to channels/64 (open_clip fails here)."""
    if channels % 64 == 0:
        return None
    target = max(1, round(channels / 64))
    return min((d for d in range(1, channels + 1) if channels % d == 0), key=lambda d: (abs(d - target), d))


# --- weights -----------------------------------------------------------------------------------

def _weights_source(pretrained: bool | str | None) -> tuple[str, Any]:
    """('none'|'timm'|'file'|'hub'|'tag', value) for the `pretrained` option."""
    if pretrained is None or pretrained is False:
        return "none", None
    if pretrained is True:
        return "timm", None
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise UnsupportedConfig(
            f"pretrained={pretrained!r} is not understood; use false, true, a timm tag, a hub id or a checkpoint path"
        )
    path = Path(pretrained).expanduser()
    if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return "file", path
    text = str(pretrained)
    if text.startswith("hf-hub:") or "/" in text:
        return "hub", text.removeprefix("hf-hub:")
    return "tag", text


def _weights_problem(model_name: str, pretrained) -> str | None:
    """The cheap (offline) check of the `pretrained` option."""
    try:
        kind, value = _weights_source(pretrained)
    except UnsupportedConfig as exc:
        return f"{model_name}: {exc}"
    if kind == "file" and not value.is_file():
        return f"{model_name}: pretrained={str(value)!r}: no such checkpoint file"
    if kind == "timm" and not timm.models.is_model_pretrained(model_name):
        return (
            f"{model_name}: pretrained=True but timm has no pretrained weights for this model; "
            "use a checkpoint path or false"
        )
    if kind == "tag" and "." in model_name:
        return f"{model_name}: pretrained={value!r} is a tag, but the model name already has one; use pretrained=True"
    if kind == "tag" and not timm.models.is_model_pretrained(f"{model_name}.{value}"):
        return (
            f"{model_name}: pretrained={value!r} is not a timm pretrained tag of this model; "
            f"see timm.list_pretrained('{model_name}*')"
        )
    return None


def _timm_weight_kwargs(model_name: str, pretrained) -> tuple[str, dict]:
    """(model name, create_model kwargs) that make timm load the asked-for weights."""
    kind, value = _weights_source(pretrained)
    if kind == "timm":
        return model_name, {"pretrained": True}
    if kind == "tag":
        return f"{model_name}.{value}", {"pretrained": True}
    if kind == "hub":
        return model_name, {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": value}}
    return model_name, {}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"pretrained={str(path)!r}: no such checkpoint file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"cannot read checkpoint {path}: {_one_line(exc)}") from exc
    # Trainer checkpoints wrap the weights (open_clip: {'epoch', 'state_dict', 'optimizer', ...}).
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model", "module") if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise WeightsError(f"checkpoint {path} holds no tensors (top-level keys: {_quote(list(state)[:8])})")
        state = inner
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} is a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        parts = [f"{name} {_quote(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})" for name, keys in kinds if keys]
        raise WeightsError(f"checkpoint {path} does not match the {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


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
        problems = _head_problems(model_name, pool, proj, drop, proj_bias)
        if problems:
            raise UnsupportedConfig(problems[0])
        source = _weights_source(pretrained)
        problem = _weights_problem(model_name, pretrained)
        if problem:  # a missing file is a weights error; an impossible timm request is a config one
            raise (WeightsError if source[0] == "file" else UnsupportedConfig)(problem)

        branch = _branch(pool, proj)
        cls = _model_class(model_name)
        if isinstance(cls, str):
            raise UnsupportedConfig(cls)
        kw, problems = _create_kwargs(model_name, cls, self.image_size, drop_path, patch_drop)
        if problems:
            raise UnsupportedConfig(problems[0])
        name, weight_kwargs = _timm_weight_kwargs(model_name, pretrained)
        num_classes = embed_dim if proj in ("", None) else 0
        try:
            self.trunk = _create_trunk(name, branch, pool, dict(kw), num_classes, **weight_kwargs)
            info = _inspect(self.trunk, self.image_size, pool, branch)
        except _BUILD_ERRORS as exc:
            if isinstance(_probe(model_name, self.image_size, pool, branch, kw), _Trunk):
                raise  # the configuration builds on meta: this failure is not about the options (weights, memory)
            raise UnsupportedConfig(
                _trunk_problem(model_name, cls, self.image_size, pool, branch, kw, _one_line(exc), meta=False)
            ) from exc
        problem = _trunk_problem(model_name, cls, self.image_size, pool, branch, kw, info, meta=False)
        if problem:
            raise UnsupportedConfig(problem)
        feat_hw = info.feature_shape[1:] if branch == "attn" else None

        # The head: module names and layer arguments as open_clip's, so state dicts line up.
        head: OrderedDict[str, nn.Module] = OrderedDict()
        width = info.pooled_width if branch != "attn" else info.feature_shape[0]
        if pool in ATTN_POOLS:
            heads = _attn_heads(width)
            heads_kw = {} if heads is None else {"num_heads": heads}
            if pool == "abs_attn":  # fix 1: the real feature size at image_size, not default_cfg['pool_size']
                head["pool"] = AttentionPool2d(width, feat_size=feat_hw, out_features=embed_dim, **heads_kw)
            else:
                head["pool"] = RotAttentionPool2d(width, out_features=embed_dim, **heads_kw)
            width = embed_dim
        if proj == "linear":
            head["drop"] = nn.Dropout(drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=proj_bias)
        elif proj == "mlp":
            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(drop, 0), bias=(True, proj_bias))
        self.head = nn.Sequential(head)

        self._output_dim = embed_dim if (proj != "none" or pool in ATTN_POOLS) else width
        self._feature_shape = info.feature_shape
        self._checkpointing_problem = info.checkpointing_problem
        self._lock_state: tuple[int | None, int] | None = None
        self._groups = info.layer_groups
        if source[0] == "file":
            self._load_file(source[1])

    # --- weights ---
    def _load_file(self, path: Path) -> None:
        state = _read_state_dict(path)
        if any(k.startswith("visual.") for k in state):  # a whole open_clip CLIP checkpoint
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
            if not any(k.startswith("trunk.") for k in state):
                raise WeightsError(f"checkpoint {path} has visual.* keys but no visual.trunk.*: not a timm tower")
        if any(k.startswith("trunk.") for k in state):  # a tower (TimmTower / open_clip TimmModel)
            _load_into(self, state, path, f"tower ({self.model_name}, trunk and head)")
            return
        # A raw timm checkpoint: its classifier is replaced by our head (or resized to embed_dim when
        # the trunk's classifier projects), so its classifier weights are dropped where they do not fit,
        # as timm does for pretrained weights with another num_classes.
        classifier = self.trunk.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        own = self.trunk.state_dict()
        state = {
            k: v for k, v in state.items()
            if not any(k.startswith(c + ".") for c in classifier) or (k in own and own[k].shape == v.shape)
        }
        _load_into(self.trunk, state, path, f"timm trunk {self.model_name}")

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
        problem = _lock_problem(self.model_name, unlocked_groups, groups)
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
        return self._checkpointing_problem is None

    @property
    def grad_checkpointing(self) -> bool:
        """Whether checkpointing is active in the trunk (read from the trunk, not remembered)."""
        return _grad_checkpointing_active(self.trunk)

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
                problem = _one_line(exc)
        if problem is None and not self.grad_checkpointing:
            problem = "set_grad_checkpointing(True) left no grad_checkpointing flag set"
        if problem is not None:
            raise UnsupportedConfig(_checkpointing_message(self.model_name, problem))

    # --- reporting and forward ---
    def describe(self) -> TowerInfo:
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
        )

    @property
    def output_dim(self) -> int:
        return self._output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _lock_problem(model_name: str, unlocked_groups: int, groups: int | None) -> str | None:
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


def _checkpointing_message(model_name: str, reason: str) -> str:
    return (
        f"{model_name}: grad_checkpointing=True is not supported by this timm model ({reason}); "
        "set grad_checkpointing to false"
    )


def _head_problems(model_name: str, pool: str, proj, drop: float, proj_bias: bool) -> list[str]:
    """Head options that cannot take effect (open_clip silently ignores them)."""
    if proj not in PROJS:
        return [f"{model_name}: proj={proj!r} is not a projection; use 'linear', 'mlp' or 'none'"]
    if not isinstance(pool, str):
        return [f"{model_name}: pool={pool!r} must be a string, e.g. 'avg'"]
    if proj in ("linear", "mlp"):
        return []
    what = "the trunk's classifier" if proj in ("", None) else f"proj={proj!r}"
    out = []
    if drop:
        out.append(
            f"{model_name}: drop={drop} has no effect with {what} (no projection layer); set drop=0 or proj='linear'"
        )
    if proj_bias:
        out.append(f"{model_name}: proj_bias=True has no effect with {what}; set proj_bias=false or proj='linear'")
    return out


# --- from trials -------------------------------------------------------------------------------

def _tower_args(trial) -> dict[str, Any]:
    return dict(
        model_name=trial.model, embed_dim=trial.embed_dim, image_size=trial.image_size, pool=trial.pool,
        proj=trial.proj, proj_bias=trial.proj_bias, drop=trial.drop, drop_path=trial.drop_path,
        patch_drop=trial.patch_drop, pretrained=trial.pretrained,
    )


def _lock_without_groups(trial) -> str | None:
    if trial.freeze_bn_stats and trial.unlocked_groups is None:
        return (
            f"{trial.model}: freeze_bn_stats=True only applies to locked groups, but the trunk is not locked "
            "(unlocked_groups=null); set unlocked_groups (0 locks the whole trunk) or freeze_bn_stats=false"
        )
    return None


def build_tower(trial) -> TimmTower:
    """Build, lock and set checkpointing for a `suite.options.Trial` (no device placement)."""
    problem = _lock_without_groups(trial)
    if problem:
        raise UnsupportedConfig(problem)
    tower = TimmTower(**_tower_args(trial))
    if trial.unlocked_groups is not None:
        tower.lock(trial.unlocked_groups, trial.freeze_bn_stats)
    if trial.grad_checkpointing:
        tower.set_grad_checkpointing(True)
    return tower


def static_problems(trial) -> list[str]:
    """Why `trial` cannot run as configured (the messages `build_tower` would raise), [] if fine.

    Cheap for big models too: structure is checked on the meta device (cached per model, size,
    pool and head kind), nothing is downloaded and checkpoint files are only checked to exist.
    A model that cannot be built on the meta device gets only the checks that need no build.
    """
    if not isinstance(trial.model, str) or not trial.model:
        return [f"model={trial.model!r}: name a timm model, e.g. 'vit_base_patch16_224'"]
    if trial.proj not in PROJS or not isinstance(trial.pool, str):
        return _head_problems(trial.model, trial.pool, trial.proj, trial.drop, trial.proj_bias)
    problems = _head_problems(trial.model, trial.pool, trial.proj, trial.drop, trial.proj_bias)
    for problem in (_lock_without_groups(trial), _weights_problem(trial.model, trial.pretrained)):
        if problem:
            problems.append(problem)
    plan_problems, trunk = _plan(trial.model, to_2tuple(trial.image_size), trial.pool,
                                 _branch(trial.pool, trial.proj), trial.drop_path, trial.patch_drop)
    problems.extend(plan_problems)
    if trunk is None:
        return problems
    if trial.unlocked_groups is not None:
        problem = _lock_problem(trial.model, trial.unlocked_groups, trunk.layer_groups)
        if problem:
            problems.append(problem)
    if trial.grad_checkpointing and trunk.checkpointing_problem:
        problems.append(_checkpointing_message(trial.model, trunk.checkpointing_problem))
    return problems
