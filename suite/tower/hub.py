"""Hub weights, decided offline: are the weights `pretrained` asks for already in the local cache?

Without network, timm's download of pretrained weights retries for about a minute per trial before
it fails. The sweep, `suite validate` and `suite bench` ask here once, up front, and fail in seconds
when the weights are not cached and cannot be downloaded: downloads are off (`HF_HUB_OFFLINE=1`), or
the hub does not answer one TCP connection within 3 seconds (`hub_reachable`, asked only when the
weights are not cached and downloads are on). Otherwise it reads timm's pretrained configs and
huggingface_hub's cache (both imported lazily: timm imports torch).
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(value: str) -> bool:
    """Whether a `pretrained` string names a local file (as `suite.tower.weights.weights_source` decides), not a hub id."""
    path = Path(value).expanduser()
    return path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES or value.startswith(("/", "~", "./", "../"))


def hub_offline() -> bool:
    """Whether huggingface_hub may not download (HF_HUB_OFFLINE, or its alias TRANSFORMERS_OFFLINE, set)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub accepts a TCP connection (one try per process, `timeout_s` at most)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_repo(model: str, weights: Any) -> tuple[str | None, str | None]:
    """(hub repo id, download url) timm would load `weights` of `model` from; (None, None) when not from a hub."""
    import timm

    if weights is True:
        name = model
    elif isinstance(weights, str) and weights and not looks_like_path(weights):
        if weights.startswith("hf-hub:") or "/" in weights:
            return weights.removeprefix("hf-hub:").split("@", 1)[0], None
        name = f"{model}.{weights}"
    else:
        return None, None
    cfg = timm.models.get_pretrained_cfg(name)
    return (cfg.hf_hub_id or None, cfg.url or None) if cfg is not None else (None, None)


def hub_weights_problem(model: str, weights: Any) -> tuple[str | None, str | None]:
    """(problem, note) about hub weights, decided offline: a problem when they are not in the local
    cache and downloads are off (each trial would retry for about a minute and fail); a note when
    they are not cached (each trial downloads them)."""
    repo, url = _hub_repo(model, weights)
    if repo is None and url is None:
        return None, None
    from huggingface_hub import constants, try_to_load_from_cache

    files = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return None, None
    if not repo:
        import torch.hub

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if local.is_file():
            return None, None
    where = f"hub repo {repo}" if repo else url
    cache = constants.HF_HUB_CACHE if repo else str(Path(torch.hub.get_dir()) / "checkpoints")
    if hub_offline() or not hub_reachable():
        why = "HF_HUB_OFFLINE=1 forbids downloading them" if hub_offline() else (
            "the hub cannot be reached (no network?), so each trial would retry for about a minute; set "
            "HF_HUB_OFFLINE=1 to say so up front")
        return (f"pretrained: {weights!r} of {model}: the weights ({where}) are not in the local cache {cache} "
                f"and {why}; fetch them once where there is network (into that cache, or HF_HOME), or set "
                "pretrained to a local checkpoint file (.safetensors/.pth)"), None
    return None, (f"pretrained: {weights!r} of {model}: the weights ({where}) are not in the local cache {cache}; "
                  "they will be downloaded. Without network, set HF_HUB_OFFLINE=1 to fail in seconds, or set "
                  "pretrained to a local checkpoint file")
