"""Experiment files: validation errors name file, key and value; grid expansion; include/exclude."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from suite.core.options import OPTIONS, Trial
from suite.experiment.spec import ConfigError, load_experiment, parse_experiment


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_experiment(write(tmp_path, text))
    assert str(tmp_path / "exp.yaml") in str(info.value)  # the file is named
    return info.value.problems


def test_trial_fields_are_exactly_the_schema():
    assert [f for f in Trial.__dataclass_fields__] == [o.name for o in OPTIONS]
    trial = Trial(model="test_vit")
    with pytest.raises(Exception):
        trial.pool = "max"  # frozen
    assert trial.trial_id == Trial(model="test_vit").trial_id
    assert trial.trial_id != Trial(model="test_vit", pool="max").trial_id
    # options that do not change the measurement do not change the id
    assert trial.trial_id == Trial(model="test_vit", probe_batch_size=7).trial_id


def test_an_integer_for_a_float_option_names_the_same_trial():
    # YAML `drop: 0` is an int; the CLI's --drop 0 and the default are 0.0: one configuration, one id.
    exp = parse_experiment({"name": "x", "grid": {"model": "test_vit", "drop": [0, 1], "drop_path": 0}})
    assert exp.trials[0].trial_id == Trial(model="test_vit", drop=0.0, drop_path=0.0).trial_id
    assert exp.trials[1].trial_id == Trial(model="test_vit", drop=1.0, drop_path=0.0).trial_id
    assert Trial(model="test_vit", drop_path=None).trial_id != Trial(model="test_vit", drop_path=0.0).trial_id


def test_grid_expands_with_include_and_exclude():
    exp = parse_experiment({
        "name": "x", "device": "cpu", "measure": {"iters": 3},
        "grid": {"model": ["test_vit", "test_resnet"], "pool": ["avg", "abs_attn"], "unlocked_groups": [None, 0]},
        "exclude": [{"model": "test_vit", "pool": "abs_attn"}],
        "include": [{"model": "test_convnext", "pool": ["max", "avg"]}],
    })
    labels = [(t.model, t.pool, t.unlocked_groups) for t in exp.trials]
    assert len(labels) == 2 * 2 * 2 - 2 + 2
    assert ("test_vit", "abs_attn", None) not in labels
    # "not locked" (None) and "locked, 0 unlocked" (0) are different trials
    assert ("test_resnet", "avg", None) in labels and ("test_resnet", "avg", 0) in labels
    # include entries inherit fixed settings but not the multi-valued grid axes
    conv = [t for t in exp.trials if t.model == "test_convnext"]
    assert [t.pool for t in conv] == ["max", "avg"]
    assert all(t.iters == 3 and t.device == "cpu" and t.unlocked_groups is None for t in conv)
    assert exp.axes == ["model", "pool", "unlocked_groups"]


def test_duplicate_combinations_collapse():
    exp = parse_experiment({"name": "x", "grid": {"model": ["test_vit", "test_vit"]},
                            "include": [{"model": "test_vit"}]})
    assert len(exp.trials) == 1


def test_unknown_keys_suggest_the_closest(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grdi: {model: [test_vit]}
        measure: {warmpu: 3}
        grid: {model: [test_vit], pol: [avg]}
    """)
    text = "\n".join(problems)
    assert "grdi: unknown key; did you mean 'grid'?" in text
    assert "measure.warmpu: unknown option 'warmpu'; did you mean 'warmup'?" in text
    assert "grid.pol: unknown option 'pol'; did you mean 'pool'?" in text


def test_wrong_types_empty_lists_and_bad_choices(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        measure: {iters: "5", precision: fp64}
        grid: {model: [test_vit], embed_dim: [], pool: [avg, avgg], grad_checkpointing: [yes, 1]}
    """)
    text = "\n".join(problems)
    assert "measure.iters: '5' must be an integer" in text
    assert "measure.precision: 'fp64' must be one of 'fp32', 'bf16', 'fp16'" in text
    assert "grid.embed_dim: empty list" in text
    assert "grid.pool[1]: 'avgg' must be one of" in text and "did you mean 'avg'" in text
    assert "grid.grad_checkpointing[1]: 1 must be true/false" in text


def test_unknown_model_names_get_close_matches(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grid: {model: [test_vitt, resnet50]}
    """)
    assert len(problems) == 1  # resnet50 is fine
    assert problems[0].startswith("model: 'test_vitt' is not a timm model; did you mean 'test_vit' or ")


