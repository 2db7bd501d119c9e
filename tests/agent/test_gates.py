"""agent.gates.gate_failures: every threshold just below, at and just above its boundary, and the wording."""

from __future__ import annotations

import math

import pytest

from agent.gates import EPSILON, gate_failures
from shared.messages import Gates, PreviousModel

STEP = 1e-6  # well beyond EPSILON: "just" below or above a threshold


def previous(accuracy: float = 0.87, p95_ms: float = 2.0) -> PreviousModel:
    return PreviousModel(model="kws", version=1, sha256="ab" * 32, accuracy=accuracy, p50_ms=1.0, p95_ms=p95_ms)


OPEN = Gates(min_accuracy=0.0)  # every other check off


# -- each threshold at its boundary -----------------------------------------------------------


@pytest.mark.parametrize(("accuracy", "fails"), [(0.9 - STEP, True), (0.9, False), (0.9 + STEP, False)])
def test_min_accuracy_boundary(accuracy: float, fails: bool) -> None:
    problems = gate_failures(Gates(min_accuracy=0.9), accuracy, 1.0, None)
    assert bool(problems) is fails
    if fails:
        assert problems == ["accuracy 0.899999 below the gate 0.900000"]  # more decimals than 4: they would match


@pytest.mark.parametrize(("p95", "fails"), [(2.0 - STEP, False), (2.0, False), (2.0 + STEP, True)])
def test_max_p95_boundary(p95: float, fails: bool) -> None:
    problems = gate_failures(Gates(min_accuracy=0.0, max_p95_ms=2.0), 1.0, p95, None)
    assert bool(problems) is fails
    if fails:
        assert problems == ["p95 latency 2.000001 ms above the gate 2.000000 ms"]


@pytest.mark.parametrize(
    ("accuracy", "fails"),
    [
        (0.86 + STEP, False),  # a drop just under the allowed 0.01
        (0.86, False),  # exactly 0.01 below, although 0.87 - 0.86 == 0.010000000000000009 in floats
        (0.86 - STEP, True),
    ],
)
def test_max_regression_boundary(accuracy: float, fails: bool) -> None:
    assert 0.87 - 0.86 > 0.01  # the float trap the epsilon is for
    problems = gate_failures(Gates(min_accuracy=0.0, max_regression=0.01), accuracy, 1.0, previous(accuracy=0.87))
    assert bool(problems) is fails
    if fails:
        assert problems == [
            "accuracy 0.8600 is 0.010001 below the replaced model's 0.8700 (max regression 0.010000)"
        ]


@pytest.mark.parametrize(("p95", "fails"), [(3.0 - STEP, False), (3.0, False), (3.0 + STEP, True)])
def test_max_latency_ratio_boundary(p95: float, fails: bool) -> None:
    problems = gate_failures(Gates(min_accuracy=0.0, max_latency_ratio=1.5), 1.0, p95, previous(p95_ms=2.0))
    assert bool(problems) is fails
    if fails:
        assert problems == ["p95 latency 3.000 ms is 1.500001x the replaced model's 2.000 ms (max 1.500000x)"]


@pytest.mark.parametrize(
    ("p95", "fails"),
    [
        (0.003 + 0.05, False),  # 17.7x the replaced model's 3 µs, but only the slack above it: timing noise
        (0.003 + 0.05 + STEP, True),
        (0.003 + 0.05 - STEP, False),
    ],
)
def test_latency_slack_boundary(p95: float, fails: bool) -> None:
    gates = Gates(min_accuracy=0.0, max_latency_ratio=1.5, latency_slack_ms=0.05)
    problems = gate_failures(gates, 1.0, p95, previous(p95_ms=0.003))
    assert bool(problems) is fails
    if fails:
        expected = "p95 latency 0.053 ms is 17.67x the replaced model's 0.003 ms (max 1.50x, beyond 0.05 ms of slack)"
        assert problems == [expected]


def test_slack_never_excuses_a_slow_model_within_its_ratio_or_above_its_slack() -> None:
    gates = Gates(min_accuracy=0.0, max_latency_ratio=1.5, latency_slack_ms=0.05)
    assert gate_failures(gates, 1.0, 2.9, previous(p95_ms=2.0)) == []  # within the ratio
    assert gate_failures(gates, 1.0, 3.1, previous(p95_ms=2.0))  # 1.55x and 1.1 ms above: slack does not matter
    assert gate_failures(Gates(min_accuracy=0.0, max_p95_ms=0.01, latency_slack_ms=1.0), 1.0, 0.02, None)


