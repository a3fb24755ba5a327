"""What the driver shows while trials run: a line per finished trial, a progress bar, a summary.

Both backends run their loop inside `run_reported`, which also makes Ctrl-C and SIGTERM end a
run cleanly, and hand every finished record to `finish`: the one place a record goes into the
run's results, to the caller's `on_result` (e.g. the store) and onto the screen.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from suite.core.records import TrialRecord
from suite.sweep.workers import TrialResults, sigterm_as_interrupt

_STYLE = {"ok": "green", "skipped": "yellow", "oom": "magenta", "error": "red", "crashed": "bold red",
          "timeout": "bold red"}


def details(record: TrialRecord) -> str:
    """The key numbers of a finished trial, or its reason."""
    if record.status != "ok":
        return record.reason
    m, p = record.measure, record.probe
    parts = []
    if m.infer_samples_per_sec is not None:
        parts.append(f"infer {m.infer_samples_per_sec:,.1f}/s")
    if m.train_samples_per_sec is not None:
        parts.append(f"train {m.train_samples_per_sec:,.1f}/s")
    if m.train_peak_mem_mib is not None:
        parts.append(f"train mem {m.train_peak_mem_mib:,.0f} MiB")
    if p.probe_top1 is not None:
        parts.append(f"probe top-1 {p.probe_top1:.1f}%")
    if record.reason:
        parts.append(record.reason)
    return ", ".join(parts)


class Reporter:
    """A rich progress bar with ETA and a line per finished trial, or plain lines (`progress=False`)."""

    def __init__(self, total: int, *, progress: bool, console: Console | None = None, where: str = "",
                 parallel: int = 1, label: Callable | None = None):
        self.total, self.done, self.where, self.parallel = total, 0, where, parallel
        self.label = label or (lambda trial: trial.label)
        self.console = console or Console()
        self.bar = None
        if progress:
            self.bar = Progress(SpinnerColumn(), TextColumn("trials"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("trials", total=total)

    def __enter__(self) -> Reporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def print(self, *parts: tuple[str, str] | str) -> None:
        # Text, not markup: labels and reasons may contain brackets.
        self.console.print(Text.assemble(*parts), highlight=False, soft_wrap=True)

    def finished(self, record: TrialRecord) -> None:
        """One line for a finished trial: count, status, label, key numbers or reason, duration."""
        self.done += 1
        seconds = (record.finished_at or 0) - (record.started_at or 0) if record.started_at else 0.0
        self.print(f"[{self.done}/{self.total}] ", (f"{record.status:<7}", _STYLE.get(record.status, "")),
                   f" {self.label(record.trial)}  {details(record)}  ({seconds:.1f} s)")
        if self.bar is not None:
            self.bar.advance(self.task)

    def warn(self, text: str) -> None:
        self.print(("warning: ", "yellow"), text)

    def summary(self, results: TrialResults) -> None:
        """The closing line: how many trials, their statuses, wall time against measured time."""
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        statuses = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none finished"
        wall, measured = results.wall_time_s, results.measured_time_s
        line = (f"{len(results)} of {self.total} trials in {wall:.1f} s wall time ({statuses}){self.where}; "
                f"sum of measured time {measured:.1f} s")
        if self.parallel == 1:  # with several at once the sum can exceed the wall time
            line += f" (start-up and per-trial overhead {max(0.0, wall - measured):.1f} s)"
        if results.interrupted:
            line = "interrupted: " + line + "; unfinished trials were not recorded"
        self.print(line)


def finish(record: TrialRecord, results: TrialResults, on_result: Callable[[TrialRecord], None] | None,
           reporter: Reporter) -> None:
    """A trial is done: keep its record, hand it to the caller, show it."""
    results.add(record)
    if on_result is not None:
        on_result(record)
    reporter.finished(record)


def run_reported(total: int, body: Callable[[Reporter, TrialResults], None], *, progress: bool,
                 console: Console | None, where: str, parallel: int, label: Callable | None,
                 start: float | None = None) -> TrialResults:
    """Run `body(reporter, results)` under the live display and return the results it finished.

    Ctrl-C or SIGTERM inside `body` ends the run with `results.interrupted` set rather than an
    exception; the summary line is printed either way. `start` (default: now) is when the run's
    wall time begins.
    """
    start = time.time() if start is None else start
    results = TrialResults()
    with Reporter(total, progress=progress, console=console, where=where, parallel=parallel,
                  label=label) as reporter:
        if total:
            try:
                with sigterm_as_interrupt():
                    body(reporter, results)
            except KeyboardInterrupt:
                results.interrupted = True
        results.wall_time_s = time.time() - start
    reporter.summary(results)
    return results
