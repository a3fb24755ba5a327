"""Bad input and faults across commands (issue 14): each is refused before any work, with exit 2 and a
message naming what to fix, and no run is mixed into another's results."""
from __future__ import annotations

import os
import textwrap

import pytest
from factories import make_record, write_store

from suite.cli.main import main
from suite.core.errors import SuiteError
from suite.experiment.spec import parse_experiment
from suite.results.store import StoreLock, load_meta
from suite.sweep.driver import OtherExperiment, resume_command, run_experiment


def experiment(tmp_path, name: str, extra: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        device: cpu
        measure: {{mode: infer, warmup: 1, iters: 5}}
        grid: {{model: [test_resnet]}}
    """) + extra)
    return str(path)


def stored(tmp_path, name: str, **fields):
    """A results folder holding one trial of experiment `name` (as if `suite run` had written it)."""
    out = tmp_path / "runs" / name
    rec = make_record("test_resnet", device="cpu", mode="infer", warmup=1, iters=5, **fields)
    write_store(out / "results.sqlite", [rec], {"experiment": {"name": name, "source": f"{name}.yaml"}})
    return out


def test_another_experiments_store_is_refused_even_with_resume(tmp_path):
    out = stored(tmp_path, "A")
    with pytest.raises(OtherExperiment, match="holds the results of experiment 'A'.*not 'B'.*--out runs/B"):
        run_experiment(experiment(tmp_path, "B"), out=out, resume=True, quiet=True)
    assert load_meta(out)["experiment"]["name"] == "A"  # A's description is not overwritten


def test_resuming_after_a_measurement_setting_changed_says_what_changed(tmp_path):
    out = stored(tmp_path, "A")
    path = tmp_path / "A2.yaml"
    path.write_text(open(experiment(tmp_path, "A")).read().replace("iters: 5", "iters: 10"))
    with pytest.raises(OtherExperiment, match="1 trial.*no longer has; what changed: iters: 5 -> 10"):
        run_experiment(str(path), out=out, resume=True, quiet=True)


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "runs" / "A"
    with StoreLock(out / "results.sqlite"):
        assert main(["run", experiment(tmp_path, "A"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"PID {os.getpid()}" in err and "being written by another `suite run`" in err
    assert not (out / "report.md").exists()


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--timeout", "0"), ("--timeout", "inf"),
                                         ("--timeout", "nan"), ("--workers", "-1")])
def test_zero_and_non_finite_run_flags_exit_2(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["run", experiment(tmp_path, "A"), flag, value])
    err = capsys.readouterr().err  # in words: "'-1' is not a whole number of workers of at least 1"
    assert info.value.code == 2 and f"argument {flag}: {value!r} is not a" in err and "_positive" not in err


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"timeout_s": 0}, {"timeout_s": float("inf")}])
def test_the_library_rejects_the_same_values(tmp_path, kwargs):
    with pytest.raises(SuiteError, match="must be a positive"):
        run_experiment(experiment(tmp_path, "A"), out=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_bench_flags_are_range_checked_like_the_files(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--model", "test_vit", "--warmup", "-2"])
    assert info.value.code == 2 and "'-2' must not be negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "test_vit", "--iters", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_a_huge_grid_needs_yes(tmp_path, capsys):
    path = experiment(tmp_path, "A")
    text = open(path).read().replace("grid: {model: [test_resnet]}",
                                     "grid: {model: [test_resnet], seed: [" + ", ".join(map(str, range(20001))) + "]}")
    open(path, "w").write(text)
    assert main(["validate", path]) == 2
    assert "20,001 trials" in capsys.readouterr().err


def test_report_and_export_outputs(tmp_path, capsys):
    out = stored(tmp_path, "A")
    folder = tmp_path / "reports"
    folder.mkdir()
    assert main(["report", str(out), "-o", str(folder)]) == 0  # a folder: report.md inside it
    assert (folder / "report.md").read_text().startswith("#")
    (tmp_path / "x").write_text("a file")
    assert main(["export", str(out), "--format", "csv", "-o", str(tmp_path / "x" / "y.csv")]) == 2
    assert "x is a file, not a folder" in capsys.readouterr().err
    if os.path.exists("/dev/full"):
        assert main(["report", str(out), "-o", "/dev/full"]) == 2
        err = capsys.readouterr().err
        assert "cannot write /dev/full: No space left on device" in err and ".png" not in err
        assert main(["export", str(out), "--format", "csv", "-o", "/dev/full"]) == 2
        assert "cannot write /dev/full" in capsys.readouterr().err


def test_profile_logdir_at_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["profile", "--model", "test_vit", "--logdir", str(tmp_path / "f")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_a_corrupt_store_is_exit_2(tmp_path, capsys):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\x13" * 4000)
    assert main(["report", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_the_resume_hint_names_the_output_folder(tmp_path):
    exp = parse_experiment({"name": "A", "grid": {"model": ["test_vit"]}}, source="exp.yaml")
    assert resume_command(exp, tmp_path / "elsewhere") == f"suite run exp.yaml --out {tmp_path / 'elsewhere'} --resume"


def test_an_interrupted_validate_does_not_talk_about_stored_results(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    import suite.cli.main

    parser = suite.cli.main.build_parser
    monkeypatch.setattr(suite.cli.main, "build_parser", lambda: _with_func(parser(), "validate", interrupted))
    assert main(["validate", experiment(tmp_path, "A")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "stored" not in err and "resume" not in err


def _with_func(parser, command, func):
    action = next(a for a in parser._actions if a.dest == "command")
    action.choices[command].set_defaults(func=func)
    return parser


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_cuda_without_cuda_is_bad_input(capsys):
    assert main(["bench", "--model", "test_vit", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "None" not in err
