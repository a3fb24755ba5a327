"""Linear probe of one trial: how well a linear classifier on a tower's frozen features separates the classes.

`probe_trial` validates the data (`suite.probe.datasets`), takes the features from the cache or extracts them
(`suite.probe.features`), and fits and scores the classifier (`suite.probe.classifier`: logistic regression
with C chosen on validation, and optionally kNN).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from suite.core import options
from suite.core.errors import DatasetError, UnsupportedConfig
from suite.core.options import sha256_json
from suite.core.paths import cache_dir as default_cache_dir
from suite.core.records import ProbeResult
from suite.core.stats import balanced_interval, pack_correct, wilson_interval
from suite.machine.device import resolve_device
from suite.probe.classifier import knn_accuracy, linear_probe
from suite.probe.datasets import load_splits
from suite.probe.features import extract_splits, feature_cache_key, load_cached_features, save_cached_features


def probe_trial(trial, *, tower=None, device: str | None = None, cache_dir: str | Path | None = None,
                use_cache: bool = True) -> ProbeResult:
    """Linear-probe one trial's tower on its data set.

    Validates the data first (`suite.probe.datasets.load_splits`), then looks the features up in the cache; on
    a miss it builds the tower (seeding torch with `trial.seed` first, so random init is reproducible)
    and extracts every split.

    Args:
        trial: a `suite.core.options.Trial` with `dataset` set.
        tower: a built tower to use instead of `build_tower(trial)`. The cache key assumes it is what
            `build_tower(trial)` gives after `torch.manual_seed(trial.seed)`; pass `use_cache=False`
            for anything else.
        device: overrides `trial.device` ('auto' -> cuda when available).
        cache_dir: feature cache folder (default `suite.core.paths.cache_dir('features')`).
        use_cache: read and write the feature cache.

    Returns:
        ProbeResult with percent accuracies. `probe_extract_samples_per_sec` is None on a cache hit
        (nothing was extracted; batch size or channels_last may differ from the run that was).

    Raises:
        DatasetError: no data set, or data that cannot be used as given.
        UnsupportedConfig: device 'cuda' where CUDA is not available (`suite.machine.device.resolve_device`).
    """
    t0 = time.perf_counter()
    if trial.dataset in (None, "none"):
        raise DatasetError(f"dataset={trial.dataset!r}: set dataset (--dataset) to digits, imagefolder or synthetic to probe")
    device = resolve_device(device or trial.device)
    splits = load_splits(trial)  # validates before any tower is built or image extracted

    key, fields = feature_cache_key(trial, splits.identity, device)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir("features")) / f"{key}.npz"
    cached = load_cached_features(path, key) if use_cache else None
    speed = None
    if cached is not None:
        arrays = cached[0]
    else:
        arrays, speed = extract_splits(trial, splits, tower, device)
        if use_cache:
            save_cached_features(path, key, arrays, {"fields": fields, "classes": splits.classes})

    val = ({"x_val": arrays["x_val"], "y_val": arrays["y_val"]} if "x_val" in arrays else {})
    res = linear_probe(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                       seed=trial.seed, device=device, **val)
    knn = _knn(arrays) if trial.knn else None
    shots = few_shot(arrays, parse_shots(trial.shots), trial.shot_seeds, device) if trial.shots else None
    top1_lo, top1_hi = wilson_interval(int(res.correct.sum()), res.n_test)
    bal_lo, bal_hi = balanced_interval(res.y_test, res.correct)
    return ProbeResult(
        probe_top1_lo=top1_lo, probe_top1_hi=top1_hi,
        probe_balanced_accuracy_lo=bal_lo, probe_balanced_accuracy_hi=bal_hi,
        probe_test_set=sha256_json([splits.identity, arrays["y_test"].tolist()]),
        probe_test_correct=pack_correct(res.correct), probe_shots=shots,
        probe_top1=res.top1, probe_top5=res.top5, probe_balanced_accuracy=res.balanced_accuracy,
        probe_C=res.C, probe_val_top1=res.val_top1, probe_solver=res.solver, probe_knn_top1=knn,
        probe_n_train=res.n_train, probe_n_val=res.n_val,
        probe_n_test=res.n_test, probe_n_classes=res.n_classes, probe_extract_samples_per_sec=speed,
        probe_cache_hit=cached is not None, probe_skipped_images=splits.skipped,
        probe_time_s=time.perf_counter() - t0,
    )


def parse_shots(text: str) -> list[int | None]:
    """'1,5,10,all' -> [1, 5, 10, None] (see `suite.core.options.parse_shots`).

    Raises:
        UnsupportedConfig: an entry that is not a positive integer or 'all'.
    """
    try:
        return options.parse_shots(text)
    except ValueError as exc:
        raise UnsupportedConfig(f"shots={text!r} {exc}") from None


def _sample_shots(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k images per class (all of a class with fewer), sorted."""
    idx = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(idx))


def few_shot(arrays: dict[str, np.ndarray], shots: list[int | None], seeds: int, device: str) -> dict:
    """Probe top-1 with k labeled training images per class, for each k, over `seeds` samples.

    The same probe as the full one (C chosen on the validation split, or on a held-out part of the k
    images per class when there is none), but fitted on the k-shot sample alone: the validation
    split chooses C and never adds labels. k = None (all) is the full training split, one fit.

    A k above a class's training images takes all of that class (there are no more): the entry then
    says so, `capped: true` with `per_class` [fewest, most] images per class actually used, and the
    report shows it beside the figure, so `k=100000` over 6 images a class never reads as 100000 shots.

    Returns:
        {k or 'all': {'mean', 'std', 'min', 'max', 'top1': [per seed], 'seeds': [...], 'per_class',
        'capped'}} (percent).
    """
    if seeds < 1:
        raise UnsupportedConfig(f"shot_seeds={seeds}: give at least 1")
    x, y = arrays["x_train"], arrays["y_train"]
    val = ({"x_val": arrays["x_val"], "y_val": arrays["y_val"]} if "x_val" in arrays else {})
    out = {}
    for k in shots:
        runs = [0] if k is None else list(range(seeds))
        accs = []
        for seed in runs:
            take = np.arange(len(y)) if k is None else _sample_shots(y, k, np.random.default_rng(seed))
            if not val and len(take) < 2 * len(np.unique(y)):
                raise UnsupportedConfig(f"shots: k={k} leaves no images to choose C on without a validation split; use k >= 2")
            res = linear_probe(x[take], y[take], arrays["x_test"], arrays["y_test"], seed=seed, device=device,
                               refit=False, **val)
            accs.append(res.top1)
        out[str(k or "all")] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "min": min(accs),
                                "max": max(accs), "top1": accs, "seeds": runs, **shots_used(y, k)}
    return out


def shots_used(y: np.ndarray, k: int | None) -> dict:
    """Images per class a k-shot sample of labels `y` takes: [fewest, most], and whether k was capped."""
    counts = np.unique(y, return_counts=True)[1]
    taken = counts if k is None else np.minimum(counts, k)
    return {"per_class": [int(taken.min()), int(taken.max())], "capped": bool(k is not None and k > counts.min())}


def _knn(arrays: dict[str, np.ndarray]) -> float:
    """kNN top-1 on test with train (+ val, when there is one) as the neighbours."""
    fit = [name for name in ("train", "val") if f"x_{name}" in arrays]
    x = np.concatenate([arrays[f"x_{name}"] for name in fit])
    y = np.concatenate([arrays[f"y_{name}"] for name in fit])
    return knn_accuracy(x, y, arrays["x_test"], arrays["y_test"])
