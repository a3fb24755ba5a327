"""Linear probe: how well a linear classifier on a tower's frozen features separates the classes.

The protocol of CLIP, Kornblith et al. 2019 and DINOv2: features from the tower in eval mode,
L2-normalized; multinomial logistic regression (L-BFGS) with the inverse regularization C swept over
a log grid on a validation split (warm-started from strong to weak regularization, stopping
`DEFAULT_PATIENCE` values past the validation peak), refit on train+val at the best C and scored once
on test. C follows scikit-learn's convention: the objective
is `C * sum_i log_loss_i + ||W||^2 / 2` (intercept not penalized).

Two solvers give the same fit: scikit-learn's lbfgs for small problems, and a torch L-BFGS (float32,
also on GPU) for large ones, where scikit-learn is several times slower per iteration (see
benchmarks/bench_probe.py).

Features are cached on disk (`feature_cache_key`), keyed by everything that changes them and by
nothing that does not (lock depth, checkpointing, batch size, channels_last, compile), so a lock-depth
sweep extracts once.

This module imports torch lazily; numpy and scikit-learn are imported at module level.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.records import ProbeResult

log = logging.getLogger(__name__)

# Half-decade log grid, strong to weak regularization; wide enough for a few hundred to a million
# L2-normalized samples (the useful C scales with 1 / n_samples).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-2, 4, 13))
DEFAULT_PATIENCE = 3  # C values past the validation peak before the sweep stops
HOLDOUT_FRACTION = 0.2  # of train, for choosing C when no validation split is given
TORCH_SOLVER_MIN_WORK = 2e7  # n_samples * n_features * n_classes above which 'auto' uses torch
CACHE_VERSION = 1
SOLVERS = ("auto", "sklearn", "torch")


@dataclass(frozen=True)
class LinearProbeResult:
    """What `linear_probe` returns. Accuracies are percent.

    Attributes:
        top1: test top-1 accuracy.
        top5: test top-5 accuracy; None with 5 classes or fewer.
        balanced_accuracy: test mean per-class recall.
        C: the inverse regularization chosen on the validation split.
        val_top1: validation top-1 at the chosen C.
        n_train / n_val / n_test: samples (n_val counts the held-out part of train when no
            validation split was given; the refit uses n_train + n_val).
        n_classes: classes seen in train (+ val).
        solver: 'sklearn' or 'torch'.
        sweep: `(C, validation top-1)` for every C tried, in order.
        fit_time_s: wall time of the sweep and the refit.
    """

    top1: float
    top5: float | None
    balanced_accuracy: float
    C: float
    val_top1: float
    n_train: int
    n_val: int
    n_test: int
    n_classes: int
    solver: str
    sweep: tuple[tuple[float, float], ...]
    fit_time_s: float


# --------------------------------------------------------------------------- classifier


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (keep, held-out) indices: round(fraction * n) per class, at least one when the class
    has two or more samples, so every class that can be validated is."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held.extend(idx[:n_held])
        keep.extend(idx[n_held:])
    return np.array(sorted(keep), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


class _SklearnSolver:
    """scikit-learn lbfgs, warm-started across C."""

    name = "sklearn"

    def __init__(self, n_classes: int, max_iter: int = 200, refit_max_iter: int = 500, tol: float = 1e-4, **_):
        from sklearn.linear_model import LogisticRegression

        # Iteration caps: near-separable data at weak regularization never meets tol, and past a
        # few hundred iterations only the weights' scale grows, not the accuracy.
        self.n_classes, self.max_iter, self.refit_max_iter = n_classes, max_iter, refit_max_iter
        self.model = LogisticRegression(max_iter=max_iter, tol=tol, warm_start=True)

    def fit(self, x, y, C, state=None, refit=False):
        from sklearn.exceptions import ConvergenceWarning

        self.model.set_params(C=C, max_iter=self.refit_max_iter if refit else self.max_iter)
        if state is not None:  # warm start from a given solution (the refit starts from the best sweep fit)
            self.model.coef_, self.model.intercept_ = state[0].copy(), state[1].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(x, y)
        return self.model.coef_.copy(), self.model.intercept_.copy()

    def logits(self, state, x) -> np.ndarray:
        return x @ state[0].T + state[1]


class _TorchSolver:
    """Multinomial logistic regression by full-batch torch L-BFGS (strong Wolfe line search), float32.

    Same objective as scikit-learn (divided by C * n): mean log loss + ||W||^2 / (2 C n). The data
    stays on `device` across the sweep; everything is deterministic for a fixed device and thread count.
    """

    name = "torch"

    def __init__(self, n_classes: int, device: str = "cpu", max_iter: int = 30, refit_max_iter: int = 100,
                 tol: float = 1e-5, **_):
        self.n_classes, self.device = n_classes, device
        self.max_iter, self.refit_max_iter, self.tol = max_iter, refit_max_iter, tol
        self._host: tuple | None = None  # the numpy arrays last moved to the device
        self._dev: tuple | None = None

    def _tensors(self, x, y):
        import torch

        # The same arrays come back for every C: move them to the device once.
        if self._host is None or self._host[0] is not x or self._host[1] is not y:
            self._host = (x, y)
            self._dev = (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        return self._dev

    def fit(self, x, y, C, state=None, refit=False):
        import torch
        import torch.nn.functional as F

        xt, yt = self._tensors(x, y)
        n, d = xt.shape
        if state is None:
            w = torch.zeros(d, self.n_classes, device=self.device)
            b = torch.zeros(self.n_classes, device=self.device)
        else:
            w = torch.from_numpy(state[0].T.copy()).to(self.device)
            b = torch.from_numpy(state[1].copy()).to(self.device)
        w.requires_grad_(True)
        b.requires_grad_(True)
        reg = 0.5 / (C * n)
        opt = torch.optim.LBFGS(
            [w, b], lr=1, max_iter=self.refit_max_iter if refit else self.max_iter, history_size=20,
            line_search_fn="strong_wolfe", tolerance_grad=self.tol, tolerance_change=1e-7,
        )
        evals = [0]

        def closure():
            evals[0] += 1
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(xt @ w + b, yt) + reg * (w * w).sum()
            loss.backward()
            return loss

        # Near convergence at weak regularization many softmax probabilities underflow to float32
        # denormals, which make CPU matmuls ~10x slower: flush them to zero while fitting.
        flush = torch.set_flush_denormal(True)
        try:
            with torch.enable_grad():
                opt.step(closure)
        finally:
            if flush:
                torch.set_flush_denormal(False)
        log.debug("torch L-BFGS at C=%g (n=%d, refit=%s): %d evaluations", C, n, refit, evals[0])
        return w.detach().T.cpu().numpy().copy(), b.detach().cpu().numpy().copy()

    def logits(self, state, x) -> np.ndarray:
        return x @ state[0].T + state[1]


def _make_solver(solver: str, n: int, d: int, k: int, device: str | None):
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {', '.join(SOLVERS)}")
    if solver == "auto":
        # A small problem fits in well under a second on the CPU wherever the features came from.
        solver = "torch" if n * d * k > TORCH_SOLVER_MIN_WORK else "sklearn"
    elif solver == "sklearn" and device not in (None, "cpu"):
        raise ValueError(f"solver='sklearn' runs on the CPU only, got device={device!r}: use solver='torch'")
    if solver == "torch":
        return _TorchSolver(k, device=device or "cpu")
    return _SklearnSolver(k)


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == y) * 100.0)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    seed: int = 0,
    Cs: tuple[float, ...] | list[float] | None = None,
    solver: str = "auto",
    device: str | None = None,
    patience: int | None = DEFAULT_PATIENCE,
) -> LinearProbeResult:
    """Fit and score a logistic-regression probe; C is chosen on validation data, never on test.

    Args:
        x_train, y_train: features (n, d) and integer labels of the training split.
        x_test, y_test: the test split, scored once with the refit classifier.
        x_val, y_val: the validation split; when None, a stratified `HOLDOUT_FRACTION` of train
            (seeded by `seed`) is held out to choose C, then the refit uses all of train.
        seed: seed of the held-out split (the solvers are deterministic).
        Cs: the grid of C, tried in the given order with warm starts (strong to weak regularization
            is fastest); default `DEFAULT_CS`.
        solver: 'sklearn' (lbfgs), 'torch' (L-BFGS, CPU or GPU), or 'auto' (torch when
            n * d * n_classes > TORCH_SOLVER_MIN_WORK).
        device: torch device of the torch solver (default cpu); a small problem that 'auto' gives to
            scikit-learn runs on the CPU whatever the device.
        patience: stop the sweep once validation top-1 has not improved for this many consecutive C
            (past the peak, weaker regularization only costs time: those fits are the slowest);
            None sweeps the whole grid.

    Returns:
        A LinearProbeResult; ties in validation accuracy go to the smaller C.
    """
    t0 = time.perf_counter()
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if x_val is None:
        keep, held = _holdout(y_train, HOLDOUT_FRACTION, seed)
        x_fit, y_fit, x_val, y_val = x_train[keep], y_train[keep], x_train[held], y_train[held]
    else:
        x_fit, y_fit, x_val, y_val = x_train, y_train, l2_normalize(x_val), np.asarray(y_val)

    # Labels -> 0..k-1 over the classes the classifier can learn; an unseen test class maps to -1
    # and so always counts as an error.
    classes = np.unique(np.concatenate([y_fit, y_val]))
    if len(classes) < 2:
        raise ValueError(f"linear_probe needs at least 2 classes in train + val, got {len(classes)}")

    def encode(y):
        pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        return np.where(classes[pos] == y, pos, -1).astype(np.int64)

    y_fit, y_val_e, y_test_e = encode(y_fit), encode(y_val), encode(y_test)
    cs = [float(c) for c in (DEFAULT_CS if Cs is None else Cs)]
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"Cs={cs!r}: give positive, finite values of C")

    k = len(classes)
    n_all = len(y_fit) + len(y_val_e)
    model = _make_solver(solver, n_all, x_train.shape[1], k, device)

    # The sweep: fit on train, score on validation, each fit warm-started from the previous one.
    sweep, state, best = [], None, None
    for C in cs:
        state = model.fit(x_fit, y_fit, C, state)
        acc = _top1(model.logits(state, x_val), y_val_e)
        sweep.append((C, acc))
        if best is None or acc > best[1]:
            best = (C, acc, state)
        elif patience is not None and len(sweep) - 1 - [c for c, _ in sweep].index(best[0]) >= patience:
            break

    # Refit on train + val at the best C, starting from the best sweep solution.
    x_all = np.concatenate([x_fit, x_val])
    y_all = np.concatenate([y_fit, y_val_e])
    final = model.fit(x_all, y_all, best[0], best[2], refit=True)
    logits = model.logits(final, x_test)

    top5 = None
    if k > 5:
        top = np.argpartition(-logits, 5, axis=1)[:, :5]
        top5 = float(np.mean((top == y_test_e[:, None]).any(1)) * 100.0)
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        bal = float(balanced_accuracy_score(y_test_e, logits.argmax(1)) * 100.0)
    return LinearProbeResult(
        top1=_top1(logits, y_test_e), top5=top5, balanced_accuracy=bal, C=best[0], val_top1=best[1],
        n_train=len(y_fit), n_val=len(y_val_e), n_test=len(y_test_e), n_classes=k, solver=model.name,
        sweep=tuple(sweep), fit_time_s=time.perf_counter() - t0,
    )


def knn_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Cosine k-nearest-neighbour top-1 accuracy (percent).

    Votes are weighted by exp(similarity / temperature), as in DINO's kNN evaluation, which breaks
    ties between classes deterministically.
    """
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes, y_idx = np.unique(y_train, return_inverse=True)
    k = min(k, len(y_train))
    correct = 0
    for start in range(0, len(x_test), 1024):  # chunks bound the similarity matrix's memory
        sim = x_test[start:start + 1024] @ x_train.T
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        w = np.exp(np.take_along_axis(sim, nn, 1) / temperature)
        votes = np.zeros((len(sim), len(classes)))
        np.add.at(votes, (np.arange(len(sim))[:, None], y_idx[nn]), w)
        correct += int(np.sum(classes[votes.argmax(1)] == y_test[start:start + 1024]))
    return 100.0 * correct / max(1, len(y_test))


