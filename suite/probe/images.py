"""Probe images: image files on disk, images in memory, and the trunk's eval transform over them.

- Image folders: `scan_image_folder` lists `root/<class>/<image>` or
  `root/{train,val,test}/<class>/<image>` and checks the layout, naming the path and the fix in a
  `DatasetError`; `bad_image` says why a file cannot be decoded.
- Map-style datasets a DataLoader accepts: `FileImages` (files decoded as RGB) and `ArrayImages`
  (gray uint8 arrays in memory, the digits).
- `eval_transform`: the trunk's own timm eval transform at an image size.
- `in_memory_batches`: an `ArrayImages` split preprocessed once per (split, transform) and batched,
  with the same result as the per-image transform to the bit, so extraction keeps up with the tower.

Light at import: PIL, torch, torchvision and timm are imported inside the functions that use them,
so validating a data set (`suite.probe.datasets.check_dataset`, run by the sweep driver) never loads torch.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.core.errors import DatasetError

# The same extensions torchvision's ImageFolder accepts; other files (READMEs, .DS_Store) are ignored.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test")
# Preprocessed in-memory splits kept per process (LRU), so trials at the same image size reuse them.
# The full digits at 224 px take 90 MB; a split that would not fit streams instead.
PREPARED_BUDGET_BYTES = 1 << 30


# --------------------------------------------------------------------------- image folders


@dataclass
class ImageFolder:
    """The validated layout of an image folder.

    Attributes:
        root: the folder (user home expanded).
        layout: "splits" (train/, test/ and optional val/ folders) or "single" (one folder of
            class folders, split by ratios later).
        classes: class names, sorted; the same in every split folder.
        files: split name ("train", "val", "test"; "all" for a single folder) -> class -> sorted
            image paths.
    """

    root: Path
    layout: str
    classes: list[str]
    files: dict[str, dict[str, list[Path]]]


def _visible_dirs(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that are not hidden, sorted."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folders(folder: Path, hint: str) -> dict[str, list[Path]]:
    """`{class: sorted image files}` of one folder of class sub-folders, validated."""
    classes = _visible_dirs(folder)
    if not classes:
        raise DatasetError(
            f"no class folders in {folder}: put the images in {folder}/<class name>/<image> "
            f"(one sub-folder per class){hint}"
        )
    out = {}
    for d in classes:
        files = sorted(
            Path(dirpath) / f
            for dirpath, _, names in os.walk(d)
            for f in names
            if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")
        )
        if not files:
            raise DatasetError(
                f"class folder {d} contains no images ({', '.join(IMG_EXTENSIONS)}): add images or remove the folder"
            )
        out[d.name] = files
    if len(out) < 2:
        raise DatasetError(
            f"{folder} has {len(out)} class folder ({', '.join(out)}); a probe needs at least 2 classes: "
            f"add a folder per class"
        )
    return out


def _split_folders(root: Path, subdirs: set[str]) -> dict[str, dict[str, list[Path]]]:
    """The class folders of `root/{train,val,test}`, checked to be complete and alike."""
    if "test" not in subdirs:
        raise DatasetError(
            f"{root} has a train/ folder but no test/ folder: add {root}/test/<class>/... "
            f"(val/ is optional), or drop train/ and let the probe split one folder of class folders"
        )
    extra = sorted(subdirs - set(SPLIT_NAMES))
    if extra:
        raise DatasetError(
            f"{root} has split folders (train/, test/) and also {', '.join(extra)}: "
            f"move class folders into train/, val/ and test/"
        )
    per_split = {split: _class_folders(root / split, "") for split in SPLIT_NAMES if split in subdirs}
    names = {s: set(c) for s, c in per_split.items()}
    if len({frozenset(v) for v in names.values()}) > 1:
        all_names = set().union(*names.values())
        diffs = "; ".join(
            f"{s}/ lacks {', '.join(sorted(all_names - v))}" for s, v in names.items() if all_names - v
        )
        raise DatasetError(f"the split folders of {root} have different classes ({diffs}): give every split the same class folders")
    return per_split


def scan_image_folder(root: str) -> ImageFolder:
    """List and validate an image folder (without decoding any image).

    Raises:
        DatasetError: naming the path and the fix, for a missing root, no class folders, an empty
            class folder, fewer than two classes, or split folders that are incomplete or differ.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"root={root!r}: {path} does not exist; set root to a folder of class folders")
    if not path.is_dir():
        raise DatasetError(f"root={root!r}: {path} is not a folder; set root to a folder of class folders")
    subdirs = {d.name for d in _visible_dirs(path)}
    if "train" in subdirs:
        layout, files = "splits", _split_folders(path, subdirs)
    else:
        layout = "single"
        files = {"all": _class_folders(path, " (or train/, val/, test/ folders of class folders)")}
    return ImageFolder(path, layout, sorted(next(iter(files.values()))), files)


