"""Exports: csv, parquet, timm-csv columns, pytest-benchmark (read by its real CLI), open_clip config."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from factories import GPU, make_record, write_store

from suite.core.errors import SuiteError
from suite.report.export import _chosen_trial, export
from suite.results.store import load_results

SELECT = {"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= 900"]}


@pytest.fixture
def db(tmp_path) -> Path:
    recs = [
        make_record("test_vit", pool="token", proj="none", probe_top1=70.0, train_peak_mem_mib=500.0,
                    unlocked_groups=1, freeze_bn_stats=True, grad_checkpointing=True, precision="bf16",
                    drop_path=0.1, patch_drop=0.25, embed_dim=64, image_size=96, batch_size=16,
                    train_batch_size=16, pretrained="augreg_in21k"),
        make_record("test_vit", probe_top1=90.0, train_peak_mem_mib=2000.0),  # best probe, too much memory
        make_record("test_resnet", pool="", infer_samples_per_sec=900.0, infer_gmacs=0.123456, param_count=1.23456),
        make_record("test_convnext", "oom", "CUDA out of memory"),
    ]
    return write_store(tmp_path / "run" / "results.sqlite", recs, {"experiment": {"name": "t", "select": SELECT}})


def test_csv_and_parquet_round_trip(db):
    df = load_results(db)
    out = export(db, "csv", None)
    assert out == db.parent / "results.csv"
    back = pd.read_csv(out)
    assert len(back) == 4 and list(back.columns) == list(df.columns)
    pytest.importorskip("pyarrow")  # the parquet extra (not on every machine, e.g. the GPU check's)
    pq = export(db, "parquet", db.parent / "x.parquet")
    back = pd.read_parquet(pq)
    assert len(back) == 4 and list(back.columns) == list(df.columns)
    # pretrained holds bools and strings: kept losslessly as JSON text in parquet.
    assert sorted(back["pretrained"]) == ['"augreg_in21k"', "false", "false", "false"]
    assert len(pd.read_csv(export(db, "csv", db.parent / "one.csv", trial_id=df["trial_id"][0][:6]))) == 1


def test_timm_csv_columns(db):
    out = export(db, "timm-csv", None)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "infer_img_size", "infer_batch_size", "infer_samples_per_sec",
                             "infer_step_time", "infer_gmacs", "param_count", "train_img_size", "train_batch_size",
                             "train_samples_per_sec", "train_step_time", "train_gmacs", "trial_id", "config"]
    # The header lines of timm's published results/benchmark-{infer,train}-*.csv, written out here.
    timm = set("model,infer_img_size,infer_samples_per_sec,infer_step_time,infer_batch_size,param_count,"
               "infer_gmacs,infer_macts".split(",")) | set(
        "model,train_samples_per_sec,train_step_time,train_batch_size,train_img_size,param_count".split(","))
    ours = set(rows[0]) - {"trial_id", "config"}
    assert ours - timm == {"train_gmacs"}  # the suite's own: forward + backward MACs per image
    assert timm - ours == {"infer_macts"}  # activation counts are not measured
    assert len(rows) == 3  # ok trials only, as timm's CSVs
    assert rows[0]["model"] == "test_resnet"  # fastest inference first, as timm sorts
    assert rows[0]["infer_samples_per_sec"] == "900.0" and rows[0]["infer_gmacs"] == "0.12"
    assert rows[0]["param_count"] == "1.23" and rows[0]["infer_batch_size"] == "32"
    assert rows[0]["config"] == "pool=''"


def test_pytest_benchmark_file_is_read_by_its_cli(db, tmp_path):
    out = export(db, "pytest-benchmark", None)
    data = json.loads(out.read_text())
    assert len(data["benchmarks"]) == 6  # 3 ok trials x (infer, train)
    bench = next(b for b in data["benchmarks"] if b["group"] == "train" and "test_resnet" in b["name"])
    assert bench["stats"]["median"] == pytest.approx(0.320)  # 32,000 / 100 ms -> s
    assert bench["stats"]["iqr"] == pytest.approx(0.0064) and bench["stats"]["mean"] == bench["stats"]["median"]
    assert "mean = median" in bench["extra_info"]["note"]
    cli = shutil.which("pytest-benchmark", path=str(Path(sys.executable).parent)) or shutil.which("pytest-benchmark")
    assert cli, "pytest-benchmark's CLI is not installed"
    again = export(db, "pytest-benchmark", tmp_path / "0002_current.json")  # e.g. baseline vs current
    proc = subprocess.run([cli, "compare", str(out), str(again), "--columns=median,iqr,rounds", "--group-by=group"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "benchmark 'train'" in proc.stdout and "benchmark 'infer'" in proc.stdout
    assert "train[test_resnet pool='']" in proc.stdout and "Median" in proc.stdout


def test_pytest_benchmark_refuses_mixed_environments(tmp_path):
    db = write_store(tmp_path / "results.sqlite", [make_record(), make_record(env=GPU)])
    with pytest.raises(SuiteError, match="2 environments"):
        export(db, "pytest-benchmark", tmp_path / "x.json")


def test_open_clip_config_of_the_select_best(db):
    out = export(db, "open-clip-config", None)  # default: the select block's best
    config = json.loads(out.read_text())
    assert config == {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": "test_vit.augreg_in21k", "timm_model_pretrained": True, "timm_pool": "token",
            "timm_proj": "none", "timm_proj_bias": False, "timm_drop": 0.0, "timm_drop_path": 0.1,
            "patch_dropout": 0.25, "image_size": 96,
        },
    }
    args = out.with_name(out.stem + ".train-args.txt").read_text().splitlines()
    assert args[1] == ("--lock-image --lock-image-unlocked-groups 1 --lock-image-freeze-bn-stats "
                       "--grad-checkpointing --precision amp_bf16 --batch-size 16")
    CLIPVisionCfg = pytest.importorskip("open_clip.model").CLIPVisionCfg

    cfg = CLIPVisionCfg(**config["vision_cfg"])
    assert cfg.timm_model_name == "test_vit.augreg_in21k" and cfg.timm_pool == "token" and cfg.image_size == 96


def test_open_clip_config_builds_the_measured_tower(db, tmp_path):
    """The exported config builds open_clip's TimmModel with the measured head (random init here)."""
    tid = load_results(db).query("model == 'test_resnet'")["trial_id"].iloc[0]
    config = json.loads(export(db, "open-clip-config", tmp_path / "cfg.json", trial_id=tid[:8]).read_text())
    assert config["vision_cfg"]["timm_pool"] == "" and config["vision_cfg"]["timm_model_pretrained"] is False
    torch = pytest.importorskip("torch")
    open_clip_model = pytest.importorskip("open_clip.model")
    CLIPVisionCfg, _build_vision_tower = open_clip_model.CLIPVisionCfg, open_clip_model._build_vision_tower

    tower = _build_vision_tower(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]))
    with torch.no_grad():
        out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, config["embed_dim"])


