"""What the gate found: one `Change` per metric of a trial, and the `Comparison` of two stores.

Plain data (no torch, no store): `compare` fills them, `confirm` updates them, `ci_output` and
the command line render them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from suite.experiment.criteria import Threshold


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
        return "—" if rel is None else f"{100 * rel:+.1f}%"


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

    @property
    def cannot_tell(self) -> list[str]:
        """Changes worse than their threshold but inside a noise band wider than it: not a verdict either way."""
        return [f"{ch.label}: {ch.metric} {ch.change_text}: noise ±{100 * ch.noise:.1f}% is wider than the threshold "
                f"{ch.threshold.text}" for ch in self.changes if ch.verdict == "cannot tell"]

    @property
    def exit_code(self) -> int:
        """1 on any regression or missing gated metric, on a trial measured in another environment, or when
        no trial at all could be compared (nothing was gated)."""
        return 1 if self.regressions or self.env_uncompared or self.n_compared == 0 else 0
