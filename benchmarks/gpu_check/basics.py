"""The device and the arithmetic: environment fingerprint, roofline, strict fp32, FLOPs per SDPA backend."""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import time

from benchmarks.gpu_check.core import Context, Result, rounded, sdpa_backend, skipped, trial, verdict, within

OPTIONAL = {  # import name -> distribution name: what the project can use, and whether it is here
    "open_clip": "open_clip_torch", "ray": "ray", "torch_tb_profiler": "torch-tb-profiler",
    "matplotlib": "matplotlib", "pyarrow": "pyarrow", "yaml": "PyYAML", "torchvision": "torchvision",
    "triton": "triton", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "sklearn": "scikit-learn",
    "pandas": "pandas", "rich": "rich",
}
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) from the vendor's data sheets, most specific name first.
# A measured cuBLAS peak lands at roughly 0.6-0.85 of it (H100 SXM: ~600-800 measured).
SPEC_BF16 = (("H100 PCIe", 756), ("H100 NVL", 835), ("GH200", 989), ("H200", 989), ("H100", 989), ("H800", 989),
             ("A100", 312), ("A800", 312), ("L40S", 362), ("L4", 121), ("A10", 125), ("RTX 4090", 165))
BAND = (0.55, 0.90)  # plausible measured fraction of the spec
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention"}  # the op each forced backend must dispatch


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (the report's file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "unknown"


def _packages() -> dict[str, str | None]:
    out = {}
    for module, dist in OPTIONAL.items():
        if importlib.util.find_spec(module) is None:
            out[module] = None
            continue
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "present (version unknown)"
    return out


def _torch_apis() -> dict[str, bool]:
    """torch APIs the suite's GPU paths use that older torch (>= 2.1) may lack."""
    import torch

    try:
        import torch.nn.attention as attention
    except ImportError:
        attention = None
    average = torch.autograd.profiler_util.FunctionEventAvg()  # its fields are instance attributes
    return {
        "torch.OutOfMemoryError": hasattr(torch, "OutOfMemoryError"),
        "torch.amp.GradScaler": hasattr(getattr(torch, "amp", None), "GradScaler"),
        "torch.nn.attention.sdpa_kernel": hasattr(attention, "sdpa_kernel"),
        "SDPBackend.CUDNN_ATTENTION": hasattr(getattr(attention, "SDPBackend", None), "CUDNN_ATTENTION"),
        "profiler self_device_time_total": hasattr(average, "self_device_time_total"),
        "matmul.fp32_precision API": hasattr(torch.backends.cuda.matmul, "fp32_precision"),
        "dynamo fail_on_recompile_limit_hit": _has_dynamo_flag(),
    }


def _has_dynamo_flag() -> bool:
    try:
        import torch._dynamo.config as config
    except Exception:  # noqa: BLE001 - dynamo unusable here: then the flag is not there either
        return False
    return hasattr(config, "fail_on_recompile_limit_hit")


def _gpu_facts() -> dict:
    import torch

    from suite.machine.env import command_output

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    smi = command_output(["nvidia-smi", "--query-gpu=name,power.limit,clocks.max.sm,persistence_mode,ecc.mode.current",
                "--format=csv,noheader"])
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
            "sm_count": props.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
            "visible_devices": torch.cuda.device_count(), "nvidia_smi": smi}


def check_env(ctx: Context) -> Result:
    """The fingerprint every row carries, plus the packages and torch APIs the GPU paths rely on."""
    from suite.machine.env import capture_env

    env = dataclasses.asdict(capture_env("cuda" if ctx.cuda else "cpu"))
    figures = {"env": env, "packages": _packages(), "torch_apis": _torch_apis()}
    missing_apis = [k for k, v in figures["torch_apis"].items() if not v]
    notes = [f"torch lacks {', '.join(missing_apis)}: see the checks that use them"] if missing_apis else []
    absent = [k for k, v in figures["packages"].items() if v is None]
    if absent:
        notes.append(f"not installed: {', '.join(absent)} (tests that need them must skip)")
    if not ctx.cuda:
        return skipped("no CUDA: CPU fingerprint recorded, GPU fields cannot be filled", figures, notes)
    figures["gpu"] = _gpu_facts()
    ctx.card = env["env_device"] or "unknown"
    required = ("env_device", "env_driver", "env_cuda", "env_cudnn", "env_torch", "env_timm")
    empty = [k for k in required if not env.get(k)]
    figure = (f"{env['env_device']} · driver {env['env_driver']} · CUDA {env['env_cuda']} · cuDNN {env['env_cudnn']}"
              f" · torch {env['env_torch']} · timm {env['env_timm']}")
    return verdict(not empty, figure + (f" · missing {empty}" if empty else ""), figures, notes)