def test_open_clip_config_errors(db):
    with pytest.raises(SuiteError, match="no trial_id starts with 'zzz'"):
        export(db, "open-clip-config", None, trial_id="zzz")
    df = load_results(db)
    df["trial_id"] = ["abc1", "abc2", "xyz", "uvw"]
    with pytest.raises(SuiteError, match="trial_id prefix 'abc' matches 2 trials"):
        _chosen_trial(df, db, "abc")
    oom = load_results(db).query("status == 'oom'")["trial_id"].iloc[0]
    with pytest.raises(SuiteError, match="has status oom .*export a trial that ran ok"):
        export(db, "open-clip-config", None, trial_id=oom)
    with pytest.raises(SuiteError, match="export format 'timm_csv' is not one of .*did you mean 'timm-csv'"):
        export(db, "timm_csv", None)


def test_open_clip_config_needs_a_select_block_or_a_trial(tmp_path):
    db = write_store(tmp_path / "results.sqlite", [make_record()], {"experiment": {"name": "t"}})
    with pytest.raises(SuiteError, match="the experiment has no select block, so there is no best trial"):
        export(db, "open-clip-config", None)
    strict = write_store(tmp_path / "strict.sqlite", [make_record()], {"experiment": {"name": "t", "select": {
        "objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= 1"]}}})
    with pytest.raises(SuiteError, match="no trial meets the select block's constraints; pass trial_id"):
        export(strict, "open-clip-config", None)
    with pytest.raises(SuiteError, match="no trial_id starts with 'zzz'"):
        export(db, "csv", tmp_path / "new" / "x.csv", trial_id="zzz")
    assert not (tmp_path / "new").exists()  # a bad request writes nothing


@pytest.mark.parametrize("model, size, pool, proj, builds", [
    ("test_resnet", 64, "avg", "linear", True),    # a conv net's weights do not depend on the input size
    ("test_vit", 160, "token", "none", True),      # a ViT at timm's default size
    ("test_vit", 96, "token", "linear", False),    # the smoke's ViT at 96 px: open_clip builds 160 px
])
def test_every_exported_open_clip_config_builds_the_measured_tower_or_says_what_it_builds(
        tmp_path, capsys, model, size, pool, proj, builds):
    """issue 14.13: build the exported config with open_clip and load the suite tower's weights strictly."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from suite.tower.model import TimmTower

    record = make_record(model, image_size=size, pool=pool, proj=proj, embed_dim=32)
    db = write_store(tmp_path / "results.sqlite", [record])
    out = export(db, "open-clip-config", tmp_path / "cfg.json", trial_id=record.trial.trial_id)
    config = json.loads(out.read_text())
    clip = open_clip.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                          text_cfg={"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1})
    ours = TimmTower(model, 32, image_size=size, pool=pool, proj=proj)
    notes = out.with_name(out.stem + ".train-args.txt").read_text()
    warning = capsys.readouterr().err
    if builds:
        clip.visual.load_state_dict(ours.state_dict(), strict=True)
        assert "WARNING" not in notes and warning == ""
        return
    with pytest.raises(RuntimeError, match="pos_embed"):
        clip.visual.load_state_dict(ours.state_dict(), strict=True)
    for text in (notes, warning):
        assert "does not pass image_size" in text and "at timm's default 160 px" in text
        assert "pos_embed (1, 101, 64) vs (1, 37, 64) measured" in text
    # The recipe the note gives loads the measured weights, strictly, in open_clip's place.
    recipe = notes.split("model.visual = ")[1].split(" (open_clip")[0]
    import suite.tower.model

    clip.visual = eval(recipe, {"suite": suite})  # noqa: S307 - our own note
    clip.visual.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert clip.encode_image(torch.randn(1, 3, size, size)).shape == (1, 32)
