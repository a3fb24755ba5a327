"""The GPU check (`python -m benchmarks.gpu_check`) without a GPU: GPU checks SKIP, CPU parts run, JSON +
markdown + report written; its registry and benchmarks/README.md's table agree; the benchmarks start with
`python -m` from the repository root, without path edits.

The check runs with CUDA hidden (`CUDA_VISIBLE_DEVICES=""`), so this test is the same on a GPU
machine, and the GPU check's own pytest run does not start the GPU check again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import basics, memory, project
from benchmarks.gpu_check.core import Check, CheckTimeout, Context, run_check, time_cap
from benchmarks.gpu_check.registry import CHECKS, markdown_table
from benchmarks.gpu_check.summary import jsonable
from benchmarks.shared import ROOT, reference_step, run_module

README = ROOT / "benchmarks" / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- checks: python -m benchmarks.gpu_check --list --markdown -->", "<!-- /checks -->"
TINY_CPU_SWEEP = """\
name: tiny-cpu
device: cpu
measure: {mode: infer, batch_size: 2, warmup: 1, iters: 2}
grid: {model: [test_resnet], image_size: 32, embed_dim: 16}
"""


def _run(*args: str, module: str = "benchmarks.gpu_check", timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module *args` from the repository root, CUDA hidden, nothing added to PYTHONPATH."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_cpu_run_skips_gpu_checks_runs_cpu_parts_and_the_sweep_and_writes_json_and_markdown(tmp_path):
    """One CPU run of the whole script (but its pytest shard): the GPU checks SKIP, the rest runs."""
    exp = tmp_path / "tiny.yaml"
    exp.write_text(TINY_CPU_SWEEP)
    out = tmp_path / "out"
    done = _run("--out", str(out), "--skip", "pytest", "--experiment", str(exp))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA here: GPU checks SKIP" in done.stdout
    result = json.loads((out / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {c.name for c in CHECKS} - {"pytest"}
    for name in (c.name for c in CHECKS if c.needs_cuda):
        assert checks[name]["status"] == "SKIP" and checks[name]["figure"] == "no CUDA: GPU check not run"
        assert f"SKIP  {name}" in done.stdout
    # The CPU parts really ran.
    assert checks["env"]["figures"]["env"]["env_torch"] and checks["env"]["figures"]["packages"]["pandas"]
    assert checks["cpu_context"]["figures"]["status"] == "ok"
    assert checks["cpu_context"]["figures"]["cuda_initialized"] is False
    summary = (out / "gpu_check.md").read_text()
    assert "| roofline | **SKIP** |" in summary and "| cpu_context | **SKIP** |" in summary
    assert result["verdict"] == "PASS" and all(c["elapsed_s"] >= 0 for c in result["checks"])
    # The sweep check ran the experiment and wrote its report under --out.
    sweep = checks["sweep"]
    assert sweep["status"] == "PASS" and sweep["figures"]["statuses"] == {"ok": 1}, sweep
    assert sweep["figures"]["trials"][0]["infer_samples_per_sec"] > 0
    assert (out / "reports" / "gpu-cpu.md").read_text().startswith("# GPU check on cpu")
    assert "| sweep | **PASS** |" in summary


def test_a_failing_check_is_a_record_and_exits_1(tmp_path):
    done = _run("--out", str(tmp_path), "--only", "sweep", "--experiment", str(tmp_path / "missing.yaml"))
    assert done.returncode == 1, done.stdout + done.stderr
    check = json.loads((tmp_path / "gpu_check.json").read_text())["checks"][0]
    assert check["status"] == "FAIL" and "missing.yaml" in check["figure"] and check["error"]
    assert "FAIL  sweep" in done.stdout


def test_unknown_check_names_are_input_errors(tmp_path):
    done = _run("--out", str(tmp_path), "--only", "rooflne")
    assert done.returncode == 2 and "unknown check(s) ['rooflne']" in done.stderr
    listed = _run("--list")  # no --out needed to list
    assert listed.returncode == 0 and all(c.name in listed.stdout for c in CHECKS)
    missing = _run("--only", "roofline")
    assert missing.returncode == 2 and "--out DIR is required" in missing.stderr


def test_run_check_turns_exceptions_into_fail_and_gpu_checks_into_skip(tmp_path):
    ctx = Context(out=tmp_path, cuda=False, budget_s=60, experiment=tmp_path / "x.yaml")

    def boom(ctx):
        raise ValueError("broken on purpose")

    result, _, _ = run_check(ctx, Check("boom", "never", boom, 30, needs_cuda=False))
    assert result.status == "FAIL" and result.figure == "ValueError: broken on purpose" and "boom" in result.error
    result, elapsed, _ = run_check(ctx, Check("gpu", "never", boom, 30))
    assert result.status == "SKIP" and elapsed == 0.0
    ctx.budget_s = 0  # nothing left: a check is skipped, not started
    assert run_check(ctx, Check("late", "never", boom, 30, needs_cuda=False))[0].status == "SKIP"


def test_time_cap_interrupts_a_check():
    with pytest.raises(CheckTimeout, match="cap of 0 s"):
        with time_cap(0.2):
            time.sleep(2)


def test_junit_parsing(tmp_path):
    xml = tmp_path / "x.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
                   '<testcase classname="tests.test_b" name="test_s"><skipped message="needs CUDA"/></testcase>'
                   '</testsuite></testsuites>')
    got = project._junit(xml)
    assert (got["tests"], got["failures"], got["errors"], got["skipped"]) == (3, 1, 0, 1)
    assert got["failed"] == ["tests.test_a::test_bad: assert 1 == 2"] and got["skip_reasons"]["needs CUDA"] == 1


def test_test_queue_runs_each_file_and_kills_what_runs_past_the_wait(tmp_path):
    """The GPU check's test runner: one process per file, two at a time, the slow one killed."""
    (tmp_path / "test_steps.py").write_text("def test_ok():\n    assert True\n")
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert 1 == 2\n")
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(120)\n")
    files = sorted(tmp_path.glob("test_*.py"))
    assert project.test_order(files)[0].name == "test_steps.py"  # a known-slow name starts first
    out = tmp_path / "out"
    out.mkdir()
    queue = project.TestQueue(out, files, slots=2, cuda=True).start()
    # Wait (generously: a loaded machine must not fail this) until all but the hanging file are done,
    # then a wait with no time left kills what still runs, as a real wait does at its cap.
    finished = {"gpu", "cpu-test_steps", "cpu-test_bad"}
    deadline = time.monotonic() + 120
    while not finished <= set(queue.done.copy()) and time.monotonic() < deadline:
        time.sleep(0.1)
    results = queue.wait(timeout_s=0)
    assert set(results) == {"gpu", "cpu-test_steps", "cpu-test_bad", "cpu-test_hang"}
    assert results["gpu"]["rc"] == 5  # nothing marked gpu: collected nothing
    assert results["cpu-test_steps"]["rc"] == 0 and results["cpu-test_steps"]["tests"] == 1
    assert results["cpu-test_bad"]["failures"] == 1 and results["cpu-test_bad"]["failed"][0].endswith("assert 1 == 2")
    assert str(results["cpu-test_hang"]["rc"]).startswith(("killed", "not started"))
    assert not queue.running


