"""Tests of suite.tower.model: open_clip parity, the documented fixes, lock, checkpointing, describe.

All offline on timm's tiny `test_*` models with random weights; open_clip (test extra) is the
reference for parity. Weights loading is tested in test_weights.py, the static checks in
test_tower_plan.py.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

from suite.core.errors import UnsupportedConfig, WeightsError
from suite.core.options import POOLS, PROJS, Trial
from suite.tower import model as tower_module
from suite.tower import plan as tower_plan
from suite.tower.model import TimmTower, TowerInfo, build_tower
from suite.tower.plan import static_problems

open_clip_timm = pytest.importorskip("open_clip.timm_model")
TimmModel = open_clip_timm.TimmModel

MODELS = ("test_vit", "test_resnet", "test_convnext", "test_efficientnet")
# The schema's projections, with the Python API's None for '' (open_clip's `timm_proj: null`).
API_PROJS = tuple(p if p else None for p in PROJS)
EMBED = 32


def _size(model: str, pool: str) -> int:
    # open_clip builds every trunk at its default size (160 for the test models: test_vit's pos_embed);
    # CNNs run at any size, but open_clip sizes abs_attn from default_cfg['pool_size'] (5x5 at 160).
    if model == "test_vit":
        return 160
    return 160 if pool == "abs_attn" else 64


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _expected_unsupported(model: str, pool: str) -> bool:
    if model == "test_vit":
        # A token trunk: no feature map to attend over; timm's ViT pools avg/max/avgmax/token/map only.
        return pool in ("abs_attn", "rot_attn", "catavgmax")
    if model == "test_convnext" and pool == "catavgmax":
        return True  # its NormMlpClassifierHead norms num_features, not the doubled catavgmax width
    return pool in ("token", "map")  # CNN pools in timm: avg/max/avgmax/catavgmax


def _open_clip(model, pool, proj, size):
    """open_clip's tower and its eval output, or (None, None) when it cannot build or run it."""
    try:
        ref = TimmModel(model, EMBED, image_size=size, pool=pool, proj=proj).eval()
        with torch.no_grad():
            out = ref(_images(size))
    except Exception:  # noqa: BLE001 - open_clip fails with assertions and shape errors
        return None, None
    return (ref, out) if out.ndim == 2 else (None, None)  # an unpooled map is not a tower output


# --- every pool x projection: builds or fails as documented; parity where open_clip works ----------

@pytest.mark.parametrize("proj", API_PROJS, ids=lambda p: repr(p))
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p or "default")
@pytest.mark.parametrize("model", MODELS)
def test_pool_proj_grid_and_open_clip_parity(model, pool, proj):
    size = _size(model, pool)
    ref, ref_out = _open_clip(model, pool, proj, size)
    if _expected_unsupported(model, pool):
        with pytest.raises(UnsupportedConfig) as info:
            TimmTower(model, EMBED, image_size=size, pool=pool, proj=proj)
        message = str(info.value)
        assert "\n" not in message and model in message and f"pool={pool!r}" in message
        assert ref is None  # open_clip cannot do it either
        return

    tower = TimmTower(model, EMBED, image_size=size, pool=pool, proj=proj).eval()
    with torch.no_grad():
        out = tower(_images(size))
    width = tower.describe().output_dim
    assert out.shape == (2, width)
    trunk_width = timm.create_model(model).num_features * (2 if pool == "catavgmax" else 1)  # avg and max side by side
    assert width == (EMBED if proj != "none" or pool in ("abs_attn", "rot_attn") else trunk_width)

    if ref is None:
        return  # a documented fix (e.g. 'map' + linear on test_vit, abs_attn on test_resnet): ours works
    # Same module names and shapes both ways, and the same function for the same weights.
    tower.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(tower(_images(size)), ref_out, atol=1e-5, rtol=1e-4)
    ref.load_state_dict(tower.state_dict(), strict=True)


def test_grid_covers_documented_open_clip_failures():
    # The grid above must really contain configurations where open_clip fails and ours works.
    assert _open_clip("test_vit", "map", "linear", 160)[0] is None
    assert _open_clip("test_resnet", "abs_attn", "linear", 160)[0] is None
    TimmTower("test_vit", EMBED, image_size=160, pool="map", proj="linear")
    TimmTower("test_resnet", EMBED, image_size=160, pool="abs_attn", proj="linear")