def test_missing_checkpoint_file(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grid: {model: [test_vit], pretrained: [/no/such/file.safetensors]}
    """)
    assert problems == ["pretrained: checkpoint file '/no/such/file.safetensors' does not exist"]


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [x\n"))
    # the safe loader refuses arbitrary Python objects
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n"))


def test_run_block_and_required_name(tmp_path):
    problems = problems_of(tmp_path, """
        grid: {model: [test_vit]}
        run: {backend: rey, workers: 0, timout_s: 3}
    """)
    text = "\n".join(problems)
    assert "name: required" in text
    assert "run.backend: 'rey' must be one of" in text and "did you mean 'ray'" in text
    assert "run.workers: 0 must be positive" in text
    assert "run.timout_s: unknown key; did you mean 'timeout_s'?" in text


def test_shipped_experiments_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].glob("experiments/*.yaml")):
        exp = load_experiment(path)
        assert exp.trials, path


def test_cli_validate_exit_code_2_on_bad_file(tmp_path):
    path = write(tmp_path, "name: x\ngrid: {model: [test_vit], pool: [avgg]}\n")
    proc = subprocess.run([sys.executable, "-m", "suite.cli.main", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}" in proc.stderr and "grid.pool[0]: 'avgg'" in proc.stderr


# --- issue 14: nothing silently dropped -----------------------------------------------------------


@pytest.mark.parametrize("option", ["noise_threshold", "probe_batch_size"])
def test_sweeping_an_option_outside_the_identity_is_an_error(tmp_path, option):
    # It used to collapse to one trial keeping the LAST value, without a word.
    values = "[0.1, 0.5, 0.9]" if option == "noise_threshold" else "[16, 32]"
    problems = problems_of(tmp_path, f"""
        name: x
        grid: {{model: [test_vit], {option}: {values}}}
    """)
    assert len(problems) == 1
    assert f"grid.{option}" in problems[0] and "not part of a trial's identity" in problems[0]
    # One value is fine, and it is the value the trial gets.
    exp = parse_experiment({"name": "x", "grid": {"model": ["test_vit"], option: [16 if option != "noise_threshold" else 0.5]}})
    assert getattr(exp.trials[0], option) == (16 if option != "noise_threshold" else 0.5)


def test_an_include_that_repeats_a_trial_with_other_settings_is_an_error():
    with pytest.raises(ConfigError, match="given twice with different settings.*noise_threshold: 0.1 vs 0.5"):
        parse_experiment({"name": "x", "grid": {"model": ["test_vit"]},
                          "include": [{"model": "test_vit", "noise_threshold": 0.5}]})


def test_a_key_given_twice_names_the_file_line_and_key(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grid:
          model: [test_vit]
          pool: [avg]
          pool: [token]
    """)
    assert len(problems) == 1
    assert "'pool' is given twice" in problems[0] and "lines 5 and 6" in problems[0]


@pytest.mark.parametrize("key, value, expect", [
    ("iters", 0, "iters: 0 must be at least 1"),
    ("embed_dim", 0, "embed_dim: 0 must be at least 1"),
    ("batch_size", 0, "batch_size: 0 must be at least 1"),
    ("warmup", -2, "warmup: -2 must not be negative"),
    ("max_per_class", 1, "max_per_class: 1 must be at least 3 (each class needs an image in train, val and test; raise it"),
    ("drop", 1.5, "drop: 1.5 must be at most 1"),
])
def test_every_range_is_checked_at_validation(tmp_path, key, value, expect):
    problems = problems_of(tmp_path, f"""
        name: x
        {key}: {value}
        grid: {{model: [test_vit]}}
    """)
    assert any(expect in p for p in problems), problems


