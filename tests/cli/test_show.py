"""One trial record as a table: which rows show, how they are formatted, and the rich rendering."""
from __future__ import annotations

from factories import make_record
from rich.console import Console

from suite.cli.show import record_rows, show_record


def test_measure_rows_leave_out_what_was_not_measured():
    record = make_record(infer_tflops=1.5, train_noisy=True)
    rows = record_rows(record, "measure")
    assert rows == [
        ("parameters (M)", "5.00"),
        ("infer samples/s", "300.0"),
        ("infer step ms (median ± IQR)", "106.67 ± 2.13"),
        ("infer batch", "32"),
        ("infer TFLOP/s (MFU)", "1.500 (20.0%)"),  # both parts measured
        ("infer peak memory MiB", "300.0"),
        ("train samples/s", "100.0"),
        ("train step ms (median ± IQR)", "320.00 ± 6.40"),
        ("train batch", "32"),
        # train TFLOP/s left out: train_mfu alone is not enough for its row
        ("train peak memory MiB", "1,000.0"),
        ("noisy timing", "train (IQR/median above the threshold)"),
    ]


def test_probe_rows():
    record = make_record(probe_top1=81.234, probe_C=0.5, probe_n_train=10, probe_n_val=5, probe_n_test=20)
    assert record_rows(record, "probe") == [
        ("top-1 %", "81.23"), ("chosen C", "0.5"), ("train / val / test", "10 / 5 / 20"),
    ]
    assert record_rows(make_record("test_vit", "oom", "CUDA out of memory"), "probe") == []


def test_show_record_prints_status_reason_and_environment():
    console = Console(record=True, width=200)
    show_record(make_record("test_resnet", "skipped", "no gradient checkpointing", grad_checkpointing=True),
                "measure", console=console)
    text = console.export_text()
    assert "test_resnet" in text and "skipped" in text
    assert "reason" in text and "no gradient checkpointing" in text
    assert "cpu · torch 2.14.1 · timm 1.0.31 · 2 threads" in text
