"""Issue 27: what a user types is checked before any work, and no figure that cannot be right is shown.

Outputs never destroy an input, input files fail with clear errors, counts are bounded, and an MFU
above 100% (fp16 on a CPU without fast fp16) is left empty with its reason. No tower is built and
nothing is timed: the measuring entry points are replaced by ones that fail the test if they run.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import timm  # noqa: F401 - imported while collecting, not inside a test that checks model names
from factories import make_record, write_store

import suite.experiment.checks as checks
import suite.experiment.spec as config
import suite.measurement.engine as measure
import suite.sweep.trial
from suite.cli.main import main
from suite.cli.show import record_rows
from suite.core.errors import SuiteError
from suite.experiment.spec import ConfigError, load_experiment, parse_experiment
from suite.measurement.roofline import utilisation
from suite.probe.engine import few_shot, shots_used
from suite.report.export import export
from suite.report.probe import probe_section, shot_cell


def _yaml(tmp_path, text: str | bytes, name: str = "exp.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- 5. an output never overwrites an input or a results store ---------------------------------------


def test_export_never_overwrites_the_results_database(tmp_path, capsys):
    db = write_store(tmp_path / "run" / "results.sqlite", [make_record()])
    before = db.read_bytes()
    assert main(["export", str(db.parent), "--format", "csv", "-o", str(db)]) == 2
    assert "is an input of this command" in capsys.readouterr().err and db.read_bytes() == before
    other = write_store(tmp_path / "other" / "results.sqlite", [make_record()])
    with pytest.raises(SuiteError, match="is a database"):
        export(db, "timm-csv", other)  # another store is never an output either


def test_report_and_compare_never_write_over_a_store(tmp_path, capsys):
    db = write_store(tmp_path / "run" / "results.sqlite", [make_record()])
    assert main(["report", str(db), "-o", str(db)]) == 2
    assert main(["compare", str(db), str(db), "--no-confirm", "-o", str(db)]) == 2
    assert capsys.readouterr().err.count("is an input of this command") == 2
    assert main(["export", str(db), "--format", "csv", "-o", str(tmp_path / "run" / "results.sqlite" / "x")]) == 2


def test_an_unwritable_output_folder_is_refused_first(tmp_path):
    from suite.core.paths import check_output

    (tmp_path / "file").write_text("")
    with pytest.raises(SuiteError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "out.md")
    assert check_output(tmp_path / "new" / "out.md") == tmp_path / "new" / "out.md"  # created later, not here
    assert not (tmp_path / "new").exists()


# --- 6, 8. experiment files ------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_file_and_byte(tmp_path, capsys):
    path = _yaml(tmp_path, "name: x\n# caf\xe9 au lait\ngrid: {model: test_vit}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path, check_names=False)
    assert str(path) in str(info.value) and "not UTF-8: byte 0xe9 at byte position 13 (line 2, column 6)" in str(info.value)
    assert main(["validate", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_yaml_merge_keys_are_supported(tmp_path):
    exp = load_experiment(_yaml(tmp_path, "name: merged\n"
                                          "measure: &m {batch_size: 4, iters: 2}\n"
                                          "probe: {dataset: none}\n"
                                          "include:\n"
                                          "  - {<<: *m, model: test_vit}\n"
                                          "  - {<<: *m, model: test_resnet, iters: 3}\n"), check_names=False)
    got = {(t.model, t.batch_size, t.iters) for t in exp.trials}
    assert got == {("test_vit", 4, 2), ("test_resnet", 4, 3)}  # merged, and a key beside the merge overrides it


def test_a_key_given_twice_is_still_refused_beside_a_merge(tmp_path):
    with pytest.raises(ConfigError, match="given twice"):
        load_experiment(_yaml(tmp_path, "name: x\nmeasure: &m {iters: 2}\n"
                                        "grid: {<<: *m, model: test_vit, model: test_resnet}\n"), check_names=False)


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", ".hidden", "x\\y"])
def test_a_name_that_leaves_runs_is_refused(name):
    with pytest.raises(ConfigError) as info:
        parse_experiment({"name": name, "grid": {"model": "test_vit"}})
    assert "must be a plain folder name" in str(info.value)
    assert parse_experiment({"name": "smoke-v1.2_x", "grid": {"model": "test_vit"}}).name == "smoke-v1.2_x"


def test_validate_yes_counts_a_huge_grid_before_expanding_it(tmp_path, monkeypatch, capsys):
    """3,000,000 trials: refused from the product of the list lengths, even with --yes, nothing expanded."""
    monkeypatch.setattr(config, "_expand_trials", lambda *a, **k: pytest.fail("the grid was expanded"))
    seeds = ", ".join(str(i) for i in range(3000))
    path = _yaml(tmp_path, f"name: huge\ngrid:\n  model: [test_vit]\n  seed: [{seeds}]\n"
                           f"  embed_dim: [{', '.join(str(i) for i in range(1, 1001))}]\n")
    assert main(["validate", str(path), "--yes"]) == 2
    err = capsys.readouterr().err
    assert "3,000,000 trials" in err and "even --yes allows no more than 100,000" in err


# --- 8. compile backend before any tower -----------------------------------------------------------------


def test_an_unknown_compile_backend_is_refused_before_building(monkeypatch, capsys):
    monkeypatch.setattr(checks, "compile_backends", lambda: ["aot_eager", "cudagraphs", "eager", "inductor"])
    monkeypatch.setattr(suite.sweep.trial, "run_trial", lambda *a, **k: pytest.fail("a tower was built"))
    argv = ["bench", "--model", "test_resnet", "--device", "cpu", "--compile", "--compile-backend"]
    assert main([*argv, "inductr"]) == 2
    err = capsys.readouterr().err
    assert "'inductr' is not a torch.compile backend; did you mean 'inductor'" in err
    assert main([*argv, "bogus"]) == 2 and "known: aot_eager, cudagraphs" in capsys.readouterr().err


def test_the_backend_list_comes_from_torch():
    assert "inductor" in checks.compile_backends()


# --- 8. export of a store without results ----------------------------------------------------------------


def test_export_of_a_store_without_an_ok_trial_fails(tmp_path, capsys):
    db = write_store(tmp_path / "results.sqlite", [make_record(status="error", reason="boom")])
    out = tmp_path / "timm.csv"
    assert main(["export", str(db), "--format", "timm-csv", "-o", str(out)]) == 2
    assert "no trial that ran ok" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(db), "--format", "csv", "-o", str(out)]) == 0  # csv keeps every row, failed ones too
    empty = write_store(tmp_path / "empty" / "results.sqlite", [])
    assert main(["export", str(empty), "--format", "csv"]) == 2 and "holds no trial" in capsys.readouterr().err


# --- 7. MFU that cannot be right is not shown ------------------------------------------------------------


def test_fp16_on_a_cpu_without_fast_fp16_shows_no_mfu():
    """The issue's case: 0.003 TFLOP/s measured fp16 peak, 172% 'MFU'."""
    mfu, why = utilisation("infer", 0.00516, 0.003, "cpu", "fp16", fast_fp16=False)
    assert mfu is None and "fp16 on a CPU without fast fp16" in why
    mfu, why = utilisation("infer", 0.00516, 0.003, "cpu", "fp16", fast_fp16=True)
    assert mfu is None and "172% of the measured fp16 matmul peak" in why and "cannot be" in why
    assert utilisation("train", 0.5, 1.0, "cuda", "bf16") == (0.5, None)
    assert utilisation("train", 0.5, 0.0, "cuda", "bf16")[0] is None


