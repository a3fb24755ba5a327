"""A results database written by the code before the subpackage move (commit 65058de, `suite run` of a
4-trial tiny experiment) still opens, reports and compares with today's code: the store format did not
change with the layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import suite
from suite.report.render import write_report

OLD = Path(__file__).parent / "data" / "results-65058de.sqlite"


def test_old_database_loads_with_its_rows_and_types():
    df = suite.load_results(OLD)
    assert sorted(df["status"]) == ["ok", "ok", "ok", "skipped"]
    assert set(df["model"]) == {"test_resnet", "test_vit"}
    ok = df[df["status"] == "ok"]
    assert (ok["infer_samples_per_sec"] > 0).all() and (ok["probe_top1"].between(0, 100)).all()


def test_old_database_reports_and_compares(tmp_path):
    db = tmp_path / "results.sqlite"
    shutil.copy(OLD, db)
    report = write_report(db, tmp_path / "report.md")
    text = report.read_text()
    assert "test_resnet" in text and "test_vit" in text
    same = suite.compare_paths(db, db)
    assert not same.regressions and same.n_compared == 3 and same.exit_code == 0
