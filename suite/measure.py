"""Measure one trial: throughput, step time, peak memory, FLOPs and MFU, for inference and training.

timm's `benchmark.py` is the reference this improves on: it reports means and no memory. Here:

- warm-up, then `iters` timed steps, each timed on its own (CUDA events on a GPU), reported as
  median and IQR, and flagged noisy when IQR/median exceeds `trial.noise_threshold`;
- peak memory per phase: on CUDA `max_memory_allocated` after `reset_peak_memory_stats`; on CPU
  the kernel's RSS high-water mark, reset at phase start through /proc/self/clear_refs and read
  relative to a baseline taken before the tower was built (so, like CUDA's figure, it holds
  weights, activations, gradients and optimizer state, but nothing an earlier trial left);
- model FLOPs per image with `FlopCounterMode` (see `suite.flops`), and MFU against the
  device's measured matmul peak (see `suite.roofline`).

The step functions are public so `suite.profile` traces exactly what is timed here. Exceptions
propagate (the sweep turns them into statuses); the one caught is OOM, and only when
`trial.auto_batch_size` asks to back off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from suite.records import MeasureResult

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_FLOP_BATCH = 2  # FLOPs are counted on a small batch and scaled: they are linear in the batch
_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


def _unsupported(message: str) -> Exception:
    from suite.tower import UnsupportedConfig

    return UnsupportedConfig(message)


# --- device, inputs, precision ---------------------------------------------------------------

def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' on a machine without CUDA is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise _unsupported("device='cuda' but CUDA is not available here; use device='cpu' or 'auto'")
        return "cuda"
    raise ValueError(f"device={name!r} is not one of 'auto', 'cpu', 'cuda'")


def autocast_dtype(trial, device: str) -> torch.dtype | None:
    """The autocast dtype of `trial.precision` (None for fp32), after checking the device can run it."""
    if trial.precision not in _AUTOCAST:
        raise ValueError(f"precision={trial.precision!r} is not one of {', '.join(_AUTOCAST)}")
    dtype = _AUTOCAST[trial.precision]
    if dtype is torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise _unsupported(f"precision='bf16' is not supported by {torch.cuda.get_device_name()}; use 'fp16'")
    return dtype


def _autocast(device: str, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device_type=device, dtype=dtype)


def make_inputs(trial, device: str, batch_size: int) -> torch.Tensor:
    """A fresh random image batch (N(0,1), like normalized pixels; never zeros, which some kernels
    shortcut), float32 (autocast casts inside), in channels_last when the trial asks for it."""
    x = torch.randn(batch_size, 3, trial.image_size, trial.image_size, device=device)
    if trial.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def place_tower(tower: torch.nn.Module, trial, device: str) -> None:
    """Move `tower` to `device`, and to channels_last when asked, in place (cheap when already there)."""
    tower.to(device)
    if trial.channels_last:
        tower.to(memory_format=torch.channels_last)


def prepare_tower(tower: torch.nn.Module, trial, device: str) -> torch.nn.Module:
    """Place `tower` (see `place_tower`) and return what to call: `torch.compile(tower)` if asked."""
    place_tower(tower, trial, device)
    if trial.compile:
        return torch.compile(tower)
    return tower


# --- the two steps ---------------------------------------------------------------------------

def infer_step_fn(tower: torch.nn.Module, trial, device: str) -> Callable[[torch.Tensor], Any]:
    """One inference step: eval mode, `inference_mode`, autocast at the trial's precision."""
    module = prepare_tower(tower, trial, device)
    tower.eval()
    dtype = autocast_dtype(trial, device)

    def step(x: torch.Tensor):
        with torch.inference_mode(), _autocast(device, dtype):
            return module(x)

    return step


