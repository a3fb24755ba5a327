"""The GPU acceptance check: one command that checks every GPU path of the suite on a real card.

    python -m benchmarks.gpu_check --list                 # the checks (--markdown: the README's table)
    PYTHONUNBUFFERED=1 python -m benchmarks.gpu_check --out DIR [--bundle FILE.tar.gz]

Run from the repository root (it imports `suite` from the source tree). One module per area:

- `cli`: the command line, the run in stage order, what is saved after every check;
- `registry`: the checks in order, each with its criterion and cap (`--list`, the README's table);
- `core`: the check record, the run context, time caps, child processes, small numeric helpers;
- `summary`: the JSON and markdown written to `--out`;
- `basics`: environment fingerprint, roofline, strict fp32, FLOPs under each SDPA backend;
- `timing`: measure vs hand loops (CUDA events, timm's benchmark.py), cold vs warm, MFU;
- `memory`: peak memory invariants, checkpointing, real OOM back-off;
- `stages`: torch.compile, the fp16 gradient scaler, the probe, the profiler, CPU trials;
- `project`: the test suite (pytest, a queue of processes) and the GPU sweep with its report;
- `child_cases`: what runs in a fresh process (cold measurement, OOM back-off, CPU trial).
"""