def test_the_measured_record_carries_the_reason(monkeypatch):
    monkeypatch.setattr(measure, "capacity_fields", lambda phase, memory: {})
    timing = types.SimpleNamespace(median_ms=10.0, iqr_ms=0.1, steady=True, warmup_steps=3, warmup_steady=True,
                                   rounds=2, steps=20)
    peak = types.SimpleNamespace(peak_mib=1.0, reserved_mib=None, rss_growth_mib=None)
    phase = types.SimpleNamespace(batch_size=4, timing=timing, memory=types.SimpleNamespace(peak=peak))
    trial = types.SimpleNamespace(precision="fp16", image_size=32, noise_threshold=0.05)
    monkeypatch.setattr("suite.measurement.roofline.fast_cpu_fp16", lambda: False)
    fields = measure._phase_fields("infer", phase, 2_000_000, 0.003, trial, "cpu")
    assert fields["infer_mfu"] is None and "fp16 on a CPU" in fields["infer_mfu_note"]
    assert fields["infer_tflops"] == pytest.approx(0.0008)


def test_bench_warns_and_shows_no_mfu(monkeypatch, capsys):
    record = make_record("test_resnet", infer_tflops=0.005, infer_mfu=None,
                         mfu_note="infer MFU not shown: fp16 on a CPU without fast fp16")
    assert ("infer TFLOP/s (MFU)", "0.005 (MFU not shown)") in record_rows(record, "measure")
    monkeypatch.setattr(suite.sweep.trial, "run_trial", lambda trial: record)
    assert main(["bench", "--model", "test_resnet", "--device", "cpu", "--precision", "fp16", "--json"]) == 0
    assert "warning: infer MFU not shown: fp16 on a CPU without fast fp16" in capsys.readouterr().err


# --- 8. few-shot k above the images a class has --------------------------------------------------------


def test_shots_above_the_images_per_class_are_reported_capped():
    y = np.array([0] * 6 + [1] * 4)
    assert shots_used(y, 100000) == {"per_class": [4, 6], "capped": True}
    assert shots_used(y, 3) == {"per_class": [3, 3], "capped": False}
    assert shots_used(y, None) == {"per_class": [4, 6], "capped": False}
    assert shot_cell({"mean": 80.0, "std": 1.0, "per_class": [6, 6], "capped": True}) == "80.0 ± 1.0 (capped: 6/class)"


def test_few_shot_records_what_it_used():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 6)
    x = rng.normal(size=(12, 4)) + y[:, None] * 3
    arrays = {"x_train": x, "y_train": y, "x_val": x, "y_val": y, "x_test": x, "y_test": y}
    out = few_shot(arrays, [100000, 2], seeds=1, device="cpu")
    assert out["100000"]["capped"] and out["100000"]["per_class"] == [6, 6]
    assert not out["2"]["capped"] and out["2"]["per_class"] == [2, 2]
    row = make_record(probe_shots=out, probe_top1=90.0, probe_features="pooled")
    text = "\n".join(probe_section([row.flat()], []))
    assert "(capped: 6/class)" in text and "k=100000" in text
