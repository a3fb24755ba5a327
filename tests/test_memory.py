"""Peak memory as live tensors: independent of the allocator and of what ran before."""
from __future__ import annotations

import torch

from suite.memory import MIB, LiveTensors, MemoryBaseline, is_oom, tensor_mib


def test_live_tensors_count_storages_once_and_release_them():
    x = torch.ones(1024, 1024)  # 4 MiB, created outside: not counted
    with LiveTensors() as live:
        a = x * 2  # +4
        view = a[:10]  # a view: same storage, not counted again
        a.add_(1)  # in place: same storage
        b = a + 1  # +4 -> peak 8
        del a, view
        c = b * 3  # +4 (a freed first) -> live 8
        assert live.live == 8 * MIB and live.peak == 8 * MIB
        del b, c
        assert live.live == 0
    assert live.peak == 8 * MIB


def test_peak_does_not_depend_on_earlier_allocations():
    """The same pass gives the same peak after the process touched and freed a lot of memory."""
    def one_pass():
        baseline = MemoryBaseline("cpu")
        with baseline.track(weights_mib=1.0) as out:
            y = torch.randn(256, 1024) @ torch.randn(1024, 512)
            del y
        return out[0]

    cold = one_pass()
    big = torch.ones(200 * MIB // 4)
    del big
    warm = one_pass()
    assert cold.peak_mib == warm.peak_mib
    assert cold.peak_mib == 1.0 + (256 * 1024 + 1024 * 512 + 256 * 512) * 4 / MIB


def test_tensor_mib_counts_parameters_and_buffers():
    module = torch.nn.BatchNorm1d(1024)  # weight, bias, running mean/var (+ an int64 counter)
    assert abs(tensor_mib(module) - (4 * 1024 * 4 + 8) / MIB) < 1e-9


def test_oom_recognition():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom(RuntimeError("GET was unable to find an engine to execute this computation"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling cublasCreate(handle)"))
    assert not is_oom(RuntimeError("shape mismatch"))
