"""Peak memory as live tensors: independent of the allocator and of what ran before."""
from __future__ import annotations

import torch

from suite.core.options import Trial
from suite.measurement.memory import MIB, LiveTensors, MemoryBaseline, is_oom, tensor_mib
from suite.tower.model import build_tower


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


def test_views_of_tensors_made_before_the_pass_are_not_new_memory():
    """A Linear's forward takes `aten.t(weight)`: a view on the weight's storage. Counting it as new
    made every peak hold the Linear weights twice (found by the CUDA breakdown test on an H200)."""
    layer = torch.nn.Linear(1024, 1024)  # a 4 MiB weight, made outside
    x = torch.randn(4, 1024)
    with LiveTensors() as live:
        y = layer(x)
        transposed = layer.weight.t()  # a view made inside the mode: still the weight's storage
        assert live.peak == live.live == y.untyped_storage().nbytes() == 4 * 1024 * 4
        assert transposed.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()


def test_peak_does_not_depend_on_earlier_allocations():
    """The same pass gives the same peak after the process touched and freed a lot of memory."""
    def one_pass():
        baseline = MemoryBaseline("cpu")
        with baseline.track(weights_mib=1.0) as tracking:
            y = torch.randn(256, 1024) @ torch.randn(1024, 512)
            del y
        return tracking.result

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


def test_live_tensors_split_the_peak_by_tag():
    """What was live at the peak, by kind, even when the tagged storage dies after the peak."""
    with LiveTensors() as live:
        grad = torch.ones(1024, 1024)  # 4 MiB
        live.tag(grad, "grads")
        state = torch.ones(512, 1024)  # 2 MiB
        live.tag(state, "optimizer")
        act = torch.ones(256, 1024)  # 1 MiB -> the peak: 7 MiB
        del grad, act
        small = torch.ones(10)  # after the peak: not in it
        assert not live.tag(torch.empty(0), "grads")  # nothing allocated: nothing to tag
    assert live.peak == 7 * MIB
    assert live.at_peak() == {"grads": 4 * MIB, "optimizer": 2 * MIB, None: 1 * MIB}
    del small, state


def test_track_adds_the_inputs_once_and_breaks_the_peak_down():
    baseline = MemoryBaseline("cpu")
    x = torch.ones(256, 1024)  # made before the pass, like a phase's input batch: 1 MiB
    with baseline.track(2.0, x.numel() * 4 / MIB) as tracking:
        y = x * 2  # +1 MiB
        tracking.live.tag(y, "grads")
        z = y + 1  # +1 MiB
        del y, z
    result = tracking.result
    assert result.peak_mib == 2.0 + 1.0 + 2.0
    assert result.parts == {"weights": 2.0, "grads": 1.0, "optimizer": 0.0, "activations": 2.0}
    assert sum(result.parts.values()) == result.peak_mib


def test_vit_train_step_breakdown_adds_up_and_matches_the_parameters():
    """The Done-when check: a ViT train step's breakdown adds up to its peak within 5%, and the
    gradients and AdamW moments it held are exactly the size of the trainable parameters."""
    from suite.measurement.footprint import memory_pass
    from suite.measurement.steps import make_inputs

    trial = Trial(model="test_vit", image_size=64, batch_size=4, embed_dim=32, device="cpu")
    torch.manual_seed(0)
    tower = build_tower(trial)
    peak, seen = memory_pass("train", tower, trial, "cpu", make_inputs(trial, "cpu", 4), MemoryBaseline("cpu"))
    parts = peak.parts
    assert abs(sum(parts.values()) - peak.peak_mib) <= 0.05 * peak.peak_mib
    trainable = sum(p.numel() * 4 for p in tower.parameters() if p.requires_grad)
    assert parts["weights"] == tensor_mib(tower)
    assert seen.grads == trainable and seen.optimizer == 2 * seen.trainable == 2 * trainable
    # at the peak the two AdamW moments (+ step counters) are live, and some activations
    assert 2 * trainable / MIB <= parts["optimizer"] <= 2 * trainable / MIB + 0.01
    assert 0 <= parts["grads"] <= trainable / MIB + 1e-9 and parts["activations"] > 0