def _contrastive_loss(emb: torch.Tensor, cache: dict) -> torch.Tensor:
    """CLIP's symmetric InfoNCE against fixed random unit "text" embeddings (one per image).

    The targets are seeded, so two towers with the same weights get the same loss (the
    checkpointing invariance test relies on it), and cached per shape: no allocation per step.
    """
    emb = emb.float().flatten(1)
    key = tuple(emb.shape)
    if key not in cache:
        g = torch.Generator().manual_seed(0)
        target = F.normalize(torch.randn(key, generator=g), dim=-1).to(emb.device)
        cache[key] = (target, torch.arange(key[0], device=emb.device))
    target, labels = cache[key]
    logits = _LOGIT_SCALE * F.normalize(emb, dim=-1) @ target.T
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_step_fn(tower: torch.nn.Module, trial, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training step: forward under autocast, contrastive loss, backward, AdamW step, zero_grad.

    Only trainable parameters (after the tower's lock) go to the optimizer, so a locked trunk
    costs neither gradients nor optimizer state. fp16 uses a gradient scaler, as real training
    must. The step returns the (detached) loss.
    """
    module = prepare_tower(tower, trial, device)
    tower.train()
    dtype = autocast_dtype(trial, device)
    params = [p for p in tower.parameters() if p.requires_grad]
    if not params:
        raise _unsupported(
            f"mode={trial.mode!r} trains nothing: the tower has no trainable parameters "
            f"(unlocked_groups={trial.unlocked_groups}, proj={trial.proj!r}); use mode='infer' or unlock groups"
        )
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = torch.amp.GradScaler(device) if trial.precision == "fp16" else None
    cache: dict = {}

    def step(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, dtype):
            emb = module(x)
        loss = _contrastive_loss(emb, cache)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --- timing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Per-step times of one timed loop, in milliseconds."""

    median_ms: float
    iqr_ms: float
    times_ms: tuple[float, ...]


def _summarize(times_ms: list[float]) -> Timing:
    if len(times_ms) >= 2:
        q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    else:
        q1 = q3 = times_ms[0]
    return Timing(statistics.median(times_ms), q3 - q1, tuple(times_ms))


def time_steps(step: Callable, inputs: torch.Tensor, *, warmup: int, iters: int, device: str) -> Timing:
    """Run `warmup` untimed steps, then time `iters` steps one by one.

    On CUDA each step is bracketed by CUDA events (no host sync inside the loop, so the launch
    queue stays full as in real use; an event pair still measures the wall time of a
    launch-bound step, because the GPU idles between the events). On CPU, `perf_counter`.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}: at least one timed iteration is needed")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must not be negative")
    for _ in range(warmup):
        step(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step(inputs)
            end.record()
        torch.cuda.synchronize()
        return _summarize([start.elapsed_time(end) for start, end in events])
    times = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        step(inputs)
        times.append((clock() - t0) * 1e3)
    return _summarize(times)


# --- memory ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS reflects live memory only."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"{field} missing from /proc/self/status")


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_mib("VmHWM")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of one phase at a time.

    CUDA: `reset_peak_memory_stats` at phase start, `max_memory_allocated` / `max_memory_reserved`
    at the end (absolute: weights included). CPU: RSS high-water mark since phase start minus the
    RSS before the tower was built. Freed heap is trimmed first, so memory an earlier trial freed
    but the allocator kept cannot hide this phase's allocations. Where the high-water mark cannot
    be reset (not Linux), CPU peaks are None rather than a polluted lifetime peak.
    """

    def __init__(self, device: str, *, weights_mib_outside_baseline: float = 0.0):
        self.device = device
        self.baseline_mib = 0.0
        if device == "cuda":
            self.method = "cuda max_memory_allocated per phase (reset_peak_memory_stats)"
            self.available = True
            return
        _settle()
        self.available = _reset_rss_peak()
        if not self.available:
            self.method = "unavailable: cpu peak needs /proc/self/clear_refs (Linux)"
            return
        # A tower built by the caller is already in the baseline: add its weights back.
        self.baseline_mib = _status_mib("VmRSS") - weights_mib_outside_baseline
        self.method = "cpu rss high-water per phase (/proc/self/clear_refs), minus rss before the tower was built"
        if weights_mib_outside_baseline:
            self.method += " (tower passed in: its weights added from tensor sizes)"

    def start(self) -> None:
        _settle()
        if self.device == "cuda":
            torch.cuda.empty_cache()  # so the reserved figure is this phase's, not a past trial's
            torch.cuda.reset_peak_memory_stats()
        elif self.available:
            _reset_rss_peak()

    def peak_mib(self) -> tuple[float | None, float | None]:
        """(peak allocated, peak reserved) in MiB since `start`; reserved is CUDA only."""
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
        if not self.available:
            return None, None
        return max(0.0, _status_mib("VmHWM") - self.baseline_mib), None


@contextmanager
def _frozen_gc() -> Iterator[None]:
    """Collect everything once, then freeze the survivors for the duration of a measurement.

    A full `gc.collect()` scans every object of torch and timm (~0.3 s); after `gc.freeze()`
    the per-phase collections scan only what the measurement itself created, which is where
    the garbage of interest is. The freeze is undone on exit (and left alone if the caller
    froze objects already).
    """
    gc.collect()
    own = gc.get_freeze_count() == 0
    if own:
        gc.freeze()
    try:
        yield
    finally:
        if own:
            gc.unfreeze()


_WARMED: set[tuple[str, torch.dtype | None]] = set()


def _warm_process(device: str, dtype: torch.dtype | None) -> None:
    """Run the common kernels once per process, before the first memory baseline.

    The first convolution, attention or optimizer step of a process pages in library code
    and sets up thread pools (~50 MiB of RSS on CPU); without this, only the first trial of
    each worker process would be charged for it.
    """
    if (device, dtype) in _WARMED:
        return
    # Our own RNG draws must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Flatten(2),
        ).to(device)
        norm, linear = torch.nn.LayerNorm(8).to(device), torch.nn.Linear(8, 24).to(device)
        optimizer = torch.optim.AdamW([*net.parameters(), *norm.parameters(), *linear.parameters()])
        x = torch.randn(2, 3, 8, 8, device=device)
        with _autocast(device, dtype):
            tokens = linear(norm(net(x).transpose(1, 2)))  # (2, 64, 24)
            q, k, v = tokens.view(2, 64, 3, 2, 4).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
        out.float().square().mean().backward()
        optimizer.step()
        with torch.inference_mode(), _autocast(device, dtype):
            net(x)
    _WARMED.add((device, dtype))


def _settle() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _malloc_trim()


# --- one phase, with optional batch back-off --------------------------------------------------

# Allocation failures that are not `torch.OutOfMemoryError`: the CPU allocator raises a plain
# RuntimeError ("DefaultCPUAllocator: can't allocate memory" / "not enough memory"), and cuBLAS
# reports a failed workspace allocation as a status code.
_OOM_MESSAGES = ("defaultcpuallocator", "can't allocate memory", "not enough memory", "out of memory",
                 "cublas_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory failure, on any device (Python's MemoryError included)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return any(m in str(exc).lower() for m in _OOM_MESSAGES)


@dataclass(frozen=True)
class _Phase:
    batch_size: int
    timing: Timing
    peak_mib: float | None
    reserved_mib: float | None
    compile_s: float
    wall_s: float


def _run_phase(phase: str, tower, trial, device: str, batch_size: int, meter: MemoryMeter) -> _Phase:
    meter.start()
    inputs = make_inputs(trial, device, batch_size)
    step = (infer_step_fn if phase == "infer" else train_step_fn)(tower, trial, device)
    compile_s = 0.0
    if trial.compile:
        # The first call compiles (and runs one step); it is reported apart and not timed, and
        # the compiler's transient memory is kept out of the phase's peak.
        t0 = time.perf_counter()
        step(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        meter.start()
    t0 = time.perf_counter()
    timing = time_steps(step, inputs, warmup=trial.warmup, iters=trial.iters, device=device)
    wall_s = time.perf_counter() - t0
    peak, reserved = meter.peak_mib()
    return _Phase(batch_size, timing, peak, reserved, compile_s, wall_s)


def _run_phase_fitting(phase: str, tower, trial, device: str, meter: MemoryMeter) -> _Phase:
    """Run a phase at `trial.batch_size`; with `auto_batch_size`, halve the batch on OOM until it fits."""
    batch = trial.batch_size
    while True:
        try:
            return _run_phase(phase, tower, trial, device, batch, meter)
        except Exception as exc:  # noqa: BLE001 - the CPU allocator's OOM is a plain RuntimeError
            if not is_oom(exc) or not trial.auto_batch_size or batch <= 1:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        tower.zero_grad(set_to_none=True)
        _settle()
        if device == "cuda":
            torch.cuda.empty_cache()
        batch //= 2


# --- FLOPs and the precision check -----------------------------------------------------------

class _MatmulDtypes(TorchDispatchMode):
    """Records the dtypes matmul-like ops compute in (to prove autocast took effect)."""

    _OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "linear",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self._OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor):
                self.dtypes.add(first.dtype)
        return out


_FLOP_CACHE: dict[tuple, tuple[int, int | None]] = {}


def _flop_key(trial, device: str) -> tuple:
    """What the FLOPs of a tower built from `trial` depend on (batch size, iters etc. do not)."""
    from suite.options import options_in

    return tuple(getattr(trial, o.name) for o in options_in("tower")) + (trial.precision, trial.mode, device)


def _count_flops(tower, trial, device: str, dtype: torch.dtype | None, *, cache: bool) -> tuple[int, int | None]:
    """(inference, training) FLOPs per image; also checks that the precision took effect.

    With `cache` (the tower was built from the trial here, so the trial describes it fully),
    counts are reused within the process: a sweep over batch sizes or memory formats pays once.
    """
    from suite.flops import count_flops

    key = _flop_key(trial, device)
    if cache and key in _FLOP_CACHE:
        return _FLOP_CACHE[key]
    x = make_inputs(trial, device, _FLOP_BATCH)
    seen = _MatmulDtypes()
    with _autocast(device, dtype), seen:
        infer = count_flops(tower, x, train=False)
    if dtype is not None and dtype not in seen.dtypes:
        raise _unsupported(
            f"precision={trial.precision!r} did not take effect on {device}: the matmuls ran in "
            f"{sorted(str(d) for d in seen.dtypes)}; use precision='fp32'"
        )
    train = None
    if trial.mode in ("both", "train"):
        train = count_flops(tower, x, train=True) // _FLOP_BATCH
    result = (infer // _FLOP_BATCH, train)
    if cache:
        _FLOP_CACHE[key] = result
    return result


# --- the measurement -------------------------------------------------------------------------

def _weights_mib(tower: torch.nn.Module) -> float:
    tensors = list(tower.parameters()) + list(tower.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu") / 2**20


def _describe(tower) -> dict[str, Any]:
    """Model fields of the record, from `tower.describe()` (a `TimmTower`) or counted directly."""
    describe = getattr(tower, "describe", None)
    if describe is None:  # a plain module (benchmarks, tests): count what we can
        params = list(tower.parameters())
        return {
            "param_count": sum(p.numel() for p in params) / 1e6,
            "trainable_param_count": sum(p.numel() for p in params if p.requires_grad) / 1e6,
        }
    info = describe()
    return {
        "param_count": info.param_count / 1e6,
        "trainable_param_count": info.trainable_param_count / 1e6,
        "layer_groups": info.layer_groups,
        "feature_shape": "x".join(str(n) for n in info.feature_shape) or None,
        "grad_checkpointing_active": info.grad_checkpointing,
    }


def measure(trial, *, tower: torch.nn.Module | None = None, cache_dir: str | Path | None = None) -> MeasureResult:
    """Measure `trial`'s tower: inference and/or training throughput, memory, FLOPs and MFU.

    Args:
        trial: the configuration (`suite.options.Trial`).
        tower: an already built tower (moved to the device in place); built from `trial` when None.
        cache_dir: folder of the device-peak cache (default `suite.paths.cache_dir('roofline')`).

    Returns:
        A frozen `MeasureResult`; fields of a phase `trial.mode` leaves out are None.

    Raises:
        torch.OutOfMemoryError: the batch does not fit (and `trial.auto_batch_size` is off, or
            even a batch of one does not fit).
        suite.tower.UnsupportedConfig: a setting cannot take effect (no CUDA, bf16 unsupported,
            autocast without effect, nothing to train).
    """
    if trial.mode not in ("both", "infer", "train"):
        raise ValueError(f"mode={trial.mode!r} is not one of 'both', 'infer', 'train'")
    if trial.batch_size < 1:
        raise ValueError(f"batch_size={trial.batch_size} must be at least 1")
    device = resolve_device(trial.device)
    dtype = autocast_dtype(trial, device)

    with _frozen_gc(), _strict_fp32(trial, device):
        return _measure(trial, tower, device, dtype, cache_dir)


@contextmanager
def _strict_fp32(trial, device: str) -> Iterator[None]:
    """precision='fp32' on CUDA means fp32: TF32 convolutions and matmuls are switched off.

    cuDNN allows TF32 by default, so fp32 convolutions on Ampere and newer would silently run
    at TF32, faster than the strict-fp32 peak that MFU divides by, and the record would say fp32.
    """
    if device != "cuda" or trial.precision != "fp32":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _measure(trial, tower, device: str, dtype, cache_dir) -> MeasureResult:
    """`measure` after the argument checks: baseline, build, count, then the timed phases."""
    # Import before the memory baseline: importing timm alone adds ~120 MiB of RSS, which
    # would otherwise land in the first trial of every process.
    from suite.flops import count_flops  # noqa: F401
    from suite.roofline import device_peak_tflops
    from suite.tower import build_tower

    _warm_process(device, dtype)
    built_here = tower is None
    if built_here:
        meter = MemoryMeter(device)  # baseline before the weights exist
        tower = build_tower(trial)
    else:
        meter = MemoryMeter(device, weights_mib_outside_baseline=_weights_mib(tower))
    fields = _describe(tower)
    place_tower(tower, trial, device)  # compiling happens in the step functions
    infer_flops, train_flops = _count_flops(tower, trial, device, dtype, cache=built_here)
    peak_tflops = device_peak_tflops(device, trial.precision, cache_dir=cache_dir)

    phases = {}
    for phase in ("infer", "train"):
        if trial.mode in ("both", phase):
            phases[phase] = _run_phase_fitting(phase, tower, trial, device, meter)
    tower.zero_grad(set_to_none=True)

    for phase, flops in (("infer", infer_flops), ("train", train_flops)):
        if phase not in phases:
            continue
        p = phases[phase]
        samples_per_sec = p.batch_size / (p.timing.median_ms / 1e3)
        tflops = flops * samples_per_sec / 1e12
        fields.update({
            f"{phase}_samples_per_sec": samples_per_sec,
            f"{phase}_step_time": p.timing.median_ms,
            f"{phase}_step_time_iqr": p.timing.iqr_ms,
            f"{phase}_batch_size": p.batch_size,
            f"{phase}_img_size": trial.image_size,
            f"{phase}_gmacs": flops / 2 / 1e9,
            f"{phase}_gflops": flops / 1e9,
            f"{phase}_tflops": tflops,
            f"{phase}_mfu": tflops / peak_tflops,
            f"{phase}_peak_mem_mib": p.peak_mib,
            f"{phase}_peak_reserved_mib": p.reserved_mib,
            f"{phase}_noisy": p.timing.iqr_ms / p.timing.median_ms > trial.noise_threshold,
        })
    return MeasureResult(
        **fields,
        device_peak_tflops=peak_tflops,
        mem_method=meter.method,
        compile_time_s=sum(p.compile_s for p in phases.values()) if trial.compile else None,
        measured_time_s=sum(p.wall_s for p in phases.values()),
    )
