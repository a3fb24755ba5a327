"""The confirm step's error rates on this machine's own noise: false alarms, detection, and its cost.

    python -m benchmarks.bench_gate_noise --record reports/gate-noise.json   # real A/B pairs, same code
    python -m benchmarks.bench_gate_noise --simulate reports/gate-noise.json # rates from those pairs

1. `--record FILE` runs real A/B experiments of identical code (both sides this checkout, in their
   own processes, as `suite compare --confirm` runs them) on a few tiny trials, `--pairs` pairs each,
   and stores every pair's log speed ratio and the pair's wall time.
2. `--simulate FILE` draws many experiments from those recorded pairs (resampled with replacement):
   identical code (the pairs as recorded), and a planted slowdown (each pair shifted by
   log(1 - s)), and runs the sequential test on them exactly as the gate does (looks, Bonferroni,
   budget in pairs). It prints the false-alarm rate (identical code called a regression), the
   detection rate of a 10% slowdown, how often a 2% slowdown is (wrongly) called a regression, and
   the pairs each decision took.

Prints figures; exits non-zero only on an error. Recording needs an idle machine (about a minute).
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


def record(path: Path, pairs: int, threads: int) -> None:
    from suite.core.options import Trial
    from suite.gate.abtest import Experiment, ProcessSide, run_experiment

    out = []
    sides = ProcessSide("baseline", None, threads), ProcessSide("current", None, threads)
    try:
        for values in TRIALS:
            values = dataclasses.asdict(Trial(**values))
            for phase in ("infer", "train"):
                exp = Experiment(values["model"], phase, -0.05)
                t0 = time.monotonic()
                # A vanishing error budget (10**9 experiments) never decides early: it runs to MAX_PAIRS.
                run_experiment(exp, *sides, values, threads, deadline=time.monotonic() + 3600, experiments=10**9)
                logs = [p.log_ratio for p in exp.pairs][:pairs]
                out.append({"model": values["model"], "phase": phase, "steps": exp.steps, "log_ratios": logs,
                            "pair_s": (time.monotonic() - t0) / max(1, len(exp.pairs))})
                print(f"{values['model']:14s} {phase:5s} {len(logs)} pairs, sd {100 * _sd(logs):.1f}%, "
                      f"{out[-1]['pair_s']:.2f} s a pair")
    finally:
        for side in sides:
            side.close()
    path.write_text(json.dumps({"recorded": time.strftime("%Y-%m-%d %H:%M"), "threads": threads,
                                "experiments": out}, indent=1))
    print(f"wrote {path}")


def _sd(x: list[float]) -> float:
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / max(1, len(x) - 1))


def simulate(path: Path, runs: int, experiments: int, max_pairs: int, seed: int) -> None:
    from suite.gate.sequential import LOOKS, decide

    data = json.loads(path.read_text())
    pools = [e["log_ratios"] for e in data["experiments"] if len(e["log_ratios"]) >= 8]
    rng = random.Random(seed)
    print(f"{path}: {len(pools)} recorded experiments ({data['recorded']}), {runs} simulated each case; "
          f"{experiments} experiments share the error budget; at most {max_pairs} pairs (the budget)")
    for label, shift in (("identical code", 0.0), ("2% slower", -0.02), ("5% slower (= threshold)", -0.05),
                         ("10% slower", -0.10)):
        verdicts: dict[str, int] = {}
        used = []
        for _ in range(runs):
            pool = rng.choice(pools)
            x: list[float] = []
            verdict = "cannot tell"
            for n in range(1, max_pairs + 1):
                x.append(rng.choice(pool) + math.log1p(shift))
                if n in LOOKS or n == max_pairs:
                    d = decide(x, -0.05, experiments=experiments, final=n == max_pairs)
                    if d.verdict != "undecided":
                        verdict = d.verdict
                        break
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            used.append(len(x))
        share = {v: f"{100 * k / runs:.1f}%" for v, k in sorted(verdicts.items())}
        print(f"  {label:24s} {share}  pairs: median {sorted(used)[len(used) // 2]}, max {max(used)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="run real identical A/B pairs and store them here")
    parser.add_argument("--simulate", type=Path, help="rates from recorded pairs")
    parser.add_argument("--pairs", type=int, default=64, help="pairs per recorded experiment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2000, help="simulated experiments per case")
    parser.add_argument("--experiments", type=int, default=10, help="flagged experiments sharing the error budget")
    parser.add_argument("--max-pairs", type=int, default=32, help="pairs the time budget allows (then: cannot tell)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.record and not args.simulate:
        parser.error("give --record FILE, --simulate FILE, or both")
    if args.record:
        record(args.record, args.pairs, args.threads)
    if args.simulate:
        simulate(args.simulate, args.runs, args.experiments, args.max_pairs, args.seed)


if __name__ == "__main__":
    main()