# --- fix 1: attention pooling ---------------------------------------------------------------------

def test_abs_attn_sizes_from_real_feature_map_and_divides_heads():
    tower = TimmTower("test_convnext", EMBED, image_size=96, pool="abs_attn")
    assert tower.describe().feature_shape == (64, 3, 3)
    assert tuple(tower.head.pool.feat_size) == (3, 3)  # open_clip: default_cfg pool_size (5, 5)
    assert tuple(tower.head.pool.pos_embed.shape) == (10, 64)
    assert TimmModel("test_convnext", EMBED, image_size=96, pool="abs_attn").head.pool.feat_size == (5, 5)

    resnet = TimmTower("test_resnet", EMBED, image_size=96, pool="abs_attn").eval()
    assert 96 % resnet.head.pool.num_heads == 0  # 96 channels: 64-wide heads do not divide them
    assert resnet(_images(96)).shape == (2, EMBED)
    rot = TimmTower("test_resnet", EMBED, image_size=96, pool="rot_attn").eval()
    assert 96 % rot.head.pool.num_heads == 0 and rot(_images(96)).shape == (2, EMBED)
    with pytest.raises(AssertionError):  # what open_clip does on this trunk
        TimmModel("test_resnet", EMBED, image_size=96, pool="abs_attn")


@pytest.mark.parametrize("pool", ("abs_attn", "rot_attn"))
def test_attention_pool_on_token_trunk_is_a_clear_value_error(pool):
    with pytest.raises(ValueError) as info:
        TimmTower("test_vit", EMBED, pool=pool)
    assert isinstance(info.value, UnsupportedConfig)
    message = str(info.value)
    assert "tokens" in message and "'token'" in message and "'avg'" in message and "'map'" in message


# --- fix 2: image_size reaches timm ---------------------------------------------------------------

def test_image_size_reaches_vit():
    tower = TimmTower("test_vit", EMBED, image_size=96).eval()
    assert tuple(tower.trunk.patch_embed.img_size) == (96, 96)
    assert tower.trunk.pos_embed.shape[1] == 36 + 1
    assert tower.describe().feature_shape == (37, 64)
    assert tower(_images(96)).shape == (2, EMBED)
    assert TimmModel("test_vit", EMBED, image_size=96).trunk.pos_embed.shape[1] == 100 + 1  # open_clip: default

    # A ViT without dynamic size: open_clip's tower cannot take the images it was configured for.
    ours = TimmTower("test_vit3", EMBED, image_size=96, pool="map").eval()
    assert ours(_images(96)).shape == (2, EMBED)
    with pytest.raises(Exception):
        TimmModel("test_vit3", EMBED, image_size=96, pool="map", proj="none").eval()(_images(96))


# --- fix 3: every timm pool, clear errors otherwise -------------------------------------------------

def test_map_pool_with_projection_builds_attention_pool_at_creation():
    tower = TimmTower("test_vit", EMBED, image_size=160, pool="map", proj="linear").eval()
    assert tower.trunk.attn_pool is not None and tower.trunk.global_pool == "map"
    assert tower(_images(160)).shape == (2, EMBED)


def test_catavgmax_projection_takes_the_doubled_width():
    tower = TimmTower("test_resnet", EMBED, image_size=64, pool="catavgmax", proj="linear").eval()
    assert tower.head.proj.in_features == 2 * 96
    assert tower(_images(64)).shape == (2, EMBED)
    assert TimmTower("test_resnet", EMBED, image_size=64, pool="catavgmax", proj="none").describe().output_dim == 192


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p or "default")
def test_every_schema_pool_builds_on_a_trunk_that_supports_it(pool):
    # options.POOLS is what experiment files may name: each must be a pool the tower can build.
    size = 64
    accepted = [m for m in MODELS if not static_problems(Trial(model=m, image_size=size, pool=pool))]
    assert accepted, f"no test model accepts pool={pool!r}"
    tower = TimmTower(accepted[0], EMBED, image_size=size, pool=pool).eval()
    with torch.no_grad():
        assert tower(_images(size)).shape == (2, EMBED)


