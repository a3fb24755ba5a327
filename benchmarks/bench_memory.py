"""Benchmark of the capacity prediction: predicted largest batch vs the batch found by measuring.

    python -m benchmarks.bench_memory                                  # resnet18, vit_tiny; 224 px; 2 GiB; CPU
    python -m benchmarks.bench_memory --models resnet18 --budget-mib 4096 --batch-size 16

For each model (train phase, fp32, CPU):

1. predicted: `suite.measurement.footprint.phase_memory` at `--batch-size` (the memory pass at that batch and
   at half of it, as every trial does), the line `peak = fixed + per_sample * batch` through the
   two points, and the largest batch under the budget (`suite.measurement.capacity.predict_max_batch`);
2. measured: `suite.measurement.capacity.search_max_batch`, doubling then bisecting from `--batch-size`, each
   try a full memory pass whose measured live-tensor peak must stay within the budget (on CPU
   nothing really runs out of memory: the budget is the live-tensor count, as in the suite);

and prints both with the prediction's error (target: within 10%), the line, and the time taken.
Memory, not timing: the figures do not depend on the machine's load. Exits non-zero only on an error.
"""
from __future__ import annotations

import argparse
import time


def one_model(model: str, args) -> dict:
    import torch

    from suite.core.options import Trial
    from suite.measurement.capacity import predict_max_batch, search_max_batch
    from suite.measurement.footprint import memory_pass, phase_memory
    from suite.measurement.memory import MemoryBaseline
    from suite.measurement.steps import make_inputs
    from suite.tower.model import build_tower

    trial = Trial(model=model, image_size=args.image_size, batch_size=args.batch_size, device="cpu", mode="train",
                  mem_budget_mib=args.budget_mib)
    baseline = MemoryBaseline("cpu")
    torch.manual_seed(0)
    tower = build_tower(trial)

    start = time.perf_counter()
    mem = phase_memory("train", tower, trial, "cpu", make_inputs(trial, "cpu", args.batch_size), baseline)
    predicted = predict_max_batch(mem.fixed_mib, mem.per_sample_mib, args.budget_mib)
    predict_s = time.perf_counter() - start

    peaks: dict[int, float] = {}

    def fits(batch: int) -> bool:
        peak, _ = memory_pass("train", tower, trial, "cpu", make_inputs(trial, "cpu", batch), baseline)
        peaks[batch] = peak.peak_mib
        print(f"  {model}: batch {batch}: peak {peak.peak_mib:,.0f} MiB", flush=True)
        return peak.peak_mib <= args.budget_mib

    start = time.perf_counter()
    measured = search_max_batch(fits, args.batch_size)
    return {"model": model, "predicted": predicted, "measured": measured,
            "error": predicted / measured - 1 if measured else None,
            "fixed_mib": mem.fixed_mib, "per_sample_mib": mem.per_sample_mib,
            "peak_at_measured": peaks.get(measured), "predict_s": predict_s, "search_s": time.perf_counter() - start,
            "tries": len(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vit_tiny_patch16_224"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="the trial's batch (the line uses it and half)")
    parser.add_argument("--budget-mib", type=float, default=2048.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    rows = [one_model(m, args) for m in args.models]
    print(f"\nlargest train batch under {args.budget_mib:,.0f} MiB, {args.image_size} px, fp32, CPU "
          f"(line from batches {args.batch_size} and {args.batch_size // 2}):")
    print(f"{'model':<24} {'predicted':>9} {'measured':>9} {'error':>7} {'fixed MiB':>10} {'MiB/sample':>10} "
          f"{'predict s':>9} {'search s':>9}")
    for r in rows:
        err = "—" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        print(f"{r['model']:<24} {r['predicted']!s:>9} {r['measured']:>9} {err:>7} {r['fixed_mib']:>10.1f} "
              f"{r['per_sample_mib']:>10.2f} {r['predict_s']:>9.1f} {r['search_s']:>9.1f}")
    worst = max((abs(r["error"]) for r in rows if r["error"] is not None), default=None)
    if worst is not None:
        print(f"worst |error| {100 * worst:.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
