"""Per-trial overhead of the sweep engine (issue target: under 1 s per trial for test_* models).

Runs a small sweep of tiny test_* trials in one worker and prints, for every trial after the
worker's first, the time spent outside the measured work: dispatch, tower building, probe-cache
lookup, environment capture and storing the row.

    python -m benchmarks.bench_sweep [--trials 12]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials in the sweep (embed_dim values)")
    args = parser.parse_args()

    from suite.results.store import load_results
    from suite.sweep.driver import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        dims = ", ".join(str(8 * (i + 1)) for i in range(args.trials))
        exp = Path(tmp) / "overhead.yaml"
        exp.write_text(textwrap.dedent(f"""
            name: overhead
            device: cpu
            measure: {{mode: both, batch_size: 8, warmup: 2, iters: 5}}
            probe: {{dataset: digits, max_per_class: 30}}
            grid: {{model: test_vit, image_size: 64, embed_dim: [{dims}], unlocked_groups: [null, 0]}}
        """))
        summary = run_experiment(exp, out=Path(tmp) / "out", quiet=True, report=False, cache_dir=Path(tmp) / "cache")
        df = load_results(summary.db_path).sort_values("started_at")
    measured = (df["measured_time_s"].fillna(0) + df["probe_time_s"].fillna(0)).tolist()
    starts, ends = df["started_at"].tolist(), df["finished_at"].tolist()
    # a trial's overhead: from the previous trial's end to its own end, less its measured work
    overhead = [ends[i] - ends[i - 1] - measured[i] for i in range(1, len(df))]
    print(f"trials: {len(df)} (statuses: {df['status'].value_counts().to_dict()})")
    print(f"sweep wall time: {summary.wall_s:.1f} s; measured work: {sum(measured):.1f} s")
    print(f"first trial (worker start-up, imports, first feature extraction): {ends[0] - starts[0]:.2f} s")
    print(f"per-trial overhead after the first: median {statistics.median(overhead):.3f} s, "
          f"max {max(overhead):.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