def bad_image(path: Path) -> str | None:
    """Why `path` cannot be decoded, or None. Decodes fully (JPEGs at reduced scale, which is fast
    and still reads the whole stream), so truncated files are caught, not only bad headers."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def to_rgb(im):
    """An 8-bit RGB copy of a PIL image, high-bit-depth gray (16-bit PNG/TIFF) scaled down to 8 bits.

    PIL's own `convert("RGB")` clips 16-bit gray values above 255 to white (a 16-bit photo comes out
    almost all white); here 0..65535 maps to 0..255.

    Raises:
        ValueError: a 32-bit integer image with values outside 0..65535, or a floating-point image
            (no known range to scale from): convert it to 8 or 16 bits first.
    """
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer image with values {a.min()}..{a.max()} (not 16-bit): no range to scale "
                             "to 8 bits from; convert it to an 8- or 16-bit PNG")
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise ValueError("floating-point image: no range to scale to 8 bits from; convert it to an 8- or 16-bit PNG")
    return im.convert("RGB")


# --------------------------------------------------------------------------- map-style datasets


class ArrayImages:
    """Small grayscale images held in memory (the digits), returned as RGB PIL through `transform`.

    Args:
        images: uint8 (N, H, W) gray levels.
        labels: int (N,).
        transform: applied to each RGB PIL image.
        key: identifies the images and labels (data set identity and split) for the preprocessed-split
            cache of `in_memory_batches`; None never caches. Whoever changes `images` after
            construction must change the key too.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
                 key: str | None = None):
        self.images, self.labels, self.transform, self.key = images, labels, transform, key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class FileImages:
    """Image files with labels, decoded with PIL as RGB and passed through `transform`."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None):
        self.samples, self.transform = samples, transform
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = to_rgb(im)
        except Exception as e:  # checked up front; only a file changed since then gets here
            raise DatasetError(f"cannot read image {path}: {e}. Remove or replace it, or set skip_bad_images") from e
        return (self.transform(img) if self.transform else img), label


# --------------------------------------------------------------------------- transforms


def eval_transform(trunk, image_size: int) -> tuple[Callable, dict]:
    """The trunk's own timm eval transform at `image_size`, and the data config it came from.

    Mean, std, interpolation and crop come from the trunk's pretrained config
    (`timm.data.resolve_data_config`), so the images are what the weights expect.
    """
    import timm.data

    cfg = timm.data.resolve_data_config(model=trunk)
    cfg["input_size"] = (3, image_size, image_size)
    return timm.data.create_transform(**cfg, is_training=False), cfg


# (split key, geometric steps) -> uint8 (N, H, W) pixels after the geometric steps; least recently used first.
_prepared: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_prepared_lock = threading.Lock()  # trials may run in threads (Ray)


def _split_eval_transform(transform: Callable) -> tuple[list, Callable] | None:
    """The (geometric PIL steps, Normalize) of a transform shaped like timm's eval transform:
    `Compose([Resize | CenterCrop, ..., ToTensor, Normalize])`; None for any other shape."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    if type(transform) is not T.Compose or len(transform.transforms) < 2:
        return None
    *geometric, to_tensor, normalize = transform.transforms
    if (all(type(t) in (T.Resize, T.CenterCrop) for t in geometric)
            and type(to_tensor) in (T.ToTensor, MaybeToTensor) and type(normalize) is T.Normalize):
        return geometric, normalize
    return None


