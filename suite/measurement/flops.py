"""FLOP counting with `torch.utils.flop_counter.FlopCounterMode`, attention included on every device.

PyTorch's counter has formulas for the CUDA fused attention kernels but not for the CPU ones
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), so on CPU a ViT's
attention products count as zero and its FLOPs come out ~15-30% low. We add those formulas
(the same arithmetic as PyTorch's CUDA formulas) through `custom_mapping`, which leaves
PyTorch's global registry untouched.

Conventions: a multiply-add is 2 FLOPs (MACs = FLOPs / 2); only matmul-like ops (mm, addmm,
bmm, convolution, attention) are counted, as in timm's and fvcore's published figures, so
norms, activations and the optimizer update add nothing. We also replace PyTorch's convolution
backward formula, which overcounts grouped (depthwise) convolutions.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

aten = torch.ops.aten


def _attention_flops(q_shape, k_shape, v_shape) -> int:
    """FLOPs of softmax(q k^T) v: two batched matmuls (key/value heads may be grouped)."""
    b, h, s_q, d_q = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _attention_backward_flops(q_shape, k_shape, v_shape) -> int:
    """Backward of attention: recompute the scores, then grads of scores, v, q and k (5 matmuls)."""
    b, h, s_q, d_q = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    recompute = 2 * b * h * s_q * s_k * d_q
    grad_scores = 2 * b * h * s_q * s_k * d_v
    grad_v = 2 * b * h * s_q * s_k * d_v
    grad_q = 2 * b * h * s_q * s_k * d_q
    grad_k = 2 * b * h * s_q * s_k * d_q
    return recompute + grad_scores + grad_v + grad_q + grad_k


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_backward_flops(query, key, value)


def _conv_forward_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """FLOPs of a convolution; `w_shape` is per group (out, in/groups, *kernel), so groups count right."""
    spatial = (x_shape if transposed else out_shape)[2:]
    points = 1
    for n in spatial:
        points *= n
    weights = 1
    for n in w_shape:
        weights *= n
    return 2 * x_shape[0] * points * weights


def _conv_backward(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups,
                   output_mask, *args, out_shape=None, **kwargs) -> int:
    """Backward of a convolution: grad of the input and of the weight, each as many MACs as the forward.

    PyTorch's own formula ignores `groups` for the weight gradient, so a depthwise conv's
    backward is overcounted by its channel count (ConvNeXt training FLOPs come out ~3x high).
    """
    forward = _conv_forward_flops(x, w, grad_out, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _extra_formulas() -> dict[Any, Any]:
    """Formulas PyTorch's counter lacks or gets wrong (for the ops present in this torch)."""
    pairs = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_forward,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_forward,
        "_scaled_dot_product_fused_attention_overrideable_backward": _sdpa_backward,
    }
    out: dict[Any, Any] = {aten.convolution_backward: _conv_backward}
    for name, formula in pairs.items():
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            out[op] = formula
    return out


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU fused attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


@contextmanager
def _grad_checkpointing_off(tower: torch.nn.Module) -> Iterator[None]:
    """Count model FLOPs, not the forward recomputed by gradient checkpointing.

    With checkpointing on, the backward re-runs the forward under the counter, which would
    make the FLOPs (and so the MFU) of a checkpointed trial look higher for the same model.
    We report model FLOPs (the PaLM "MFU" convention); the cost of recomputation shows up as
    lower throughput and so lower MFU.
    """
    trunk = getattr(tower, "trunk", tower)
    was_on = bool(getattr(tower, "grad_checkpointing", False))
    setter = getattr(trunk, "set_grad_checkpointing", None)
    if not was_on or setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def _snapshot_buffers(tower: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in tower.buffers()]


def count_flops(tower: torch.nn.Module, x: torch.Tensor, *, train: bool) -> int:
    """FLOPs of one batch `x` through `tower`.

    Runs `tower` for real on `x` (use a small batch: FLOPs scale linearly with the batch),
    or on the meta device when `tower` and `x` live there.

    Args:
        tower: the module; its train/eval mode is set here and restored afterwards.
        x: an input batch.
        train: count forward + backward of a training step (the optimizer adds no matmul
            FLOPs); otherwise the inference forward only.

    Returns:
        FLOPs for the whole batch (a multiply-add is 2).
    """
    was_training = tower.training
    if not train:
        # Parameters are switched to requires_grad=False rather than using no_grad or
        # inference_mode: under those, a view of a parameter (e.g. the latent query of timm's
        # attention pool, pool='map') still requires grad but has no grad_fn, and
        # FlopCounterMode's module tracker fails on it. The FLOPs are the same.
        params = [p for p in tower.parameters() if p.requires_grad]
        tower.eval()
        try:
            for p in params:
                p.requires_grad_(False)
            with flop_counter() as counter:
                tower(x)
        finally:
            for p in params:
                p.requires_grad_(True)
            tower.train(was_training)
        return int(counter.get_total_flops())

    # A training step updates BatchNorm statistics and leaves .grad behind; put both back
    # so counting FLOPs does not change the model that is measured next.
    saved = _snapshot_buffers(tower)
    grads_before = {p: p.grad for p in tower.parameters()}
    tower.train()
    try:
        with _grad_checkpointing_off(tower), flop_counter() as counter:
            out = tower(x)
            loss = out.float().pow(2).mean()
            if loss.requires_grad:  # a fully locked tower has no backward pass
                loss.backward()
    finally:
        tower.train(was_training)
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        for p, g in grads_before.items():
            p.grad = g
    return int(counter.get_total_flops())