def test_helpers():
    assert basics.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and basics.card_slug("NVIDIA H200") == "h200"
    assert basics._spec_bf16("NVIDIA H100 PCIe") == 756 and basics._spec_bf16("NVIDIA H100 80GB HBM3") == 989
    # The OOM check's start batches must not fit in the memory it leaves (by the rough per-image needs).
    # Per-image needs measured on an H200: resnet50 train ~43 MiB, vit_base infer ~5.3 MiB.
    for total in (80 * 1024, 141 * 1024):
        starts = memory.oom_start_batches(total, 0.2)
        assert starts["resnet50"] * 43 > 1.25 * 0.2 * total and starts["vit_base_patch16_224"] * 5.3 > 1.25 * 0.2 * total
        assert starts["resnet50"] * 43 < 4 * 0.2 * total  # at most two back-offs, each a costly try
    np = pytest.importorskip("numpy")
    assert jsonable({"a": np.float64("nan"), "b": np.int64(3), "c": {1, 2}, "d": (Path("x"),)}) == \
        {"a": None, "b": 3, "c": [1, 2], "d": ["x"]}


def test_the_readme_table_is_the_registry():
    """benchmarks/README.md's check table is `--list --markdown`, pasted between its markers."""
    text = README.read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, f"{README} lacks the markers {TABLE_BEGIN} ... {TABLE_END}"
    table = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    names = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    assert names == [c.name for c in CHECKS], "the README's checks differ from the registry's"
    assert table == markdown_table(), (f"{README}'s check table differs from the registry: paste the output of "
                                       "`python -m benchmarks.gpu_check --list --markdown` between its markers")
    listed = _run("--list", "--markdown")
    assert listed.returncode == 0 and listed.stdout.strip() == markdown_table(), listed.stderr


BENCH_SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_each_bench_script_starts_with_python_m(name):
    done = _run("--help", module=f"benchmarks.{name}", timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_no_path_edits_in_benchmarks():
    edited = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").rglob("*.py") if "sys.path" in p.read_text()]
    assert not edited, f"benchmarks are run with `python -m` from the repository root, without path edits: {edited}"


def test_reference_step_computes_the_suites_step():
    """The hand-written step gives the suite's inference output, and a training step changes the weights."""
    import torch

    from suite.core.options import Trial
    from suite.measurement.steps import infer_step_fn, make_inputs
    from suite.tower.model import build_tower

    trial = Trial(model="test_vit", embed_dim=16, image_size=32, batch_size=2, device="cpu")
    torch.manual_seed(0)
    tower = build_tower(trial)
    x = make_inputs(trial, "cpu", 2)
    assert torch.equal(reference_step(tower, "infer")(x), infer_step_fn(tower, trial, "cpu")(x))
    before = [p.detach().clone() for p in tower.parameters() if p.requires_grad]
    reference_step(tower, "train")(x)
    after = [p for p in tower.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_run_module_raises_with_the_childs_stderr():
    """(Its JSON result is what the CPU run's cpu_context check reads.)"""
    with pytest.raises(RuntimeError, match=r"(?s)exited 2: .*unknown check"):
        run_module("benchmarks.gpu_check", ["--only", "nope", "--list"], timeout_s=60)
