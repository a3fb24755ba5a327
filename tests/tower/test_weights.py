"""Tests of suite.tower.weights: the `pretrained` option, checkpoint files of every origin, clear errors.

Offline: hub requests are checked at the `timm.create_model` call, files are saved by the tests.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from suite.core.errors import UnsupportedConfig, WeightsError
from suite.tower.model import TimmTower
from suite.tower.weights import read_state_dict, timm_weight_kwargs, weights_problem, weights_source

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


# --------------------------------------------------------------------------- real weights, offline (issue 13)

_HUB_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file
from suite.tower.model import TimmTower
tower = TimmTower("test_resnet", 32, image_size=64, pretrained=True)
ref = load_file(sys.argv[1])
own = tower.trunk.state_dict()
same = [k for k in own if k in ref and torch.equal(own[k], ref[k])]
print(json.dumps({"same": len(same), "own": len(own), "ref": len(ref)}))
"""


def test_pretrained_true_loads_from_an_offline_hub_cache(tmp_path):
    """timm's hub loader, no network: a Hugging Face cache laid out under HF_HOME, HF_HUB_OFFLINE=1.

    timm resolves `test_resnet` to its default tag's `hf_hub_id` (timm/test_resnet.r160_in1k) and
    asks huggingface_hub for model.safetensors, which the offline cache answers from refs/main ->
    snapshots/<rev>/. Runs in a subprocess: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import.
    """
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert cfg.hf_hub_id == "timm/test_resnet.r160_in1k"
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    save_file(state, str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 1000}))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None), env.pop("HUGGINGFACE_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(snap / "model.safetensors")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    # Every trunk tensor equals the file's (the 1000-class classifier is replaced by the projection).
    assert counts["same"] == counts["own"] > 10 and counts["ref"] > counts["own"]


def test_open_clip_checkpoint_probed_on_projected_features(tmp_path):
    """An open_clip checkpoint (visual.trunk.*, visual.head.*): probe_features=projected reads the
    checkpoint's head, pooled reads the trunk alone."""
    from suite.core.options import Trial
    from suite.probe.features import probed_module

    torch.manual_seed(7)
    source = TimmTower("test_convnext", EMBED, image_size=64, pool="avg", proj="linear").eval()
    clip_state = {f"visual.{k}": v for k, v in source.state_dict().items()}
    clip_state["logit_scale"] = torch.ones([])
    assert any(k.startswith("visual.head.proj") for k in clip_state)
    path = tmp_path / "open_clip_model.safetensors"
    _save(clip_state, path)
    trial = Trial(model="test_convnext", embed_dim=EMBED, image_size=64, pool="avg", proj="linear",
                  pretrained=str(path), probe_features="projected")
    torch.manual_seed(99)  # another seed: only the checkpoint can make the weights agree
    tower = TimmTower("test_convnext", EMBED, image_size=64, pool="avg", proj="linear", pretrained=str(path)).eval()
    x = _images(64)
    with torch.no_grad():
        projected = probed_module(tower, trial)(x)
        pooled = probed_module(tower, Trial(**{**trial.as_dict(), "probe_features": "pooled"}))(x)
        assert projected.shape == (2, EMBED) and torch.allclose(projected, source(x), atol=1e-6)
        assert torch.allclose(pooled, source.trunk(x), atol=1e-6)
        assert torch.allclose(source.head(pooled), projected, atol=1e-6)


def test_a_text_file_checkpoint_is_named_not_an_index_error(tmp_path):
    # issue 14.12: torch.load of a text file raised "IndexError: pop from empty list".
    lfs = tmp_path / "model.pth"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match=r"model.pth is a text file, not a checkpoint \(a Git LFS pointer"):
        TimmTower("test_resnet", EMBED, image_size=64, pretrained=str(lfs))
    notes = tmp_path / "notes.pt"
    notes.write_text("hello\n")
    with pytest.raises(WeightsError, match="notes.pt is a text file.*'hello'"):
        read_state_dict(notes)


def test_a_vit_checkpoint_at_another_resolution_is_resampled_and_noted(tmp_path):
    # issue 14.12: a ViT checkpoint saved at 160 px did not load into a 96-px tower (pos_embed 101 vs 37 tokens).
    from timm.layers import resample_abs_pos_embed

    source = timm.create_model("test_vit")  # 160 px: 10x10 patches + 1 class token
    path = _save(source.state_dict(), tmp_path / "vit160.pth")
    tower = TimmTower("test_vit", EMBED, image_size=96, pool="token", pretrained=path)
    assert tower.trunk.pos_embed.shape[1] == 37  # 6x6 + 1
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert torch.allclose(tower.trunk.pos_embed, expected)
    assert torch.equal(tower.trunk.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert tower.weights_notes == ["pos_embed resampled from a 10x10 to a 6x6 patch grid (bicubic, as timm does "
                                   "for pretrained weights at another image size)"]
    # ... and the record says so (the measured tower's `weights_note`).
    from suite.core.options import Trial
    from suite.measurement.engine import measure

    t = Trial(model="test_vit", embed_dim=EMBED, image_size=96, pool="token", pretrained=str(path), device="cpu",
              mode="infer", warmup=1, iters=1, batch_size=2)
    assert measure(t, tower=tower).weights_note == tower.weights_notes[0]
    assert measure(t, tower=TimmTower("test_vit", EMBED, image_size=96, pool="token")).weights_note is None
