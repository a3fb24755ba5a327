"""Probe features: a tower's frozen features for every split of a data set, and their disk cache.

Extraction runs the tower in eval mode without grad, at the trial's precision under the same rules
as measurement (`suite.machine.device`: one autocast table, and fp32 on CUDA is strict fp32, TF32 off).

Features are cached on disk (`feature_cache_key`), keyed by everything that changes them and by
nothing that does not (lock depth, checkpointing, batch size, channels_last, compile), so a
lock-depth sweep extracts once. A file is written atomically and carries a checksum; a corrupt or
stale one is removed and rebuilt.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from suite.core.options import sha256_json
from suite.machine.device import autocast, autocast_dtype, place, strict_fp32
from suite.probe.images import FileImages, eval_transform, in_memory_batches

log = logging.getLogger(__name__)

# 2: fp32 extraction on CUDA became strict fp32 (TF32 off), as measurement is.
# 3: `probe_features` (pooled features before the projection head, or projected ones) in the key.
CACHE_VERSION = 3
# The modules whose source defines the features (the tower, its weights, the data and its
# preprocessing, extraction): a change to any of them invalidates the cache. A module that does
# not exist hashes as empty.
FEATURE_SOURCES = ("tower/model.py", "tower/plan.py", "tower/weights.py", "probe/datasets.py", "probe/images.py",
                   "probe/features.py")


# --------------------------------------------------------------------------- extraction


def extract_features(tower, loader, device: str, precision: str = "fp32",
                     channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Run `tower` over `loader` in eval mode without grad.

    Args:
        tower: module mapping images (B, 3, H, W) to features (B, D).
        loader: iterable of (images, labels) batches.
        device: where to run.
        precision: fp32 (strict on CUDA: TF32 off), or bf16/fp16 under autocast.
        channels_last: feed channels_last inputs (speed only; the features are the same function).

    Returns:
        (features float32 (N, D), labels int64 (N,), images per second including data loading).

    Raises:
        SuiteError: not a precision name; UnsupportedConfig: bf16 on a GPU without it.
    """
    dev = torch.device(device)
    dtype = autocast_dtype(precision, dev.type)
    was_training = tower.training
    tower.eval()
    feats, labels = [], []
    t0 = time.perf_counter()
    try:
        with strict_fp32(dev.type, precision), torch.inference_mode(), autocast(dev.type, dtype):
            for x, y in loader:
                x = x.to(dev, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats.append(tower(x).float().cpu())  # .cpu() synchronizes, so the timing is honest
                labels.append(torch.as_tensor(y))
    finally:
        tower.train(was_training)
    elapsed = time.perf_counter() - t0
    x_out = torch.cat(feats).numpy().astype(np.float32, copy=False)
    y_out = torch.cat(labels).numpy().astype(np.int64, copy=False)
    return x_out, y_out, len(y_out) / max(elapsed, 1e-9)


class PooledFeatures(nn.Module):
    """A tower's pooled features, before its projection head (`probe_features: pooled`).

    A randomly initialized projection is a random linear map: probing after it only adds noise to a
    comparison of trunks. Attention pooling (`abs_attn`, `rot_attn`) lives in the head but is the
    pooling, so it is kept; dropout and the linear/MLP projection are left out. With `proj: ''` the
    trunk's own classifier projects, so its pre-logits features are the pooled ones.
    """

    def __init__(self, tower: nn.Module, proj: str | None):
        super().__init__()
        self.tower, self.proj = tower, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.tower.trunk
        if self.proj in ("", None):
            return trunk.forward_head(trunk.forward_features(x), pre_logits=True)
        pool = getattr(self.tower.head, "pool", None)
        return pool(trunk(x)) if pool is not None else trunk(x)


def probed_module(tower: nn.Module, trial) -> nn.Module:
    """What the probe extracts features with: the whole tower (`projected`) or `PooledFeatures`."""
    return tower if trial.probe_features == "projected" else PooledFeatures(tower, trial.proj)


def feature_loader(dataset, batch_size: int, device: str):
    """Batches of `dataset` for `extract_features`: an in-memory split preprocessed once when it
    applies (`suite.probe.images.in_memory_batches`: the same tensors without per-image overhead), else a
    DataLoader over the per-image transform."""
    fast = in_memory_batches(dataset, batch_size)
    if fast is not None:
        return fast
    # In-memory data sets decode in microseconds: worker processes would cost more than they save.
    # Files need decoding in parallel with the tower (leave one core to the tower).
    workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if isinstance(dataset, FileImages) else 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.startswith("cuda"))


