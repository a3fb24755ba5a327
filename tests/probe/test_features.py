"""Feature extraction (precision rules, the in-memory path) and the feature cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from factories import digits_trial

import suite.probe.features
from suite.core.errors import SuiteError
from suite.probe.datasets import load_splits
from suite.probe.features import (
    extract_features,
    feature_cache_key,
    feature_loader,
    load_cached_features,
    save_cached_features,
)
from suite.probe.images import PreparedBatches, eval_transform


class MeanTower(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


LOADER = [(torch.ones(4, 3, 8, 8), torch.arange(4)), (torch.zeros(2, 3, 8, 8), torch.tensor([7, 8]))]


# --------------------------------------------------------------------------- extraction


def test_extract_features_shapes():
    x, y, sps = extract_features(MeanTower(), LOADER, "cpu", "fp32")
    assert x.dtype == np.float32 and x.shape == (6, 3) and y.tolist() == [0, 1, 2, 3, 7, 8]
    assert sps > 0 and np.all(x[:4] == 1) and np.all(x[4:] == 0)
    with pytest.raises(SuiteError, match="precision="):
        extract_features(MeanTower(), LOADER, "cpu", "int8")


def test_extract_features_autocast_and_mode_restored():
    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    loader = [(torch.randn(4, 3, 8, 8), torch.arange(4))]
    fp32, _, _ = extract_features(tower, loader, "cpu", "fp32")
    bf16, _, _ = extract_features(tower, loader, "cpu", "bf16")
    assert bf16.dtype == np.float32  # features come back as float32 whatever ran
    assert not np.array_equal(fp32, bf16) and np.allclose(fp32, bf16, atol=0.1)  # autocast did run
    assert tower.training  # eval while extracting, the caller's mode afterwards


def test_extraction_follows_the_strict_fp32_rule(monkeypatch):
    seen = []
    real = suite.probe.features.strict_fp32

    def spy(device, precision):
        seen.append((device, precision))
        return real(device, precision)

    monkeypatch.setattr(suite.probe.features, "strict_fp32", spy)
    extract_features(MeanTower(), LOADER, "cpu", "fp32")
    extract_features(MeanTower(), LOADER, "cpu", "bf16")
    assert seen == [("cpu", "fp32"), ("cpu", "bf16")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_extraction_on_cuda_has_tf32_off():
    from suite.machine.device import tf32_enabled

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tf32_enabled())
            return x.mean((2, 3))

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        extract_features(Probe().cuda(), LOADER, "cuda", "fp32")
        assert seen == [False, False]
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_in_memory_extraction_equals_per_image_path():
    from torch.utils.data import DataLoader

    from suite.tower.model import build_tower

    t = digits_trial(max_per_class=4)
    torch.manual_seed(0)
    tower = build_tower(t)
    transform, _ = eval_transform(tower.trunk, t.image_size)
    ds = load_splits(t, transform).train
    loader = feature_loader(ds, 16, "cpu")
    assert isinstance(loader, PreparedBatches)
    fast, y_fast, sps = extract_features(tower, loader, "cpu")
    slow, y_slow, _ = extract_features(tower, DataLoader(ds, batch_size=16), "cpu")
    assert sps > 0 and fast.shape == (len(ds), tower(torch.zeros(1, 3, 32, 32)).shape[1])
    assert np.array_equal(fast, slow) and np.array_equal(y_fast, y_slow)


# --------------------------------------------------------------------------- cache


def test_cache_key_covers_what_changes_features():
    ident = "digits-v1"
    key = feature_cache_key(digits_trial(), ident, "cpu")[0]
    assert len(key) == 32
    # Pooled features (the default) come before the projection head: linear vs mlp, its bias and
    # width do not change them, so a proj sweep extracts once.
    same = [dict(unlocked_groups=1), dict(grad_checkpointing=True), dict(probe_batch_size=7),
            dict(channels_last=True), dict(compile=True), dict(knn=True), dict(freeze_bn_stats=True),
            dict(proj="mlp"), dict(proj_bias=True), dict(embed_dim=64), dict(shots="1,5")]
    for kw in same:
        assert feature_cache_key(digits_trial(**kw), ident, "cpu")[0] == key, kw
    changed = [dict(model="test_resnet"), dict(pretrained=True), dict(pool="token"), dict(proj="none"),
               dict(proj=""), dict(image_size=48), dict(seed=1), dict(precision="bf16"),
               dict(probe_features="projected")]
    for kw in changed:
        assert feature_cache_key(digits_trial(**kw), ident, "cpu")[0] != key, kw
    projected = feature_cache_key(digits_trial(probe_features="projected"), ident, "cpu")[0]
    for kw in (dict(proj="mlp"), dict(proj_bias=True), dict(embed_dim=64)):
        assert feature_cache_key(digits_trial(probe_features="projected", **kw), ident, "cpu")[0] != projected, kw
    attn = feature_cache_key(digits_trial(pool="abs_attn"), ident, "cpu")[0]  # the attention pool's width
    assert feature_cache_key(digits_trial(pool="abs_attn", embed_dim=64), ident, "cpu")[0] != attn
    assert feature_cache_key(digits_trial(), "digits-v2", "cpu")[0] != key
    assert feature_cache_key(digits_trial(), ident, "cuda:0")[0] != key


def test_cache_key_follows_the_feature_source(monkeypatch):
    key = feature_cache_key(digits_trial(), "d", "cpu")[0]
    monkeypatch.setattr(suite.probe.features, "FEATURE_SOURCES", suite.probe.features.FEATURE_SOURCES[:-1])
    assert feature_cache_key(digits_trial(), "d", "cpu")[0] != key


def test_cache_key_local_weights_file(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"1234")
    key = feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0]
    ckpt.write_bytes(b"12345")  # new weights at the same path
    assert feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0] != key
    key = feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0]
    os.utime(ckpt, ns=(5, 5))
    assert feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0] != key


def test_cache_round_trip_wrong_key_and_corruption(tmp_path):
    path = tmp_path / "f.npz"
    arrays = {"x_train": np.arange(6, dtype=np.float32).reshape(3, 2), "y_train": np.arange(3)}
    assert load_cached_features(path, "k") is None  # absent
    save_cached_features(path, "k", arrays, {"classes": ["a", "b"]})
    loaded, meta = load_cached_features(path, "k")
    assert meta["classes"] == ["a", "b"] and loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[n], arrays[n]) for n in arrays)
    assert load_cached_features(path, "other") is None and not path.exists()  # stale: removed
    save_cached_features(path, "k", arrays, {})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert load_cached_features(path, "k") is None and not path.exists()  # corrupt: removed


def test_pooled_features_come_before_the_projection_and_ignore_it():
    from suite.probe.features import PooledFeatures, probed_module
    from suite.tower.model import build_tower

    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for proj in ("linear", "mlp"):
        t = digits_trial(model="test_resnet", proj=proj, embed_dim=16)
        torch.manual_seed(0)
        tower = build_tower(t).eval()
        with torch.no_grad():
            outs[proj] = probed_module(tower, t)(x)
            assert isinstance(probed_module(tower, t), PooledFeatures)
            assert torch.equal(outs[proj], tower.trunk(x)) and outs[proj].shape[1] != 16
            projected = probed_module(tower, digits_trial(model="test_resnet", proj=proj, embed_dim=16,
                                                          probe_features="projected"))(x)
            assert projected.shape == (2, 16) and torch.equal(projected, tower(x))
    assert torch.equal(outs["linear"], outs["mlp"])  # the cache key may share them
    t = digits_trial(model="test_resnet", pool="abs_attn", embed_dim=16)
    torch.manual_seed(0)
    tower = build_tower(t).eval()
    with torch.no_grad():  # attention pooling is the pooling: kept; the projection after it is not
        assert torch.equal(probed_module(tower, t)(x), tower.head.pool(tower.trunk(x)))
    t = digits_trial(model="test_vit", proj="", embed_dim=16)
    tower = build_tower(t).eval()
    with torch.no_grad():  # proj '': the trunk's classifier projects; pre-logits are the pooled features
        assert probed_module(tower, t)(x).shape[1] == tower.trunk.num_features
