"""Accuracy intervals and the paired test (suite.core.stats), and their use by the regression gate."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from factories import make_record

from suite.core.stats import (
    balanced_interval,
    half_width,
    mcnemar_exact,
    pack_correct,
    tied_with_best,
    unpack_correct,
    wilson_interval,
)
from suite.gate.compare import compare


def test_wilson_interval_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (50, 500, 5000):
        lo, hi = wilson_interval(int(0.886 * n), n)
        assert 0 <= lo < 100 * int(0.886 * n) / n < hi <= 100
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(np.sqrt(10), rel=0.05)  # ~1/sqrt(n)
    assert wilson_interval(10, 10)[1] == pytest.approx(100.0) and wilson_interval(10, 10)[0] < 75.0  # width at 100%
    with pytest.raises(ValueError, match="correct=11, n=10"):
        wilson_interval(11, 10)


def test_balanced_interval_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10000):
        y = rng.integers(0, 5, n)
        correct = rng.random(n) < 0.8
        lo, hi = balanced_interval(y, correct)
        mean = np.mean([correct[y == c].mean() for c in range(5)]) * 100
        assert lo < mean < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert half_width(80.0, 84.0) == 2.0 and half_width(None, 1.0) is None


def test_correctness_bits_round_trip():
    bits = np.random.default_rng(1).random(361) < 0.5
    text = pack_correct(bits)
    assert len(text) == 2 * 46  # 361 bits in 46 bytes, hex
    assert np.array_equal(unpack_correct(text, 361), bits)
    with pytest.raises(ValueError, match="368 bits stored, 400 images"):
        unpack_correct(text, 400)


def test_paired_test_ties_a_handful_of_differences_and_separates_a_clear_gap():
    rng = np.random.default_rng(0)
    a = rng.random(360) < 0.886
    b = a.copy()
    flip = rng.choice(360, 6, replace=False)  # differ on 6 images, both ways
    b[flip] = ~b[flip]
    p, _, _ = mcnemar_exact(a, b)
    assert p >= 0.05
    worse = a.copy()
    worse[np.flatnonzero(a)[:30]] = False  # 30 images only the first gets right: ~8 points worse
    p_worse, only_a, only_b = mcnemar_exact(a, worse)
    assert p_worse < 1e-6 and (only_a, only_b) == (30, 0)
    assert mcnemar_exact(a, a) == (1.0, 0, 0)
    assert tied_with_best([a, b, worse, None], 0) == [True, True, False, False]
    with pytest.raises(ValueError, match="not the same test images"):
        mcnemar_exact(a, a[:10])


def test_mcnemar_exact_matches_the_binomial_tail():
    # 8 vs 2 discordant: P(X <= 2 | n=10, p=1/2) = 56/1024, two-sided 0.109375
    a = np.array([True] * 8 + [False] * 2)
    assert mcnemar_exact(a, ~a)[0] == pytest.approx(0.109375)


def test_compare_uses_the_accuracy_interval_where_it_is_wider_than_the_threshold():
    def frame(top1, lo, hi):
        return pd.DataFrame([make_record("m", probe_top1=top1, probe_top1_lo=lo, probe_top1_hi=hi).flat()])

    base = frame(88.6, 85.0, 91.6)  # half-width 3.3 on a small test set
    # A 2-point drop is beyond the 1-point threshold but well inside the interval: not a regression.
    wide = compare(base, frame(86.6, 83.0, 89.8))
    assert not wide.regressions
    assert [c.verdict for c in wide.changes if c.metric == "probe_top1"] == ["cannot tell"]  # a warning, exit 0
    # A 10-point drop is beyond both.
    assert compare(base, frame(78.6, 74.0, 82.8)).regressions
    # Without intervals (old records) the fixed threshold applies as before.
    old = pd.DataFrame([make_record("m", probe_top1=88.6).flat()])
    assert compare(old, pd.DataFrame([make_record("m", probe_top1=86.6).flat()])).regressions
