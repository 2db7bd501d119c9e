"""A wave's gate, as pure functions over what its devices reported.

Each device decides its own part on the device (it commits or rolls back, and
says which check failed with the numbers). The wave's gate is decided here,
on the server, from the reports: enough of them, few enough failures, and the
worst accuracy, regression, p95 and latency ratio any device measured against
their thresholds. A value exactly at a threshold passes. A device that has not
reported within the timeout counts as a failed report.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from server.rollouts.policy import RolloutPolicy
from shared.messages import GATE_EPSILON, within_latency_slack

EPSILON = GATE_EPSILON  # the device's own gates use the same tolerance


@dataclass(frozen=True)
class DeviceReport:
    """One device's part of a wave, as far as the gate is concerned."""

    device: str
    final: bool  # the device reported how its deployment ended
    failed: bool  # it failed, rolled back, or timed out
    timed_out: bool = False
    accuracy: float | None = None
    p95_ms: float | None = None
    previous_accuracy: float | None = None  # the model it replaces, same trial and samples
    previous_p95_ms: float | None = None

    @property
    def reported(self) -> bool:
        return self.final or self.timed_out


@dataclass(frozen=True)
class GateResult:
    name: str
    measured: float | None  # None: nothing to measure yet (or no device had a model to compare with)
    threshold: float | None
    passed: bool
    detail: str = ""

    def describe(self) -> str:
        measured = "-" if self.measured is None else f"{self.measured:.4g}"
        threshold = "-" if self.threshold is None else f"{self.threshold:.4g}"
        verdict = "passed" if self.passed else "FAILED"
        return f"{self.name} {measured} vs {threshold}: {verdict}" + (f" ({self.detail})" if self.detail else "")


class Decision(enum.Enum):
    PENDING = "pending"  # not enough reports yet
    PASSED = "passed"
    FAILED = "failed"


@dataclass(frozen=True)
class WaveVerdict:
    decision: Decision
    gates: tuple[GateResult, ...]

    def failed_gates(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)


def _at_most(value: float, threshold: float) -> bool:
    return value <= threshold + EPSILON


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold - EPSILON


def reports_gate(reports: Sequence[DeviceReport], policy: RolloutPolicy) -> GateResult:
    needed = policy.reports_needed(len(reports))
    reported = sum(r.reported for r in reports)
    return GateResult("reports", reported, needed, reported >= needed,
                      f"{sum(r.timed_out for r in reports)} timed out" if any(r.timed_out for r in reports) else "")


def failure_gate(reports: Sequence[DeviceReport], policy: RolloutPolicy) -> GateResult:
    """Failed ÷ reported; failed ÷ all when that alone already exceeds the threshold (no later report can help)."""
    reported = [r for r in reports if r.reported]
    failed = sum(r.failed for r in reported)
    ratio = failed / len(reported) if reported else 0.0
    if reports and not _at_most(failed / len(reports), policy.max_failure_ratio):
        ratio = max(ratio, failed / len(reports))
    return GateResult("failure_ratio", round(ratio, 6), policy.max_failure_ratio,
                      _at_most(ratio, policy.max_failure_ratio), f"{failed} of {len(reported)} reported failed")


def accuracy_gate(reports: Sequence[DeviceReport], floor: float) -> GateResult:
    measured = [r.accuracy for r in reports if r.accuracy is not None]
    worst = min(measured) if measured else None
    return GateResult("accuracy", worst, floor, worst is None or _at_least(worst, floor), "lowest on a device")


def regression_gate(reports: Sequence[DeviceReport], policy: RolloutPolicy) -> GateResult:
    drops = [r.previous_accuracy - r.accuracy for r in reports
             if r.accuracy is not None and r.previous_accuracy is not None]
    worst = round(max(drops), 6) if drops else None
    detail = "largest drop below the replaced model" if drops else "no device had a model to compare with"
    return GateResult("regression", worst, policy.max_regression,
                      worst is None or _at_most(worst, policy.max_regression), detail)


def p95_gate(reports: Sequence[DeviceReport], policy: RolloutPolicy) -> GateResult:
    measured = [r.p95_ms for r in reports if r.p95_ms is not None]
    worst = max(measured) if measured else None
    passed = worst is None or policy.max_p95_ms is None or _at_most(worst, policy.max_p95_ms)
    return GateResult("p95_ms", worst, policy.max_p95_ms, passed, "highest on a device")


def latency_ratio_gate(reports: Sequence[DeviceReport], policy: RolloutPolicy) -> GateResult:
    """The highest p95 ÷ replaced p95 among devices whose p95 rose beyond the slack: within it the ratio of
    two microsecond timings is noise, and the device's own gate let it pass too."""
    compared = [(r.p95_ms, r.previous_p95_ms) for r in reports
                if r.p95_ms is not None and r.previous_p95_ms is not None and r.previous_p95_ms > 0]
    ratios = [new / old for new, old in compared if not within_latency_slack(new, old, policy.latency_slack_ms)]
    worst = round(max(ratios), 6) if ratios else None
    if ratios:
        detail = "highest p95 ÷ replaced model's p95"
    elif compared:
        detail = f"every p95 within {policy.latency_slack_ms:g} ms of the replaced model's"
    else:
        detail = "no device had a model to compare with"
    return GateResult("latency_ratio", worst, policy.max_latency_ratio,
                      worst is None or _at_most(worst, policy.max_latency_ratio), detail)


def evaluate_wave(reports: Sequence[DeviceReport], policy: RolloutPolicy, accuracy_floor: float) -> WaveVerdict:
    """The wave's gate now. An empty wave passes. It fails as soon as its failures alone decide it,
    and otherwise once enough devices reported."""
    count = reports_gate(reports, policy)
    quality = (
        failure_gate(reports, policy),
        accuracy_gate(reports, accuracy_floor),
        regression_gate(reports, policy),
        p95_gate(reports, policy),
        latency_ratio_gate(reports, policy),
    )
    gates = (count, *quality)
    reported = [r for r in reports if r.reported]
    if not reports:
        return WaveVerdict(Decision.PASSED, gates)
    failed = sum(r.failed for r in reported)
    if not _at_most(failed / len(reports), policy.max_failure_ratio):
        return WaveVerdict(Decision.FAILED, gates)  # whatever the others report, too many failed
    if any(not g.passed for g in quality[1:]):
        return WaveVerdict(Decision.FAILED, gates)  # a device measured a value over a limit: no waiting
    if not count.passed:
        return WaveVerdict(Decision.PENDING, gates)
    return WaveVerdict(Decision.PASSED if all(g.passed for g in quality) else Decision.FAILED, gates)
