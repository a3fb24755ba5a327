"""Linear-probe benchmarks (prints figures; no pass/fail).

1. Classifier: 50,000 x 768 synthetic features, 100 classes (Gaussian clusters with enough noise that
   the accuracy is far from 100%), 10,000 test samples. Times `suite.probe.classifier.linear_probe` (full C sweep
   on a held-out 20% of train + refit on all of train) and compares its test top-1 with scikit-learn
   lbfgs run to convergence at the chosen C. Target: under 60 s on 2 CPU cores, within 0.5 points.
2. Extraction: `extract_features` throughput (data loading included) against the tower's raw
   inference throughput on the same device, measured back to back, for the small model at 64 px
   and the big one at 224 px: in-memory digits through the per-image transform (a DataLoader), the
   same preprocessed once (the probe's path: first trial, and later trials that reuse it), and PNG
   files on disk. Target: in-memory extraction keeps up with inference (close to 100%).

    python -m benchmarks.bench_probe [--skip-sklearn] [--skip-extract] [--skip-classifier] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def synthetic_features(n: int, d: int, k: int, noise: float, seed: int = 0):
    """Gaussian clusters: unit-scale class means plus isotropic noise of norm ~`noise` x the mean's."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    x = means[y] + rng.standard_normal((n, d)).astype(np.float32) * np.float32(noise)
    return x.astype(np.float32), y.astype(np.int64)


def bench_classifier(args) -> None:
    import torch

    from suite.probe.classifier import DEFAULT_CS, l2_normalize, linear_probe

    n_train, n_test, d, k = 50_000, 10_000, 768, 100
    x, y = synthetic_features(n_train + n_test, d, k, args.noise)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    print(f"== classifier: {n_train} x {d} train, {n_test} test, {k} classes, noise {args.noise}, "
          f"torch threads {torch.get_num_threads()}, device {args.device}")

    t0, c0 = time.perf_counter(), time.process_time()
    res = linear_probe(x_train, y_train, x_test, y_test, seed=0, device=args.device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"suite linear_probe ({res.solver}): {len(res.sweep)} of {len(DEFAULT_CS)} C values (early stop) + refit in {wall:.1f} s wall "
          f"({cpu:.1f} s CPU); C={res.C:g} val top-1 {res.val_top1:.2f}; "
          f"test top-1 {res.top1:.2f}  top-5 {res.top5:.2f}  balanced {res.balanced_accuracy:.2f}")
    print("  sweep (C: val top-1): " + ", ".join(f"{c:g}: {a:.2f}" for c, a in res.sweep))

    if args.skip_sklearn:
        return
    from sklearn.linear_model import LogisticRegression

    # The reference: scikit-learn lbfgs to convergence at the chosen C, on the same (normalized) data.
    xn_train, xn_test = l2_normalize(x_train), l2_normalize(x_test)
    t0 = time.perf_counter()
    ref = LogisticRegression(C=res.C, max_iter=5000, tol=1e-6).fit(xn_train, y_train)
    ref_wall = time.perf_counter() - t0
    ref_top1 = float(np.mean(ref.predict(xn_test) == y_test) * 100)
    print(f"sklearn lbfgs to convergence at C={res.C:g}: {ref.n_iter_[0]} iterations in {ref_wall:.1f} s; "
          f"test top-1 {ref_top1:.2f}; |difference| {abs(ref_top1 - res.top1):.2f} points (target <= 0.5)")
    # What the same sweep would cost with scikit-learn: one warm-started fit per C, at its per-iteration cost.
    per_iter = ref_wall / max(1, ref.n_iter_[0])
    print(f"  sklearn costs {per_iter * 1000:.0f} ms per lbfgs iteration on this problem")


def raw_inference(tower, batch: int, size: int, args) -> float:
    """Images/s of the tower alone: the same batch again and again, no data loading."""
    import torch

    xb = torch.randn(batch, 3, size, size, device=args.device)
    with torch.inference_mode():
        for _ in range(2):
            tower(xb)
        n_iter, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            tower(xb).cpu()
            n_iter += 1
    return n_iter * batch / (time.perf_counter() - t0)


