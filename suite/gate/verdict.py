"""What the gate found: one `Change` per metric of a trial, and the `Comparison` of two stores.

Plain data (no torch, no store): `compare` fills them, `confirm` updates them, `ci_output` and
the command line render them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from suite.experiment.criteria import Threshold, higher_is_better

TIMING_PHASE = re.compile(r"^(infer|train)_(samples_per_sec|step_time|tflops|mfu)$")


def is_timing(metric: str) -> bool:
    """Whether `metric` is a throughput/step-time figure (the kind a re-measurement can confirm)."""
    return TIMING_PHASE.match(metric) is not None


def judge(metric: str, base: float, cur: float, threshold: Threshold | None, noise: float | None) -> str:
    """The verdict of one stored figure against its threshold and noise (relative; None: unknown)."""
    if base == cur:
        return "unchanged"
    if threshold is None:
        return "not gated"
    good_up = higher_is_better(metric)
    worse = cur < base if good_up else cur > base
    rel = abs(cur - base) / abs(base) if base else float("inf")
    size = 100 * rel if threshold.relative else abs(cur - base)
    if noise is not None and rel <= noise:  # worse beyond the threshold inside a wider band: not "fine"
        return "cannot tell" if worse and size > threshold.limit else "within noise"
    if size <= threshold.limit:
        return "within threshold"
    return "regression" if worse else "improvement"


@dataclass
class Change:
    """One metric of one trial, baseline vs current."""

    trial_id: str
    label: str
    metric: str
    baseline: float | None  # None: "missing" (not stored on that side)
    current: float | None
    threshold: Threshold | None
    noise: float | None  # combined relative IQR (timing metrics only)
    verdict: str  # "regression" | "improvement" | "within noise" | "within threshold" | "unchanged" | "not gated"
    #               | "cannot tell" (worse beyond the threshold, but within a noise band wider than it)
    #               | "not confirmed" (flagged, but a re-measurement did not reproduce it)
    #               | "missing" (a gated metric stored on one side only: not compared, fails the gate)
    remeasured: tuple[float, ...] = ()  # --confirm: the re-measured current values
    spreads: tuple[float | None, float | None] = (None, None)  # each side's own relative noise (`spread`)
    drift: float | None = None  # the move all trials made together (`suite.gate.drift`), judged net of it
    common: bool = False  # stands for the common move of all trials (beyond the threshold) in the A/B check
    ab: dict | None = None  # the A/B re-measurement's summary (`suite.gate.confirm`): pairs, interval, reason

    @property
    def rel_change(self) -> float | None:
        if self.baseline is None or self.current is None or self.baseline == 0:
            return None
        return (self.current - self.baseline) / abs(self.baseline)

    @property
    def change_text(self) -> str:
        if self.verdict == "missing":
            return "missing: not compared"
        if self.threshold is not None and not self.threshold.relative:
            return f"{self.current - self.baseline:+.2f}"
        rel = self.rel_change
        if rel is None:
            return "—"
        if self.drift is None:
            return f"{100 * rel:+.1f}%"
        return f"{100 * rel:+.1f}% ({100 * ((1 + rel) / (1 + self.drift) - 1):+.1f}% net of the common {100 * self.drift:+.1f}%)"


@dataclass
class Comparison:
    """The outcome of `compare`; `markdown` is the table a CI log or PR shows."""

    changes: list[Change] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)  # one line each (status changes included)
    status_regressions: list[str] = field(default_factory=list)  # trials that ran ok before and no longer do
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)
    env_mismatch: list[str] = field(default_factory=list)
    env_uncompared: list[str] = field(default_factory=list)  # trials run ok but measured in another environment
    env_unknown: list[str] = field(default_factory=list)  # ENV_IDENTITY fields a side does not record (older store)
    status_changes: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)  # gated metrics neither run stored for any trial
    code: dict[str, str] = field(default_factory=dict)  # side -> the code (commits) its rows were measured with
    notes: list[str] = field(default_factory=list)  # what the re-measurement did and did not run, and why
    n_compared: int = 0
    markdown: str = ""
    confirmed: bool = False  # flagged timing regressions were re-measured (`apply_confirmation`)
    gates: dict = field(default_factory=dict)  # the thresholds applied: {metric: Threshold or None}
    drift: dict = field(default_factory=dict)  # timing metric -> {"n", "shift", "scatter"} (`suite.gate.drift`)
    ab: dict = field(default_factory=dict)  # the A/B confirm step: {"time_s", "budget_s", "alpha", ...}

    @property
    def cannot_tell(self) -> list[str]:
        """Changes worse than their threshold but inside a noise band wider than it: not a verdict either way."""
        return [f"{ch.label}: {ch.metric} {ch.change_text}: {_why_cannot_tell(ch)}"
                for ch in self.changes if ch.verdict == "cannot tell"]

    @property
    def exit_code(self) -> int:
        """1 on any regression or missing gated metric, on a trial measured in another environment, or when
        no trial at all could be compared (nothing was gated)."""
        return 1 if self.regressions or self.env_uncompared or self.n_compared == 0 else 0


def _why_cannot_tell(ch: Change) -> str:
    if ch.ab is not None:
        return f"A/B re-measurement: {ch.ab['reason']}"
    if ch.common:
        return (f"every trial moved by {100 * ch.drift:+.1f}%, beyond the threshold {ch.threshold.text}: drift of "
                "the machine between the two runs, or a change to every tower (an A/B re-measurement decides)")
    return f"noise ±{100 * (ch.noise or 0):.1f}% is wider than the threshold {ch.threshold.text}"
