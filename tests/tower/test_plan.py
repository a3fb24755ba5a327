"""Tests of suite.tower.plan: the static checks agree with the build, cost nothing, and name the fix.

Offline on timm's tiny `test_*` models; big models (ViT-B, ConvNeXt-B) only ever on the meta device.
"""
from __future__ import annotations

import pytest
import timm
import torch

from suite.core.errors import UnsupportedConfig
from suite.core.options import POOLS, PROJS, Trial
from suite.tower import plan as tower_plan
from suite.tower.model import TimmTower, build_tower
from suite.tower.plan import (
    ATTN_POOLS,
    TIMM_POOLS,
    create_kwargs,
    head_branch,
    head_problems,
    inspect_trunk,
    known_proj,
    lock_problem,
    probe,
    static_problems,
)

EMBED = 32


# --- the vocabulary agrees with the schema -----------------------------------------------------------

def test_schema_pools_are_exactly_the_tower_pools():
    # A pool the tower builds but experiment files cannot name (catavgmax once) is a silent gap.
    assert sorted(POOLS) == sorted(TIMM_POOLS + ATTN_POOLS)


def test_projections_are_the_schema_ones_plus_none():
    assert all(known_proj(p) for p in PROJS) and known_proj(None)
    assert not known_proj("bogus") and not known_proj("Linear")
    assert head_problems("m", "avg", None, 0.0, False) == []
    assert head_problems("m", "avg", "", 0.1, False) == [
        "m: drop=0.1 has no effect with the trunk's classifier (no projection layer); set drop=0 or proj='linear'"
    ]
    assert head_problems("m", 3, "linear", 0.0, False) == ["m: pool=3 must be a string, e.g. 'avg'"]


@pytest.mark.parametrize("pool,proj,branch", [
    ("abs_attn", "linear", "attn"), ("rot_attn", None, "attn"), ("avg", "linear", "reset"), ("map", "mlp", "reset"),
    ("avg", "none", "create"), ("token", None, "create"), ("", "", "create"),
])
def test_head_branch_follows_open_clip(pool, proj, branch):
    assert head_branch(pool, proj) == branch


# --- building and inspecting trunks --------------------------------------------------------------------

def test_create_kwargs_pass_only_what_the_model_takes():
    vit, resnet = type(timm.create_model("test_vit")), type(timm.create_model("test_resnet"))
    kw, problems = create_kwargs("test_vit", vit, (96, 64), 0.1, 0.25)
    assert dict(kw) == {"img_size": (96, 64), "drop_path_rate": 0.1, "patch_drop_rate": 0.25} and problems == []
    kw, problems = create_kwargs("test_resnet", resnet, (64, 64), 0.1, 0.0)  # a zero rate is no rate
    assert dict(kw) == {"drop_path_rate": 0.1} and problems == []
    _, (problem,) = create_kwargs("test_resnet", resnet, (64, 64), None, 0.25)
    assert problem.startswith("test_resnet: patch_drop=0.25 is not accepted")


def test_inspect_trunk_describes_maps_tokens_and_ignored_pools():
    resnet = inspect_trunk(timm.create_model("test_resnet", num_classes=0), (64, 64), "avg", "create")
    assert (resnet.feature_shape, resnet.pooled_width, resnet.token_features) == ((96, 2, 2), 96, False)
    assert resnet.layer_groups == 5 and resnet.checkpointing_problem is None
    vit = inspect_trunk(timm.create_model("test_vit", num_classes=0), (160, 160), "token", "create")
    assert vit.token_features and vit.feature_shape == (101, 64) and vit.pooled_width == 64
    with pytest.raises(ValueError, match="the trunk kept pool 'avg'"):  # asked for max, got avg
        inspect_trunk(timm.create_model("test_resnet", num_classes=0), (64, 64), "max", "create")


def test_probe_is_one_line_on_failure_and_leaves_the_rng_alone():
    before = torch.random.get_rng_state()
    got = probe("test_resnet", (72, 72), "token", "reset", ())
    assert isinstance(got, str) and "\n" not in got
    assert isinstance(probe("test_resnet", (72, 72), "avg", "reset", ()), tower_plan.TrunkInfo)
    assert torch.equal(before, torch.random.get_rng_state())


def test_lock_problem_names_the_range_or_the_type():
    assert lock_problem("m", 0, None) is None and lock_problem("m", 5, 5) is None
    assert lock_problem("m", True, 5) == "m: unlocked_groups=True must be an integer"
    assert "no group_matcher" in lock_problem("m", 1, None)
    assert "outside 0..5" in lock_problem("m", 6, 5)


# --- static_problems ------------------------------------------------------------------------------------

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


def test_static_problems_ok_for_big_models_built_only_on_meta(monkeypatch):
    # Vetting a grid of big models must allocate no weights and download nothing: every trunk the
    # checks build lives on the meta device and no weights are asked of timm.
    built = []
    real = timm.create_model

    def recording_create_model(name, **kwargs):
        model = real(name, **kwargs)
        built.append((name, next(model.parameters()).device.type, kwargs.get("pretrained", False)))
        return model

    monkeypatch.setattr(timm, "create_model", recording_create_model)
    for cached in (tower_plan.model_class, tower_plan.probe, tower_plan._plan):
        cached.cache_clear()  # a build cached by an earlier test would not be seen
    assert static_problems(Trial(model="vit_base_patch16_224", pool="map", unlocked_groups=12,
                                 grad_checkpointing=True, pretrained=True)) == []
    (problem,) = static_problems(Trial(model="convnext_base", pool="token"))
    assert "valid pools" in problem
    assert "tokens" in static_problems(Trial(model="vit_base_patch16_224", pool="rot_attn"))[0]
    assert {name for name, _, _ in built} == {"vit_base_patch16_224", "convnext_base"}
    assert {(device, pretrained) for _, device, pretrained in built} == {("meta", False)}


def test_static_problems_ok_and_named_problems():
    assert static_problems(Trial(model="test_convnext", image_size=64, pool="abs_attn", unlocked_groups=3)) == []
    assert static_problems(Trial(model="test_resnett"))[0].startswith(
        "model='test_resnett' is not a timm model; did you mean 'test_resnet', "  # closest first
    )
    assert static_problems(Trial(model="zzqq_no_model"))[0].endswith("; see timm.list_models()")
    assert "no such checkpoint file" in static_problems(Trial(model="test_resnet", pretrained="/nope/x.pth"))[0]
    # An unknown projection stops the checks there: nothing else is meaningful without a head.
    assert static_problems(Trial(model="test_resnet", proj="bogus", unlocked_groups=99)) == [
        "test_resnet: proj='bogus' is not a projection; use 'linear', 'mlp' or 'none'"
    ]


def test_seeded_build_is_deterministic_whatever_the_caches():
    torch.manual_seed(0)
    first = TimmTower("test_efficientnet", EMBED, image_size=48, pool="rot_attn").state_dict()
    torch.manual_seed(0)
    static_problems(Trial(model="test_efficientnet", image_size=40, pool="map"))  # meta probes on a cold cache
    second = TimmTower("test_efficientnet", EMBED, image_size=48, pool="rot_attn").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