def _geometric(steps: list, gray: np.ndarray):
    """The PIL image of one (H, W) gray array after the geometric steps.

    The per-image path converts to RGB first, which repeats the gray level in three equal bands;
    Resize and CenterCrop treat every band alike, so transforming the gray band once and repeating
    it afterwards gives the same pixels for a third of the work (tests compare the two).
    """
    from PIL import Image

    img = Image.fromarray(gray)
    for step in steps:
        img = step(img)
    return img


def _pixels(images: np.ndarray, steps: list) -> np.ndarray:
    """uint8 (N, H, W): every image through the geometric steps, once."""
    first = _geometric(steps, images[0])
    out = np.empty((len(images), first.height, first.width), dtype=np.uint8)
    for i, gray in enumerate(images):
        img = first if i == 0 else _geometric(steps, gray)
        out[i] = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width)
    return out


def _cached_pixels(key: tuple[str, str] | None, images: np.ndarray, steps: list) -> np.ndarray:
    """`_pixels`, from the per-process LRU cache when `key` is set."""
    if key is None:
        return _pixels(images, steps)
    with _prepared_lock:
        if key in _prepared:
            _prepared.move_to_end(key)
            return _prepared[key]
    pixels = _pixels(images, steps)
    with _prepared_lock:
        _prepared[key] = pixels
        while len(_prepared) > 1 and sum(p.nbytes for p in _prepared.values()) > PREPARED_BUDGET_BYTES:
            _prepared.popitem(last=False)
    return pixels


class PreparedBatches:
    """Contiguous `(images, labels)` batches of an in-memory split, preprocessed once (see
    `in_memory_batches`). Iterating does the preprocessing (or takes it from the cache), so a timed
    loop over the batches includes it."""

    def __init__(self, dataset: ArrayImages, batch_size: int, steps: list, normalize: Callable,
                 key: tuple[str, str] | None):
        self.dataset, self.batch_size, self.steps, self.normalize, self.key = dataset, batch_size, steps, normalize, key

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch
        from torchvision.transforms.functional import normalize

        pixels = _cached_pixels(self.key, self.dataset.images, self.steps)
        labels = torch.from_numpy(np.asarray(self.dataset.labels, dtype=np.int64))
        for start in range(0, len(pixels), self.batch_size):
            gray = torch.from_numpy(pixels[start:start + self.batch_size])
            # What ToTensor does to each image (to float32, then / 255), on the whole batch; the
            # gray band repeated as RGB; then what the trunk's Normalize does (its mean and std),
            # in place as the tensor is ours: fewer large allocations, the same arithmetic.
            x = gray.to(torch.float32).div_(255)[:, None].expand(-1, 3, -1, -1).contiguous()
            x = normalize(x, self.normalize.mean, self.normalize.std, inplace=True)
            yield x, labels[start:start + self.batch_size]


def in_memory_batches(dataset: Any, batch_size: int) -> PreparedBatches | None:
    """Fast batches of an in-memory split with the same pixels as its per-image transform, or None.

    Per-image PIL transforms and per-item DataLoader overhead cost more than a tiny tower's inference
    (about 3,400 against 10,000 images/s at 64 px on a CPU). Here the geometric steps (resize with
    the configured interpolation, center crop) run once per split and image size, cached per
    process (`PREPARED_BUDGET_BYTES`, least recently used out); ToTensor's scaling and the trunk's
    Normalize run on whole batches. The tensors are equal to the per-image path's, bit for bit.

    Returns:
        None, so the caller streams through a DataLoader with the per-image transform, when the
        dataset is not an `ArrayImages` of gray uint8 images with a timm-shaped eval transform
        (`_split_eval_transform`), or when its preprocessed pixels would exceed
        `PREPARED_BUDGET_BYTES`. That fallback is about memory and generality only: the
        preprocessing, and so the features, are the same.
    """
    if (not isinstance(dataset, ArrayImages) or dataset.transform is None or len(dataset) == 0
            or dataset.images.ndim != 3 or dataset.images.dtype != np.uint8):
        return None
    parts = _split_eval_transform(dataset.transform)
    if parts is None:
        return None
    steps, normalize = parts
    first = _geometric(steps, dataset.images[0])
    if len(dataset) * first.width * first.height > PREPARED_BUDGET_BYTES:
        return None
    key = None if dataset.key is None else (dataset.key, repr(steps))
    return PreparedBatches(dataset, batch_size, steps, normalize, key)
