"""The confirm step's error rates on this machine's own noise: false alarms, detection, and its cost.

    python -m benchmarks.bench_gate_noise --record reports/gate-noise.json   # real A/B blocks, same code
    python -m benchmarks.bench_gate_noise --simulate reports/gate-noise.json # rates from those blocks

1. `--record FILE` runs real A/B experiments of identical code (both sides this checkout, in blocks of
   fresh processes, as `suite compare --confirm` runs them) on tiny trials, `--blocks` blocks each,
   never stopped early, and stores every block's mean log speed ratio (and every pair's), and the time
   a block took.
2. `--simulate FILE` draws many experiments from those recorded blocks (resampled with replacement):
   identical code (each experiment's blocks centred on 0), and planted slowdowns (shifted by log(1 - s)),
   and runs the sequential test on them exactly as the gate does (looks, Bonferroni over
   `--experiments`, a budget of `--max-blocks`). It prints how often each case is called a regression,
   no regression or cannot tell, and the blocks each decision took.

Prints figures; exits non-zero only on an error. Recording needs an idle machine (minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

TRIALS = [  # tiny CPU trials, as the smoke sweep has them
    {"model": "test_resnet", "image_size": 96, "embed_dim": 64, "batch_size": 16, "device": "cpu"},
    {"model": "test_vit", "image_size": 96, "embed_dim": 64, "batch_size": 16, "device": "cpu"},
    {"model": "test_convnext", "image_size": 96, "embed_dim": 64, "batch_size": 16, "device": "cpu"},
]


def record(path: Path, blocks: int, threads: int) -> None:
    from suite.core.options import Trial
    from suite.gate.abtest import Experiment, ProcessSide, block

    out = []
    sides = ProcessSide("baseline", None, threads), ProcessSide("current", None, threads)
    try:
        for values in TRIALS:
            values = dataclasses.asdict(Trial(**values))
            for phase in ("infer", "train"):
                exp = Experiment(values["model"], phase, -0.05)
                t0 = time.monotonic()
                for _ in range(blocks):  # every block, never stopped early: the recorded noise
                    exp.blocks.append(block(exp, *sides, values, threads))
                means = exp.block_means()
                out.append({"model": values["model"], "phase": phase, "steps": exp.steps, "log_ratios": means,
                            "pairs": [p.log_ratio for p in exp.pairs],
                            "block_s": (time.monotonic() - t0) / max(1, len(means))})
                print(f"{values['model']:14s} {phase:5s} {len(means)} blocks, sd {100 * _sd(means):.1f}%, "
                      f"{out[-1]['block_s']:.2f} s a block")
    finally:
        for side in sides:
            side.close()
    path.write_text(json.dumps({"recorded": time.strftime("%Y-%m-%d %H:%M"), "threads": threads,
                                "experiments": out}, indent=1))
    print(f"wrote {path}")


def _sd(x: list[float]) -> float:
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / max(1, len(x) - 1))


def simulate(path: Path, runs: int, experiments: int, max_blocks: int, seed: int) -> None:
    from suite.gate.sequential import LOOKS, decide

    data = json.loads(path.read_text())
    # Block means, each experiment's centred on 0: its recorded mean is a draw too (the code was
    # identical), and the shift added below is then the true change of the simulated pairs.
    pools = [[x - sum(e["log_ratios"]) / len(e["log_ratios"]) for x in e["log_ratios"]]
             for e in data["experiments"] if len(e["log_ratios"]) >= 8]
    rng = random.Random(seed)
    print(f"{path}: {len(pools)} recorded experiments ({data['recorded']}), {runs} simulated each case; "
          f"{experiments} experiments share the error budget; at most {max_blocks} blocks (the budget)")
    for label, shift in (("identical code", 0.0), ("2% slower", -0.02), ("5% slower (= threshold)", -0.05),
                         ("10% slower", -0.10)):
        verdicts: dict[str, int] = {}
        used = []
        for _ in range(runs):
            pool = rng.choice(pools)
            x: list[float] = []
            verdict = "cannot tell"
            for n in range(1, max_blocks + 1):
                x.append(rng.choice(pool) + math.log1p(shift))
                if n in LOOKS or n == max_blocks:
                    d = decide(x, -0.05, experiments=experiments, final=n == max_blocks)
                    if d.verdict != "undecided":
                        verdict = d.verdict
                        break
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            used.append(len(x))
        share = {v: f"{100 * k / runs:.1f}%" for v, k in sorted(verdicts.items())}
        print(f"  {label:24s} {share}  blocks: median {sorted(used)[len(used) // 2]}, max {max(used)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="run real identical A/B pairs and store them here")
    parser.add_argument("--simulate", type=Path, help="rates from recorded pairs")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per recorded experiment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2000, help="simulated experiments per case")
    parser.add_argument("--experiments", type=int, default=10, help="flagged experiments sharing the error budget")
    parser.add_argument("--max-blocks", type=int, default=32, help="blocks the time budget allows (then: cannot tell)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.record and not args.simulate:
        parser.error("give --record FILE, --simulate FILE, or both")
    if args.record:
        record(args.record, args.blocks, args.threads)
    if args.simulate:
        simulate(args.simulate, args.runs, args.experiments, args.max_blocks, args.seed)


if __name__ == "__main__":
    main()