@pytest.mark.parametrize("slack", [-0.001, math.inf, math.nan])
def test_a_slack_that_is_not_a_non_negative_number_is_refused(slack: float) -> None:
    with pytest.raises(ValueError, match="latency_slack_ms must be a non-negative number"):
        Gates(min_accuracy=0.0, latency_slack_ms=slack)


def test_a_ratio_at_its_limit_passes_despite_float_rounding() -> None:
    assert 3.3 / 2.2 != 1.5  # 1.4999999999999998
    assert gate_failures(Gates(min_accuracy=0.0, max_latency_ratio=1.5), 1.0, 3.3, previous(p95_ms=2.2)) == []
    assert 0.07 / 0.01 > 7  # 7.000000000000001
    assert gate_failures(Gates(min_accuracy=0.0, max_latency_ratio=7.0), 1.0, 0.07, previous(p95_ms=0.01)) == []


def test_the_epsilon_is_tiny() -> None:
    assert EPSILON == 1e-9
    assert gate_failures(Gates(min_accuracy=0.9), 0.9 - 2e-9, 1.0, None)  # beyond it: a real miss


# -- the wording of every check, as the operator reads it --------------------------------------


def test_every_check_fails_with_its_numbers_in_a_fixed_order() -> None:
    gates = Gates(min_accuracy=0.9, max_p95_ms=2.0, max_regression=0.01, max_latency_ratio=1.5)
    problems = gate_failures(gates, 0.8123, 3.2, previous(accuracy=0.8773, p95_ms=1.524))
    assert problems == [
        "accuracy 0.8123 below the gate 0.9000",
        "accuracy 0.8123 is 0.0650 below the replaced model's 0.8773 (max regression 0.0100)",
        "p95 latency 3.200 ms above the gate 2.000 ms",
        "p95 latency 3.200 ms is 2.10x the replaced model's 1.524 ms (max 1.50x)",
    ]


def test_everything_passes() -> None:
    gates = Gates(min_accuracy=0.9, max_p95_ms=2.0, max_regression=0.01, max_latency_ratio=1.5)
    assert gate_failures(gates, 0.95, 1.5, previous(accuracy=0.95, p95_ms=1.4)) == []


def test_a_better_model_than_the_replaced_one_passes_a_zero_regression_budget() -> None:
    assert gate_failures(Gates(min_accuracy=0.0, max_regression=0.0), 0.9, 1.0, previous(accuracy=0.85)) == []


# -- skipped checks ---------------------------------------------------------------------------


def test_no_replaced_model_skips_both_comparisons() -> None:
    gates = Gates(min_accuracy=0.5, max_regression=0.0, max_latency_ratio=1.0)
    assert gate_failures(gates, 0.6, 100.0, None) == []


def test_none_thresholds_skip_their_checks() -> None:
    assert gate_failures(Gates(min_accuracy=0.5), 0.6, 1e6, previous(accuracy=1.0, p95_ms=0.001)) == []


@pytest.mark.parametrize("p95", [0.0, -1.0, math.nan, math.inf])
def test_a_replaced_p95_that_gives_no_ratio_skips_the_ratio_check(p95: float) -> None:
    gates = Gates(min_accuracy=0.0, max_latency_ratio=1.5)
    assert gate_failures(gates, 1.0, 5.0, previous(p95_ms=p95)) == []


def test_a_replaced_accuracy_that_is_not_a_number_skips_the_regression_check() -> None:
    gates = Gates(min_accuracy=0.0, max_regression=0.01)
    assert gate_failures(gates, 0.5, 1.0, previous(accuracy=math.nan)) == []


@pytest.mark.parametrize(("accuracy", "p95"), [(math.nan, 1.0), (0.9, math.nan), (math.inf, 1.0)])
def test_measured_numbers_that_are_not_finite_fail_closed(accuracy: float, p95: float) -> None:
    """NaN compares false with everything: without this it would pass every gate."""
    (problem,) = gate_failures(Gates(min_accuracy=0.5, max_p95_ms=10.0), accuracy, p95, None)
    assert problem.startswith("the trial measured no usable numbers")
