"""Memory truth on the GPU: peak ordering, repeatability, no leaks, checkpointing, real OOM back-off."""
from __future__ import annotations

import dataclasses

from benchmarks.gpu_check.core import Context, Result, rounded, run_child, trial, verdict

MIB = 2**20


def _allocated_mib() -> float:
    import torch

    from suite.sweep.trial import release_memory

    release_memory()
    return torch.cuda.memory_allocated() / MIB


def _weights_mib(t) -> float:
    import torch

    from suite.measurement.memory import tensor_mib
    from suite.tower.model import build_tower

    torch.manual_seed(0)
    return tensor_mib(build_tower(t))


def check_memory(ctx: Context) -> Result:
    """train peak > infer peak > weights; two runs agree within 1%; nothing stays allocated between them."""
    from suite.sweep.trial import run_trial

    t = trial(model="vit_base_patch16_224", pool="token", precision="bf16", batch_size=64, warmup=1, iters=3)
    weights = _weights_mib(t)
    allocated = [_allocated_mib()]
    peaks = []
    for _ in range(2):  # as a sweep worker runs trials: run_trial, then its cleanup
        record = run_trial(t, cache_dir=ctx.cache_dir)
        if record.status != "ok":
            return verdict(False, f"trial {record.status}: {record.reason}", {"trial": t.label})
        peaks.append((record.measure.infer_peak_mem_mib, record.measure.train_peak_mem_mib))
        allocated.append(_allocated_mib())
    infer, train = peaks[0]
    spread = max(max(p[i] for p in peaks) / min(p[i] for p in peaks) - 1 for i in (0, 1))
    leak = allocated[2] - allocated[1]
    figures = {"trial": t.label, "weights_mib": weights, "peaks_infer_train_mib": peaks, "spread": spread,
               "allocated_mib_before_and_after_each": allocated, "leak_mib": leak,
               "first_trial_growth_mib": allocated[1] - allocated[0]}
    ckpt = _checkpointing(ctx)
    figures["grad_checkpointing_batch128"] = ckpt
    ok = (train > infer > weights and spread <= 0.01 and leak <= 1.0
          and ckpt["active"] and ckpt["peak_on_mib"] < ckpt["peak_off_mib"])
    figure = (f"train {train:.0f} > infer {infer:.0f} > weights {weights:.0f} MiB; spread {spread:.2%} (<=1%); "
              f"leak {leak:.1f} MiB (<=1); ckpt train peak {ckpt['peak_on_mib']:.0f} vs {ckpt['peak_off_mib']:.0f} MiB")
    notes = ["first_trial_growth_mib: what the first trial leaves for good (library workspaces), not a leak"]
    return verdict(ok, figure, rounded(figures, 2), notes)


def _checkpointing(ctx: Context) -> dict:
    """vit_base train peak at batch 128 with and without gradient checkpointing."""
    from suite.measurement.engine import measure

    peaks, active = {}, None
    for on in (False, True):
        t = trial(model="vit_base_patch16_224", pool="token", precision="bf16", batch_size=128, mode="train",
                  grad_checkpointing=on, warmup=1, iters=3)
        r = measure(t, cache_dir=ctx.cache_dir / "roofline")
        peaks[on] = (r.train_peak_mem_mib, r.train_samples_per_sec)
        active = r.grad_checkpointing_active if on else active
    return {"peak_off_mib": peaks[False][0], "peak_on_mib": peaks[True][0],
            "ratio": peaks[True][0] / peaks[False][0], "samples_per_sec_off_on": [peaks[False][1], peaks[True][1]],
            "active": bool(active)}


def oom_start_batches(total_mib: float, fraction: float) -> dict[str, int]:
    """Start batches that cannot fit in `fraction` of the card, so auto batch size must back off.

    bf16 needs per image measured on an H200 (training resnet50 ~43 MiB, vit_base inference ~5.3 MiB),
    rounded up; 1.5x what fits, then up to a power of two: one or two back-offs, each a costly try.
    """
    def start(mib_per_image: float) -> int:
        want = 1.5 * fraction * total_mib / mib_per_image
        batch = 1
        while batch < want:
            batch *= 2
        return batch

    return {"resnet50": start(50), "vit_base_patch16_224": start(5.5)}


def oom_trials(total_mib: float, fraction: float) -> list:
    start = oom_start_batches(total_mib, fraction)
    return [
        trial(model="resnet50", precision="bf16", channels_last=True, mode="train", auto_batch_size=True,
              batch_size=start["resnet50"], warmup=1, iters=3),
        trial(model="vit_base_patch16_224", pool="token", precision="bf16", mode="infer", auto_batch_size=True,
              batch_size=start["vit_base_patch16_224"], warmup=1, iters=3),
    ]


def check_oom(ctx: Context) -> Result:
    """With 20% of the card, auto batch size ends `ok` at a smaller batch; no allocation failure is an `error`."""
    got = run_child(ctx, "oom", {"fraction": 0.2, "cache_dir": str(ctx.cache_dir)}, timeout_s=max(30.0, min(240.0, ctx.remaining() - 30)))
    ok, parts = True, []
    for row in got["trials"]:
        batch = row["infer_batch_size"] or row["train_batch_size"]
        good = row["status"] == "ok" and batch is not None and batch < row["batch_size"]
        library = any(w in (row["reason"] or "").lower() for w in ("cudnn", "cublas", "engine"))
        ok &= good and not library
        parts.append(f"{row['model']} {row['status']} at {batch} (from {row['batch_size']})")
    return verdict(ok, "; ".join(parts) + f" with {got['fraction']:.0%} of {got['total_mib'] / 1024:.0f} GiB",
                   rounded(got, 2))


def oom_child(fraction: float, cache_dir: str) -> dict:
    """In a fresh process: cap this process's share of the card, then run the back-off trials."""
    import torch

    from suite.sweep.trial import run_trial

    torch.cuda.set_per_process_memory_fraction(fraction)
    total = torch.cuda.get_device_properties(0).total_memory / MIB
    rows = []
    for t in oom_trials(total, fraction):
        record = run_trial(t, cache_dir=cache_dir)
        m = record.measure
        rows.append({"model": t.model, "mode": t.mode, "batch_size": t.batch_size, "status": record.status,
                     "reason": record.reason, "infer_batch_size": m.infer_batch_size,
                     "train_batch_size": m.train_batch_size, "measure": dataclasses.asdict(m)})
    return {"fraction": fraction, "total_mib": total, "trials": rows}