# --------------------------------------------------------------------------- feature extraction


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; an unavailable 'cuda' raises (no silent CPU run)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available: use device=cpu or auto")
    return device


def extract_features(tower, loader, device: str, precision: str = "fp32",
                     channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Run `tower` over `loader` in eval mode without grad.

    Args:
        tower: module mapping images (B, 3, H, W) to features (B, D).
        loader: iterable of (images, labels) batches.
        device: where to run.
        precision: fp32, or bf16/fp16 under autocast.
        channels_last: feed channels_last inputs (speed only; the features are the same function).

    Returns:
        (features float32 (N, D), labels int64 (N,), images per second including data loading).
    """
    import contextlib

    import torch

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(dtypes)}")
    dev = torch.device(device)
    amp = (torch.autocast(dev.type, dtype=dtypes[precision]) if dtypes[precision] is not None
           else contextlib.nullcontext())
    was_training = tower.training
    tower.eval()
    feats, labels = [], []
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), amp:
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


def _loader(dataset, batch_size: int, device: str):
    """Batches of `dataset` for `extract_features`: an in-memory split preprocessed once when it
    applies (`suite.data.in_memory_batches`: the same tensors without per-image overhead), else a
    DataLoader over the per-image transform."""
    from torch.utils.data import DataLoader

    from suite.data import FileImages, in_memory_batches

    fast = in_memory_batches(dataset, batch_size)
    if fast is not None:
        return fast
    # In-memory data sets decode in microseconds: worker processes would cost more than they save.
    # Files need decoding in parallel with the tower (leave one core to the tower).
    workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if isinstance(dataset, FileImages) else 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.startswith("cuda"))


# --------------------------------------------------------------------------- feature cache


def _weights_identity(pretrained) -> Any:
    """A local checkpoint is identified by path, size and mtime; hub weights by their name."""
    if isinstance(pretrained, str) and os.path.isfile(os.path.expanduser(pretrained)):
        path = os.path.realpath(os.path.expanduser(pretrained))
        st = os.stat(path)
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return pretrained


def _source_digest(*modules: str) -> str:
    """Hash of the source of the modules that define the features (a code change invalidates)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in modules:
        path = here / f"{name}.py"
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]


