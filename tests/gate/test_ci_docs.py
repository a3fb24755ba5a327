"""docs/ci.md: the workflows parse, and every `suite` command in them runs, on CPU, with stand-ins.

The sweeps (`suite run`) are not run (they take minutes): their flags are parsed by the real parser
and the experiment file is validated; the stores they would write are built from records
(`factories`) at the paths the workflow uses, with one real regression, then the workflow's compare
and history commands run as written. The gate judges the stored figures (its re-measurement is
replaced by `compare_paths`: no timing decides anything here).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from factories import make_record, run_cli, write_store

import suite.gate.confirm
from suite.cli.main import build_parser
from suite.gate.compare import compare_paths

ROOT = Path(__file__).parents[2]
DOC = (ROOT / "docs" / "ci.md").read_text()
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)
BASE_SHA, HEAD_SHA = "b" * 40, "c" * 40


def suite_commands(block: str) -> list[list[str]]:
    """Every `suite ...` command of a workflow block, as argv after `suite`, shell redirections dropped."""
    out = []
    for line in block.splitlines():
        m = re.search(r"(?:\S*/)?bin/suite (.*?)(?:\)|\s+>>.*)?$", line)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], a) for a in argv]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A CI workspace after the two sweeps: runs/baseline (base commit) and runs/current (one regression)."""
    models = ("test_vit", "test_resnet")
    write_store(tmp_path / "runs" / "baseline" / "results.sqlite",
                [make_record(m, env_git_commit=BASE_SHA, finished_at=1.7e9) for m in models])
    write_store(tmp_path / "runs" / "current" / "results.sqlite",
                [make_record("test_vit", env_git_commit=HEAD_SHA, finished_at=1.7e9 + 600, train_samples_per_sec=70.0),
                 make_record("test_resnet", env_git_commit=HEAD_SHA, finished_at=1.7e9 + 600)])
    (tmp_path / "experiments").mkdir()  # the checkout's experiment file, a tiny CPU stand-in for the GPU one
    (tmp_path / "experiments" / "smoke.yaml").write_text((ROOT / "experiments" / "smoke.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite.gate.confirm, "confirm_paths",
                        lambda baseline, current, thresholds, **kw: compare_paths(baseline, current, thresholds))
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    env = {"EXP": "experiments/smoke.yaml", "GITHUB_WORKSPACE": str(tmp_path),
           "CI_PROJECT_DIR": str(tmp_path), "BASE_SHA": BASE_SHA, "CI_MERGE_REQUEST_DIFF_BASE_SHA": BASE_SHA,
           "GITHUB_STEP_SUMMARY": str(summary)}
    return tmp_path, env


def run_doc_command(argv: list[str], env: dict) -> object:
    argv = expand(argv, env)
    if argv[0] == "run":  # the sweep: its flags parse, its experiment file is valid; stand-in stores exist
        args = build_parser().parse_args(argv)
        assert args.quiet and args.out
        return run_cli("validate", args.experiment)
    return run_cli(*argv)


def test_the_workflows_are_yaml_with_what_the_page_promises():
    assert len(BLOCKS) == 2
    github, gitlab = (yaml.safe_load(b) for b in BLOCKS)
    steps = github["jobs"]["perf"]["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0 and "pull_request.base.sha" in github["jobs"]["perf"]["env"]["BASE_SHA"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    assert any("junit" in u for u in uses)
    assert all(s.get("if") == "always()" for s in steps[steps.index(next(s for s in steps if s.get("name") == "Gate")) + 1:])
    assert gitlab["perf"]["artifacts"]["reports"]["junit"] == "runs/junit.xml"
    assert "CI_MERGE_REQUEST_DIFF_BASE_SHA" in " ".join(gitlab["perf"]["script"])


@pytest.mark.parametrize("which", ["github", "gitlab"])
def test_every_suite_command_of_the_workflow_runs(workspace, which):
    tmp_path, env = workspace
    commands = suite_commands(BLOCKS[0 if which == "github" else 1])
    assert [c[0] for c in commands] == ["run", "run", "compare", "history"]
    for argv in commands:
        done = run_doc_command(argv, env)
        expected = 1 if argv[0] == "compare" else 0  # the planted regression fails the gate
        assert done.returncode == expected, (argv, done.stdout, done.stderr)
    junit = (tmp_path / "runs" / "junit.xml").read_text()
    assert junit.count("<failure") == 1 and "train_samples_per_sec" in junit
    assert (tmp_path / "runs" / "history" / "history.md").read_text().startswith("## History of `train_samples_per_sec`")
    if which == "github":
        gate = next(run_cli(*expand(c, env)) for c in commands if c[0] == "compare")
        assert sum(line.startswith("::error") for line in gate.stdout.splitlines()) == 1
        assert (tmp_path / "summary.md").read_text().startswith("## Regression gate: FAIL")
    else:
        assert (tmp_path / "runs" / "gate.md").read_text().startswith("## Regression gate: FAIL")


def test_the_longer_history_command_runs(workspace):
    tmp_path, env = workspace
    line = re.search(r"`(suite history stores/\S+ -o history)`", DOC).group(1)
    for side in ("baseline", "current"):  # `gh run download` puts each artifact in its own folder
        dest = tmp_path / "stores" / f"perf-1-{side}" / "current"
        dest.mkdir(parents=True)
        (dest / "results.sqlite").write_bytes((tmp_path / "runs" / side / "results.sqlite").read_bytes())
    import glob

    argv = [p for a in shlex.split(line)[1:] for p in (sorted(glob.glob(a)) if "*" in a else [a])]
    done = run_cli(*argv)
    assert done.returncode == 0, done.stderr
    assert f"`{BASE_SHA[:12]}`" in done.stdout and "-30.0%" in done.stdout
