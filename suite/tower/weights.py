"""Where a tower's weights come from: the `pretrained` option, checkpoint files, state-dict remapping.

`pretrained` is one of: False (random init), True (timm's default weights), a timm tag (`r160_in1k`),
a hub id (`timm/...` or `hf-hub:...`), or a local checkpoint path. Hub weights are loaded by timm
itself (`timm_weight_kwargs` says how to ask for them); a local file is read here and fitted to a
tower, whatever saved it:

- a timm trunk state dict (its classifier is dropped where our head replaces it, as timm does for
  pretrained weights with another `num_classes`),
- a tower (`trunk.*`/`head.*`, from `TimmTower` or open_clip's `TimmModel`),
- a whole open_clip CLIP checkpoint (the `visual.*` tower), possibly wrapped by a trainer
  (`{'epoch', 'state_dict', ...}`) or saved from DistributedDataParallel (`module.*`).

A file that is missing, unreadable or does not fit raises `WeightsError` naming the file and keys.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from suite.core.errors import UnsupportedConfig, WeightsError, one_line

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def weights_source(pretrained: bool | str | None) -> tuple[str, Any]:
    """('none'|'timm'|'file'|'hub'|'tag', value) for the `pretrained` option.

    Raises:
        UnsupportedConfig: a value that names no source (a number, an empty string).
    """
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


def weights_problem(model_name: str, pretrained) -> str | None:
    """The cheap (offline) check of the `pretrained` option: why it cannot work, or None."""
    try:
        kind, value = weights_source(pretrained)
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


def timm_weight_kwargs(model_name: str, pretrained) -> tuple[str, dict]:
    """(model name, `timm.create_model` kwargs) that make timm load the asked-for weights ({} for none or a file)."""
    kind, value = weights_source(pretrained)
    if kind == "timm":
        return model_name, {"pretrained": True}
    if kind == "tag":
        return f"{model_name}.{value}", {"pretrained": True}
    if kind == "hub":
        return model_name, {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": value}}
    return model_name, {}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from trainer dicts and DDP's `module.` prefix.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no state dict.
    """
    if not path.is_file():
        raise WeightsError(f"pretrained={str(path)!r}: no such checkpoint file")
    _check_format(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file  # only for this format; timm depends on it anyway

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"cannot read checkpoint {path}: {one_line(exc)}") from exc
    # Trainer checkpoints wrap the weights (open_clip: {'epoch', 'state_dict', 'optimizer', ...}).
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model", "module") if isinstance(state.get(k), dict)), None)
        if inner is None:
            keys = ", ".join(repr(k) for k in list(state)[:8])
            raise WeightsError(f"checkpoint {path} holds no tensors (top-level keys: {keys})")
        state = inner
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} is a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = _strip_prefix(state, "module.")
    return state


def _check_format(path: Path) -> None:
    """Refuse a file that is no checkpoint format at all (torch.load of text fails with 'pop from empty list').

    Raises:
        WeightsError: naming the file and, for a text file, its first line (a Git LFS pointer, often).
    """
    with open(path, "rb") as f:
        head = f.read(256)
    if path.suffix.lower() == ".safetensors" or head.startswith((b"PK\x03\x04", b"\x80")) or not head:
        return  # safetensors, torch's zip format, a legacy pickle; an empty file fails on reading
    try:
        first = head.decode("utf-8").splitlines()[0][:80]
    except (UnicodeDecodeError, IndexError):
        raise WeightsError(f"checkpoint {path} is not a PyTorch (zip or pickle) or safetensors file") from None
    lfs = " (a Git LFS pointer: run `git lfs pull` to fetch the real file)" if first.startswith("version https://git-lfs") else ""
    raise WeightsError(f"checkpoint {path} is a text file, not a checkpoint{lfs}; it starts with {first!r}")


def resample_pos_embeds(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Resample absolute position embeddings saved at another resolution to `module`'s patch grid, in place,
    as timm does when it loads pretrained weights at another image size; one note per resampled key."""
    from timm.layers import resample_abs_pos_embed

    notes, own = [], module.state_dict()
    for key, value in list(state.items()):
        if not key.endswith("pos_embed") or key not in own or own[key].shape == value.shape or value.ndim != 3:
            continue
        owner = module.get_submodule(key.rsplit(".", 1)[0]) if "." in key else module
        grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
        prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 0))
        side = math.isqrt(value.shape[1] - prefix)
        if grid is None or side * side != value.shape[1] - prefix or value.shape[2] != own[key].shape[2]:
            continue  # not a square ViT grid: left for the shape check to name
        state[key] = resample_abs_pos_embed(value, new_size=list(grid), old_size=[side, side],
                                            num_prefix_tokens=prefix, verbose=False)
        notes.append(f"{key} resampled from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid (bicubic, as timm "
                     "does for pretrained weights at another image size)")
    return notes


def load_checkpoint(tower: nn.Module, path: Path) -> list[str]:
    """Load a checkpoint file into a `TimmTower` (its `trunk` and `model_name` are used), strictly.

    Position embeddings saved at another resolution are resampled to the tower's (see
    `resample_pos_embeds`); what was resampled is returned and kept in `tower.weights_notes`.

    Raises:
        WeightsError: the file cannot be read or does not fit the tower.
    """
    state = read_state_dict(path)
    if any(k.startswith("visual.") for k in state):  # a whole open_clip CLIP checkpoint
        state = _strip_prefix(state, "visual.")
        if not any(k.startswith("trunk.") for k in state):
            raise WeightsError(f"checkpoint {path} has visual.* keys but no visual.trunk.*: not a timm tower")
    if any(k.startswith("trunk.") for k in state):  # a tower (TimmTower / open_clip TimmModel)
        module, what = tower, f"tower ({tower.model_name}, trunk and head)"
    else:
        module, what = tower.trunk, f"timm trunk {tower.model_name}"
        state = _fitting_classifier(tower.trunk, state)
    notes = resample_pos_embeds(module, state)
    _load_into(module, state, path, what)
    tower.weights_notes = notes
    return notes


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it removed (others are dropped)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _fitting_classifier(trunk: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A raw timm state dict without the classifier weights that do not fit `trunk`.

    Our head replaces the trunk's classifier (or the classifier is resized to embed_dim when it is
    the projection), so a saved 1000-class classifier is dropped where it does not fit, as timm
    does for pretrained weights with another num_classes.
    """
    classifier = trunk.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    own = trunk.state_dict()
    return {
        k: v for k, v in state.items()
        if not any(k.startswith(c + ".") for c in classifier) or (k in own and own[k].shape == v.shape)
    }


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """`load_state_dict(strict=True)`, after naming every missing, unexpected or mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        kinds = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        parts = [
            f"{name} {', '.join(repr(k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for name, keys in kinds if keys
        ]
        raise WeightsError(f"checkpoint {path} does not match the {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
