"""Probe data sets: digits, ImageFolder layouts, synthetic, and every bad-input case."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from factories import data_trial as trial
from factories import write_digits_folder
from PIL import Image

from suite.probe.datasets import (
    DATASETS,
    DatasetError,
    cap_per_class,
    check_dataset,
    get_loader,
    load_splits,
    stratified_split,
)
from suite.probe.images import eval_transform

# --------------------------------------------------------------------------- digits / synthetic


def test_digits_fixed_stratified_split():
    s = load_splits(trial(dataset="digits"))
    sizes = [len(s.train), len(s.val), len(s.test)]
    assert sum(sizes) == 1797
    assert abs(sizes[0] / 1797 - 0.6) < 0.01 and abs(sizes[2] / 1797 - 0.2) < 0.01
    assert s.classes == [str(i) for i in range(10)]
    for ds in (s.train, s.val, s.test):
        assert set(ds.labels.tolist()) == set(range(10))  # stratified: every class in every split
    # Fixed split: the trial's seed does not move it.
    s2 = load_splits(trial(dataset="digits", seed=5))
    assert s2.identity == s.identity
    assert np.array_equal(s2.test.images, s.test.images)


def test_digits_cap_and_transform():
    import timm

    s = load_splits(trial(dataset="digits", max_per_class=5))
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    assert "cap=5" in s.identity and s.identity != load_splits(trial(dataset="digits")).identity
    transform, cfg = eval_transform(timm.create_model("test_vit", num_classes=0), 40)
    assert cfg["input_size"] == (3, 40, 40)
    s.set_transform(transform)
    x, y = s.train[0]
    assert tuple(x.shape) == (3, 40, 40) and isinstance(y, int)
    assert float(x.min()) < 0  # mean/std normalized, not 0..1


def test_synthetic_deterministic_and_sized():
    s = load_splits(trial(dataset="synthetic", max_per_class=5, image_size=24))
    assert len(s.train) + len(s.val) + len(s.test) == 50
    x, y = s.test[3]
    assert tuple(x.shape) == (3, 24, 24)
    x2, _ = load_splits(trial(dataset="synthetic", max_per_class=5, image_size=24)).test[3]
    assert np.array_equal(x.numpy(), x2.numpy())


def test_unknown_dataset_suggests():
    assert set(DATASETS) == {"digits", "imagefolder", "synthetic", "textures"}
    with pytest.raises(DatasetError, match="did you mean 'digits'"):
        get_loader("digit")
    with pytest.raises(DatasetError, match="not known; choose one of digits, imagefolder, synthetic, textures$"):
        get_loader("zzz")  # nothing close: no suggestion


def test_cap_per_class_seeded_and_checked():
    labels = np.array([0] * 10 + [1] * 2)
    keep = cap_per_class(labels, 3, seed=0)
    assert np.bincount(labels[keep]).tolist() == [3, 2] and keep.tolist() == sorted(keep.tolist())
    assert np.array_equal(keep, cap_per_class(labels, 3, seed=0))
    assert not np.array_equal(keep, cap_per_class(labels, 3, seed=1))
    assert cap_per_class(labels, None, seed=0).tolist() == list(range(12))
    with pytest.raises(DatasetError, match="max_per_class=0"):
        cap_per_class(labels, 0, seed=0)


def test_stratified_split_needs_three_per_class():
    with pytest.raises(DatasetError, match="class 1 has 2"):  # no names given: the label
        stratified_split(np.array([0, 0, 0, 1, 1]), seed=0)
    tr, va, te = stratified_split(np.array([0] * 10 + [1] * 5), seed=0)
    assert (len(tr), len(va), len(te)) == (9, 3, 3)
    assert not set(tr) & set(va) and not set(va) & set(te)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_single_folder(tmp_path):
    write_digits_folder(tmp_path)
    t = trial(dataset="imagefolder", root=str(tmp_path))
    check_dataset(t)
    s = load_splits(t)
    assert s.classes == ["digit0", "digit1", "digit2"]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 3, 3)
    assert s.skipped == 0
    img, label = s.train[0]
    assert img.mode == "RGB" and label in (0, 1, 2)
    # The ratio split follows the trial's seed; the identity records it.
    other = load_splits(trial(dataset="imagefolder", root=str(tmp_path), seed=1))
    assert other.identity != s.identity


def test_imagefolder_split_folders(tmp_path):
    write_digits_folder(tmp_path, per_class=4, splits=("train", "val", "test"))
    s = load_splits(trial(dataset="imagefolder", root=str(tmp_path)))
    assert (len(s.train), len(s.val), len(s.test)) == (12, 12, 12)
    # Without val/, the probe holds part of train out itself.
    (tmp_path / "val").rename(tmp_path.parent / f"{tmp_path.name}-val-moved")
    s = load_splits(trial(dataset="imagefolder", root=str(tmp_path), max_per_class=2))
    assert s.val is None and (len(s.train), len(s.test)) == (6, 6)


def test_imagefolder_identity_changes_with_files(tmp_path):
    write_digits_folder(tmp_path)
    t = trial(dataset="imagefolder", root=str(tmp_path))
    before = load_splits(t).identity
    assert load_splits(t).identity == before
    path = next((tmp_path / "digit1").iterdir())
    Image.new("RGB", (16, 16), "white").save(path)
    os.utime(path, ns=(1, 1))
    assert load_splits(t).identity != before


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (write_digits_folder(root), (root / "empty").mkdir()), "empty contains no images"),
        (lambda root: write_digits_folder(root, classes=(3,)), "at least 2 classes"),
        (lambda root: (write_digits_folder(root, splits=("train", "test")),
                       (root / "test" / "digit7").mkdir(), Image.new("L", (8, 8)).save(root / "test/digit7/a.png")),
         "different classes.*train/ lacks digit7"),
        (lambda root: write_digits_folder(root, splits=("train", "val")), "no test/ folder"),
        (lambda root: (root.parent.mkdir(exist_ok=True), root.write_text("x")), "not a folder"),
    ],
    ids=["missing", "no-classes", "empty-class", "one-class", "split-classes-differ", "no-test", "root-is-file"],
)
def test_imagefolder_bad_input(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    t = trial(dataset="imagefolder", root=str(root))
    with pytest.raises(DatasetError, match=match):
        check_dataset(t)
    with pytest.raises(DatasetError, match=match):
        load_splits(t)


def test_imagefolder_needs_root():
    with pytest.raises(DatasetError, match="needs root"):
        check_dataset(trial(dataset="imagefolder"))


def test_too_few_images_to_split(tmp_path):
    write_digits_folder(tmp_path, per_class=2)
    with pytest.raises(DatasetError, match="at least 3.*train/, val/, test/"):
        check_dataset(trial(dataset="imagefolder", root=str(tmp_path)))


def test_a_class_with_one_image_is_named_by_its_folder(tmp_path):
    write_digits_folder(tmp_path, classes=(0, 1), per_class=5)
    write_digits_folder(tmp_path / "x", classes=(2,), per_class=1)
    (tmp_path / "x" / "digit2").rename(tmp_path / "rare_cat")
    (tmp_path / "x").rmdir()
    with pytest.raises(DatasetError) as info:
        check_dataset(trial(dataset="imagefolder", root=str(tmp_path)))
    assert "class 'rare_cat' has 1 image(s)" in str(info.value) and "class 2 " not in str(info.value)


def _corrupt(root: Path) -> tuple[Path, Path]:
    write_digits_folder(root)
    bad = root / "digit0" / "broken.png"
    bad.write_bytes(b"not a png at all")
    good = next(p for p in sorted((root / "digit1").iterdir()))
    truncated = root / "digit1" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])  # a valid header, a cut-off stream
    return bad, truncated


def test_corrupt_images_named(tmp_path):
    bad, truncated = _corrupt(tmp_path)
    with pytest.raises(DatasetError) as e:
        check_dataset(trial(dataset="imagefolder", root=str(tmp_path)))
    assert str(bad) in str(e.value) and str(truncated) in str(e.value)
    assert "2 unreadable" in str(e.value) and "skip_bad_images" in str(e.value)


def test_skip_bad_images_counts(tmp_path):
    _corrupt(tmp_path)
    t = trial(dataset="imagefolder", root=str(tmp_path), skip_bad_images=True)
    check_dataset(t)
    s = load_splits(t)
    assert s.skipped == 2
    assert len(s.train) + len(s.val) + len(s.test) == 18
    assert not any("broken" in p or "truncated" in p for p, _ in s.train.samples + s.val.samples + s.test.samples)


def test_skipping_that_empties_a_class_fails(tmp_path):
    write_digits_folder(tmp_path, classes=(0, 1))
    (tmp_path / "digit9").mkdir()
    (tmp_path / "digit9" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="no readable images of class digit9"):
        load_splits(trial(dataset="imagefolder", root=str(tmp_path), skip_bad_images=True))


def test_textures_derived_from_the_bundled_sample_photos():
    from suite.probe.datasets import TEXTURE_PER_CLASS, texture_patches

    images, labels = texture_patches()
    assert images.shape == (10 * TEXTURE_PER_CLASS, 16, 16) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [TEXTURE_PER_CLASS] * 10
    again, _ = texture_patches()
    assert np.array_equal(images, again)  # fixed: the same patches in every run
    s = load_splits(trial(dataset="textures"))
    assert len(s.classes) == 10 and s.classes[0] == "china-strip0" and s.identity.startswith("textures-v1")
    assert (len(s.train), len(s.val), len(s.test)) == (480, 160, 160)
