"""FLOP counting: timm's published figures, CPU attention, grouped convolutions, no side effects."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from suite.measurement.flops import count_flops, flop_counter
from suite.tower.model import TimmTower

# timm's published infer_gmacs at 224 (results/benchmark-infer-*.csv, model cards); MACs = FLOPs / 2.
PUBLISHED_GMACS = {
    "resnet50": 4.11,
    "convnext_tiny": 4.47,
    "vit_tiny_patch16_224": 1.26,
    "vit_base_patch16_224": 17.58,
}


def _model(name: str, device: str = "cpu", **kwargs) -> torch.nn.Module:
    with torch.device(device):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_gmacs_match_timm_published(name):
    # The meta device runs shapes only: counting ViT-B costs milliseconds and no memory.
    model = _model(name, "meta")
    gmacs = count_flops(model, torch.randn(1, 3, 224, 224, device="meta"), train=False) / 2 / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.03)


def test_cpu_fused_attention_is_counted():
    model = _model("test_vit").eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode(), FlopCounterMode(display=False) as plain:
        model(x)
    ours = count_flops(model, x, train=False)
    # On meta the attention decomposes into bmm, which PyTorch counts: our CPU count must agree.
    reference = count_flops(_model("test_vit", "meta"), x.to("meta"), train=False)
    assert ours == reference
    assert plain.get_total_flops() < ours  # PyTorch alone misses the CPU attention kernel


def test_extra_formulas_leave_torchs_registry_alone():
    # The CPU attention formulas go through custom_mapping: torch's global counter stays as it was.
    registry = dict(flop_registry)
    with flop_counter():
        _model("test_vit")(torch.randn(1, 3, 160, 160))
    assert dict(flop_registry) == registry
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert cpu_attention in flop_counter().flop_registry


def test_cpu_attention_backward_is_counted():
    model = _model("test_vit")
    with flop_counter() as counter:
        model(torch.randn(2, 3, 160, 160)).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    backward = [n for op, n in counts.items() if "attention" in op and op.endswith("backward")]
    forward = [n for op, n in counts.items() if "attention" in op and not op.endswith("backward")]
    # PyTorch's convention for fused kernels: the backward recomputes the scores, 5 matmuls vs 2.
    assert backward and forward and sum(backward) == pytest.approx(2.5 * sum(forward))


def test_grouped_conv_backward_is_not_overcounted():
    # ConvNeXt's depthwise convs: PyTorch's formula makes train/infer ~8.7 for convnext_tiny.
    model = _model("convnext_tiny", "meta")
    x = torch.randn(2, 3, 224, 224, device="meta")
    ratio = count_flops(model, x, train=True) / count_flops(model, x, train=False)
    assert ratio == pytest.approx(3.0, rel=0.02)


def test_flops_scale_with_batch():
    model = _model("test_resnet", "meta")
    one = count_flops(model, torch.randn(1, 3, 64, 64, device="meta"), train=False)
    four = count_flops(model, torch.randn(4, 3, 64, 64, device="meta"), train=False)
    assert four == 4 * one > 0


def test_counting_a_training_step_leaves_the_model_untouched():
    model = _model("test_resnet")  # BatchNorm: its running statistics would move
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, torch.randn(2, 3, 64, 64), train=True)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_parameters_lower_training_flops():
    model = _model("test_resnet")
    x = torch.randn(2, 3, 64, 64)
    full = count_flops(model, x, train=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    head_only = count_flops(model, x, train=True)
    forward = count_flops(model, x, train=False)
    assert forward < head_only < full


def test_attention_latent_pool_counts_and_leaves_requires_grad_alone():
    # pool='map' feeds a view of a parameter (the latent query) to a Linear; FLOP counting used
    # to fail on it in inference mode.
    tower = TimmTower("test_vit", 16, image_size=64, pool="map")
    tower.lock(unlocked_groups=1)
    trainable = [p.requires_grad for p in tower.parameters()]
    x = torch.randn(2, 3, 64, 64)
    infer = count_flops(tower, x, train=False)
    assert 0 < infer < count_flops(tower, x, train=True)
    assert [p.requires_grad for p in tower.parameters()] == trainable