def bench_extraction(args) -> None:
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader

    import suite.probe.images
    from suite.core.options import Trial
    from suite.probe.features import extract_features, feature_loader
    from suite.probe.images import ArrayImages, FileImages, eval_transform
    from suite.tower.model import build_tower

    # One thread by default: the machine may be shared, and two threads contending with other
    # processes make every figure noisy. The figures of one model are measured back to back.
    torch.set_num_threads(args.threads)
    print(f"== extraction on {args.device} (torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs)")
    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # as suite.probe.datasets's digits
    for model, size, batch in ((args.small_model, 64, 64), (args.big_model, 224, 32)):
        trial = Trial(model=model, image_size=size, dataset="digits", probe_batch_size=batch)
        torch.manual_seed(0)
        tower = build_tower(trial).to(args.device).eval()
        transform, _ = eval_transform(tower.trunk, size)

        raw_before = raw_inference(tower, batch, size, args)
        n_imgs = min(len(gray), max(4 * batch, int(raw_before * args.seconds)))
        ds = ArrayImages(gray[:n_imgs], digits.target[:n_imgs], transform, key=f"bench:{model}:{size}:{n_imgs}")
        # The per-image path (what extraction did before in-memory splits were preprocessed once).
        stream_x, _, stream = extract_features(tower, DataLoader(ds, batch_size=batch), args.device)
        # The probe's path: the first pass preprocesses the split, later trials at this size reuse it.
        loader = feature_loader(ds, batch, args.device)
        assert isinstance(loader, suite.probe.images.PreparedBatches), type(loader)
        first_x, _, first = extract_features(tower, loader, args.device)
        n_done, elapsed = 0, 0.0
        while elapsed < args.seconds:  # several passes: one is short at this speed
            _, y, sps = extract_features(tower, loader, args.device)
            n_done, elapsed = n_done + len(y), elapsed + len(y) / sps
        cached = n_done / elapsed
        raw = (raw_before + raw_inference(tower, batch, size, args)) / 2

        # The same images as PNG files on disk, decoded by DataLoader workers.
        with tempfile.TemporaryDirectory() as tmp:
            samples = []
            for i in range(n_imgs):
                path = os.path.join(tmp, f"{i}.png")
                Image.fromarray(gray[i]).resize((size, size)).convert("RGB").save(path)
                samples.append((path, int(digits.target[i])))
            files = FileImages(samples, transform)
            _, _, disk = extract_features(tower, feature_loader(files, batch, args.device), args.device)
        print(f"{model} @ {size}px, batch {batch}, {n_imgs} digits: raw inference {raw:.0f} img/s "
              f"(before/after {raw_before:.0f}/{2 * raw - raw_before:.0f})")
        for what, sps in (("from memory, per-image transforms (DataLoader)", stream),
                          ("from memory, preprocessed once, first trial", first),
                          ("from memory, preprocessed once, later trials", cached),
                          ("from PNG files (DataLoader workers)", disk)):
            print(f"  extraction {what + ':':<48} {sps:6.0f} img/s ({sps / raw:.0%} of raw)")
        print(f"  features equal to the per-image path: {np.array_equal(first_x, stream_x)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--noise", type=float, default=8.0, help="noise scale of the synthetic features")
    p.add_argument("--skip-sklearn", action="store_true", help="skip the scikit-learn reference fit")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--skip-classifier", action="store_true")
    p.add_argument("--small-model", default="test_vit")
    p.add_argument("--big-model", default="resnet18")
    p.add_argument("--seconds", type=float, default=5.0, help="time per raw-inference measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the extraction section")
    args = p.parse_args()
    if not args.skip_classifier:
        bench_classifier(args)
    if not args.skip_extract:
        bench_extraction(args)


if __name__ == "__main__":
    main()
