"""The other GPU paths: torch.compile, the fp16 gradient scaler, the probe, the profiler, CPU trials."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from typing import Iterator

from benchmarks.gpu_check.core import Context, Result, rounded, run_child, skipped, trial, verdict

# torch threads for the CPU parts of untimed checks (4 on 16 cores): the test queue holds the other cores
CPU_CHECK_THREADS = max(1, min(4, (os.cpu_count() or 2) // 4))
PROBE_FIELDS = ("probe_top1", "probe_top5", "probe_balanced_accuracy", "probe_C", "probe_val_top1", "probe_solver")


def check_compile(ctx: Context) -> Result:
    """Several compiled trials in one process each compile; compile time apart; compiled == eager."""
    from suite.sweep.trial import run_trial

    small = {"embed_dim": 64, "image_size": 96, "warmup": 2, "iters": 5, "compile": True}
    trials = [trial(model="test_vit", mode="infer", batch_size=8, **small),
              trial(model="test_resnet", mode="infer", precision="bf16", batch_size=8, **small),
              trial(model="test_vit", mode="infer", batch_size=16, **small)]  # the same tower again, another batch
    rows, ok = [], True
    for t in trials:
        r = run_trial(t, cache_dir=ctx.cache_dir)
        m = r.measure
        rows.append({"trial": t.label, "mode": t.mode, "status": r.status, "reason": r.reason,
                     "compile_graphs": m.compile_graphs, "compile_graph_breaks": m.compile_graph_breaks,
                     "compile_time_s": m.compile_time_s, "measured_time_s": m.measured_time_s})
        ok &= r.status == "ok" and (m.compile_graphs or 0) >= 1 and (m.compile_time_s or 0) > 0
    match = _compiled_matches_eager()
    ok &= match["max_rel_diff"] <= 1e-3
    figure = (f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} compiled trials ok, graphs "
              f"{[r['compile_graphs'] for r in rows]}, compile s {[round(r['compile_time_s'] or 0, 1) for r in rows]}; "
              f"compiled vs eager rel diff {match['max_rel_diff']:.1e} (<=1e-3)")
    return verdict(ok, figure, rounded({"trials": rows, "compiled_vs_eager": match}, 6))


def _compiled_matches_eager() -> dict:
    """The compiled tower's output against the eager one, strict fp32, same weights and input."""
    import torch

    from suite.machine.device import strict_fp32
    from suite.measurement.steps import compile_tower, reset_compiler
    from suite.tower.model import build_tower

    torch.manual_seed(0)
    tower = build_tower(trial(model="test_vit", embed_dim=64, image_size=96)).to("cuda").eval()
    x = torch.randn(4, 3, 96, 96, device="cuda")
    reset_compiler()
    with strict_fp32("cuda", "fp32"), torch.no_grad():
        eager = tower(x)
        compiled = compile_tower(tower)(x)
    diff = float((compiled - eager).abs().max() / eager.abs().max())
    return {"max_rel_diff": diff, "shape": list(eager.shape)}


