"""Benchmarks of the measurement engine itself: history independence, fidelity, overhead.

    python -m benchmarks.bench_measure                          # test_resnet 96 px batch 16, CPU
    python -m benchmarks.bench_measure --model resnet18 --image-size 224
    python -m benchmarks.bench_measure --allocator default      # as before the fix, for comparison
    python -m benchmarks.bench_measure --min-time-s 3           # rounds of 3 s: below the machine's wander

1. History independence: the same trial measured
   - cold: the first measurement of a fresh process (as `suite bench` does), mode both, infer, train;
   - warm: after other trials in the same process (as the 20th trial of a sweep worker);
   reported as each phase's samples/s per case and the max/min spread over all of them. Target <= 1.05x.
   Next to it, the machine's floor: the bare hand loop alone in as many fresh processes, run between
   the suite's (on this 2-core VM it alone spreads 1.06-1.14x on test_resnet). And the history effect
   itself: the max/min of the per-case medians (a case that history moves stands apart from the rest).
   The VM's speed wanders on a scale of seconds (one process, the same loop: windows of 20 steps
   1.15x apart, of 1,000 steps 1.04x), so `--min-time-s` lengthens every round to average it.
2. Fidelity: `measure()` against a minimal hand-written loop as lean as timm's `benchmark.py`
   (perf_counter around `benchmarks.shared.reference_step`, nothing else per step), in the same
   process and steady state, alternated round by round; ratio suite / hand loop per phase.
   Target >= 0.97.
3. Overhead: `measure()` wall time outside the warm-up and timed loops.

Each case runs in its own subprocess (`python -m benchmarks.bench_measure --child CASE`), so no
case inherits another's heap. Prints figures; exits non-zero only on an error, not on a missed target.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from benchmarks.shared import child_env, reference_step, run_module

OTHER_TRIALS = (("test_vit", "both"), ("test_convnext", "train"), ("test_efficientnet", "both"), ("test_vit", "train"))


def _trial(args, mode: str):
    from suite.core.options import Trial

    return Trial(model=args.model, image_size=args.image_size, batch_size=args.batch_size, embed_dim=args.embed_dim,
                 device="cpu", mode=mode, warmup=args.warmup, iters=args.iters, min_time_s=args.min_time_s)


def _measure(trial, cache_dir: str) -> dict:
    from suite.measurement.engine import measure

    start = time.perf_counter()
    r = measure(trial, cache_dir=cache_dir)
    return {"infer": r.infer_samples_per_sec, "train": r.train_samples_per_sec,
            "overhead_s": time.perf_counter() - start - r.measured_time_s,
            "warmup_steps": [r.infer_warmup_steps, r.train_warmup_steps]}


def hand_loop(tower, x, warmup: int, iters: int, train: bool, min_time_s: float = 0.0) -> float:
    """timm benchmark.py's loop around the hand-written step (`benchmarks.shared.reference_step`): warm-up,
    then perf_counter around each step; samples/s over the loop. With `min_time_s`, as many steps as last
    that long (sized from the last warm-up step, as `suite.measurement.timing.round_steps` sizes the
    suite's rounds) if more than `iters`."""
    from suite.measurement.timing import round_steps

    step = reference_step(tower, "train" if train else "infer")
    for _ in range(warmup):
        t0 = time.perf_counter()
        step(x)
    if min_time_s > 0:
        iters = round_steps(iters, min_time_s, (time.perf_counter() - t0) * 1e3)
    total = 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        step(x)
        total += time.perf_counter() - t0
    return x.shape[0] * iters / total


def child(args) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from suite.machine.allocator import allocator, steady_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "steady":
        steady_allocator()
    cache_dir = tempfile.mkdtemp()
    case = args.child
    if case.startswith("cold-"):
        return _measure(_trial(args, case.split("-")[1]), cache_dir) | {"allocator": allocator()}
    if case == "warm":
        from suite.core.options import Trial

        for model, mode in OTHER_TRIALS:
            _measure(Trial(model=model, image_size=args.image_size, batch_size=args.batch_size, device="cpu",
                           mode=mode, warmup=2, iters=5), cache_dir)
        return _measure(_trial(args, "both"), cache_dir)
    if case == "fidelity":
        return fidelity(args, cache_dir)
    if case == "floor":
        return floor(args)
    raise SystemExit(f"unknown case {case!r}")


def fidelity(args, cache_dir: str) -> dict:
    import torch

    from suite.measurement.engine import measure
    from suite.measurement.steps import make_inputs
    from suite.tower.model import build_tower

    trial = _trial(args, "both")
    torch.manual_seed(0)
    tower = build_tower(trial)
    x = make_inputs(trial, "cpu", trial.batch_size)
    ratios: dict[str, list[float]] = {"infer": [], "train": []}
    for _ in range(args.rounds):
        r = measure(trial, tower=tower, cache_dir=cache_dir)
        for phase, ours in (("infer", r.infer_samples_per_sec), ("train", r.train_samples_per_sec)):
            hand = hand_loop(tower, x, max(args.warmup, 10), args.iters, train=phase == "train",
                             min_time_s=args.min_time_s)
            ratios[phase].append(ours / hand)
    return {phase: statistics.median(v) for phase, v in ratios.items()} | {"rounds": ratios}


def floor(args) -> dict:
    """The machine's own floor: the bare hand loop (no suite code in the loop), in this fresh process,
    as many steps as two of the suite's rounds. Its spread over processes is what no harness can beat."""
    import torch

    from suite.measurement.steps import make_inputs
    from suite.tower.model import build_tower

    trial = _trial(args, "both")
    torch.manual_seed(0)
    tower = build_tower(trial)
    x = make_inputs(trial, "cpu", trial.batch_size)
    return {phase: hand_loop(tower, x, max(args.warmup, 10), 2 * args.iters, train=phase == "train",
                             min_time_s=2 * args.min_time_s)
            for phase in ("infer", "train")}


def run_case(case: str) -> dict:
    """One case in a fresh process: this script again with the same flags, under the C allocator's defaults."""
    args = ["--child", case] + [a for a in sys.argv[1:] if a != "--child"]
    return run_module("benchmarks.bench_measure", args, env=child_env(drop_prefix="MALLOC_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--min-time-s", type=float, default=0.0,
                        help="each timed round lasts at least this long (the trial option min_time_s); the bare "
                             "loop and the hand loop of the fidelity check are sized alike")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the fidelity check")
    parser.add_argument("--allocator", choices=("steady", "default"), default="steady",
                        help="default: leave glibc as it is (what the suite did before holding it steady)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"{args.model} {args.image_size}px batch {args.batch_size} fp32 cpu, warmup>={args.warmup}, "
          f"iters {args.iters}, min_time_s {args.min_time_s}, allocator {args.allocator}, {args.repeats} fresh processes per case")
    cases = ("cold-both", "cold-infer", "cold-train", "warm")
    rows: dict[str, list[dict]] = {case: [] for case in (*cases, "floor")}
    for _ in range(args.repeats):  # round-robin, with a bare-loop process after each cold one: the
        for case in cases:  # suite's cases and the floor meet the same episodes of the machine
            rows[case].append(run_case(case))
            if case != "warm":
                rows["floor"].append(run_case("floor"))
    values: dict[str, list[float]] = {"infer": [], "train": []}
    for case in cases:
        for phase in values:
            got = [r[phase] for r in rows[case] if r[phase] is not None]
            values[phase] += got
            if got:
                print(f"  {case:11s} {phase:5s} samples/s: {', '.join(f'{v:,.1f}' for v in got)}")
        print(f"  {case:11s} warm-up steps (infer, train): {[r['warmup_steps'] for r in rows[case]]}; "
              f"overhead {statistics.median(r['overhead_s'] for r in rows[case]):.2f} s")
    for phase in values:
        print(f"  {'bare loop':11s} {phase:5s} samples/s: {', '.join(f'{r[phase]:,.1f}' for r in rows['floor'])}")
    for phase, got in values.items():
        bare = [r[phase] for r in rows["floor"]]
        print(f"history independence, {phase}: spread max/min = {max(got) / min(got):.3f}x over "
              f"{len(got)} measurements (target <= 1.05x); the bare loop in {len(bare)} fresh processes "
              f"between them: {max(bare) / min(bare):.3f}x (this machine's floor)")
        medians = {case: statistics.median(r[phase] for r in rows[case]) for case in cases
                   if all(r[phase] is not None for r in rows[case])}
        print(f"  history effect, {phase}: median per case " + ", ".join(f"{c} {m:,.1f}" for c, m in medians.items())
              + f"; max/min {max(medians.values()) / min(medians.values()):.3f}x (a history effect would be a "
              f"case apart from the others; the bare loop's median {statistics.median(bare):,.1f})")
    fid = run_case("fidelity")
    for phase in ("infer", "train"):
        rounds = ", ".join(f"{r:.3f}" for r in fid["rounds"][phase])
        print(f"fidelity, {phase}: suite / timm-style hand loop = {fid[phase]:.3f} (rounds {rounds}; target >= 0.97)")


if __name__ == "__main__":
    main()