def feature_cache_key(trial, dataset_identity: str, device: str) -> tuple[str, dict]:
    """The cache key of a trial's features: (hex digest, the fields it hashes).

    Includes what changes the features: the model and its weights, pool, projection, embed dim, image
    size, data set (files and split), seed (random init), precision, device type, and the timm version
    and tower source (which, with model, weights and image size, fix the preprocessing config).
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
        "pool": trial.pool,
        "proj": trial.proj,
        "proj_bias": trial.proj_bias,
        "embed_dim": trial.embed_dim,
        "image_size": trial.image_size,
        "dataset": dataset_identity,
        "seed": trial.seed,
        "precision": trial.precision,
        "device_type": device.split(":")[0],
        "timm": timm_version,
        "source": _source_digest("tower", "data"),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return digest, fields


def _checksum(arrays: dict[str, np.ndarray]) -> str:
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


# --------------------------------------------------------------------------- one trial


def probe_trial(trial, *, tower=None, device: str | None = None, cache_dir: str | Path | None = None,
                use_cache: bool = True) -> ProbeResult:
    """Linear-probe one trial's tower on its data set.

    Validates the data first (`suite.data.load_splits`), then looks the features up in the cache; on
    a miss it builds the tower (seeding torch with `trial.seed` first, so random init is reproducible)
    and extracts every split.

    Args:
        trial: a `suite.options.Trial` with `dataset` set.
        tower: a built tower to use instead of `build_tower(trial)`. The cache key assumes it is what
            `build_tower(trial)` gives after `torch.manual_seed(trial.seed)`; pass `use_cache=False`
            for anything else.
        device: overrides `trial.device` ('auto' -> cuda when available).
        cache_dir: feature cache folder (default `suite.paths.cache_dir('features')`).
        use_cache: read and write the feature cache.

    Returns:
        ProbeResult with percent accuracies. `probe_extract_samples_per_sec` is None on a cache hit
        (nothing was extracted; batch size or channels_last may differ from the run that was).
    """
    from suite.data import DatasetError, load_splits

    t0 = time.perf_counter()
    if trial.dataset in (None, "none"):
        raise DatasetError(f"dataset={trial.dataset!r}: set dataset (--dataset) to digits, imagefolder or synthetic to probe")
    device = resolve_device(device or trial.device)
    splits = load_splits(trial)  # validates before any tower is built or image extracted

    key, fields = feature_cache_key(trial, splits.identity, device)
    if cache_dir is None:
        from suite.paths import cache_dir as default_cache_dir

        cache_dir = default_cache_dir("features")
    path = Path(cache_dir) / f"{key}.npz"
    cached = load_cached_features(path, key) if use_cache else None

    speed = None
    if cached is not None:
        arrays = cached[0]
    else:
        arrays, speed = _extract_splits(trial, splits, tower, device)
        if use_cache:
            save_cached_features(path, key, arrays, {"fields": fields, "classes": splits.classes})

    val = ({"x_val": arrays["x_val"], "y_val": arrays["y_val"]} if "x_val" in arrays else {})
    res = linear_probe(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                       seed=trial.seed, device=device, **val)
    knn = None
    if trial.knn:
        x_tr = np.concatenate([arrays["x_train"]] + ([arrays["x_val"]] if val else []))
        y_tr = np.concatenate([arrays["y_train"]] + ([arrays["y_val"]] if val else []))
        knn = knn_accuracy(x_tr, y_tr, arrays["x_test"], arrays["y_test"])
    return ProbeResult(
        probe_top1=res.top1, probe_top5=res.top5, probe_balanced_accuracy=res.balanced_accuracy,
        probe_C=res.C, probe_val_top1=res.val_top1, probe_solver=res.solver, probe_knn_top1=knn,
        probe_n_train=res.n_train, probe_n_val=res.n_val,
        probe_n_test=res.n_test, probe_n_classes=res.n_classes, probe_extract_samples_per_sec=speed,
        probe_cache_hit=cached is not None, probe_skipped_images=splits.skipped,
        probe_time_s=time.perf_counter() - t0,
    )


def _extract_splits(trial, splits, tower, device: str) -> tuple[dict[str, np.ndarray], float]:
    """Features of every split and the overall extraction throughput (images/s)."""
    import torch

    from suite.data import eval_transform

    if tower is None:
        from suite.tower import build_tower

        torch.manual_seed(trial.seed)  # random-init weights must be the same in every run
        tower = build_tower(trial)
    tower = tower.to(device)
    if trial.channels_last:
        tower = tower.to(memory_format=torch.channels_last)
    transform, _ = eval_transform(tower.trunk, trial.image_size)
    splits.set_transform(transform)
    arrays, n, seconds = {}, 0, 0.0
    for name, ds in splits.items():
        x, y, sps = extract_features(tower, _loader(ds, trial.probe_batch_size, device), device,
                                     trial.precision, trial.channels_last)
        arrays[f"x_{name}"], arrays[f"y_{name}"] = x, y
        n, seconds = n + len(y), seconds + len(y) / sps
    return arrays, n / max(seconds, 1e-9)
