"""Uncertainty of probe accuracies, and the paired test that says whether two towers differ.

- `wilson_interval`: the 95% Wilson score interval of a proportion (top-1 on n test images). It
  stays inside [0, 100] and is sensible at 0 or n correct, unlike the normal approximation.
- `balanced_interval`: a 95% interval for balanced accuracy (the mean of per-class recalls), from
  the per-class binomial variances (normal approximation, clipped to [0, 100]).
- `pack_correct` / `unpack_correct`: per-test-image correctness as a hex string, in test-image
  order (the split is seeded, so that order is stable), stored with every probe so two trials can
  be compared on the same images later, without their features.
- `mcnemar_exact`: the exact (binomial) McNemar test on the images where two classifiers disagree.
- `tied_with_best`: which candidates are not significantly below the best on the same test images.

Pure Python and numpy (no scipy, no torch): the read side uses it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ALPHA = 0.05  # significance level of the paired test


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes in `n` trials, in percent.

    Raises:
        ValueError: n < 1 or correct outside 0..n.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def balanced_interval(y_true: np.ndarray, correct: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """A normal-approximation interval (percent) for balanced accuracy: mean over classes of recall,
    with variance `sum_c p_c (1 - p_c) / n_c / K^2`; a class with p_c of 0 or 1 adds the variance of
    one error in n_c + 1 (so a perfect score still gets a width)."""
    y_true, correct = np.asarray(y_true), np.asarray(correct, dtype=bool)
    classes = np.unique(y_true)
    recalls, var = [], 0.0
    for c in classes:
        hits = correct[y_true == c]
        n_c, p = len(hits), float(hits.mean())
        p_var = p if 0.0 < p < 1.0 else 1.0 / (n_c + 1)
        var += p_var * (1 - p_var) / n_c
        recalls.append(p)
    mean, half = float(np.mean(recalls)), z * math.sqrt(var) / len(classes)
    return 100.0 * max(0.0, mean - half), 100.0 * min(1.0, mean + half)


def half_width(lo: float | None, hi: float | None) -> float | None:
    """Half the width of an interval (the ± the report shows), None when either end is missing."""
    if lo is None or hi is None or lo != lo or hi != hi:
        return None
    return (hi - lo) / 2


# --------------------------------------------------------------------------- per-image correctness


def pack_correct(correct: np.ndarray) -> str:
    """Correct/incorrect per test image as hex, most significant bit first (`np.packbits`)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The boolean array `pack_correct` stored for `n` images.

    Raises:
        ValueError: the text is not hex, or holds fewer than n bits.
    """
    raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    if len(raw) * 8 < n:
        raise ValueError(f"unpack_correct: {len(raw) * 8} bits stored, {n} images expected")
    return np.unpackbits(raw)[:n].astype(bool)


# --------------------------------------------------------------------------- the paired test


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """Exact two-sided McNemar test of two classifiers scored on the same images.

    Args:
        a, b: per-image correctness (same images, same order).

    Returns:
        (p-value, images only `a` got right, images only `b` got right). Under the null hypothesis
        (equal accuracy) the discordant images split as Binomial(n01 + n10, 1/2).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: {a.shape} vs {b.shape}: not the same test images")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0, 0, 0
    # P(X <= k) for X ~ Binomial(n, 1/2), in log space (n may be thousands).
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail), only_a, only_b


def tied_with_best(correct: Sequence[np.ndarray | None], best: int, alpha: float = ALPHA) -> list[bool]:
    """Which candidates are statistically tied with candidate `best` on the same test images.

    A candidate is tied when the exact McNemar test against the best gives p >= alpha (its accuracy
    is not significantly different). A candidate without per-image correctness (an old record, another
    test set: None) cannot be tested and is not tied. The best is tied with itself.
    """
    ref = correct[best]
    out = []
    for i, c in enumerate(correct):
        if i == best:
            out.append(True)
        elif c is None or ref is None or len(c) != len(ref):
            out.append(False)
        else:
            out.append(mcnemar_exact(ref, c)[0] >= alpha)
    return out
