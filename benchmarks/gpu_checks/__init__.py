"""The checks of `benchmarks/gpu_check.py`, one module per area.

- `core`: the check record, the run context, time caps, child processes, small numeric helpers;
- `summary`: the JSON and markdown written to `--out`;
- `basics`: environment fingerprint, roofline, strict fp32, FLOPs under each SDPA backend;
- `timing`: measure vs hand loops (CUDA events, timm's benchmark.py), cold vs warm, MFU;
- `memory`: peak memory invariants, checkpointing, real OOM back-off;
- `stages`: torch.compile, the fp16 gradient scaler, the probe, the profiler, CPU trials;
- `project`: the test suite (pytest, sharded) and the GPU sweep with its report;
- `children`: what runs in a fresh process (cold measurement, OOM back-off, CPU trial).
"""
