"""The CLI is derived from the schema: every option has its flag, parsed to the option's type."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from factories import run_cli

from suite.cli.flags import trial_from_args
from suite.cli.main import build_parser
from suite.core.options import OPTIONS, options_in


def sub_parser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize("command, groups", [("bench", ("tower", "measure")), ("profile", ("tower", "measure")),
                                             ("probe", ("tower", "probe"))])
def test_every_option_of_the_groups_has_a_flag(command, groups):
    dests = {a.dest for a in sub_parser(command)._actions}
    assert {o.name for o in options_in(*groups)} <= dests


def test_flags_parse_to_the_schema_types():
    args = build_parser().parse_args([
        "bench", "--model", "test_vit", "--lock", "0", "--grad-checkpointing", "--pool", "token",
        "--precision", "bf16", "--batch-size", "4", "--drop-path", "0.1", "--pretrained", "/tmp/w.safetensors",
    ])
    trial = trial_from_args(args)
    assert trial.unlocked_groups == 0 and trial.grad_checkpointing is True and trial.batch_size == 4
    assert trial.pool == "token" and trial.precision == "bf16" and trial.drop_path == 0.1
    assert trial.pretrained == "/tmp/w.safetensors"
    # defaults come from the schema
    defaults = trial_from_args(build_parser().parse_args(["bench", "--model", "test_vit"]))
    for option in options_in("tower", "measure"):
        if option.name != "model":
            assert getattr(defaults, option.name) == option.default, option.name
    none = trial_from_args(build_parser().parse_args(["bench", "--model", "m", "--lock", "none", "--pretrained", "true"]))
    assert none.unlocked_groups is None and none.pretrained is True


def test_bad_flag_values_exit_2():
    for argv in (["bench", "--model", "m", "--pool", "avgg"], ["bench", "--model", "m", "--batch-size", "x"]):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 2


def test_import_suite_and_cli_help_do_not_import_torch():
    code = ("import sys, suite, suite.cli.main, suite.experiment.spec, suite.core.options, suite.core.records, suite.cli.show, suite.experiment.estimate;"
            "suite.cli.main.build_parser().format_help(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_model_is_bad_input():
    proc = run_cli("bench", "--model", "resnet5O")
    assert proc.returncode == 2
    assert "'resnet5O' is not a timm model; did you mean 'resnet50'" in proc.stderr


def test_every_command_help_renders():
    """argparse %-formats help text: an option help with a bare % ("within 5%") crashed `suite bench --help`."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"run", "bench", "probe", "compare", "profile"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "--" in text, name
    assert "two agree within 5%)" in commands["bench"].format_help()


def test_all_options_documented():
    for option in OPTIONS:
        assert option.help and option.group in ("tower", "measure", "probe")


def test_bench_and_probe_print_records_as_json():
    import json

    tiny = ["--model", "test_vit", "--image-size", "64", "--embed-dim", "16", "--device", "cpu"]
    bench = run_cli("bench", *tiny, "--batch-size", "4", "--warmup", "1", "--iters", "2", "--lock", "0", "--json")
    assert bench.returncode == 0, bench.stderr
    row = json.loads(bench.stdout)
    assert row["status"] == "ok" and row["unlocked_groups"] == 0 and row["infer_batch_size"] == 4
    assert row["trainable_param_count"] < row["param_count"]  # the flag reached the tower
    probe = run_cli("probe", *tiny, "--max-per-class", "15", "--json")
    assert probe.returncode == 0, probe.stderr
    row = json.loads(probe.stdout)
    assert row["status"] == "ok" and row["dataset"] == "digits" and row["probe_n_classes"] == 10
    skipped = run_cli("bench", *tiny, "--pool", "abs_attn", "--json")
    assert skipped.returncode == 1 and json.loads(skipped.stdout)["status"] == "skipped"


def test_report_compare_export_over_a_store(tmp_path):
    from factories import make_record, write_store

    base = write_store(tmp_path / "base" / "results.sqlite", [make_record(), make_record("test_resnet")])
    slow = write_store(tmp_path / "slow" / "results.sqlite",
                       [make_record(train_samples_per_sec=70.0), make_record("test_resnet")])
    assert run_cli("compare", str(base.parent), str(base.parent)).returncode == 0
    worse = run_cli("compare", str(base.parent), str(slow.parent))
    assert worse.returncode == 1 and "train_samples_per_sec" in worse.stdout
    lenient = run_cli("compare", str(base.parent), str(slow.parent), "--threshold", "train_samples_per_sec=-50%")
    assert lenient.returncode == 0, lenient.stdout
    report = run_cli("report", str(base.parent))
    assert report.returncode == 0 and (base.parent / "report.md").exists()
    out = tmp_path / "timm.csv"
    assert run_cli("export", str(base), "--format", "timm-csv", "-o", str(out)).returncode == 0
    assert out.read_text().startswith("model,")
    missing = run_cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_docs_option_table_matches_the_schema():
    from pathlib import Path

    table = (Path(__file__).parents[2] / "docs" / "options.md").read_text()
    for option in OPTIONS:
        row = next((line for line in table.splitlines() if line.startswith(f"| `{option.name}` |")), None)
        assert row is not None, f"docs/options.md's option table lacks {option.name}"
        assert f"| {option.group} |" in row, f"docs/options.md gives {option.name} another group than {option.group}"
        assert option.help.replace("|", "\\|") in row, f"docs/options.md's help for {option.name} is stale"
