"""The live display: a line per finished trial, the summary, and how a run ends on Ctrl-C or SIGTERM."""
from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parents[1]  # tests/: trialfns, factories
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from factories import make_record  # noqa: E402

from suite.core.options import Trial  # noqa: E402
from suite.core.records import TrialRecord  # noqa: E402
from suite.sweep.progress import Reporter, details, finish, run_reported  # noqa: E402
from suite.sweep.workers import TrialResults  # noqa: E402


def console() -> Console:
    return Console(file=io.StringIO(), width=200)


def text_of(c: Console) -> str:
    return c.file.getvalue()


def test_details_show_the_key_numbers_or_the_reason():
    ok = make_record("a", train_peak_mem_mib=1234.0, reason="note")
    assert details(ok) == "infer 300.0/s, train 100.0/s, train mem 1,234 MiB, probe top-1 50.0%, note"
    assert details(make_record("a", "oom", "OutOfMemoryError: CUDA out of memory")) == \
        "OutOfMemoryError: CUDA out of memory"
    assert details(TrialRecord(Trial(model="a"), "ok")) == ""  # nothing measured, nothing to say


def test_a_finished_line_counts_and_keeps_brackets_in_labels():
    c = console()
    reporter = Reporter(2, progress=False, console=c, label=lambda trial: f"[{trial.model}]")
    reporter.finished(make_record("a", "skipped", "pool='x' [not here]"))
    line = text_of(c).strip()
    assert line == "[1/2] skipped [a]  pool='x' [not here]  (10.0 s)"  # markup would have eaten the brackets
    reporter.finished(make_record("b"))
    assert text_of(c).splitlines()[1].startswith("[2/2] ok      [b]  infer 300.0/s")


def test_summary_counts_statuses_and_overhead_only_when_serial():
    results = TrialResults()
    for record in (make_record("a", measured_time_s=3.0), make_record("b", "crashed"), make_record("c")):
        results.add(record)
    results.wall_time_s = 10.0
    c = console()
    Reporter(4, progress=False, console=c, where=", somewhere").summary(results)
    assert text_of(c).strip() == ("3 of 4 trials in 10.0 s wall time (2 ok, 1 crashed), somewhere; "
                                  "sum of measured time 3.0 s (start-up and per-trial overhead 7.0 s)")
    c = console()
    results.interrupted = True
    Reporter(4, progress=False, console=c, parallel=2).summary(results)
    line = text_of(c).strip()
    assert line.startswith("interrupted: 3 of 4") and line.endswith("; unfinished trials were not recorded")
    assert "overhead" not in line  # with two at once, measured time can exceed the wall time


def test_finish_keeps_hands_over_and_shows_each_record_once():
    c, results, seen = console(), TrialResults(), []
    reporter = Reporter(1, progress=False, console=c)
    record = make_record("a", measured_time_s=2.0)
    finish(record, results, seen.append, reporter)
    assert list(results) == [record] == seen and results.measured_time_s == 2.0
    assert text_of(c).count("[1/1] ok") == 1
    finish(make_record("b"), results, None, reporter)  # no on_result: still kept and shown
    assert len(results) == 2 and reporter.done == 2


def test_run_reported_ends_cleanly_on_ctrl_c_and_sigterm():
    def body(reporter, results):
        finish(make_record("a"), results, None, reporter)
        raise KeyboardInterrupt

    c = console()
    results = run_reported(3, body, progress=False, console=c, where="", parallel=1, label=None,
                           start=time.time() - 5)
    assert results.interrupted and len(results) == 1 and results.wall_time_s >= 5
    assert "interrupted: 1 of 3 trials" in text_of(c)

    def terminated(reporter, results):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    results = run_reported(1, terminated, progress=True, console=console(), where="", parallel=1, label=None)
    assert results.interrupted and signal.getsignal(signal.SIGTERM) is before


def test_run_reported_with_nothing_to_do_does_not_call_the_body():
    called = []
    c = console()
    results = run_reported(0, lambda reporter, results: called.append(1), progress=False, console=c, where="",
                           parallel=1, label=None)
    assert called == [] and results == [] and not results.interrupted
    assert "0 of 0 trials" in text_of(c) and "none finished" in text_of(c)
