"""The checks, in the order they run: the one list that `--list`, the run and the README's table read.

Each entry has a short criterion (printed per check and in gpu_check.md) and, where the short one
leaves something out, the criterion in full (`detail`, the README's table). The README's table is
this list as `python -m benchmarks.gpu_check --list --markdown` prints it; a test keeps them equal.
"""
from __future__ import annotations

from benchmarks.gpu_check import basics, memory, project, stages, timing
from benchmarks.gpu_check.core import Check

CHECKS = (
    Check("env", "device name, driver, CUDA, cuDNN, torch and timm all recorded", basics.check_env, 30,
          needs_cuda=False,
          detail="device name, driver, CUDA, cuDNN, torch and timm recorded; also lists optional packages and "
                 "the torch APIs the GPU paths use"),
    Check("roofline", "bf16 matmul peak in the card's band; fp32 strict < 0.5x TF32; cached per device",
          basics.check_roofline, 60,
          detail="measured bf16 matmul peak within 0.55-0.90 of the card's data-sheet dense bf16 peak (H100 SXM: "
                 "544-890 TFLOP/s); fp32 strict < 0.5x TF32; a second lookup comes from the per-device cache file"),
    Check("fidelity", "measure() within ±3% of a hand-written CUDA-event loop (vit_base bf16 b128, infer+train)",
          timing.check_fidelity, 90,
          detail="`measure()` within ±3% of a hand-written CUDA-event loop over the same computation (vit_base "
                 "bf16, batch 128, infer and train; median of 2 alternating rounds)"),
    Check("timm", "within ±3% of a timm benchmark.py-style loop (resnet50, vit_base; bf16 b256; infer, train)",
          timing.check_timm_side_by_side, 120,
          detail="within ±3% of a loop written like timm's `benchmark.py` (warm-up 10, sync after each step, "
                 "samples over the loop's wall time) for resnet50 and vit_base_patch16_224, bf16, batch 256, "
                 "infer and train; a case past ±3% counts as explained when the suite is within ±3% of the same "
                 "step in a CUDA-event loop with no host sync inside, the fidelity check's loop (timm's per-step "
                 "host sync then costs the difference)"),
    Check("mfu", "MFU of vit_base_patch16_224 bf16 inference at batch 256 in 0.2-0.95", timing.check_mfu, 45),
    Check("cold_warm", "the same trial warm (after other trials) within 2% of cold (fresh processes, before and after)",
          timing.check_cold_warm, 90,
          detail="resnet50 bf16 channels_last batch 128: first measurement of a fresh process, the same trial "
                 "after the others in this process, then a fresh process again; warm within 2% of the two cold "
                 "figures' mean (a drift between the two cold ones is the card, not the process: clocks, "
                 "temperature, power and throttle reasons are recorded around each)"),
    Check("memory", "train peak > infer peak > weights; runs agree within 1%; no leak; checkpointing lowers peak",
          memory.check_memory, 90, stage="untimed",
          detail="vit_base: train peak > infer peak > weights; two `run_trial`s agree within 1%; memory "
                 "allocated after each trial's cleanup constant within 1 MiB; gradient checkpointing lowers the "
                 "train peak at batch 128"),
    Check("strict_fp32", "under strict fp32 a matmul and a conv match float64 to 1e-5", basics.check_strict_fp32, 30,
          stage="untimed",
          detail="under `strict_fp32` a 1024² matmul and a 3x3 conv match float64 to 1e-5 (norm-wise), TF32 "
                 "errors at least 10x larger"),
    Check("flops", "vit_base FLOPs on CUDA/bf16 = meta count ±0.1% for flash, efficient, cuDNN SDPA; bf16 seen",
          basics.check_flops, 60, stage="untimed",
          detail="vit_base FLOPs on CUDA under bf16 equal the meta-device count ±0.1% with the flash, efficient "
                 "and cuDNN SDPA backends forced (the forced op is seen dispatched; cuDNN may be unavailable); "
                 "bf16 matmuls seen. Training is compared with meta + the score recompute that fused attention "
                 "backward kernels do (PyTorch's formulas count it; the meta math path does not)"),
    Check("oom", "with 20% of the card auto batch size ends ok at a smaller batch (resnet50 train, vit_base infer)",
          memory.check_oom, 150, stage="untimed",
          detail="in a fresh process with `set_per_process_memory_fraction(0.2)`: auto batch size for resnet50 "
                 "(channels_last, bf16, train) and vit_base (infer) ends `ok` at a smaller batch; no "
                 "cuDNN/cuBLAS failure recorded as `error`"),
    Check("compile", "3 compiled inference trials in one process each compile; compile time apart; compiled == eager",
          stages.check_compile, 150, stage="untimed",
          detail="three compiled inference trials in one process (test_vit, test_resnet bf16, test_vit at another "
                 "batch) each `ok` with `compile_graphs` >= 1 and `compile_time_s` > 0; a compiled tower matches "
                 "eager within 1e-3 (strict fp32)"),
    Check("fp16_scaler", "fp16 training: no optimizer step skipped while timing", stages.check_fp16, 45, stage="untimed",
          detail="resnet50 fp16 training: `train_skipped_steps` == 0, and no skip in a hand-counted timed window"),
    Check("probe", "GPU digits probe within 1 point of CPU; two GPU fits identical", stages.check_probe, 60,
          stage="untimed",
          detail="digits probe (resnet18, 64 px) on the GPU within 1 point of the CPU probe; a second fit on the "
                 "same (cached) GPU features identical"),
    Check("profiler", "CUDA trace with kernels and non-zero CUDA time in the top-operator table",
          stages.check_profiler, 45, stage="untimed",
          detail="`profile_trial` on CUDA writes a trace with kernel events and a top-operator table with "
                 "non-zero CUDA time, without torch-tb-profiler"),
    Check("cpu_context", "a CPU trial on this machine creates no CUDA context", stages.check_cpu_context, 60,
          needs_cuda=False, stage="untimed",
          detail="a CPU trial with a probe, in a fresh process on the GPU machine, leaves "
                 "`torch.cuda.is_initialized()` False"),
    Check("pytest", "`pytest -m gpu` passes and so do the CPU-assuming tests", project.check_tests, project.TESTS_CAP_S,
          needs_cuda=False, stage="final",
          detail="the test suite in parallel pytest processes started after the timed checks: `-m gpu` over every "
                 "file (at least one GPU test runs), and every other file in its own process from a queue (up to "
                 "10 at a time, one BLAS thread each, the slowest files first); all pass"),
    Check("sweep", "experiments/gpu-check.yaml: every trial ok; report written", project.check_sweep, 180,
          needs_cuda=False, stage="final",
          detail="`experiments/gpu-check.yaml` (random init) through `suite.run_experiment`: every trial ok; "
                 "report written to `reports/gpu-<card>.md`"),
)
STAGES = ("timed", "untimed", "final")
NAMES = tuple(c.name for c in CHECKS)


def listing() -> str:
    """One line per check: name, cap, where it runs, the short criterion (`--list`)."""
    return "\n".join(f"{c.name:12s} cap {c.cap_s:4.0f} s  {'GPU' if c.needs_cuda else 'any'}  {c.criterion}"
                     for c in CHECKS)


def markdown_table() -> str:
    """The checks as the README's markdown table (`--list --markdown`): the full criterion of each."""
    lines = ["| check | stage | runs on | cap (s) | pass criterion |", "|---|---|---|---:|---|"]
    for c in CHECKS:
        text = (c.detail or c.criterion).replace("|", "\\|")
        lines.append(f"| {c.name} | {c.stage} | {'CUDA' if c.needs_cuda else 'any'} | {c.cap_s:.0f} | {text} |")
    return "\n".join(lines)
