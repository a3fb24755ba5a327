"""Probe data sets: the built-in digits, the user's ImageFolder, synthetic tensors.

Each data set gives three splits (train, val, test) of `(image, label)` pairs plus an identity string
that changes whenever the images, labels or split assignment change, so extracted features can be
cached by it (see `suite.probe.features`).

- `digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes, shipped with scikit-learn),
  given three channels and upscaled by the tower's own eval transform. The split is a fixed stratified
  60/20/20 split with seed 0, independent of `trial.seed`: it is a fixed benchmark, like a
  published data set's official split, so probe numbers are comparable across trials and seeds.
- `imagefolder`: `root/<class>/<image>`, or `root/{train,val,test}/<class>/<image>` (`val/` optional:
  without it the probe holds a stratified part of train out for choosing C). A single folder is split
  per class 60/20/20 with `trial.seed`.
- `textures`: a data set derived here from the two photographs scikit-learn ships
  (`load_sample_images`: china.jpg, flower.jpg; no download): each photo is cut into 5 vertical
  strips, one class per strip (10 classes), and `TEXTURE_PER_CLASS` 16x16 gray patches are cropped at
  seeded random positions in each strip. A texture/region task unlike the digits, small and fixed
  (split seed 0, like the digits), so the multi-data-set path runs offline. It is not a published
  benchmark: treat its numbers as a second opinion, not a quality claim.
- `synthetic`: class-structured random tensors at the tower's image size, already normalized (the
  transform is not applied), `max_per_class` (default 100) per class, 10 classes: for speed work.

The images themselves (folder listing, decoding, the eval transform, in-memory preprocessing) are
`suite.probe.images`. `max_per_class` caps images per class (per split folder when the folder has splits;
before splitting otherwise), choosing them with the seed. Validation (`check_dataset`) runs before
any image is decoded for features and raises `DatasetError` naming the path and the fix.

Light at import: no torch (datasets are plain map-style objects that a DataLoader accepts).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from suite.core.errors import DatasetError, suggest  # DatasetError is also imported from here by callers
from suite.core.options import sha256_json
from suite.probe.images import SPLIT_NAMES, ArrayImages, FileImages, ImageFolder, bad_image, scan_image_folder

SPLIT_RATIOS = (0.6, 0.2, 0.2)  # train/val/test for data sets without split folders
DIGITS_SPLIT_SEED = 0  # the digits split is fixed: see the module docstring
SYNTHETIC_CLASSES = 10
SYNTHETIC_PER_CLASS = 100
TEXTURE_STRIPS = 5  # classes per photo
TEXTURE_PER_CLASS = 80
TEXTURE_PATCH = 16
_MAX_LISTED = 5  # bad paths named in one error message


@dataclass
class Splits:
    """The three splits of a probe data set.

    Attributes:
        train: map-style dataset of `(image tensor, label)`.
        val: like train, or None when the data set has no validation split (the probe holds out
            part of train).
        test: like train.
        classes: class names; label `i` is `classes[i]`.
        identity: changes whenever the images, labels or split assignment change (cache key part).
        skipped: unreadable images left out (only with `skip_bad_images`).
    """

    train: Any
    val: Any | None
    test: Any
    classes: list[str]
    identity: str
    skipped: int = 0

    def items(self) -> list[tuple[str, Any]]:
        """The present splits as `(name, dataset)`, in train/val/test order."""
        return [(n, d) for n, d in zip(SPLIT_NAMES, (self.train, self.val, self.test)) if d is not None]

    def set_transform(self, transform: Callable | None) -> None:
        """Set the image transform of every split (the tower's eval transform)."""
        for _, ds in self.items():
            ds.transform = transform


# --------------------------------------------------------------------------- splitting helpers


def stratified_split(labels: np.ndarray, seed: int, ratios=SPLIT_RATIOS,
                     classes: list[str] | None = None) -> tuple[np.ndarray, ...]:
    """Split indices per class by `ratios`, at least one image per class in each split.

    Args:
        classes: class names (label i is classes[i]), so an error names the class, not its index.

    Returns:
        Sorted index arrays, one per ratio. A class with fewer images than splits raises DatasetError.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in ratios]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        name = repr(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)
        # The later splits (val, test) get round(n * ratio), at least 1; train keeps the rest.
        sizes = [max(1, round(len(idx) * r)) for r in ratios[1:]]
        sizes = [len(idx) - sum(sizes)] + sizes
        if len(idx) < len(ratios) or sizes[0] < 1:
            raise DatasetError(f"class {name} has {len(idx)} image(s); a train/val/test split needs at least "
                               f"{len(ratios)} per class")
        start = 0
        for part, size in zip(parts, sizes):
            part.extend(idx[start:start + size].tolist())
            start += size
    return tuple(np.array(sorted(p), dtype=np.int64) for p in parts)


def cap_per_class(labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most `cap` items per class, chosen with `seed` (all when cap is None)."""
    if cap is None:
        return np.arange(len(labels))
    if cap < 1:
        raise DatasetError(f"max_per_class={cap}: must be at least 1 (or null for no cap)")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(idx if len(idx) <= cap else rng.choice(idx, cap, replace=False))
    return np.array(sorted(keep), dtype=np.int64)


# --------------------------------------------------------------------------- digits


def _digits(trial) -> Splits:
    """scikit-learn's digits in the fixed split (see the module docstring)."""
    from sklearn.datasets import load_digits  # scikit-learn loads only for this data set

    d = load_digits()
    # 0..16 gray levels -> 0..255 uint8, the range PIL and timm's transforms expect.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _fixed_splits(images, d.target.astype(np.int64), "digits-v1", trial, [str(i) for i in range(10)])


def _fixed_splits(images: np.ndarray, labels: np.ndarray, name: str, trial, classes: list[str]) -> Splits:
    """In-memory gray images capped by `trial.max_per_class` and split with the fixed seed."""
    keep = cap_per_class(labels, trial.max_per_class, DIGITS_SPLIT_SEED)
    images, labels = images[keep], labels[keep]
    try:
        parts = stratified_split(labels, DIGITS_SPLIT_SEED, classes=classes)
    except DatasetError as e:
        raise DatasetError(f"{name}: {e}: raise max_per_class (at least 3) or set it to null") from None
    identity = f"{name}:split_seed={DIGITS_SPLIT_SEED}:cap={trial.max_per_class}"
    train, val, test = (ArrayImages(images[p], labels[p], key=f"{identity}:{split}")
                        for split, p in zip(SPLIT_NAMES, parts))
    return Splits(train, val, test, classes, identity)


# --------------------------------------------------------------------------- textures


def texture_patches(per_class: int = TEXTURE_PER_CLASS, seed: int = DIGITS_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 gray patches (N, 16, 16), labels (N,)) cropped from scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images  # scikit-learn loads only for this data set

    rng = np.random.default_rng(seed)
    patches, labels = [], []
    for i, photo in enumerate(load_sample_images().images):
        gray = np.round(photo.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        h, w = gray.shape
        strip = w // TEXTURE_STRIPS
        for j in range(TEXTURE_STRIPS):
            ys = rng.integers(0, h - TEXTURE_PATCH + 1, per_class)
            xs = rng.integers(j * strip, (j + 1) * strip - TEXTURE_PATCH + 1, per_class)
            patches.extend(gray[y:y + TEXTURE_PATCH, x:x + TEXTURE_PATCH] for y, x in zip(ys, xs))
            labels.extend([i * TEXTURE_STRIPS + j] * per_class)
    return np.stack(patches), np.array(labels, dtype=np.int64)


def _textures(trial) -> Splits:
    """The textures data set in its fixed split (see the module docstring)."""
    images, labels = texture_patches()
    names = [f"{photo}-strip{j}" for photo in ("china", "flower") for j in range(TEXTURE_STRIPS)]
    return _fixed_splits(images, labels, f"textures-v1:n={TEXTURE_PER_CLASS}:patch={TEXTURE_PATCH}", trial, names)


# --------------------------------------------------------------------------- synthetic


class SyntheticImages:
    """Class-structured random tensors: a per-class low-resolution pattern plus per-image noise.

    Already normalized (about zero mean, unit variance), so no transform applies. Each item is
    generated from its own seed, so any size costs no memory and any order gives the same tensors.
    """

    def __init__(self, labels: np.ndarray, ids: np.ndarray, image_size: int, seed: int):
        self.labels, self.ids, self.image_size, self.seed = labels, ids, image_size, seed
        self.transform = None  # accepted and ignored: the tensors are already normalized

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        import torch  # items are made only at extraction: validating stays light
        import torch.nn.functional as F

        label = int(self.labels[i])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + label)
        pattern = torch.randn(1, 3, 4, 4, generator=g)
        base = F.interpolate(pattern, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        g.manual_seed(self.seed * 1_000_003 + 7919 * (int(self.ids[i]) + 1))
        noise = torch.randn(3, self.image_size, self.image_size, generator=g)
        return (0.6 * base + 0.8 * noise), label


def _synthetic(trial) -> Splits:
    """`max_per_class` synthetic images per class, split with `trial.seed`."""
    per_class = trial.max_per_class or SYNTHETIC_PER_CLASS
    if per_class < 3:
        raise DatasetError(f"max_per_class={per_class}: dataset=synthetic needs at least 3 per class (train/val/test)")
    labels = np.repeat(np.arange(SYNTHETIC_CLASSES), per_class)
    ids = np.arange(len(labels))
    parts = stratified_split(labels, trial.seed)
    train, val, test = (SyntheticImages(labels[p], ids[p], trial.image_size, trial.seed) for p in parts)
    identity = f"synthetic-v1:n={per_class}:size={trial.image_size}:seed={trial.seed}"
    return Splits(train, val, test, [f"class{i}" for i in range(SYNTHETIC_CLASSES)], identity)


# --------------------------------------------------------------------------- imagefolder


@dataclass
class _Scan:
    """The validated file lists of an image folder: split name -> list of (path, label)."""

    layout: str  # "splits" (train/val/test folders) or "single" (split by ratios)
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]
    skipped: int
    identity: str


def _readable_files(folder: ImageFolder, trial) -> tuple[dict[str, list[tuple[str, int]]], int]:
    """Per split, the `(path, label)` kept by `max_per_class` that decode, and how many were skipped.

    Raises:
        DatasetError: unreadable images (naming them) unless `skip_bad_images`.
    """
    label_of = {c: i for i, c in enumerate(folder.classes)}
    files: dict[str, list[tuple[str, int]]] = {}
    skipped, bad = 0, []
    for split, by_class in folder.files.items():
        paths = [p for c in folder.classes for p in by_class[c]]
        labels = np.array([label_of[c] for c in folder.classes for _ in by_class[c]], dtype=np.int64)
        keep = cap_per_class(labels, trial.max_per_class, trial.seed)  # cap first: a quick run checks fewer files
        kept = []
        for i in keep:
            why = bad_image(paths[i])
            if why is None:
                kept.append((str(paths[i]), int(labels[i])))
            elif trial.skip_bad_images:
                skipped += 1
            else:
                bad.append(f"{paths[i]} ({why})")
        files[split] = kept
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED]) + (f"; and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
        raise DatasetError(
            f"{len(bad)} unreadable image(s) under {folder.root}: {listed}. Remove or replace them, "
            f"or set skip_bad_images (--skip-bad-images) to leave them out"
        )
    return files, skipped


def _check_every_class_left(folder: ImageFolder, files: dict[str, list[tuple[str, int]]]) -> None:
    """Skipping may have emptied a class: the split would silently lose it."""
    for split, kept in files.items():
        present = {label for _, label in kept}
        missing = [c for i, c in enumerate(folder.classes) if i not in present]
        if missing:
            where = folder.root / split if folder.layout == "splits" else folder.root
            raise DatasetError(
                f"after skipping unreadable images, {where} has no readable images of class "
                f"{', '.join(missing)}: replace the bad files"
            )


def _split_single(folder: ImageFolder, samples: list[tuple[str, int]],
                  seed: int) -> dict[str, list[tuple[str, int]]]:
    """A single folder's samples split per class by `SPLIT_RATIOS` with `seed`."""
    labels = np.array([label for _, label in samples], dtype=np.int64)
    try:
        parts = stratified_split(labels, seed, classes=folder.classes)
    except DatasetError as e:
        raise DatasetError(f"{folder.root}: {e}: add images to that class, or give train/, val/, test/ folders") from e
    return {s: [samples[i] for i in p] for s, p in zip(SPLIT_NAMES, parts)}


def _scan_imagefolder(trial) -> _Scan:
    """The trial's image folder, validated, capped, checked image by image and split."""
    if not trial.root:
        raise DatasetError("dataset=imagefolder needs root: set root (--root PATH) to a folder of class folders")
    folder = scan_image_folder(trial.root)
    files, skipped = _readable_files(folder, trial)
    _check_every_class_left(folder, files)
    if folder.layout == "single":
        files = _split_single(folder, files.pop("all"), trial.seed)

    # Identity: every file with its size and mtime, its label and its split.
    stat = []
    for split, samples in files.items():
        for path, label in samples:
            st = os.stat(path)
            stat.append((split, os.path.relpath(path, folder.root), label, st.st_size, st.st_mtime_ns))
    identity = "imagefolder-v1:" + sha256_json([str(folder.root.resolve()), folder.layout, folder.classes, stat])
    return _Scan(folder.layout, folder.classes, files, skipped, identity)


def _imagefolder(trial) -> Splits:
    """The trial's image folder as `FileImages` splits."""
    scan = _scan_imagefolder(trial)
    split = {s: FileImages(scan.files[s]) if s in scan.files else None for s in SPLIT_NAMES}
    return Splits(split["train"], split["val"], split["test"], scan.classes, scan.identity, scan.skipped)


# --------------------------------------------------------------------------- registry and entry points

DATASETS: dict[str, Callable[[Any], Splits]] = {
    "digits": _digits,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
    "textures": _textures,
}


def get_loader(name: str) -> Callable[[Any], Splits]:
    """The split loader registered as `name`; an unknown name raises DatasetError with suggestions."""
    if name in DATASETS:
        return DATASETS[name]
    raise DatasetError(f"dataset={name!r} is not known; choose one of {', '.join(DATASETS)}"
                       f"{suggest(name, DATASETS, n=1)}")


def check_dataset(trial) -> None:
    """Validate the trial's probe data before any work; raise DatasetError naming the path and the fix.

    Checks a missing root, no class folders, an empty class folder, fewer than two classes, classes
    that differ between split folders, and unreadable or corrupt images (unless `skip_bad_images`).
    Every image is decoded once (JPEGs at reduced scale), so this costs a fraction of extraction.
    """
    if trial.dataset == "imagefolder":
        _scan_imagefolder(trial)
    else:
        get_loader(trial.dataset)(trial)  # digits/synthetic: building the splits is the check


def load_splits(trial, transform: Callable | None = None) -> Splits:
    """The trial's train/val/test splits, validated as `check_dataset` does.

    Args:
        trial: a `suite.core.options.Trial`; reads dataset, root, max_per_class, seed, skip_bad_images,
            image_size (synthetic).
        transform: applied to each PIL image (the tower's eval transform); can be set later with
            `Splits.set_transform`.
    """
    splits = get_loader(trial.dataset)(trial)
    splits.set_transform(transform)
    return splits