def test_unsupported_pool_lists_the_valid_ones():
    with pytest.raises(UnsupportedConfig) as info:
        TimmTower("test_resnet", EMBED, image_size=64, pool="token")
    message = str(info.value)
    valid = message.split("valid pools:")[1]
    assert "'avg'" in valid and "'abs_attn'" in valid and "'token'" not in valid and "'map'" not in valid
    with pytest.raises(UnsupportedConfig, match="valid pools: .*'map'"):
        TimmTower("test_vit", EMBED, pool="catavgmax")
    with pytest.raises(UnsupportedConfig, match="valid pools"):
        TimmTower("test_convnext", EMBED, image_size=64, pool="catavgmax")


def test_default_pool_means_trunk_default_even_without_projection():
    # open_clip returns an unpooled map for pool='' with proj='none'; ours pools as the trunk does.
    tower = TimmTower("test_convnext", EMBED, image_size=64, pool="", proj="none").eval()
    plain = timm.create_model("test_convnext", num_classes=0).eval()
    plain.load_state_dict(tower.trunk.state_dict())
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(tower(x), plain(x))


def test_head_options_that_cannot_take_effect_raise():
    with pytest.raises(UnsupportedConfig, match="drop=0.1"):
        TimmTower("test_resnet", EMBED, image_size=64, proj="none", drop=0.1)
    with pytest.raises(UnsupportedConfig, match="proj_bias"):
        TimmTower("test_resnet", EMBED, image_size=64, proj="none", proj_bias=True)
    with pytest.raises(UnsupportedConfig, match="proj='bogus'"):
        TimmTower("test_resnet", EMBED, proj="bogus")
    tower = TimmTower("test_resnet", EMBED, image_size=64, proj="linear", drop=0.1, proj_bias=True)
    assert tower.head.drop.p == 0.1 and tower.head.proj.bias is not None


# --- fix 4: gradient checkpointing ------------------------------------------------------------------

def test_checkpointing_unsupported_raises_and_reads_back():
    tower = TimmTower("dla34", EMBED, image_size=64)
    assert not tower.supports_grad_checkpointing
    with pytest.raises(UnsupportedConfig, match="dla34: grad_checkpointing=True is not supported"):
        tower.set_grad_checkpointing(True)
    assert tower.grad_checkpointing is False
    tower.set_grad_checkpointing(False)  # turning it off is always fine

    vit = TimmTower("test_vit", EMBED)
    assert vit.supports_grad_checkpointing and not vit.grad_checkpointing
    vit.set_grad_checkpointing(True)
    assert vit.grad_checkpointing and vit.describe().grad_checkpointing
    vit.set_grad_checkpointing(False)
    assert not vit.grad_checkpointing


@pytest.mark.parametrize("model,size", [("test_vit", 160), ("test_convnext", 64)])
def test_checkpointing_gives_same_outputs_and_gradients(model, size):
    torch.manual_seed(0)
    plain = TimmTower(model, EMBED, image_size=size, drop=0.0).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = _images(size)
    out_plain, out_ckpt = plain(x), ckpt(x)
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None, name
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


# --- fix 5: lock -----------------------------------------------------------------------------------

def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore:Importing from timm.models.helpers:FutureWarning")  # open_clip's import
@pytest.mark.parametrize("model", MODELS)
def test_lock_counts_per_unlocked_groups(model):
    tower = TimmTower(model, EMBED, image_size=_size(model, "avg"))
    groups = tower.layer_groups
    assert groups == tower.describe().layer_groups and groups >= 3
    counts = []
    for unlocked in range(groups + 1):
        tower.lock(unlocked)
        counts.append(tower.describe().trainable_param_count)
        assert _trainable(tower.head) == sum(p.numel() for p in tower.head.parameters())  # head stays trainable
        info = tower.describe()
        assert (info.locked_groups, info.unlocked_groups) == (groups - unlocked, unlocked)
    assert all(a < b for a, b in zip(counts, counts[1:]))  # each unlocked group adds parameters
    assert counts[-1] == tower.describe().param_count

    tower.lock(0)
    assert _trainable(tower.trunk) == 0
    ref = TimmModel(model, EMBED)
    ref.lock(1)
    tower.lock(1)
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == {
        n: p.requires_grad for n, p in tower.named_parameters()
    }
    for bad in (-1, groups + 1):
        with pytest.raises(UnsupportedConfig, match=rf"unlocked_groups={bad} is outside 0\.\.{groups}"):
            tower.lock(bad)