def _spec_bf16(name: str) -> float | None:
    return next((tflops for key, tflops in SPEC_BF16 if key.lower() in name.lower()), None)


def check_roofline(ctx: Context) -> Result:
    """bf16 peak in the card's band; strict fp32 far below TF32; the figures cached per device."""
    import torch

    from suite.machine.device import strict_fp32
    from suite.machine.env import device_name
    from suite.measurement import roofline

    folder = ctx.cache_dir / "roofline"
    t0 = time.perf_counter()
    bf16 = roofline.device_peak_tflops("cuda", "bf16", cache_dir=folder)
    measure_s = time.perf_counter() - t0
    with strict_fp32("cuda", "fp32"):
        strict = roofline.device_peak_tflops("cuda", "fp32", cache_dir=folder)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, with a cache key of its own
    try:
        tf32 = roofline.device_peak_tflops("cuda", "fp32", cache_dir=folder)
    finally:
        torch.set_float32_matmul_precision(before)
    roofline.forget_peaks()  # the next lookup must come from the file
    t0 = time.perf_counter()
    again = roofline.device_peak_tflops("cuda", "bf16", cache_dir=folder)
    cached_s = time.perf_counter() - t0
    files = [json.loads(p.read_text()) for p in folder.glob("peak-*.json")]
    name = device_name("cuda")
    spec = _spec_bf16(name)
    figures = {"bf16_tflops": bf16, "fp32_strict_tflops": strict, "tf32_tflops": tf32, "strict_over_tf32": strict / tf32,
               "bf16_measure_s": measure_s, "cached_lookup_s": cached_s, "cache_files": len(files),
               "cache_devices": sorted({f["key"]["device"] for f in files}), "spec_bf16_tflops": spec}
    cached = again == bf16 and cached_s < 0.5 and len(files) >= 3 and figures["cache_devices"] == [name]
    figure = (f"bf16 {bf16:.0f} TFLOP/s; fp32 strict {strict:.1f} vs TF32 {tf32:.1f} ({strict / tf32:.2f}x); "
              f"cache {'hit' if cached else 'MISS'} in {cached_s * 1e3:.0f} ms")
    if spec is None:
        return skipped(f"no reference band for {name!r}: {figure}", figures)
    low, high = BAND[0] * spec, BAND[1] * spec
    figures["band_tflops"] = [low, high]
    ok = low <= bf16 <= high and strict < 0.5 * tf32 and cached
    return verdict(ok, f"{figure}; band {low:.0f}-{high:.0f}", figures)


def _relative_error(out, ref) -> float:
    """Norm-wise relative error ||out - ref|| / ||ref||, in float64."""
    return float((out.double() - ref).norm() / ref.norm())


def _errors(a, b, x, w) -> tuple[float, float]:
    import torch.nn.functional as F

    mm = _relative_error(a @ b, a.double() @ b.double())
    conv = _relative_error(F.conv2d(x, w, padding=1), F.conv2d(x.double(), w.double(), padding=1))
    return mm, conv


def check_strict_fp32(ctx: Context) -> Result:
    """Under `strict_fp32` a matmul and a convolution match float64 to ~1e-5; with TF32 they do not."""
    import torch

    from suite.machine.device import strict_fp32, tf32_allowed, tf32_enabled

    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    x, w = torch.randn(8, 64, 32, 32, device="cuda", generator=g), torch.randn(64, 64, 3, 3, device="cuda", generator=g)
    with strict_fp32("cuda", "fp32"):
        flag_inside = tf32_enabled()
        mm, conv = _errors(a, b, x, w)
    with tf32_allowed(True):
        mm_tf32, conv_tf32 = _errors(a, b, x, w)
    figures = {"matmul_rel_err": mm, "conv_rel_err": conv, "matmul_rel_err_tf32": mm_tf32,
               "conv_rel_err_tf32": conv_tf32, "tf32_enabled_inside_strict": flag_inside}
    ok = max(mm, conv) <= 1e-5 and not flag_inside and min(mm_tf32, conv_tf32) > 10 * max(mm, conv)
    return verdict(ok, f"strict: matmul {mm:.1e}, conv {conv:.1e}; TF32: {mm_tf32:.1e}, {conv_tf32:.1e} "
                       "(limit 1e-5 strict, TF32 >= 10x larger)", figures)