def test_run_timeout_must_be_finite(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grid: {model: [test_vit]}
        run: {timeout_s: .inf}
    """)
    assert problems == ["run.timeout_s: inf must be positive (and finite)"]


def test_a_huge_grid_is_counted_not_expanded_and_refused(monkeypatch):
    import suite.experiment.spec

    grid = {"model": ["test_vit"], "seed": list(range(1000)), "embed_dim": list(range(1, 1001)),
            "iters": list(range(1, 33))}  # 3.2e7 trials: expanding them would take minutes and gigabytes
    with monkeypatch.context() as m:  # counted, never expanded (no timing: an expansion raises here)
        m.setattr(suite.experiment.spec, "_expand_trials", lambda *a, **k: pytest.fail("the grid was expanded"))
        with pytest.raises(ConfigError) as info:
            parse_experiment({"name": "x", "grid": grid})
    (problem,) = info.value.problems
    assert "32,000,000 trials" in problem and "limit of 10,000" in problem and "--yes" in problem
    assert "4,444.4 h" in problem  # the overhead floor: 3.2e7 x 0.5 s
    # Under the limit, or with the limit lifted, it expands.
    small = parse_experiment({"name": "x", "grid": {"model": ["test_vit"], "seed": list(range(20))}}, max_trials=20)
    assert len(small.trials) == 20
    assert len(parse_experiment({"name": "x", "grid": {"model": ["test_vit"], "seed": list(range(30))}},
                                max_trials=None).trials) == 30


def test_an_exclude_rule_that_matches_nothing_warns():
    exp = parse_experiment({"name": "x", "grid": {"model": ["test_vit", "test_resnet"], "pool": ["avg", "max"]},
                            "exclude": [{"model": "test_vit", "pool": "max"}, {"model": "test_vitt"}]})
    assert len(exp.trials) == 3
    assert exp.warnings == ("exclude[1]: {'model': ['test_vitt']} matches no trial of the grid; "
                            "check its names and values",)


def test_hub_model_names_are_refused_at_validation(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        grid: {model: ['hf-hub:timm/test_vit.r160_in1k']}
    """)
    assert len(problems) == 1 and "not supported as model" in problems[0] and "pretrained: 'hf-hub:" in problems[0]


def test_pretrained_weights_not_cached_fail_fast_offline(tmp_path, monkeypatch):
    # No network is touched: the cache is an empty folder and downloads are off.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    problems = problems_of(tmp_path, """
        name: x
        grid: {model: [test_vit], pretrained: [true]}
    """)
    (problem,) = problems
    assert "timm/test_vit.r160_in1k" in problem and "HF_HUB_OFFLINE=1" in problem
    assert str(tmp_path / "hub") in problem and "local checkpoint file" in problem
    # Downloads allowed and the hub reachable (faked: tests never touch the network): a note only.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("suite.tower.hub.hub_reachable", lambda: True)
    exp = load_experiment(write(tmp_path, "name: x\ngrid: {model: [test_vit], pretrained: [true]}\n"))
    assert any("will be downloaded" in w and "HF_HUB_OFFLINE=1" in w for w in exp.warnings)
    # Downloads allowed but no network (faked): refused in seconds, naming the ways out.
    monkeypatch.setattr("suite.tower.hub.hub_reachable", lambda: False)
    (problem,) = problems_of(tmp_path, """
        name: x
        grid: {model: [test_vit], pretrained: [true]}
    """)
    assert "cannot be reached" in problem and "HF_HUB_OFFLINE=1" in problem and "local checkpoint file" in problem


# --- issue 13: several datasets and few-shot ks written where a user writes them ------------------


def test_a_list_outside_the_grid_is_an_axis_and_shots_is_one_trials_list():
    exp = parse_experiment({"name": "x", "probe": {"dataset": ["digits", "textures"], "shots": [1, 5, None]},
                            "grid": {"model": ["test_vit", "test_resnet"]}})
    assert [(t.model, t.dataset) for t in exp.trials] == [
        ("test_vit", "digits"), ("test_vit", "textures"), ("test_resnet", "digits"), ("test_resnet", "textures")]
    assert {t.shots for t in exp.trials} == {"1,5,all"} and exp.axes == ["model", "dataset"]
    # The same axis written under grid gives the same trials (same ids).
    same = parse_experiment({"name": "x", "probe": {"shots": "1,5,all"},
                             "grid": {"model": ["test_vit", "test_resnet"], "dataset": ["digits", "textures"]}})
    assert [t.trial_id for t in same.trials] == [t.trial_id for t in exp.trials]


def test_lists_outside_the_grid_are_checked_like_grid_axes(tmp_path):
    problems = problems_of(tmp_path, """
        name: x
        noise_threshold: [0.1, 0.2]
        probe: {dataset: [digits, txtures], shots: [0, 5]}
        grid: {model: [test_vit], pool: avg}
        measure: {pool: [avg]}
    """)
    text = "\n".join(problems)
    assert "noise_threshold: [0.1, 0.2] cannot be swept" in text
    assert "probe.dataset[1]: 'txtures' must be one of" in text and "did you mean 'textures'" in text
    assert "probe.shots: '0,5' has '0', which is not a positive integer or 'all'" in text
    assert "measure.pool: unknown option" in text  # sections keep their own options
    with pytest.raises(ConfigError, match="grid.dataset: also set outside the grid"):
        parse_experiment({"name": "x", "probe": {"dataset": ["digits", "textures"]},
                          "grid": {"model": ["test_vit"], "dataset": ["digits"]}})
