"""Probe images: folder listing, decode checks, datasets, and the preprocessed in-memory batches."""
from __future__ import annotations

import pytest
import torch
from factories import data_trial as trial
from factories import write_digits_folder

from suite.core.errors import DatasetError
from suite.probe import images
from suite.probe.datasets import load_splits
from suite.probe.images import FileImages, bad_image, eval_transform, in_memory_batches, scan_image_folder

# --------------------------------------------------------------------------- folders and files


def test_scan_image_folder_layouts(tmp_path):
    single = scan_image_folder(str(write_digits_folder(tmp_path / "one", per_class=2)))
    assert single.layout == "single" and single.classes == ["digit0", "digit1", "digit2"]
    assert list(single.files) == ["all"] and [len(v) for v in single.files["all"].values()] == [2, 2, 2]
    split = scan_image_folder(str(write_digits_folder(tmp_path / "two", per_class=2, splits=("train", "test"))))
    assert split.layout == "splits" and list(split.files) == ["train", "test"]
    assert all(p.suffix == ".png" for files in split.files["test"].values() for p in files)


def test_scan_image_folder_ignores_hidden_and_other_files(tmp_path):
    root = write_digits_folder(tmp_path, classes=(0, 1), per_class=2)
    (root / ".git").mkdir()
    (root / "digit0" / "README.txt").write_text("notes")
    (root / "digit0" / ".hidden.png").write_bytes(b"x")
    folder = scan_image_folder(str(root))
    assert folder.classes == ["digit0", "digit1"] and len(folder.files["all"]["digit0"]) == 2


def test_bad_image_and_file_images(tmp_path):
    root = write_digits_folder(tmp_path, classes=(0, 1), per_class=1)
    good = next((root / "digit0").iterdir())
    broken = root / "broken.png"
    broken.write_bytes(b"not a png")
    assert bad_image(good) is None and "broken.png" in bad_image(broken)
    ds = FileImages([(str(good), 0), (str(broken), 1)])
    img, label = ds[0]
    assert img.mode == "RGB" and label == 0 and ds.labels.tolist() == [0, 1]
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        ds[1]


# --------------------------------------------------------------------------- preprocessed in-memory splits


def _digits_with_transform(size: int, max_per_class: int = 3, **cfg):
    import timm

    trunk = timm.create_model("test_vit", num_classes=0)
    trunk.pretrained_cfg = dict(trunk.pretrained_cfg, **cfg)
    transform, _ = eval_transform(trunk, size)
    return load_splits(trial(dataset="digits", max_per_class=max_per_class, image_size=size), transform)


@pytest.mark.parametrize("size, cfg", [
    (40, {}),  # test_vit: bicubic, crop 0.95, mean/std 0.5
    (24, {"interpolation": "bilinear", "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
])
def test_in_memory_batches_equal_per_image_transform(size, cfg):
    s = _digits_with_transform(size, **cfg)
    for _, ds in s.items():
        fast = in_memory_batches(ds, batch_size=4)
        assert fast is not None and len(fast) == -(-len(ds) // 4)
        batches = list(fast)
        assert [len(y) for _, y in batches[:-1]] == [4] * (len(batches) - 1)
        x = torch.cat([b for b, _ in batches])
        y = torch.cat([b for _, b in batches])
        per_image = torch.stack([ds[i][0] for i in range(len(ds))])
        assert x.dtype == torch.float32 and x.shape == (len(ds), 3, size, size)
        assert torch.equal(x, per_image)  # bit for bit: the features cannot change
        assert y.tolist() == ds.labels.tolist()


def test_in_memory_cache_reuses_and_bounds_memory(monkeypatch):
    monkeypatch.setattr(images, "_prepared", type(images._prepared)())
    s32 = _digits_with_transform(32)
    list(in_memory_batches(s32.train, 8))
    (key, pixels), = images._prepared.items()
    assert key[0] == s32.train.key and pixels.shape == (len(s32.train), 32, 32)
    # Another trial at the same size (a new Splits object) reuses the pixels.
    again = _digits_with_transform(32)
    list(in_memory_batches(again.train, 8))
    assert len(images._prepared) == 1 and images._prepared[key] is pixels
    # Another size is another entry; past the budget the least recently used goes.
    list(in_memory_batches(_digits_with_transform(16).train, 8))
    assert len(images._prepared) == 2
    monkeypatch.setattr(images, "PREPARED_BUDGET_BYTES", pixels.nbytes + 1)
    list(in_memory_batches(s32.val, 8))
    assert [k[0] for k in images._prepared] == [s32.val.key]
    # A split over the budget streams instead (the per-image path), and is not cached.
    monkeypatch.setattr(images, "PREPARED_BUDGET_BYTES", pixels.nbytes - 1)
    assert in_memory_batches(s32.train, 8) is None


def test_in_memory_batches_only_for_known_shapes(tmp_path):
    import torchvision.transforms as T

    s = _digits_with_transform(16)
    transform = s.train.transform
    assert in_memory_batches(load_splits(trial(dataset="digits", max_per_class=3)).train, 4) is None  # no transform
    s.set_transform(T.Compose([T.Grayscale(3)] + transform.transforms))  # an unknown step: stream
    assert in_memory_batches(s.train, 4) is None
    syn = load_splits(trial(dataset="synthetic", max_per_class=3, image_size=16), transform)
    assert in_memory_batches(syn.train, 4) is None
    files = load_splits(trial(dataset="imagefolder", root=str(write_digits_folder(tmp_path, per_class=3))), transform)
    assert in_memory_batches(files.train, 4) is None


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    # issue 14.5: PIL's convert("RGB") of an I;16 image clipped ~99% of the pixels to white.
    import numpy as np
    from PIL import Image

    levels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB"))[..., 0] == 255).mean() > 0.9  # what PIL alone does
    img, label = FileImages([(str(tmp_path / "deep.png"), 3)])[0]
    rgb = np.asarray(img)
    assert label == 3 and rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], (levels >> 8).astype(np.uint8))  # full range kept: 0..255
    assert (rgb[..., 0] == 255).mean() < 0.01


def test_images_without_a_known_range_are_refused_by_name(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((8, 8), 1e6, dtype=np.float32), "F").save(tmp_path / "float.tiff")
    with pytest.raises(DatasetError, match="float.tiff.*floating-point image"):
        FileImages([(str(tmp_path / "float.tiff"), 0)])[0]
