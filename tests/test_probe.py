"""Linear probe: classifier protocol, kNN, extraction, feature cache, probe_trial end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from suite.data import DatasetError, load_splits
from suite.options import Trial
from suite.probe import (
    extract_features,
    feature_cache_key,
    knn_accuracy,
    linear_probe,
    probe_trial,
)


def clusters(n_per_class: int, k: int, d: int = 32, noise: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * 1.5
    y = np.repeat(np.arange(k), n_per_class)
    x = means[y] + rng.standard_normal((len(y), d)) * noise
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def digits_trial(**kw) -> Trial:
    base = dict(model="test_vit", image_size=32, dataset="digits", max_per_class=20, device="cpu",
                probe_batch_size=64)
    base.update(kw)
    return Trial(**base)


# --------------------------------------------------------------------------- classifier


def test_linear_probe_metrics_and_determinism():
    x, y = clusters(60, 8, noise=2.0)
    xtr, ytr, xva, yva, xte, yte = x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:]
    r = linear_probe(xtr, ytr, xte, yte, x_val=xva, y_val=yva, Cs=[0.1, 1, 10])
    assert r.n_train == 300 and r.n_val == 100 and r.n_test == 80 and r.n_classes == 8
    assert r.solver == "sklearn"
    assert 50 < r.top1 <= 100 and r.top5 is not None and r.top5 >= r.top1
    assert 0 < r.balanced_accuracy <= 100
    assert r.C in (0.1, 1, 10) and [c for c, _ in r.sweep] == [0.1, 1, 10]
    assert dict(r.sweep)[r.C] == r.val_top1 == max(a for _, a in r.sweep)
    again = linear_probe(xtr, ytr, xte, yte, x_val=xva, y_val=yva, Cs=[0.1, 1, 10])
    assert dataclasses.replace(again, fit_time_s=0) == dataclasses.replace(r, fit_time_s=0)


def test_C_never_depends_on_test_labels():
    x, y = clusters(40, 6, noise=3.0)
    xtr, ytr, xte, yte = x[:180], y[:180], x[180:], y[180:]
    a = linear_probe(xtr, ytr, xte, yte, seed=3)
    b = linear_probe(xtr, ytr, xte, np.random.default_rng(0).permutation(yte), seed=3)
    assert a.C == b.C and a.sweep == b.sweep and a.val_top1 == b.val_top1
    assert a.top1 != b.top1  # the test labels did change what was scored


def test_holdout_without_val_and_top5_none():
    x, y = clusters(30, 4)
    r = linear_probe(x[:100], y[:100], x[100:], y[100:])
    assert r.top5 is None  # 4 classes: top-5 is meaningless
    assert r.n_val > 0 and r.n_train + r.n_val == 100
    assert r.top1 > 80


def test_torch_solver_matches_sklearn():
    x, y = clusters(50, 10, d=48, noise=2.5)
    kw = dict(x_val=x[300:400], y_val=y[300:400], Cs=[0.1, 1, 10], patience=None)
    args = (x[:300], y[:300], x[400:], y[400:])
    sk = linear_probe(*args, solver="sklearn", **kw)
    th = linear_probe(*args, solver="torch", **kw)
    assert th.solver == "torch"
    for (c1, a1), (c2, a2) in zip(sk.sweep, th.sweep):
        assert c1 == c2 and abs(a1 - a2) <= 2.0
    assert abs(sk.top1 - th.top1) <= 2.0


def test_patience_stops_sweep_past_the_peak():
    x, y = clusters(30, 5, noise=4.0)
    r = linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=np.logspace(-3, 4, 15), patience=2)
    best = [c for c, _ in r.sweep].index(r.C)
    assert len(r.sweep) <= best + 3  # the peak plus at most two worse values
    full = linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=np.logspace(-3, 4, 15), patience=None)
    assert len(full.sweep) == 15


def test_linear_probe_bad_args():
    x, y = clusters(10, 2)
    with pytest.raises(ValueError, match="both x_val and y_val"):
        linear_probe(x, y, x, y, x_val=x)
    with pytest.raises(ValueError, match="Cs="):
        linear_probe(x, y, x, y, Cs=[0, 1])
    with pytest.raises(ValueError, match="solver="):
        linear_probe(x, y, x, y, solver="newton")
    with pytest.raises(ValueError, match="CPU only"):
        linear_probe(x, y, x, y, solver="sklearn", device="cuda")
    assert linear_probe(x, y, x, y, device="cuda").solver == "sklearn"  # small: auto stays on the CPU
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, np.zeros_like(y), x, y)


def test_knn_accuracy():
    x, y = clusters(30, 3, noise=0.3)
    assert knn_accuracy(x[:60], y[:60], x[60:], y[60:]) == 100.0
    assert knn_accuracy(x[:5], y[:5], x[60:], y[60:], k=20) >= 0  # k larger than train is capped
    assert knn_accuracy(x[:60], y[:60], x[60:], (y[60:] + 1) % 3) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_solver_on_gpu_matches_cpu():
    x, y = clusters(50, 10, d=48, noise=2.5)
    kw = dict(Cs=[0.1, 1, 10], solver="torch", patience=None)
    cpu = linear_probe(x[:400], y[:400], x[400:], y[400:], **kw)
    gpu = linear_probe(x[:400], y[:400], x[400:], y[400:], device="cuda", **kw)
    assert abs(cpu.top1 - gpu.top1) <= 1.0


# --------------------------------------------------------------------------- extraction and cache


def test_extract_features_shapes():
    class Tower(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    loader = [(torch.ones(4, 3, 8, 8), torch.arange(4)), (torch.zeros(2, 3, 8, 8), torch.tensor([7, 8]))]
    x, y, sps = extract_features(Tower(), loader, "cpu", "fp32")
    assert x.dtype == np.float32 and x.shape == (6, 3) and y.tolist() == [0, 1, 2, 3, 7, 8]
    assert sps > 0 and np.all(x[:4] == 1)
    xb, _, _ = extract_features(Tower(), loader, "cpu", "bf16")
    assert xb.dtype == np.float32
    with pytest.raises(ValueError, match="precision="):
        extract_features(Tower(), loader, "cpu", "int8")


def test_in_memory_extraction_equals_per_image_path():
    from torch.utils.data import DataLoader

    from suite.data import PreparedBatches, eval_transform
    from suite.probe import _loader
    from suite.tower import build_tower

    t = digits_trial(max_per_class=4)
    torch.manual_seed(0)
    tower = build_tower(t)
    transform, _ = eval_transform(tower.trunk, t.image_size)
    ds = load_splits(t, transform).train
    loader = _loader(ds, 16, "cpu")
    assert isinstance(loader, PreparedBatches)
    fast, y_fast, sps = extract_features(tower, loader, "cpu")
    slow, y_slow, _ = extract_features(tower, DataLoader(ds, batch_size=16), "cpu")
    assert sps > 0 and fast.shape == (len(ds), tower(torch.zeros(1, 3, 32, 32)).shape[1])
    assert np.array_equal(fast, slow) and np.array_equal(y_fast, y_slow)


def test_cache_key_covers_what_changes_features():
    ident = "digits-v1"
    key = feature_cache_key(digits_trial(), ident, "cpu")[0]
    same = [dict(unlocked_groups=1), dict(grad_checkpointing=True), dict(probe_batch_size=7),
            dict(channels_last=True), dict(compile=True), dict(knn=True), dict(freeze_bn_stats=True)]
    for kw in same:
        assert feature_cache_key(digits_trial(**kw), ident, "cpu")[0] == key, kw
    changed = [dict(model="test_resnet"), dict(pretrained=True), dict(pool="token"), dict(proj="mlp"),
               dict(proj_bias=True), dict(embed_dim=64), dict(image_size=48), dict(seed=1),
               dict(precision="bf16")]
    for kw in changed:
        assert feature_cache_key(digits_trial(**kw), ident, "cpu")[0] != key, kw
    assert feature_cache_key(digits_trial(), "digits-v2", "cpu")[0] != key
    assert feature_cache_key(digits_trial(), ident, "cuda:0")[0] != key


def test_cache_key_local_weights_file(tmp_path):
    import os

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"1234")
    key = feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0]
    ckpt.write_bytes(b"12345")  # new weights at the same path
    assert feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0] != key
    key = feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0]
    os.utime(ckpt, ns=(5, 5))
    assert feature_cache_key(digits_trial(pretrained=str(ckpt)), "d", "cpu")[0] != key


def test_probe_trial_digits_cache_hit_invalidate_corrupt(tmp_path):
    t = digits_trial()
    first = probe_trial(t, cache_dir=tmp_path)
    assert first.probe_cache_hit is False
    assert first.probe_top1 > 30  # 10 classes: chance is 10%
    assert first.probe_n_classes == 10 and first.probe_n_test == 40 and first.probe_top5 is not None
    assert first.probe_extract_samples_per_sec > 0 and first.probe_skipped_images == 0
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))

    # A hit: identical numbers, no extraction; a lock/checkpointing change shares the features.
    hit = probe_trial(dataclasses.replace(t, unlocked_groups=0, probe_batch_size=16), cache_dir=tmp_path)
    assert hit.probe_cache_hit is True and hit.probe_extract_samples_per_sec is None
    assert (hit.probe_top1, hit.probe_C, hit.probe_balanced_accuracy) == (first.probe_top1, first.probe_C,
                                                                         first.probe_balanced_accuracy)

    # A corrupt file is detected, rebuilt, and gives the same numbers (random init is seeded).
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    rebuilt = probe_trial(t, cache_dir=tmp_path)
    assert rebuilt.probe_cache_hit is False and rebuilt.probe_top1 == first.probe_top1
    assert probe_trial(t, cache_dir=tmp_path).probe_cache_hit is True

    # A changed input (the seed changes the random weights) invalidates.
    other = probe_trial(dataclasses.replace(t, seed=1), cache_dir=tmp_path)
    assert other.probe_cache_hit is False and len(list(tmp_path.glob("*.npz"))) == 2


def test_probe_trial_identical_without_cache():
    t = digits_trial(model="test_convnext", max_per_class=12, knn=True)
    a = probe_trial(t, use_cache=False)
    b = probe_trial(t, use_cache=False)
    assert a.probe_cache_hit is False and a.probe_knn_top1 is not None
    fields = ("probe_top1", "probe_top5", "probe_balanced_accuracy", "probe_C", "probe_knn_top1")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_probe_trial_imagefolder_skips_bad(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "imgs"
    for c in (0, 1, 2):
        (root / f"d{c}").mkdir(parents=True)
        for i in np.flatnonzero(d.target == c)[:8]:
            Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(root / f"d{c}" / f"{i}.png")
    (root / "d2" / "bad.png").write_bytes(b"\x89PNG garbage")
    t = Trial(model="test_vit", image_size=32, dataset="imagefolder", root=str(root), device="cpu",
              skip_bad_images=True)
    r = probe_trial(t, cache_dir=tmp_path / "cache")
    assert r.probe_skipped_images == 1 and r.probe_n_classes == 3
    assert r.probe_n_train + r.probe_n_val + r.probe_n_test == 24
    assert r.probe_top5 is None
    with pytest.raises(DatasetError, match="bad.png"):
        probe_trial(dataclasses.replace(t, skip_bad_images=False), cache_dir=tmp_path / "cache")


def test_probe_trial_rejects_no_dataset_and_missing_cuda():
    with pytest.raises(DatasetError, match="set dataset"):
        probe_trial(Trial(model="test_vit"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            probe_trial(digits_trial(device="cuda"))


def test_split_sizes_reach_probe():
    s = load_splits(digits_trial())
    assert (len(s.train), len(s.val), len(s.test)) == (120, 40, 40)
