"""probe_trial end to end: digits and image folders, the feature cache, devices, determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from factories import digits_trial
from PIL import Image

from suite.core.errors import UnsupportedConfig
from suite.core.options import Trial
from suite.probe.datasets import DatasetError, load_splits
from suite.probe.engine import probe_trial


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
    assert a.probe_cache_hit is False
    assert 10 < a.probe_knn_top1 <= 100  # kNN on train + val: above chance, from one extraction
    fields = ("probe_top1", "probe_top5", "probe_balanced_accuracy", "probe_C", "probe_knn_top1")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_probe_trial_uses_the_given_tower():
    from suite.tower.model import build_tower

    t = digits_trial(max_per_class=8)
    torch.manual_seed(t.seed)
    given = probe_trial(t, tower=build_tower(t), use_cache=False)
    built = probe_trial(t, use_cache=False)
    assert (given.probe_top1, given.probe_C) == (built.probe_top1, built.probe_C)


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


def test_probe_trial_rejects_no_dataset_and_missing_cuda(monkeypatch):
    with pytest.raises(DatasetError, match="set dataset"):
        probe_trial(Trial(model="test_vit"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedConfig, match="CUDA is not available"):
        probe_trial(digits_trial(device="cuda"))


def test_split_sizes_reach_probe():
    s = load_splits(digits_trial())
    assert (len(s.train), len(s.val), len(s.test)) == (120, 40, 40)


def test_probe_records_intervals_correctness_and_few_shot(tmp_path):
    from suite.core.stats import unpack_correct
    from suite.probe.engine import parse_shots

    t = digits_trial(shots="1,3,all", shot_seeds=2)
    r = probe_trial(t, cache_dir=tmp_path)
    assert r.probe_top1_lo < r.probe_top1 < r.probe_top1_hi or r.probe_top1_hi == pytest.approx(100)
    assert r.probe_balanced_accuracy_lo <= r.probe_balanced_accuracy <= r.probe_balanced_accuracy_hi
    correct = unpack_correct(r.probe_test_correct, r.probe_n_test)
    assert correct.mean() * 100 == pytest.approx(r.probe_top1)
    assert set(r.probe_shots) == {"1", "3", "all"}
    assert r.probe_shots["1"]["seeds"] == [0, 1] and len(r.probe_shots["1"]["top1"]) == 2
    assert r.probe_shots["all"]["seeds"] == [0] and r.probe_shots["all"]["std"] == 0.0
    for v in r.probe_shots.values():
        assert min(v["top1"]) == v["min"] <= v["mean"] <= v["max"] == max(v["top1"])
    # the same test images: the same test-set hash; projected features: another number, same test set
    proj = probe_trial(dataclasses.replace(t, probe_features="projected", shots=None), cache_dir=tmp_path)
    assert proj.probe_test_set == r.probe_test_set
    assert proj.probe_cache_hit is False and proj.probe_shots is None
    assert parse_shots("1, 5,10,all") == [1, 5, 10, None]
    with pytest.raises(UnsupportedConfig, match="shots='0,5' has '0', which is not a positive integer or 'all'"):
        parse_shots("0,5")