def extract_splits(trial, splits, tower, device: str) -> tuple[dict[str, np.ndarray], float]:
    """Features of every split (`x_<split>`, `y_<split>`) and the overall extraction throughput (images/s).

    Args:
        trial: the `suite.core.options.Trial` (tower, image size, batch size, precision, channels_last).
        splits: the trial's `suite.probe.datasets.Splits`; their transform is set to the trunk's eval transform.
        tower: a built tower, or None to build `build_tower(trial)` after `torch.manual_seed(trial.seed)`.
        device: a resolved device.
    """
    if tower is None:
        from suite.tower.model import build_tower  # timm and the tower code load only on a cache miss

        torch.manual_seed(trial.seed)  # random-init weights must be the same in every run
        tower = build_tower(trial)
    place(tower, device, trial.channels_last)
    transform, _ = eval_transform(tower.trunk, trial.image_size)
    splits.set_transform(transform)
    module = probed_module(tower, trial)
    arrays, n, seconds = {}, 0, 0.0
    for name, ds in splits.items():
        x, y, sps = extract_features(module, feature_loader(ds, trial.probe_batch_size, device), device,
                                     trial.precision, trial.channels_last)
        arrays[f"x_{name}"], arrays[f"y_{name}"] = x, y
        n, seconds = n + len(y), seconds + len(y) / sps
    return arrays, n / max(seconds, 1e-9)


# --------------------------------------------------------------------------- feature cache


def _weights_identity(pretrained) -> Any:
    """A local checkpoint is identified by path, size and mtime; hub weights by their name."""
    if isinstance(pretrained, str) and os.path.isfile(os.path.expanduser(pretrained)):
        path = os.path.realpath(os.path.expanduser(pretrained))
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return pretrained


def _source_digest(*modules: str) -> str:
    """Hash of the source of the suite files named, relative to suite/ (a code change invalidates)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for name in modules:
        h.update((root / name).read_bytes())  # a missing file is a bug here, not an empty hash
    return h.hexdigest()[:16]


def _head_fields(trial) -> dict:
    """The head options that change the probed features.

    Projected: pool, projection, its bias and width. Pooled: only what shapes the trunk and the
    pooling, so a `proj` sweep (linear vs mlp) extracts pooled features once. The trunk is built the
    same way for linear and mlp (open_clip's 'reset' branch, `suite.tower.plan.head_branch`; the
    trunk is initialized before the head, so the seeded weights agree); `none` and `''` build it
    with other classifier arguments, and attention pooling's width is embed_dim.
    """
    if trial.probe_features == "projected":
        return {"features": "projected", "pool": trial.pool, "proj": trial.proj, "proj_bias": trial.proj_bias,
                "embed_dim": trial.embed_dim}
    attn = trial.pool in ("abs_attn", "rot_attn")
    branch = "attn" if attn else ("reset" if trial.proj in ("linear", "mlp") else trial.proj)
    return {"features": "pooled", "pool": trial.pool, "branch": branch,
            "embed_dim": trial.embed_dim if attn or trial.proj == "" else None}


def feature_cache_key(trial, dataset_identity: str, device: str) -> tuple[str, dict]:
    """The cache key of a trial's features: (hex digest, the fields it hashes).

    Includes what changes the features: the model and its weights, the probed features and the head
    options that shape them (`_head_fields`: pooled features do not depend on the projection), image
    size, data set (files and split), seed (random init), precision, device type, and the timm version
    and the source of `FEATURE_SOURCES` (which, with model, weights and image size, fix the
    preprocessing config).
    Excludes what does not change the function at inference: lock depth, frozen BN statistics
    (FrozenBatchNorm in eval computes the same function), gradient checkpointing, dropout, drop path
    and patch dropout (all off in eval), batch size, channels_last and compile.
    """
    try:
        timm_version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        timm_version = None
    fields = {
        "version": CACHE_VERSION,
        "model": trial.model,
        "pretrained": _weights_identity(trial.pretrained),
        **_head_fields(trial),
        "image_size": trial.image_size,
        "dataset": dataset_identity,
        "seed": trial.seed,
        "precision": trial.precision,
        "device_type": device.split(":")[0],
        "timm": timm_version,
        "source": _source_digest(*FEATURE_SOURCES),
    }
    return sha256_json(fields, length=32), fields


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_cached_features(path: Path, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and metadata stored at `path` for `key`; None when absent, stale or corrupt.

    A corrupt file (unreadable, wrong key, checksum mismatch) is removed so it is rebuilt.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {name: z[name] for name in z.files if name != "meta"}
        if meta.get("key") != key:
            raise ValueError(f"stored key {meta.get('key')!r} differs")
        if _checksum(arrays) != meta.get("checksum"):
            raise ValueError("checksum mismatch")
        return arrays, meta
    except Exception as e:  # any failure to read means: rebuild
        log.warning("feature cache %s is unusable (%s); extracting again", path, e)
        path.unlink(missing_ok=True)
        return None


def save_cached_features(path: Path, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write atomically (a temporary file in the same folder, then os.replace), so a concurrent reader
    sees the old file or the new one, never half of one."""
    meta = dict(meta, key=key, checksum=_checksum(arrays))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta, default=str)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
