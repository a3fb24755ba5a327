"""Benchmarks of the measurement engine itself: fidelity, repeatability and overhead.

    python benchmarks/bench_measure.py                 # resnet18, 224 px, batch 16, fp32, CPU
    python benchmarks/bench_measure.py --threads 1 --iters 10

1. Fidelity: `suite.measure`'s inference samples/s against a minimal hand-written loop over the
   same tower (same weights, same input recipe, same threads), alternated round by round in one
   process so drifting machine load hits both. Target: ratio >= 0.97.
2. Repeatability: five repeated `measure()` calls; coefficient of variation of samples/s.
   Target: < 3%.
3. Overhead: the wall time of `measure()` outside its warm-up and timed loops (tower build,
   FLOP counting, roofline lookup, memory bookkeeping), with the roofline already cached.

Prints figures; exits non-zero only on an error, not on a missed target (timings vary by machine).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from suite.measure import make_inputs, measure
from suite.options import Trial
from suite.tower import build_tower


def hand_loop_samples_per_sec(tower: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> float:
    """The simplest honest loop: eval, inference_mode, warm-up, then wall time over `iters` calls."""
    tower.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            tower(x)
        start = time.perf_counter()
        for _ in range(iters):
            tower(x)
        elapsed = time.perf_counter() - start
    return x.shape[0] * iters / elapsed


def fidelity(trial: Trial, cache_dir: str, rounds: int) -> float:
    torch.manual_seed(0)
    tower = build_tower(trial)
    x = make_inputs(trial, "cpu", trial.batch_size)
    ratios = []
    for i in range(rounds):
        # Paired rounds: load that drifts over minutes hits both sides of a ratio alike.
        hand = hand_loop_samples_per_sec(tower, x, trial.warmup, trial.iters)
        ours = measure(trial, tower=tower, cache_dir=cache_dir).infer_samples_per_sec
        ratios.append(ours / hand)
        print(f"  round {i + 1}: hand loop {hand:8.2f} samples/s   suite {ours:8.2f} samples/s   "
              f"ratio {ratios[-1]:.3f}")
    ratio = statistics.median(ratios)
    print(f"fidelity: suite / hand loop = {ratio:.3f}  (median of {rounds} paired rounds; target >= 0.97)")
    return ratio


def repeatability(trial: Trial, cache_dir: str, repeats: int) -> float:
    values, overheads = [], []
    for i in range(repeats):
        start = time.perf_counter()
        r = measure(trial, cache_dir=cache_dir)
        wall = time.perf_counter() - start
        values.append(r.infer_samples_per_sec)
        overheads.append(wall - r.measured_time_s)
        print(f"  run {i + 1}: {r.infer_samples_per_sec:8.2f} samples/s  (IQR/median "
              f"{r.infer_step_time_iqr / r.infer_step_time:.1%}, measure() wall {wall:.2f} s, "
              f"timed work {r.measured_time_s:.2f} s)")
    cv = statistics.stdev(values) / statistics.mean(values)
    print(f"repeatability: coefficient of variation = {cv:.2%} over {repeats} runs (target < 3%)")
    print(f"overhead: measure() outside warm-up + timed loops = median {statistics.median(overheads):.2f} s "
          f"per trial (tower build, FLOP count, roofline lookup, memory bookkeeping)")
    return cv


def overhead_breakdown(trial: Trial, cache_dir: str) -> None:
    """Time the fixed per-trial steps one by one."""
    from suite.flops import count_flops
    from suite.measure import MemoryMeter, _frozen_gc
    from suite.roofline import device_peak_tflops

    parts = {}
    t0 = time.perf_counter()
    with _frozen_gc():  # as in measure(): one full collection, then only new objects are scanned
        parts["full gc.collect + gc.freeze (once)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        meter = MemoryMeter("cpu")
        parts["memory baseline (gc, malloc_trim)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tower = build_tower(trial)
        parts["build_tower"] = time.perf_counter() - t0
        x = make_inputs(trial, "cpu", 2)
        t0 = time.perf_counter()
        count_flops(tower, x, train=False)
        parts["count_flops infer (batch 2; cached per tower config)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        count_flops(tower, x, train=True)
        parts["count_flops train (batch 2; cached per tower config)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        device_peak_tflops("cpu", trial.precision, cache_dir=cache_dir)
        parts["device_peak_tflops (cached)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        meter.start()
        meter.peak_mib()
        parts["per-phase memory reset + read"] = time.perf_counter() - t0
    for name, seconds in parts.items():
        print(f"  {name:54s} {seconds * 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the fidelity check")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trial = Trial(model=args.model, image_size=args.image_size, batch_size=args.batch_size, precision="fp32",
                  device="cpu", mode="infer", warmup=args.warmup, iters=args.iters)
    print(f"{args.model} {args.image_size}px batch {args.batch_size} fp32 cpu, torch threads "
          f"{torch.get_num_threads()}, warmup {args.warmup}, iters {args.iters}")
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        measure(Trial(model="test_resnet", image_size=64, batch_size=2, mode="infer", iters=1, warmup=0),
                cache_dir=cache_dir)  # measures and caches the device peak, loads kernels
        print(f"first measure() in the process, roofline measured: {time.perf_counter() - start:.2f} s")
        fidelity(trial, cache_dir, args.rounds)
        repeatability(trial, cache_dir, args.repeats)
        print("overhead breakdown (roofline cached):")
        overhead_breakdown(trial, cache_dir)


if __name__ == "__main__":
    main()
