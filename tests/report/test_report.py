"""The markdown report: expected text for a small fixed table, purity, ablations, Pareto, plots."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from factories import GPU, make_record, write_store

from suite.report.render import render, write_report
from suite.results.store import load_results

SELECT = {"objective": "max probe_top1", "constraints": ["train_peak_mem_mib <= 900"], "top": 3}


def fixed_records():
    """test_vit: pool avg/token x checkpointing off/on; test_resnet: pool avg/'' (+ ckpt unsupported)."""
    return [
        make_record("test_vit", pool="token", train_samples_per_sec=100.0, train_peak_mem_mib=1000.0, probe_top1=60.0),
        make_record("test_vit", pool="token", grad_checkpointing=True, train_samples_per_sec=77.0,
                    train_peak_mem_mib=580.0, probe_top1=60.0),
        make_record("test_vit", train_samples_per_sec=110.0, train_peak_mem_mib=1000.0, probe_top1=55.0),
        make_record("test_vit", grad_checkpointing=True, train_samples_per_sec=85.0, train_peak_mem_mib=600.0,
                    probe_top1=55.0),
        make_record("test_resnet", train_samples_per_sec=300.0, train_peak_mem_mib=800.0, probe_top1=40.0),
        make_record("test_resnet", "skipped", "test_resnet has no gradient checkpointing", grad_checkpointing=True),
        make_record("test_resnet", pool="", train_samples_per_sec=310.0, train_step_time_iqr=40.0,
                    train_peak_mem_mib=790.0, probe_top1=41.0),
        make_record("test_convnext", "oom", "CUDA out of memory | tried 2 GiB"),
    ]


def frame(records) -> pd.DataFrame:
    return pd.DataFrame([r.flat() for r in records])


@pytest.fixture
def text():
    return render(frame(fixed_records()), {"experiment": {"name": "smoke", "select": SELECT}})


def test_header_environment_and_weights(text):
    assert text.startswith("# smoke: timm tower sweep\n")
    assert "Date: 2023-11-14 22:13 UTC. **8 trials:** 6 ok, 1 skipped, 1 oom." in text
    assert "- **Device:** cpu" in text and "torch 2.14.1, timm 1.0.31" in text and "AMD EPYC, 2 threads" in text
    assert "**Weights:** random init (8 trials)" in text
    assert "8 of 8 trials use randomly initialized weights" in text and "says nothing about how the pretrained" in text


def test_recommendation_runner_ups_and_exclusions(text):
    section = text.split("## Recommendation")[1].split("## Pareto")[0]
    assert "Objective: **max probe_top1** subject to `train_peak_mem_mib <= 900`." in section
    assert "**Recommended: `test_vit pool=token ckpt`**" in section
    assert "| 1 | `test_vit pool=token ckpt` | 60.0 | 580 |" in section
    assert "| 2 | `test_vit ckpt` | 55.0 | 600 |" in section
    assert "| 3 | `test_resnet pool=''` | 41.0 | 790 |" in section
    assert "1 more trial meets the constraints but ranks lower." in section
    assert "| `test_vit` | train_peak_mem_mib = 1,000 fails train_peak_mem_mib <= 900 |" in section
    assert "| `test_vit pool=token` | train_peak_mem_mib = 1,000 fails" in section
    assert "2 trials did not run ok and were not considered" in section


def test_constraints_that_exclude_everything_are_said_plainly():
    meta = {"name": "x", "select": {"objective": "max probe_top1", "constraints": ["train_samples_per_sec >= 1e6"]}}
    out = render(frame(fixed_records()), meta)
    assert "**No trial meets the constraints:** all 6 trials that ran ok were excluded (2 did not run ok)" in out
    assert "Recommended" not in out


def test_no_or_invalid_select_block():
    assert "No `select` block in the experiment, so no recommendation" in render(frame(fixed_records()), {})
    bad = render(frame(fixed_records()), {"select": {"objective": "max speed"}})
    assert "`select` block is invalid, so no recommendation: select.objective: unknown metric 'speed'" in bad


def test_ablation_table(text):
    section = text.split("## Ablations")[1].split("## Failed")[0]
    expected = [
        "| axis | change | n | train img/s | infer img/s | train mem | infer mem | probe top-1 |",
        # n = 2: the resnet checkpointing pair is out, its checkpointing trial was skipped.
        "| grad_checkpointing | off → on | 2 | 0.77x | 1.00x | 0.59x | 1.00x | +0.0 pt |",
        "| pool | avg → '' | 1 | 1.03x | 1.00x | 0.99x | 1.00x | +1.0 pt |",
        "| pool | avg → token | 2 | 0.91x | 1.00x | 0.98x | 1.00x | +5.0 pt |",
    ]
    assert [line for line in expected if line not in section] == []


def test_pareto_section_text(text):
    section = text.split("## Pareto fronts")[1].split("## Ablations")[0]
    assert "**Probe top-1 vs throughput** (higher probe top-1 (%) and higher train img/s are better): " \
           "3 of 6 ok trials are on the front." in section
    assert "| `test_resnet pool=''` | 310 | 41.0 | 790 |" in section


def test_failures_and_full_table(text):
    failed = text.split("## Failed and skipped trials")[1].split("## All trials")[0]
    assert "| skipped | test_resnet has no gradient checkpointing | 1 | `test_resnet ckpt` |" in failed
    assert "| oom | CUDA out of memory \\| tried 2 GiB | 1 | `test_convnext` |" in failed  # pipe escaped
    full = text.split("## All trials")[1]
    assert ("| # | model | pool | ckpt | status | train img/s | infer img/s | train mem (MiB) | infer mem (MiB) |"
            in full)
    # Spread visible (±IQR/median), noisy timing flagged, pool '' readable.
    assert "| test_resnet | '' | off | ok | 310 ±39% ⚠ | 300 ±2.0% | 790 | 300 | 1.5 | 10.0 / 20.0 | 41.0 |" in full
    assert "| test_vit | token | on | ok | 77.0 ±2.0% | 300 ±2.0% | 580 |" in full
    assert "| test_convnext | avg | off | oom | — | — | — |" in full
    # Summary first, full table last.
    assert text.index("## Recommendation") < text.index("## Ablations") < text.index("## All trials")


def test_render_is_pure_and_order_free(tmp_path):
    recs = fixed_records()
    meta = {"experiment": {"name": "smoke", "select": SELECT}}
    first = render(frame(recs), meta)
    assert render(frame(recs), meta) == first
    assert render(frame(recs[::-1]), meta) == first
    assert render(frame(recs).sample(frac=1.0, random_state=3), meta) == first
    # The same results read back from the store (other dtypes) give the same text.
    assert render(load_results(write_store(tmp_path / "results.sqlite", recs)), meta) == first


def test_several_environments_are_kept_apart():
    recs = fixed_records() + [make_record("test_vit", env=GPU, train_samples_per_sec=5000.0)]
    out = render(frame(recs), {"name": "x"})
    assert "Results come from 2 environments" in out
    assert "## Recommendation (NVIDIA H100 80GB HBM3)" in out and "## Recommendation (cpu)" in out
    assert "- **Device:** NVIDIA H100 80GB HBM3, cpu (driver 570.86)" in out
    assert "| device |" in out.split("## All trials")[1]


def test_timing_line_says_min_time_only_when_it_was_set(text):
    assert "rounds of 20 timed steps per phase (at least two" in text
    out = render(frame([make_record(min_time_s=1.5), make_record("test_resnet")]), {})
    assert "rounds of 20 timed steps per phase, or as many as last 1.5 s (`min_time_s`) (at least two" in out


def test_pretrained_weights_are_named():
    out = render(frame([make_record(pretrained="laion2b_s34b_b88k"), make_record("test_resnet", pretrained=True)]), {})
    assert "pretrained: `laion2b_s34b_b88k` (1 trial)" in out and "pretrained (timm default weights) (1 trial)" in out
    assert "randomly initialized" not in out


def test_empty_results():
    out = render(frame([]).reindex(columns=list(make_record().flat())), {"name": "empty"})
    assert "**No trials stored.**" in out


def test_write_report_with_plots(tmp_path):
    db = write_store(tmp_path / "run" / "results.sqlite", fixed_records(),
                     {"experiment": {"name": "smoke", "select": SELECT}})
    path = write_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report.md"
    text = path.read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert "report-accuracy-vs-throughput.png" in links and "report-effects.png" in links
    assert "report-memory.png" in links
    for link in links:
        png = (path.parent / link).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    custom = write_report(db, tmp_path / "out" / "pr.md", title="PR 12")
    assert custom.read_text().startswith("# PR 12: timm tower sweep")
    assert (tmp_path / "out" / "pr-effects.png").exists()


def test_unpaired_ablations_show_no_numbers():
    recs = [make_record(pool="avg"), make_record(pool="token", grad_checkpointing=True)]
    out = render(frame(recs), {})
    assert "| pool | avg → token | 0 | — | — | — | — | — |" in out
    assert "| grad_checkpointing | off → on | 0 | — | — | — | — | — |" in out


# --- memory: breakdown, fits-on, checks, checkpointing (issue 11) --------------------------------

def memory_records():
    line = dict(train_fixed_mem_mib=1024.0, train_mem_per_sample_mib=100.0, train_max_batch=779,
                capacity_budget_mib=80 * 1024.0, lock_ok=True, train_state_ok=True, check_reason="")
    parts = dict(train_weights_mib=100.0, train_grads_mib=100.0, train_optimizer_mib=200.0)
    return [
        make_record("test_vit", train_peak_mem_mib=1000.0, train_activations_mib=600.0, **parts, **line),
        make_record("test_vit", grad_checkpointing=True, train_peak_mem_mib=600.0, train_activations_mib=200.0,
                    **parts, **line),
        make_record("test_resnet", train_peak_mem_mib=800.0, train_activations_mib=400.0, **parts,
                    **{**line, "lock_ok": False,
                       "check_reason": "lock: 1.0M trunk parameters trainable, 0.5M expected"}),
        make_record("test_resnet", grad_checkpointing=True, train_peak_mem_mib=800.0, train_activations_mib=400.0,
                    **parts, **line),
        make_record("test_convnext", mode="infer", infer_peak_mem_mib=300.0, infer_weights_mib=100.0,
                    infer_activations_mib=200.0, train_peak_mem_mib=None),
    ]


def test_memory_section_breakdown_fits_on_checks_and_checkpointing():
    text = render(frame(memory_records()), {"name": "mem"})
    section = text.split("## Memory")[1].split("## ")[0]
    assert ("| trial | phase | peak (MiB) | weights (MiB) | grads (MiB) | optimizer (MiB) | activations (MiB) | "
            "fixed (MiB) | per sample (MiB) | fits on 24 GiB | fits on 40 GiB | fits on 80 GiB |") in section
    assert ("| `test_vit` | train | 1,000 | 100 | 100 | 200 | 600 | 1,024 | 100 | 235 | 399 | 808 | 779 | ok |"
            in section)
    assert "| `test_convnext mode=infer` | infer | 300 | 100 | 0 | 0 | 200 | — | — | — | — | — | — | — |" \
        in section
    assert "| `test_resnet` | train | 800 |" in section and "| ⚠ lock |" in section
    assert "- `test_resnet`: lock: 1.0M trunk parameters trainable, 0.5M expected" in section
    # checkpointing: saved where it worked, flagged where it did not
    assert "| `test_vit` | 600 | 200 | 400 (66.7%) | 779 → 779 |" in section
    assert "| `test_resnet` | 400 | 400 | 0 (0.00%) ⚠ not lower |" in section
    assert "1 pair: checkpointing did not lower the activations" in section
    full = text.split("## All trials")[1]
    assert "mem at peak W / G / O / A (MiB) |" in full and "| train: 100 / 100 / 200 / 600 |" in full


def test_no_memory_section_without_a_breakdown(text):
    assert "## Memory" not in text


def test_breakdown_plot(tmp_path):
    write_store(tmp_path / "run" / "results.sqlite", memory_records(), {"experiment": {"name": "mem"}})
    text = write_report(tmp_path / "run").read_text()
    assert "![Where peak memory goes](report-memory-breakdown.png)" in text
    png = (tmp_path / "run" / "report-memory-breakdown.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
