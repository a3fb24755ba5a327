"""The probe's classifier: C chosen on validation only, both solvers, patience, kNN."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from suite.probe.classifier import knn_accuracy, l2_normalize, linear_probe


def clusters(n_per_class: int, k: int, d: int = 32, noise: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * 1.5
    y = np.repeat(np.arange(k), n_per_class)
    x = means[y] + rng.standard_normal((len(y), d)) * noise
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


def test_l2_normalize_unit_rows_and_zero_rows():
    x = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert x.dtype == np.float32 and np.allclose(x, [[0.6, 0.8], [0.0, 0.0]])


def test_linear_probe_metrics_and_determinism():
    x, y = clusters(60, 8, noise=2.0)
    xtr, ytr, xva, yva, xte, yte = x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:]
    r = linear_probe(xtr, ytr, xte, yte, x_val=xva, y_val=yva, Cs=[0.1, 1, 10])
    assert r.n_train == 300 and r.n_val == 100 and r.n_test == 80 and r.n_classes == 8
    assert r.solver == "sklearn"
    assert 50 < r.top1 <= 100 and r.top5 is not None and r.top5 >= r.top1
    assert 0 < r.balanced_accuracy <= 100
    assert r.C in (0.1, 1, 10) and [c for c, _ in r.sweep] == [0.1, 1, 10]
    assert dict(r.sweep)[r.C] == r.val_top1 == max(a for _, a in r.sweep)
    again = linear_probe(xtr, ytr, xte, yte, x_val=xva, y_val=yva, Cs=[0.1, 1, 10])
    assert dataclasses.replace(again, fit_time_s=0) == dataclasses.replace(r, fit_time_s=0)


def test_C_never_depends_on_test_labels():
    x, y = clusters(40, 6, noise=3.0)
    xtr, ytr, xte, yte = x[:180], y[:180], x[180:], y[180:]
    a = linear_probe(xtr, ytr, xte, yte, seed=3)
    b = linear_probe(xtr, ytr, xte, np.random.default_rng(0).permutation(yte), seed=3)
    assert a.C == b.C and a.sweep == b.sweep and a.val_top1 == b.val_top1
    assert a.top1 != b.top1  # the test labels did change what was scored


def test_holdout_without_val_and_top5_none():
    x, y = clusters(30, 4)
    r = linear_probe(x[:100], y[:100], x[100:], y[100:])
    assert r.top5 is None  # 4 classes: top-5 is meaningless
    assert r.n_val > 0 and r.n_train + r.n_val == 100
    assert r.top1 > 80


def test_unseen_test_class_counts_as_error():
    x, y = clusters(40, 3, noise=0.3)
    r = linear_probe(x[:90], y[:90], x[90:], np.full(len(y) - 90, 7))  # class 7 never seen in train
    assert r.top1 == 0.0 and r.n_classes == 3


def test_torch_solver_matches_sklearn():
    x, y = clusters(50, 10, d=48, noise=2.5)
    kw = dict(x_val=x[300:400], y_val=y[300:400], Cs=[0.1, 1, 10], patience=None)
    args = (x[:300], y[:300], x[400:], y[400:])
    sk = linear_probe(*args, solver="sklearn", **kw)
    th = linear_probe(*args, solver="torch", **kw)
    assert th.solver == "torch"
    for (c1, a1), (c2, a2) in zip(sk.sweep, th.sweep):
        assert c1 == c2 and abs(a1 - a2) <= 2.0
    assert abs(sk.top1 - th.top1) <= 2.0


def test_patience_stops_sweep_past_the_peak():
    x, y = clusters(30, 5, noise=4.0)
    r = linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=np.logspace(-3, 4, 15), patience=2)
    best = [c for c, _ in r.sweep].index(r.C)
    assert len(r.sweep) <= best + 3  # the peak plus at most two worse values
    full = linear_probe(x[:100], y[:100], x[100:], y[100:], Cs=np.logspace(-3, 4, 15), patience=None)
    assert len(full.sweep) == 15


def test_linear_probe_bad_args():
    x, y = clusters(10, 2)
    with pytest.raises(ValueError, match="both x_val and y_val"):
        linear_probe(x, y, x, y, x_val=x)
    with pytest.raises(ValueError, match="Cs="):
        linear_probe(x, y, x, y, Cs=[0, 1])
    with pytest.raises(ValueError, match="solver="):
        linear_probe(x, y, x, y, solver="newton")
    with pytest.raises(ValueError, match="CPU only"):
        linear_probe(x, y, x, y, solver="sklearn", device="cuda")
    assert linear_probe(x, y, x, y, device="cuda").solver == "sklearn"  # small: auto stays on the CPU
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, np.zeros_like(y), x, y)


def test_knn_accuracy():
    x, y = clusters(30, 3, noise=0.3)
    assert knn_accuracy(x[:60], y[:60], x[60:], y[60:]) == 100.0
    # k larger than train is capped at the number of training samples.
    assert knn_accuracy(x[:5], y[:5], x[60:], y[60:], k=20) == knn_accuracy(x[:5], y[:5], x[60:], y[60:], k=5)
    assert knn_accuracy(x[:60], y[:60], x[60:], (y[60:] + 1) % 3) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_solver_on_gpu_matches_cpu():
    x, y = clusters(50, 10, d=48, noise=2.5)
    kw = dict(Cs=[0.1, 1, 10], solver="torch", patience=None)
    cpu = linear_probe(x[:400], y[:400], x[400:], y[400:], **kw)
    gpu = linear_probe(x[:400], y[:400], x[400:], y[400:], device="cuda", **kw)
    assert abs(cpu.top1 - gpu.top1) <= 1.0