def _meta_counts(tower) -> dict[str, int]:
    """Inference and training FLOPs of `tower` on the meta device (batch 2), and its attention matmuls."""
    import torch

    from suite.measurement.flops import count_flops, flop_counter

    meta = copy.deepcopy(tower).to("meta")
    x = torch.empty(2, 3, 224, 224, device="meta")
    with flop_counter() as counter:
        meta.eval()
        meta(x)
    bmm = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(k))
    return {"infer": count_flops(meta, x, train=False), "train": count_flops(meta, x, train=True), "attention_bmm": bmm}


def _cuda_counts(tower, backend: str) -> dict:
    """FLOPs on CUDA under bf16 autocast with one SDPA backend forced, and the dtypes/ops seen."""
    import torch

    from suite.measurement.engine import MatmulDtypes
    from suite.measurement.flops import count_flops

    class Seen(MatmulDtypes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.overloadpacket.__name__:
                self.attention.add(func.overloadpacket.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)

    forced = sdpa_backend(backend)
    if forced is None:
        return {"available": False, "reason": "not in this torch"}
    x = torch.randn(2, 3, 224, 224, device="cuda")
    seen = Seen()
    seen.attention = set()
    try:
        with forced, torch.autocast("cuda", dtype=torch.bfloat16):
            with seen:
                infer = count_flops(tower, x, train=False)
            train = count_flops(tower, x, train=True)
    except RuntimeError as exc:  # "No available kernel": the backend cannot run this shape/dtype here
        return {"available": False, "reason": str(exc).splitlines()[0][:200]}
    return {"available": True, "infer": infer, "train": train, "dtypes": sorted(str(d) for d in seen.dtypes),
            "attention_ops": sorted(seen.attention)}


def check_flops(ctx: Context) -> Result:
    """vit_base FLOPs on CUDA/bf16 equal the meta count (±0.1%) under each SDPA backend; bf16 is seen."""
    import torch

    from suite.machine.device import place
    from suite.measurement.engine import trial_flops
    from suite.tower.model import build_tower

    t = trial(model="vit_base_patch16_224", pool="token", precision="bf16", mode="infer")
    torch.manual_seed(0)
    tower = build_tower(t)
    meta = _meta_counts(tower)
    # Fused attention backward kernels recompute the scores (q k^T): PyTorch's formulas and
    # suite.measurement.flops's CPU formula count it, the meta device's math path (bmm autograd) does not.
    meta["train_fused"] = meta["train"] + meta["attention_bmm"] // 2
    place(tower, "cuda")
    suite_infer, _ = trial_flops(tower, t, "cuda", torch.bfloat16, cache=False)  # raises if bf16 is not seen
    backends = {name: _cuda_counts(tower, name) for name in ("flash", "efficient", "cudnn")}
    ratios = {}
    for name, got in backends.items():
        if got["available"]:
            got["infer_ratio"] = got["infer"] / meta["infer"]
            got["train_ratio"] = got["train"] / meta["train_fused"]
            ratios[name] = (got["infer_ratio"], got["train_ratio"])
    figures = {"meta": meta, "suite_infer_per_image": suite_infer, "suite_over_meta": 2 * suite_infer / meta["infer"],
               "backends": backends}
    ran_forced = all(SDPA_OPS[n] in got["attention_ops"] for n, got in backends.items() if got["available"])
    ok = (ran_forced and all(within(r, 1e-3) for pair in ratios.values() for r in pair)
          and within(figures["suite_over_meta"], 1e-3)
          and all(backends[b]["available"] for b in ("flash", "efficient"))
          and all("torch.bfloat16" in got["dtypes"] for got in backends.values() if got["available"]))
    shown = ", ".join(f"{n} {i:.4f}/{tr:.4f}" for n, (i, tr) in ratios.items())
    missing = [n for n, got in backends.items() if not got["available"]]
    notes = [f"{n}: {backends[n]['reason']}" for n in missing]
    notes.append("train compared with meta + the scores recompute of fused attention backward (see figures.meta)")
    return verdict(ok, f"CUDA/meta infer/train: {shown}" + (f"; unavailable: {missing}" if missing else ""),
                   rounded(figures, 6), notes)
