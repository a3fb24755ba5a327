"""The environment a result was measured in (lm-eval's `add_env_info`, as a frozen record).

Every probe of the machine is best effort: a missing tool (git, nvidia-smi) gives None, never
an exception, because a result without a driver version is still a result.
"""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

from suite.core.records import Env
from suite.machine.allocator import allocator
from suite.machine.device import resolve_device


def command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a short command, or None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    out = done.stdout.strip()
    return out if done.returncode == 0 and out else None


def git_commit() -> str | None:
    """The project's commit (with "+dirty" when the work tree differs), or None outside a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    commit = command_output(["git", "rev-parse", "HEAD"], cwd=repo)
    if commit is None:
        return None
    # Uncommitted changes mean the commit alone does not say what code produced the number.
    dirty = command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _nvidia_driver() -> str | None:
    out = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def device_name(device: str) -> str:
    """"cpu", or the name of the current CUDA device."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def capture_env(device: str) -> Env:
    """Describe this process's environment for results measured on `device` ('cpu', 'cuda' or 'auto').

    'auto' is resolved as the trials resolve it, so records the runner makes itself (crashed,
    timeout) for an 'auto' sweep on a GPU get the GPU's environment, not a phantom 'cpu' one.
    The allocator and the torch thread count are read each time (a measuring process holds the allocator
    steady from its first trial on; a re-measurement sets a stored row's threads); the rest is cached per process: versions and hardware do not change while it runs.
    """
    import torch

    return _capture_env(resolve_device(device), allocator(), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _capture_env(device: str, allocator_text: str, threads: int) -> Env:
    import timm
    import torch

    cuda = device == "cuda"
    driver = None
    if cuda:
        driver = _nvidia_driver()
        if driver is None and hasattr(torch._C, "_cuda_getDriverVersion"):
            # No nvidia-smi (e.g. in a slim container): the CUDA driver API version is the next best.
            version = torch._C._cuda_getDriverVersion()
            driver = f"cuda-driver-api {version // 1000}.{version % 1000 // 10}"
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return Env(
        env_torch=str(torch.__version__),  # a TorchVersion would make unpickling import torch
        env_timm=timm.__version__,
        env_cuda=torch.version.cuda if cuda else None,
        env_cudnn=str(cudnn) if cudnn else None,
        env_device=device_name(device),
        env_driver=driver,
        env_cpu=cpu_model(),
        env_threads=threads,
        env_allocator=allocator_text,
        env_python=platform.python_version(),
        env_platform=platform.platform(),
        env_git_commit=git_commit(),
    )