def check_fp16(ctx: Context) -> Result:
    """fp16 training with the gradient scaler: no optimizer step skipped while timing."""
    import torch

    from suite.measurement.engine import measure
    from suite.measurement.steps import train_step_fn
    from suite.tower.model import build_tower

    t = trial(model="resnet50", precision="fp16", channels_last=True, mode="train", batch_size=64, warmup=3, iters=5)
    r = measure(t, cache_dir=ctx.cache_dir / "roofline")
    # The same step counted by hand: skips in warm-up apart from skips in the timed window.
    torch.manual_seed(0)
    tower = build_tower(t)
    step = train_step_fn(tower, t, "cuda")
    x = torch.randn(t.batch_size, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(5):
        step(x)
    before = step.optimizer_steps()
    for _ in range(10):
        step(x)
    timed_skips = 10 - (step.optimizer_steps() - before)
    figures = {"train_skipped_steps": r.train_skipped_steps, "train_warmup_steps": r.train_warmup_steps,
               "train_samples_per_sec": r.train_samples_per_sec, "hand_warmup_skips": 5 - before,
               "hand_timed_skips": timed_skips, "scaler_scale": float(step.scaler.get_scale())}
    ok = r.train_skipped_steps == 0 and timed_skips == 0
    notes = [] if r.train_skipped_steps == 0 or timed_skips else [
        "the suite's train_skipped_steps counts warm-up steps too (see hand_* figures)"]
    return verdict(ok, f"skipped steps: suite {r.train_skipped_steps}, hand-timed {timed_skips}, "
                       f"{r.train_samples_per_sec:.0f} img/s", rounded(figures), notes)


def check_probe(ctx: Context) -> Result:
    """Digits probe on the GPU within 1 point of the CPU probe; two GPU fits identical."""
    from suite.probe.engine import probe_trial

    t = trial(model="resnet18", image_size=64, embed_dim=128, dataset="digits", probe_batch_size=256)
    folder = ctx.cache_dir / "probe-check"
    with cpu_threads(CPU_CHECK_THREADS):  # the test suite runs beside this check
        cpu = probe_trial(t, device="cpu", use_cache=False)
    gpu = probe_trial(t, device="cuda", cache_dir=folder)  # extracts, stores the features
    refit = probe_trial(t, device="cuda", cache_dir=folder)  # the same features: a second fit
    pick = lambda r: {k: getattr(r, k) for k in PROBE_FIELDS}  # noqa: E731
    figures = {"cpu": pick(cpu), "gpu": pick(gpu), "gpu_refit": pick(refit), "refit_cache_hit": refit.probe_cache_hit,
               "gpu_extract_samples_per_sec": gpu.probe_extract_samples_per_sec,
               "cpu_extract_samples_per_sec": cpu.probe_extract_samples_per_sec}
    diff = abs(gpu.probe_top1 - cpu.probe_top1)
    same = pick(gpu) == pick(refit) and refit.probe_cache_hit
    return verdict(diff <= 1.0 and same, f"top-1 GPU {gpu.probe_top1:.2f} vs CPU {cpu.probe_top1:.2f} "
                                         f"(|diff| {diff:.2f} <= 1); two GPU fits {'identical' if same else 'DIFFER'}",
                   rounded(figures))


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trace_kernels(folder) -> tuple[int, int]:
    """(trace files, GPU kernel events in them)."""
    traces = list(folder.glob("*.pt.trace.json"))
    kernels = 0
    for path in traces:
        events = json.loads(path.read_text()).get("traceEvents", [])
        kernels += sum(1 for e in events if str(e.get("cat", "")).lower() == "kernel")
    return len(traces), kernels


def check_profiler(ctx: Context) -> Result:
    """`suite profile` on CUDA: a trace with kernels, non-zero CUDA time in the table; no plugin needed."""
    from suite.measurement.profile import profile_trial

    folder = ctx.out / "profile"
    shutil.rmtree(folder, ignore_errors=True)  # a rerun into the same --out counts only its own trace
    t = trial(model="resnet18", precision="bf16", batch_size=32)
    table = profile_trial(t, folder, steps=3, phase="train")
    self_ms = [float(m) for m in re.findall(r"^\| `[^`]+` \| \d+ \| ([\d.]+) \|", table, flags=re.M)]
    traces, kernels = _trace_kernels(folder)
    figures = {"table_self_cuda_ms": sum(self_ms), "rows": len(self_ms), "trace_files": traces,
               "kernel_events": kernels, "torch_tb_profiler_imported": "torch_tb_profiler" in sys.modules}
    (ctx.out / "profile" / "top-operators.md").write_text(table)
    ok = "self CUDA time" in table and sum(self_ms) > 0 and traces == 1 and kernels > 0
    return verdict(ok, f"{traces} trace, {kernels} kernel events, top-operator self CUDA time {sum(self_ms):.1f} ms",
                   rounded(figures), ["the table is in profile/top-operators.md"])


def check_cpu_context(ctx: Context) -> Result:
    """A CPU trial (with its probe) in a fresh process on this machine creates no CUDA context."""
    got = run_child(ctx, "cpu_trial", {"cache_dir": str(ctx.cache_dir)},
                    timeout_s=max(20.0, min(90.0, ctx.remaining())))
    figure = f"CPU trial {got['status']}, CUDA initialized: {got['cuda_initialized']}"
    if not ctx.cuda:
        return skipped(f"no CUDA (ran: {figure}; meaningful where CUDA exists)", got)
    return verdict(got["status"] == "ok" and not got["cuda_initialized"], figure, got)


def cpu_trial_child(cache_dir: str) -> dict:
    """In a fresh process: one tiny CPU trial with a probe, then whether CUDA was initialized."""
    import torch

    from suite.core.options import Trial
    from suite.sweep.trial import run_trial

    torch.set_num_threads(CPU_CHECK_THREADS)  # the test suite runs beside this check
    t = Trial(model="test_resnet", device="cpu", image_size=32, embed_dim=32, batch_size=2, warmup=1, iters=2,
              mode="infer", dataset="digits", max_per_class=10)
    record = run_trial(t, cache_dir=cache_dir)
    initialized = torch.cuda.is_initialized()  # read before anything below could initialize it
    return {"status": record.status, "reason": record.reason, "cuda_initialized": initialized,
            "cuda_available": torch.cuda.is_available(), "probe_top1": record.probe.probe_top1,
            "infer_samples_per_sec": record.measure.infer_samples_per_sec}
