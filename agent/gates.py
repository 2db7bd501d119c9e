"""The device's commit gates, as a pure function of the trial's numbers.

A candidate model commits only when every check the directive's ``Gates`` ask
for passes: its accuracy on the eval set that travelled with it, its p95
latency, and, when the device already runs a model, both compared with that
replaced model measured in the same trial on the same samples
(``PreviousModel``). Each failed check becomes one sentence with its numbers;
the updater joins them into the reason it stores and reports.

Thresholds are inclusive: a value exactly at a threshold passes. Measured
numbers are floats, so "exactly" means within ``EPSILON`` (1e-9): an accuracy
of 0.86 against a replaced 0.87 with a max regression of 0.01 passes, although
``0.87 - 0.86`` is 0.010000000000000009 in binary floating point. A check
whose threshold is None is skipped; so are both comparisons when there is no
replaced model, or when its numbers cannot be compared (a p95 of zero, which
gives no ratio, or a value that is not finite). The latency ratio fails only
a p95 more than ``latency_slack_ms`` above the replaced model's: between two
timings of a few microseconds the ratio is noise.
"""

from __future__ import annotations

import math

from shared.messages import GATE_EPSILON, Gates, PreviousModel, within_latency_slack

EPSILON = GATE_EPSILON  # how close to a threshold still counts as at it (see the module docstring)
MAX_DIGITS = 9  # a value beyond EPSILON of its threshold prints distinct from it with this many decimals


def _pair(value: float, threshold: float, digits: int) -> tuple[str, str]:
    """Both numbers with ``digits`` decimals, or more when they would print the same: a failed check
    never reads "0.9000 below the gate 0.9000"."""
    while digits < MAX_DIGITS and f"{value:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}", f"{threshold:.{digits}f}"


def _above(value: float, threshold: float) -> bool:
    return value > threshold + EPSILON


def gate_failures(gates: Gates, accuracy: float, p95_ms: float, previous: PreviousModel | None) -> list[str]:
    """One human sentence per failed check, in a fixed order (accuracy, regression, p95, latency ratio);
    an empty list means the candidate may commit."""
    problems: list[str] = []
    if not math.isfinite(accuracy) or not math.isfinite(p95_ms):
        # NaN compares false with everything: it would pass every check below.
        return [f"the trial measured no usable numbers (accuracy {accuracy}, p95 latency {p95_ms} ms)"]
    if _above(gates.min_accuracy, accuracy):
        value, gate = _pair(accuracy, gates.min_accuracy, 4)
        problems.append(f"accuracy {value} below the gate {gate}")
    if gates.max_regression is not None and previous is not None and math.isfinite(previous.accuracy):
        drop = previous.accuracy - accuracy
        if _above(drop, gates.max_regression):
            shown_drop, limit = _pair(drop, gates.max_regression, 4)
            problems.append(
                f"accuracy {accuracy:.4f} is {shown_drop} below the replaced model's {previous.accuracy:.4f} "
                f"(max regression {limit})"
            )
    if gates.max_p95_ms is not None and _above(p95_ms, gates.max_p95_ms):
        value, gate = _pair(p95_ms, gates.max_p95_ms, 3)
        problems.append(f"p95 latency {value} ms above the gate {gate} ms")
    if (
        gates.max_latency_ratio is not None
        and previous is not None
        and math.isfinite(previous.p95_ms)
        and previous.p95_ms > 0  # a zero p95 (a clock too coarse to time it) gives no ratio
        and not within_latency_slack(p95_ms, previous.p95_ms, gates.latency_slack_ms)
    ):
        ratio = p95_ms / previous.p95_ms
        if _above(ratio, gates.max_latency_ratio):
            shown_ratio, limit = _pair(ratio, gates.max_latency_ratio, 2)
            slack = f", beyond {gates.latency_slack_ms:g} ms of slack" if gates.latency_slack_ms else ""
            problems.append(
                f"p95 latency {p95_ms:.3f} ms is {shown_ratio}x the replaced model's {previous.p95_ms:.3f} ms "
                f"(max {limit}x{slack})"
            )
    return problems