def _randomize_bn_stats(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def test_freeze_bn_stats_keeps_fused_activation():
    torch.manual_seed(0)
    tower = TimmTower("test_efficientnet", EMBED, image_size=64)
    _randomize_bn_stats(tower)
    reference = copy.deepcopy(tower).eval()
    n_fused = sum(isinstance(m, BatchNormAct2d) for m in tower.modules())
    acts = [type(m.act) for m in tower.modules() if isinstance(m, BatchNormAct2d)]
    assert n_fused > 0

    tower.lock(0, freeze_bn_stats=True)
    frozen = [m for m in tower.modules() if isinstance(m, FrozenBatchNormAct2d)]
    assert len(frozen) == n_fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.trunk.modules())
    assert [type(m.act) for m in frozen] == acts  # the activation survives (open_clip drops it)
    stats = [m.running_mean.clone() for m in frozen]

    tower.train()
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(tower(x), reference(x), atol=1e-5)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, frozen))  # stats did not move


def test_freeze_bn_stats_only_in_locked_groups():
    tower = TimmTower("test_efficientnet", EMBED, image_size=64)
    tower.lock(1, freeze_bn_stats=True)
    live = [n for n, m in tower.trunk.named_modules() if isinstance(m, BatchNormAct2d)]
    frozen = [n for n, m in tower.trunk.named_modules() if isinstance(m, FrozenBatchNormAct2d)]
    assert live and frozen
    # The last layer group of test_efficientnet: its last stage and the head conv's norm.
    assert sorted(live) == ["blocks.4.0.bn1", "blocks.4.0.bn2", "blocks.4.0.bn3", "bn2"]
    assert "bn1" in frozen and not any(n.startswith(("blocks.4", "bn2")) for n in frozen)


# --- fix 6: drop_path / patch_drop ----------------------------------------------------------------

def test_drop_path_and_patch_drop_only_where_accepted():
    vit = TimmTower("test_vit", EMBED, drop_path=0.1, patch_drop=0.25)
    assert vit.trunk.patch_drop.prob == 0.25
    assert vit.trunk.blocks[-1].drop_path1.drop_prob > 0
    resnet = TimmTower("test_resnet", EMBED, image_size=64, drop_path=0.1)
    assert any(type(m).__name__ == "DropPath" for m in resnet.trunk.modules())
    with pytest.raises(UnsupportedConfig) as info:
        TimmTower("test_resnet", EMBED, image_size=64, patch_drop=0.25)
    assert "test_resnet" in str(info.value) and "patch_drop=0.25" in str(info.value)
    TimmTower("test_resnet", EMBED, image_size=64, patch_drop=0.0)  # a zero rate is no patch dropout


# --- describe, build_tower, re-exports --------------------------------------------------------------

def test_describe_reports_the_tower():
    tower = TimmTower("test_resnet", EMBED, image_size=64, proj="none")
    info = tower.describe()
    assert isinstance(info, TowerInfo)
    assert info.feature_shape == (96, 2, 2) and info.output_dim == 96 and info.layer_groups == 5
    assert info.param_count == sum(p.numel() for p in tower.parameters()) == info.trainable_param_count
    assert info.supports_grad_checkpointing and not info.grad_checkpointing
    assert info.locked_groups is None and info.unlocked_groups is None
    tower.lock(0, freeze_bn_stats=True)
    locked = tower.describe()
    assert locked.param_count == info.param_count  # frozen BN affine buffers still count
    assert locked.trainable_param_count == 0 and (locked.locked_groups, locked.unlocked_groups) == (5, 0)


def test_build_tower_applies_lock_and_checkpointing():
    trial = Trial(model="test_resnet", embed_dim=16, image_size=64, unlocked_groups=2, freeze_bn_stats=True,
                  grad_checkpointing=True)
    tower = build_tower(trial)
    info = tower.describe()
    assert info.output_dim == 16 and info.unlocked_groups == 2 and info.grad_checkpointing
    assert 0 < info.trainable_param_count < info.param_count
    unlocked = build_tower(Trial(model="test_resnet", image_size=64))
    assert all(p.requires_grad for p in unlocked.parameters()) and unlocked.describe().unlocked_groups is None


def test_tower_reexports_the_errors_and_static_checks():
    # Older callers catch these through suite.tower.model: they must be the very classes raised.
    assert tower_module.UnsupportedConfig is UnsupportedConfig and tower_module.WeightsError is WeightsError
    assert tower_module.static_problems is tower_plan.static_problems
