"""The suite's own benchmarks, run from the repository root with `python -m`.

- `bench_measure`, `bench_memory`, `bench_probe`, `bench_sweep`, `bench_gate`: figure scripts
  (`python -m benchmarks.bench_measure --help`); they print figures, no pass/fail;
- `test_bench_suite`: the suite's hot paths under pytest-benchmark;
- `gpu_check`: the GPU acceptance check (`python -m benchmarks.gpu_check --list`);
- `shared`: what they share (the hand-written reference step, re-running a module as a child process).

See benchmarks/README.md.
"""
