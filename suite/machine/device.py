"""Where and at what precision a trial runs: the one home of device rules.

- `resolve_device('auto'|'cpu'|'cuda')`: the device a trial runs on. An unavailable 'cuda' is
  `UnsupportedConfig` on every path (measure, probe, profile, the runner's own records), so a
  trial's status never depends on which stage met the problem.
- `autocast_dtype(precision, device)` and `autocast(device, dtype)`: the one precision table.
- `place(module, device, channels_last)`: device and memory format, in place.
- `strict_fp32(device, precision)`: fp32 on CUDA means fp32 (TF32 off), through `tf32_allowed(False)`:
  torch's newer `fp32_precision` API or the legacy `allow_tf32` flags, restored on exit.
- `cuda_in_use()`: whether this process has a CUDA context. Cleanup code asks this, not
  `is_available()`, so a CPU trial on a GPU machine never creates a context.

torch is imported inside the functions: importing this module stays light.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

from suite.core.errors import SuiteError, UnsupportedConfig, suggest
from suite.core.options import DEVICES

# precision -> torch dtype name under autocast (None: plain fp32)
AUTOCAST_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' on a machine without CUDA is unsupported.

    Raises:
        UnsupportedConfig: 'cuda' asked for where CUDA is not available.
        SuiteError: not a device name.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedConfig("device='cuda' but CUDA is not available here; use device='cpu' or 'auto'")
        return "cuda"
    raise SuiteError(f"device={name!r} is not one of {', '.join(map(repr, DEVICES))}{suggest(name, DEVICES)}")


def check_precision(precision: str) -> None:
    """Raise SuiteError, with the close match, unless `precision` is fp32, bf16 or fp16."""
    if precision not in AUTOCAST_DTYPES:
        raise SuiteError(f"precision={precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}"
                         f"{suggest(precision, AUTOCAST_DTYPES)}")


def autocast_dtype(precision: str, device: str):
    """The autocast dtype of `precision` (None for fp32), after checking the device can run it.

    Raises:
        UnsupportedConfig: bf16 on a GPU without bf16 support.
        SuiteError: not a precision name.
    """
    import torch

    check_precision(precision)
    name = AUTOCAST_DTYPES[precision]
    if name is None:
        return None
    if name == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedConfig(f"precision='bf16' is not supported by {torch.cuda.get_device_name()}; use 'fp16'")
    return getattr(torch, name)


def autocast(device: str, dtype):
    """`torch.autocast` at `dtype`, or a no-op for fp32 (dtype None)."""
    import torch

    return nullcontext() if dtype is None else torch.autocast(device_type=device, dtype=dtype)


def place(module, device: str, channels_last: bool = False) -> None:
    """Move `module` to `device`, and to channels_last when asked, in place (cheap when already there)."""
    import torch

    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)


def cuda_in_use() -> bool:
    """Whether this process has initialized CUDA (never initializes it itself)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


@contextmanager
def strict_fp32(device: str, precision: str) -> Iterator[None]:
    """precision='fp32' on CUDA means fp32: TF32 convolutions and matmuls are off inside the block.

    cuDNN allows TF32 by default, so fp32 convolutions on Ampere and newer would silently run at
    TF32, faster than the strict-fp32 peak MFU divides by, while the record says fp32. Uses torch's
    `fp32_precision` API where it exists (mixing it with the legacy flags is deprecated there),
    else the legacy `allow_tf32` flags; the previous settings are restored on exit.
    """
    if device != "cuda" or precision != "fp32":
        yield
        return
    with tf32_allowed(False):
        yield


@contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """TF32 matmuls and cuDNN convolutions allowed (or not) inside the block, the previous settings
    restored on exit: torch's `fp32_precision` API where it exists, else the legacy `allow_tf32` flags."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        switches, name, value = (matmul, cudnn.conv), "fp32_precision", "tf32" if allowed else "ieee"
    else:
        switches, name, value = (matmul, cudnn), "allow_tf32", allowed
    saved = [getattr(switch, name) for switch in switches]
    for switch in switches:
        setattr(switch, name, value)
    try:
        yield
    finally:
        for switch, before in zip(switches, saved):
            setattr(switch, name, before)


def tf32_enabled() -> bool:
    """Whether fp32 matmuls (or cuDNN convolutions) may run at TF32 right now.

    Where torch has the `fp32_precision` API (2.9+), only that API is read: once it has been set,
    reading the legacy `allow_tf32` raises ("mix of the legacy and new APIs"), found on an H200.
    """
    import torch

    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision"):
        if conv is not None and getattr(conv, "fp32_precision", None) == "tf32":
            return True
        precision = matmul.fp32_precision
        if precision == "none":  # inherits the generic setting, then the matmul-precision default
            precision = getattr(torch.backends, "fp32_precision", "none")
        if precision == "none":
            return torch.get_float32_matmul_precision() != "highest"
        return precision == "tf32"
    return bool(matmul.allow_tf32)
