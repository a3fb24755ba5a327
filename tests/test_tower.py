"""Tests of suite.tower: open_clip parity, the documented fixes, lock, checkpointing, weights.

All offline on timm's tiny `test_*` models with random weights; open_clip (test extra) is the
reference for parity.
"""
from __future__ import annotations

import copy
import time

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

from suite.options import POOLS, Trial
from suite.tower import (
    TimmTower,
    TowerInfo,
    UnsupportedConfig,
    WeightsError,
    build_tower,
    static_problems,
)

open_clip_timm = pytest.importorskip("open_clip.timm_model")
TimmModel = open_clip_timm.TimmModel

MODELS = ("test_vit", "test_resnet", "test_convnext", "test_efficientnet")
PROJS = ("linear", "mlp", "none", None)  # None: open_clip's `timm_proj: null` (the trunk's classifier projects)
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
        return pool in ("abs_attn", "rot_attn")  # token trunk: no feature map to attend over
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

@pytest.mark.parametrize("proj", PROJS, ids=lambda p: repr(p))
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
    trunk_width = timm.create_model(model).num_features
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


# --- fix 7: weights ---------------------------------------------------------------------------------

def _save(state: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("suffix", (".pth", ".safetensors"))
def test_local_timm_checkpoint_loads_into_trunk(tmp_path, suffix):
    source = timm.create_model("test_resnet")  # with its 1000-class classifier, as timm saves it
    path = _save(source.state_dict(), tmp_path / f"trunk{suffix}")
    tower = TimmTower("test_resnet", EMBED, image_size=64, pretrained=path)
    for name, value in tower.trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


def test_open_clip_checkpoint_loads_trunk_and_head(tmp_path):
    ref = TimmModel("test_convnext", EMBED, pool="avg", proj="mlp").eval()
    clip_state = {f"module.visual.{k}": v for k, v in ref.state_dict().items()}
    clip_state["module.logit_scale"] = torch.ones([])
    clip_state["module.text_projection"] = torch.zeros(4, 4)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": clip_state}, path)
    tower = TimmTower("test_convnext", EMBED, image_size=64, pool="avg", proj="mlp", pretrained=str(path)).eval()
    x = _images(64)
    with torch.no_grad():
        assert torch.allclose(tower(x), ref(x), atol=1e-6)


class _NotATensor:
    pass


def test_bad_checkpoints_raise_weights_error(tmp_path):
    wrong = _save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(WeightsError) as info:
        TimmTower("test_convnext", EMBED, image_size=64, pretrained=wrong)
    message = str(info.value)
    assert wrong in message and "missing" in message and "unexpected" in message and "stem.0.weight" in message

    with pytest.raises(WeightsError, match="no such checkpoint file"):
        TimmTower("test_resnet", EMBED, pretrained=str(tmp_path / "absent.safetensors"))

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weight": _NotATensor()}, unsafe)  # weights_only=True refuses to unpickle arbitrary objects
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        TimmTower("test_resnet", EMBED, image_size=64, pretrained=str(unsafe))


def test_pretrained_hub_requests_reach_timm(monkeypatch):
    calls = []
    real = timm.create_model

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs.get("pretrained"), kwargs.get("pretrained_cfg_overlay")))
        kwargs.pop("pretrained", None), kwargs.pop("pretrained_cfg_overlay", None)
        return real(name, **kwargs)  # offline: same model, random weights

    monkeypatch.setattr("suite.tower.timm.create_model", fake_create_model)
    TimmTower("test_resnet", EMBED, image_size=64, pretrained=True)
    TimmTower("test_resnet", EMBED, image_size=64, pretrained="r160_in1k")
    TimmTower("test_resnet", EMBED, image_size=64, pretrained="timm/test_resnet.r160_in1k")
    assert ("test_resnet", True, None) in calls
    assert ("test_resnet.r160_in1k", True, None) in calls
    assert ("test_resnet", True, {"hf_hub_id": "timm/test_resnet.r160_in1k"}) in calls
    monkeypatch.undo()

    no_weights = next(m for m in timm.list_models("coatnet*") if not timm.models.is_model_pretrained(m))
    with pytest.raises(UnsupportedConfig, match="no pretrained weights"):
        TimmTower(no_weights, EMBED, pretrained=True)
    with pytest.raises(UnsupportedConfig, match="not a timm pretrained tag"):
        TimmTower("test_resnet", EMBED, pretrained="no_such_tag")


# --- describe, build_tower, static_problems -------------------------------------------------------

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


BAD_TRIALS = [
    dict(model="test_resnet", pool="token"),
    dict(model="test_vit", image_size=160, pool="abs_attn"),
    dict(model="test_resnet", unlocked_groups=9),
    dict(model="test_resnet", freeze_bn_stats=True),
    dict(model="test_resnet", patch_drop=0.1),
    dict(model="dla34", grad_checkpointing=True),
    dict(model="test_resnet", proj="none", drop=0.2),
]


@pytest.mark.parametrize("fields", BAD_TRIALS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_static_problems_match_build_errors(fields):
    trial = Trial(**{"image_size": 64, **fields})
    problems = static_problems(trial)
    with pytest.raises(UnsupportedConfig) as info:
        build_tower(trial)
    assert problems and problems[0] == str(info.value)
    assert all("\n" not in p and trial.model in p for p in problems)


def test_static_problems_ok_and_cheap_for_real_models():
    assert static_problems(Trial(model="test_convnext", image_size=64, pool="abs_attn", unlocked_groups=3)) == []
    start = time.perf_counter()
    assert static_problems(Trial(model="vit_base_patch16_224", pool="map", unlocked_groups=12,
                                 grad_checkpointing=True)) == []
    (problem,) = static_problems(Trial(model="convnext_base", pool="token"))
    assert "valid pools" in problem
    assert "tokens" in static_problems(Trial(model="vit_base_patch16_224", pool="rot_attn"))[0]
    print(f"static_problems on vit_base + convnext_base: {time.perf_counter() - start:.2f}s")  # no assertion on time
    assert "did you mean" in static_problems(Trial(model="test_resnett"))[0]
    assert "no such checkpoint file" in static_problems(Trial(model="test_resnet", pretrained="/nope/x.pth"))[0]


def test_seeded_build_is_deterministic_whatever_the_caches():
    torch.manual_seed(0)
    first = TimmTower("test_efficientnet", EMBED, image_size=48, pool="rot_attn").state_dict()
    torch.manual_seed(0)
    static_problems(Trial(model="test_efficientnet", image_size=40, pool="map"))  # meta probes on a cold cache
    second = TimmTower("test_efficientnet", EMBED, image_size=48, pool="rot_attn").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
