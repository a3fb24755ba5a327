"""The linear classifier of the probe: logistic regression with C chosen on validation, and kNN.

The protocol of CLIP, Kornblith et al. 2019 and DINOv2: features L2-normalized; multinomial
logistic regression (L-BFGS) with the inverse regularization C swept over a log grid on a
validation split (warm-started from strong to weak regularization, stopping `DEFAULT_PATIENCE`
values past the validation peak), refit on train+val at the best C and scored once on test. C
follows scikit-learn's convention: the objective is `C * sum_i log_loss_i + ||W||^2 / 2`
(intercept not penalized).

Two solvers give the same fit: scikit-learn's lbfgs for small problems, and a torch L-BFGS
(float32, also on GPU) for large ones, where scikit-learn is several times slower per iteration
(see benchmarks.bench_probe).

Works on numpy arrays only (features come from `suite.probe.features`). scikit-learn and torch are
imported inside the solvers that use them, so choosing and scoring stay light and a small
problem never loads torch.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Half-decade log grid, strong to weak regularization; wide enough for a few hundred to a million
# L2-normalized samples (the useful C scales with 1 / n_samples).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-2, 4, 13))
DEFAULT_PATIENCE = 3  # C values past the validation peak before the sweep stops
HOLDOUT_FRACTION = 0.2  # of train, for choosing C when no validation split is given
TORCH_SOLVER_MIN_WORK = 2e7  # n_samples * n_features * n_classes above which 'auto' uses torch
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
        correct: per test image, whether the top-1 prediction was right (test order), for intervals
            and paired tests (`suite.core.stats`).
        y_test: the test labels as scored (0..k-1; -1 for a class the classifier never saw).
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
    correct: np.ndarray | None = field(default=None, compare=False, repr=False)
    y_test: np.ndarray | None = field(default=None, compare=False, repr=False)


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


# --------------------------------------------------------------------------- solvers


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
    """The solver for `n` samples of `d` features in `k` classes ('auto' picks by problem size)."""
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


# --------------------------------------------------------------------------- the probe


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy, percent."""
    return float(np.mean(logits.argmax(1) == y) * 100.0)


def _fit_and_val(x_train, y_train, x_val, y_val, seed: int) -> tuple[np.ndarray, ...]:
    """(x_fit, y_fit, x_val, y_val), normalized: the given validation split, or a held-out part of train."""
    if (x_val is None) != (y_val is None):
        raise ValueError("give both x_val and y_val, or neither")
    if x_val is None:
        keep, held = _holdout(y_train, HOLDOUT_FRACTION, seed)
        return x_train[keep], y_train[keep], x_train[held], y_train[held]
    return x_train, y_train, l2_normalize(x_val), np.asarray(y_val)


def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Labels -> 0..k-1 over `classes` (the ones the classifier can learn); an unseen label maps to -1
    and so always counts as an error."""
    pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
    return np.where(classes[pos] == y, pos, -1).astype(np.int64)


def _check_cs(Cs) -> list[float]:
    """The grid of C as floats (`DEFAULT_CS` for None); raises ValueError unless all positive and finite."""
    cs = [float(c) for c in (DEFAULT_CS if Cs is None else Cs)]
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"Cs={cs!r}: give positive, finite values of C")
    return cs


def _sweep(model, x_fit, y_fit, x_val, y_val, cs: list[float], patience: int | None):
    """Fit on train and score on validation for each C, each fit warm-started from the previous one.

    Returns:
        (the `(C, val top-1)` tried, the best `(C, val top-1, state)`; ties go to the smaller C).
    """
    sweep, state, best = [], None, None
    for C in cs:
        state = model.fit(x_fit, y_fit, C, state)
        acc = _top1(model.logits(state, x_val), y_val)
        sweep.append((C, acc))
        if best is None or acc > best[1]:
            best = (C, acc, state)
        elif patience is not None and len(sweep) - 1 - [c for c, _ in sweep].index(best[0]) >= patience:
            break
    return sweep, best


def _scores(logits: np.ndarray, y: np.ndarray) -> tuple[float, float | None, float]:
    """(top-1, top-5 or None with 5 classes or fewer, balanced accuracy), percent."""
    top5 = None
    if logits.shape[1] > 5:
        top = np.argpartition(-logits, 5, axis=1)[:, :5]
        top5 = float(np.mean((top == y[:, None]).any(1)) * 100.0)
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true"
        bal = float(balanced_accuracy_score(y, logits.argmax(1)) * 100.0)
    return _top1(logits, y), top5, bal


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
    refit: bool = True,
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
        refit: refit on train + val at the chosen C (the full-data protocol). False keeps the fit on
            train alone (few-shot: the validation split only chooses C, it never adds labels).

    Returns:
        A LinearProbeResult; ties in validation accuracy go to the smaller C.
    """
    t0 = time.perf_counter()
    x_train, x_test = l2_normalize(x_train), l2_normalize(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    x_fit, y_fit, x_val, y_val = _fit_and_val(x_train, y_train, x_val, y_val, seed)
    classes = np.unique(np.concatenate([y_fit, y_val]))
    if len(classes) < 2:
        raise ValueError(f"linear_probe needs at least 2 classes in train + val, got {len(classes)}")
    y_fit, y_val, y_test = _encode(classes, y_fit), _encode(classes, y_val), _encode(classes, y_test)
    cs = _check_cs(Cs)

    k = len(classes)
    model = _make_solver(solver, len(y_fit) + len(y_val), x_train.shape[1], k, device)
    sweep, best = _sweep(model, x_fit, y_fit, x_val, y_val, cs, patience)
    # Refit on train + val at the best C, starting from the best sweep solution.
    final = (model.fit(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), best[0], best[2], refit=True)
             if refit else best[2])
    logits = model.logits(final, x_test)
    top1, top5, bal = _scores(logits, y_test)
    return LinearProbeResult(
        top1=top1, top5=top5, balanced_accuracy=bal, C=best[0], val_top1=best[1],
        n_train=len(y_fit), n_val=len(y_val), n_test=len(y_test), n_classes=k, solver=model.name,
        sweep=tuple(sweep), fit_time_s=time.perf_counter() - t0, correct=logits.argmax(1) == y_test, y_test=y_test,
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
