"""Tests of suite.weights: the `pretrained` option, checkpoint files of every origin, clear errors.

Offline: hub requests are checked at the `timm.create_model` call, files are saved by the tests.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from suite.errors import UnsupportedConfig, WeightsError
from suite.tower import TimmTower
from suite.weights import read_state_dict, timm_weight_kwargs, weights_problem, weights_source

EMBED = 32


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# --- what `pretrained` names -------------------------------------------------------------------------

def test_weights_source_names_each_kind(tmp_path):
    assert weights_source(False) == weights_source(None) == ("none", None)
    assert weights_source(True) == ("timm", None)
    assert weights_source("r160_in1k") == ("tag", "r160_in1k")
    assert weights_source("timm/test_resnet.r160_in1k") == ("hub", "timm/test_resnet.r160_in1k")
    assert weights_source("hf-hub:org/model") == ("hub", "org/model")
    assert weights_source("/nope/trunk.safetensors") == ("file", Path("/nope/trunk.safetensors"))  # by suffix
    assert weights_source(str(tmp_path)) == ("file", tmp_path)  # an existing path, whatever its suffix
    for bad in (3, ""):
        with pytest.raises(UnsupportedConfig, match="is not understood"):
            weights_source(bad)


def test_weights_problem_checks_offline():
    assert weights_problem("test_resnet", False) is None
    assert weights_problem("test_resnet", "r160_in1k") is None
    assert weights_problem("test_resnet", 3) == (
        "test_resnet: pretrained=3 is not understood; use false, true, a timm tag, a hub id or a checkpoint path"
    )
    assert "already has one" in weights_problem("test_resnet.r160_in1k", "r160_in1k")
    assert "no such checkpoint file" in weights_problem("test_resnet", "/nope/x.pth")


def test_timm_weight_kwargs_load_nothing_for_files_and_random_init():
    assert timm_weight_kwargs("test_resnet", False) == ("test_resnet", {})
    assert timm_weight_kwargs("test_resnet", "/nope/x.pth") == ("test_resnet", {})  # read by the tower, not timm
    assert timm_weight_kwargs("test_resnet", "r160_in1k") == ("test_resnet.r160_in1k", {"pretrained": True})


# --- checkpoint files ----------------------------------------------------------------------------------

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
    TimmModel = pytest.importorskip("open_clip.timm_model").TimmModel
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

    monkeypatch.setattr(timm, "create_model", fake_create_model)  # the one timm module every caller uses
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


def test_read_state_dict_unwraps_trainer_dicts_and_ddp(tmp_path):
    weight = torch.ones(2, 2)
    torch.save({"epoch": 3, "model": {"module.fc.weight": weight, "module.step": 5}}, tmp_path / "ckpt.pt")
    state = read_state_dict(tmp_path / "ckpt.pt")
    assert list(state) == ["fc.weight"] and torch.equal(state["fc.weight"], weight)  # non-tensors dropped


def test_read_state_dict_rejects_what_is_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match=r"holds no tensors \(top-level keys: 'epoch', 'optimizer'\)"):
        read_state_dict(tmp_path / "empty.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="is a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_open_clip_checkpoint_without_a_timm_trunk_is_rejected(tmp_path):
    path = _save({"visual.conv1.weight": torch.ones(4, 3, 3, 3)}, tmp_path / "vit_clip.pt")  # open_clip's own ViT
    with pytest.raises(WeightsError, match="no visual.trunk"):
        TimmTower("test_resnet", EMBED, image_size=64, pretrained=path)
