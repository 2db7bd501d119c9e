"""A wave's gate (``server.rollouts.gates``) and the rollout policy (``server.rollouts.policy``), on their own.

Every threshold is probed just below, exactly at and just above it: a value
exactly at a threshold passes (floating point included: 0.87 - 0.86 is "at" a
0.01 regression budget).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.rollouts.gates import (
    Decision,
    DeviceReport,
    GateResult,
    accuracy_gate,
    evaluate_wave,
    failure_gate,
    latency_ratio_gate,
    p95_gate,
    regression_gate,
    reports_gate,
)
from server.rollouts.policy import (
    DEFAULT_LATENCY_SLACK_MS,
    MAX_WAVES,
    OnFailure,
    RolloutPolicy,
    parse_size,
    parse_waves,
    size_of,
)
from shared.errors import UserInputError

FLOOR = 0.9  # the accuracy floor the wave tests pass to evaluate_wave


def ok(name: str = "d", **metrics: float | None) -> DeviceReport:
    """A device that committed, with the numbers it measured."""
    return DeviceReport(device=name, final=True, failed=False, **metrics)  # type: ignore[arg-type]


def failed(name: str = "d") -> DeviceReport:
    return DeviceReport(device=name, final=True, failed=True)


def silent(name: str = "d") -> DeviceReport:
    """Sent, no final report yet, not timed out."""
    return DeviceReport(device=name, final=False, failed=False)


def timed_out(name: str = "d") -> DeviceReport:
    return DeviceReport(device=name, final=False, failed=True, timed_out=True)


def named(*reports: DeviceReport) -> list[DeviceReport]:
    """The same reports with distinct device names."""
    return [DeviceReport(**{**r.__dict__, "device": f"d{i}"}) for i, r in enumerate(reports)]


def policy(**overrides: Any) -> RolloutPolicy:
    return RolloutPolicy(**overrides)


# -- reports needed ----------------------------------------------------------------------------


@pytest.mark.parametrize(("reported", "passes"), [(3, False), (4, True)])
def test_by_default_every_device_of_the_wave_must_report(reported: int, passes: bool) -> None:
    reports = named(*[ok()] * reported, *[silent()] * (4 - reported))

    gate = reports_gate(reports, policy())

    assert (gate.measured, gate.threshold, gate.passed) == (reported, 4, passes)


@pytest.mark.parametrize(("reported", "passes"), [(1, False), (2, True), (3, True)])
def test_a_count_of_reports_is_enough(reported: int, passes: bool) -> None:
    reports = named(*[ok()] * reported, *[silent()] * (5 - reported))

    gate = reports_gate(reports, policy(min_reports="2"))

    assert (gate.threshold, gate.passed) == (2, passes)


def test_a_count_larger_than_the_wave_needs_the_whole_wave() -> None:
    assert reports_gate(named(ok(), ok()), policy(min_reports="5")).threshold == 2
    assert not reports_gate(named(ok(), silent()), policy(min_reports="5")).passed


@pytest.mark.parametrize(("reported", "passes"), [(2, False), (3, True), (4, True)])
def test_a_share_of_reports_rounds_up(reported: int, passes: bool) -> None:
    """50% of 5 devices is 3 reports."""
    reports = named(*[ok()] * reported, *[silent()] * (5 - reported))

    gate = reports_gate(reports, policy(min_reports="50%"))

    assert (gate.threshold, gate.passed) == (3, passes)


def test_a_small_share_still_needs_one_report() -> None:
    assert policy(min_reports="1%").reports_needed(5) == 1
    assert not reports_gate(named(silent(), silent()), policy(min_reports="1%")).passed


def test_timed_out_devices_count_as_reports_and_the_gate_says_how_many() -> None:
    gate = reports_gate(named(ok(), timed_out(), timed_out()), policy())

    assert (gate.measured, gate.passed) == (3, True)
    assert gate.detail == "2 timed out"


@pytest.mark.parametrize(
    ("min_reports", "wave_size", "needed"),
    [(None, 0, 0), (None, 7, 7), ("3", 7, 3), ("3", 2, 2), ("10%", 5, 1), ("34%", 3, 2), ("100%", 7, 7)],
)
def test_reports_needed(min_reports: str | None, wave_size: int, needed: int) -> None:
    assert policy(min_reports=min_reports).reports_needed(wave_size) == needed


# -- failure ratio -------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "passes"), [(1, True), (2, True), (3, False)])
def test_the_failure_ratio_passes_at_the_threshold(failures: int, passes: bool) -> None:
    """Max 0.5 of 4 reports: 1 (below), 2 (at), 3 (above) failed."""
    reports = named(*[failed()] * failures, *[ok()] * (4 - failures))

    gate = failure_gate(reports, policy(max_failure_ratio=0.5))

    assert gate.measured == pytest.approx(failures / 4)
    assert gate.passed is passes


@pytest.mark.parametrize(("failures", "passes"), [(0, True), (1, False)])
def test_no_failure_allowed_by_default(failures: int, passes: bool) -> None:
    reports = named(*[failed()] * failures, *[ok()] * (3 - failures))

    assert failure_gate(reports, policy()).passed is passes


def test_a_one_third_ratio_is_met_by_one_failure_of_three() -> None:
    """1/3 is not exactly representable: the threshold 0.333333 is "at" it only within the tolerance."""
    reports = named(failed(), ok(), ok())

    assert failure_gate(reports, policy(max_failure_ratio=1 / 3)).passed
    assert not failure_gate(reports, policy(max_failure_ratio=0.33)).passed


def test_the_ratio_is_of_the_devices_that_reported() -> None:
    """1 failed, 1 committed, 2 silent: 1 of 2 reports failed."""
    gate = failure_gate(named(failed(), ok(), silent(), silent()), policy(max_failure_ratio=0.5))

    assert gate.measured == pytest.approx(0.5)
    assert gate.passed
    assert gate.detail == "1 of 2 reported failed"


def test_failures_alone_over_the_ratio_fail_before_the_others_report() -> None:
    """3 of 5 failed, 2 silent: even if both commit, 3/5 > 0.5."""
    reports = named(failed(), failed(), failed(), silent(), silent())

    gate = failure_gate(reports, policy(max_failure_ratio=0.5))
    verdict = evaluate_wave(reports, policy(max_failure_ratio=0.5), FLOOR)

    assert not gate.passed
    assert verdict.decision is Decision.FAILED
    assert not reports_gate(reports, policy()).passed  # it did not wait for the reports


def test_failures_at_the_ratio_of_the_whole_wave_wait_for_the_others() -> None:
    """2 of 4 failed, 2 silent, max 0.5: the silent ones may still commit and keep the wave at 0.5."""
    reports = named(failed(), failed(), silent(), silent())

    verdict = evaluate_wave(reports, policy(max_failure_ratio=0.5), FLOOR)

    assert verdict.decision is Decision.PENDING


def test_the_early_failure_reports_the_share_of_the_whole_wave_when_it_is_higher() -> None:
    """1 failed and reported, 3 silent, max 0: 1/1 of the reports, 1/4 of the wave; the larger is shown."""
    reports = named(failed(), silent(), silent(), silent())

    gate = failure_gate(reports, policy())

    assert gate.measured == pytest.approx(1.0)
    assert evaluate_wave(reports, policy(), FLOOR).decision is Decision.FAILED


def test_a_timed_out_device_is_a_failed_report() -> None:
    reports = named(timed_out(), ok(), ok(), ok())

    gate = failure_gate(reports, policy(max_failure_ratio=0.25))
    strict = failure_gate(reports, policy(max_failure_ratio=0.24))

    assert (gate.measured, gate.passed) == (pytest.approx(0.25), True)
    assert not strict.passed
    assert evaluate_wave(reports, policy(max_failure_ratio=0.24), FLOOR).decision is Decision.FAILED
    assert evaluate_wave(reports, policy(max_failure_ratio=0.25), FLOOR).decision is Decision.PASSED


def test_no_report_is_no_failure() -> None:
    gate = failure_gate(named(silent(), silent()), policy())

    assert (gate.measured, gate.passed) == (0.0, True)


# -- accuracy floor ------------------------------------------------------------------------------


@pytest.mark.parametrize(("accuracy", "passes"), [(0.899, False), (0.9, True), (0.901, True)])
def test_the_lowest_accuracy_on_a_device_against_the_floor(accuracy: float, passes: bool) -> None:
    reports = named(ok(accuracy=0.99), ok(accuracy=accuracy))

    gate = accuracy_gate(reports, 0.9)

    assert (gate.measured, gate.threshold, gate.passed) == (accuracy, 0.9, passes)


def test_an_accuracy_a_rounding_error_below_the_floor_is_at_it() -> None:
    assert accuracy_gate(named(ok(accuracy=0.9 - 1e-12)), 0.9).passed
    assert not accuracy_gate(named(ok(accuracy=0.9 - 1e-6)), 0.9).passed


def test_without_any_accuracy_the_accuracy_gate_passes() -> None:
    gate = accuracy_gate(named(failed(), silent()), 0.9)

    assert (gate.measured, gate.passed) == (None, True)


@pytest.mark.parametrize(
    ("min_accuracy", "max_accuracy_drop", "reference", "floor"),
    [
        (0.0, 0.02, 0.95, 0.93),  # the drop below the reference decides
        (0.94, 0.02, 0.95, 0.94),  # the absolute minimum decides
        (0.93, 0.02, 0.95, 0.93),  # both agree
        (0.0, 0.0, 0.95, 0.95),
        (0.0, 1.0, 0.95, 0.0),
        (0.5, 0.3, 0.7, 0.5),
    ],
)
def test_the_accuracy_floor_is_the_higher_of_the_minimum_and_the_reference_minus_the_drop(
    min_accuracy: float, max_accuracy_drop: float, reference: float, floor: float
) -> None:
    rules = policy(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop)

    assert rules.accuracy_gate(reference) == pytest.approx(floor, abs=1e-9)


def test_the_accuracy_floor_is_rounded_so_a_device_measuring_it_passes() -> None:
    """0.95 - 0.02 is 0.9299999999999999 in floating point; the floor is 0.93."""
    assert policy(max_accuracy_drop=0.02).accuracy_gate(0.95) == 0.93


@settings(max_examples=200)
@given(
    min_accuracy=st.floats(0, 1), max_accuracy_drop=st.floats(0, 1), reference=st.floats(0, 1),
)
def test_the_accuracy_floor_is_never_below_either_bound(
    min_accuracy: float, max_accuracy_drop: float, reference: float
) -> None:
    floor = policy(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop).accuracy_gate(reference)

    assert floor >= min_accuracy - 1e-6
    assert floor >= reference - max_accuracy_drop - 1e-6
    assert floor == pytest.approx(max(min_accuracy, reference - max_accuracy_drop), abs=1e-6)


# -- regression vs the replaced model -----------------------------------------------------------------


@pytest.mark.parametrize(("accuracy", "passes"), [(0.861, True), (0.86, True), (0.859, False)])
def test_the_largest_drop_below_the_replaced_model(accuracy: float, passes: bool) -> None:
    """Replaced model 0.87, budget 0.01: 0.861 (below), 0.86 (at: 0.010000000000000009), 0.859 (above)."""
    reports = named(ok(accuracy=0.95, previous_accuracy=0.95), ok(accuracy=accuracy, previous_accuracy=0.87))

    gate = regression_gate(reports, policy(max_regression=0.01))

    assert gate.measured == pytest.approx(0.87 - accuracy, abs=1e-6)
    assert gate.passed is passes


def test_a_model_better_than_the_one_it_replaces_is_no_regression() -> None:
    gate = regression_gate(named(ok(accuracy=0.95, previous_accuracy=0.9)), policy(max_regression=0.0))

    assert gate.measured == pytest.approx(-0.05)
    assert gate.passed


def test_regression_is_skipped_when_no_device_had_a_previous_model() -> None:
    gate = regression_gate(named(ok(accuracy=0.1), ok(accuracy=0.2)), policy(max_regression=0.0))

    assert (gate.measured, gate.passed) == (None, True)
    assert gate.detail == "no device had a model to compare with"


def test_regression_counts_only_devices_that_had_a_previous_model() -> None:
    reports = named(ok(accuracy=0.1), ok(accuracy=0.9, previous_accuracy=0.905))

    gate = regression_gate(reports, policy(max_regression=0.01))

    assert gate.measured == pytest.approx(0.005)
    assert gate.passed


# -- p95 ceiling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("p95_ms", "passes"), [(19.99, True), (20.0, True), (20.01, False)])
def test_the_highest_p95_on_a_device_against_the_ceiling(p95_ms: float, passes: bool) -> None:
    reports = named(ok(p95_ms=1.0), ok(p95_ms=p95_ms))

    gate = p95_gate(reports, policy(max_p95_ms=20.0))

    assert (gate.measured, gate.threshold, gate.passed) == (p95_ms, 20.0, passes)


def test_without_a_ceiling_any_p95_passes() -> None:
    gate = p95_gate(named(ok(p95_ms=1e9)), policy(max_p95_ms=None))

    assert (gate.measured, gate.threshold, gate.passed) == (1e9, None, True)


def test_without_a_measurement_the_p95_gate_passes() -> None:
    assert p95_gate(named(failed()), policy(max_p95_ms=1.0)).passed


# -- latency ratio -------------------------------------------------------------------------------


@pytest.mark.parametrize(("p95_ms", "passes"), [(14.99, True), (15.0, True), (15.01, False)])
def test_the_highest_latency_ratio_against_the_replaced_model(p95_ms: float, passes: bool) -> None:
    """Replaced model's p95 10 ms, max ratio 1.5."""
    reports = named(ok(p95_ms=5.0, previous_p95_ms=10.0), ok(p95_ms=p95_ms, previous_p95_ms=10.0))

    gate = latency_ratio_gate(reports, policy(max_latency_ratio=1.5))

    assert gate.measured == pytest.approx(p95_ms / 10.0)
    assert gate.passed is passes


@pytest.mark.parametrize(("p95_ms", "passes"), [(0.049, True), (0.05, True), (0.0501, False)])
def test_a_rise_within_the_slack_is_noise_whatever_its_ratio(p95_ms: float, passes: bool) -> None:
    """Replaced p95 0 ms... almost: 1 µs, so any real p95 is a huge ratio; the slack 0.049 ms above it."""
    reports = named(ok(p95_ms=0.0011, previous_p95_ms=0.001), ok(p95_ms=p95_ms + 0.001, previous_p95_ms=0.001))

    gate = latency_ratio_gate(reports, policy(max_latency_ratio=1.5, latency_slack_ms=0.05))

    assert gate.passed is passes
    if passes:
        assert (gate.measured, gate.detail) == (None, "every p95 within 0.05 ms of the replaced model's")
    else:
        assert gate.measured == pytest.approx(51.1)


def test_a_device_beyond_the_slack_is_judged_by_its_ratio_even_if_another_rose_more_within_it() -> None:
    reports = named(ok(p95_ms=0.04, previous_p95_ms=0.001), ok(p95_ms=16.0, previous_p95_ms=10.0))

    gate = latency_ratio_gate(reports, policy(max_latency_ratio=1.5, latency_slack_ms=0.05))

    assert (gate.measured, gate.passed) == (1.6, False)  # not the 40x of the device within the slack


def test_latency_ratio_is_skipped_without_a_previous_p95() -> None:
    gate = latency_ratio_gate(named(ok(p95_ms=1e6)), policy(max_latency_ratio=1.0))

    assert (gate.measured, gate.passed) == (None, True)
    assert gate.detail == "no device had a model to compare with"


def test_a_previous_p95_of_zero_is_no_comparison_not_a_division_by_zero() -> None:
    gate = latency_ratio_gate(named(ok(p95_ms=3.0, previous_p95_ms=0.0)), policy(max_latency_ratio=1.0))

    assert (gate.measured, gate.passed) == (None, True)


def test_a_previous_p95_of_zero_is_ignored_beside_real_ones() -> None:
    reports = named(ok(p95_ms=3.0, previous_p95_ms=0.0), ok(p95_ms=2.0, previous_p95_ms=1.0))

    gate = latency_ratio_gate(reports, policy(max_latency_ratio=1.5))

    assert (gate.measured, gate.passed) == (pytest.approx(2.0), False)


# -- the decision ----------------------------------------------------------------------------------


def test_an_empty_wave_passes() -> None:
    verdict = evaluate_wave([], policy(max_p95_ms=1.0), FLOOR)

    assert verdict.decision is Decision.PASSED
    assert verdict.failed_gates() == ()
    assert [g.name for g in verdict.gates] == [
        "reports", "failure_ratio", "accuracy", "regression", "p95_ms", "latency_ratio",
    ]


def test_a_wave_waits_for_its_reports() -> None:
    verdict = evaluate_wave(named(ok(accuracy=0.95), silent()), policy(), FLOOR)

    assert verdict.decision is Decision.PENDING
    assert [g.name for g in verdict.failed_gates()] == ["reports"]


def test_a_wave_passes_once_every_device_reported_within_its_thresholds() -> None:
    reports = named(ok(accuracy=0.95, p95_ms=5.0, previous_accuracy=0.95, previous_p95_ms=5.0), ok(accuracy=0.9))

    verdict = evaluate_wave(reports, policy(max_p95_ms=5.0), FLOOR)

    assert verdict.decision is Decision.PASSED
    assert all(g.passed for g in verdict.gates)


def test_a_wave_passes_with_enough_reports_while_others_are_silent() -> None:
    verdict = evaluate_wave(named(ok(), silent(), silent()), policy(min_reports="1"), FLOOR)

    assert verdict.decision is Decision.PASSED


@pytest.mark.parametrize(
    ("report", "rules"),
    [
        (ok(accuracy=0.8), policy()),
        (ok(accuracy=0.95, previous_accuracy=0.99), policy(max_regression=0.01)),
        (ok(p95_ms=30.0), policy(max_p95_ms=20.0)),
        (ok(p95_ms=30.0, previous_p95_ms=10.0), policy(max_latency_ratio=2.0)),
    ],
    ids=["accuracy", "regression", "p95", "latency_ratio"],
)
def test_a_value_over_a_limit_fails_the_wave_without_waiting(report: DeviceReport, rules: RolloutPolicy) -> None:
    verdict = evaluate_wave(named(report, silent(), silent()), rules, FLOOR)

    assert verdict.decision is Decision.FAILED
    assert "reports" in [g.name for g in verdict.failed_gates()]  # the others had not reported
    assert len(verdict.failed_gates()) == 2


def test_a_wave_of_timeouts_fails() -> None:
    verdict = evaluate_wave(named(timed_out(), timed_out()), policy(max_failure_ratio=0.5), FLOOR)

    assert verdict.decision is Decision.FAILED
    assert [g.name for g in verdict.failed_gates()] == ["failure_ratio"]


def test_failed_devices_within_the_ratio_pass_the_wave() -> None:
    verdict = evaluate_wave(named(failed(), ok(), ok(), ok()), policy(max_failure_ratio=0.25), FLOOR)

    assert verdict.decision is Decision.PASSED


def test_a_gate_describes_itself() -> None:
    assert GateResult("p95_ms", 12.5, 10.0, False, "highest on a device").describe() == (
        "p95_ms 12.5 vs 10: FAILED (highest on a device)"
    )
    assert GateResult("regression", None, 0.01, True).describe() == "regression - vs 0.01: passed"


_REPORT = st.builds(
    DeviceReport,
    device=st.just("d"),
    final=st.booleans(),
    failed=st.booleans(),
    timed_out=st.booleans(),
    accuracy=st.none() | st.floats(0, 1),
    p95_ms=st.none() | st.floats(0.01, 100),
    previous_accuracy=st.none() | st.floats(0, 1),
    previous_p95_ms=st.none() | st.floats(0, 100),
)


@settings(max_examples=300)
@given(reports=st.lists(_REPORT, max_size=8), ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       min_reports=st.sampled_from([None, "1", "50%"]))
def test_the_decision_agrees_with_the_gates(
    reports: list[DeviceReport], ratio: float, min_reports: str | None
) -> None:
    """PASSED only if every gate passed; PENDING only if nothing but the report count failed; a failure
    that would be one whatever the silent devices report is never PENDING."""
    rules = policy(max_failure_ratio=ratio, min_reports=min_reports, max_p95_ms=50.0)
    verdict = evaluate_wave(reports, rules, FLOOR)
    failing = [g.name for g in verdict.failed_gates()]

    if not reports:
        assert verdict.decision is Decision.PASSED
    elif verdict.decision is Decision.PASSED:
        assert failing == []
    elif verdict.decision is Decision.PENDING:
        assert "reports" in failing
        assert set(failing) <= {"reports", "failure_ratio"}
        assert sum(r.failed for r in reports if r.reported) / len(reports) <= ratio + 1e-9
    else:
        assert failing
    if reports and all(g.passed for g in verdict.gates):
        assert verdict.decision is Decision.PASSED


# -- waves and sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "waves"),
    [
        ("1,10%,50%,100%", ("1", "10%", "50%", "100%")),
        ("1, 10% ,50%", ("1", "10%", "50%", "100%")),  # a final 100% is added
        ("100%", ("100%",)),
        ("3", ("3", "100%")),
        ("1,,100%,", ("1", "100%")),  # empty parts are skipped
        ("01,10.0%,100.00%", ("1", "10%", "100%")),  # normalised
        ("2.5%", ("2.5%", "100%")),
        ("+2", ("2", "100%")),
    ],
)
def test_parse_waves(text: str, waves: tuple[str, ...]) -> None:
    assert parse_waves(text) == waves


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--waves needs at least one size, e.g. 1,100%"),
        (" , ,", "--waves needs at least one size"),
        ("0", "invalid wave size '0': use a count like 1 or a share like 10%"),
        ("1,0%", "invalid wave size '0%'"),
        ("1,101%", "invalid wave size '101%'"),
        ("-1", "invalid wave size '-1'"),
        ("1.5", "invalid wave size '1.5'"),
        ("ten", "invalid wave size 'ten'"),
        ("%", "invalid wave size '%'"),
        ("nan%", "invalid wave size 'nan%'"),
        ("1;10%", "invalid wave size '1;10%'"),
        (",".join(["1"] * (MAX_WAVES + 1)), f"--waves lists {MAX_WAVES + 1} waves; at most {MAX_WAVES}"),
    ],
)
def test_bad_waves_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(UserInputError) as caught:
        parse_waves(text)
    assert message in str(caught.value)


def test_at_most_max_waves_including_the_final_one() -> None:
    assert len(parse_waves(",".join(["1"] * (MAX_WAVES - 1)))) == MAX_WAVES
    assert len(parse_waves(",".join(["1"] * MAX_WAVES))) == MAX_WAVES + 1  # the added 100% is not counted


def test_parse_size_names_what_it_parses() -> None:
    with pytest.raises(UserInputError, match="invalid --min-reports size 'x'"):
        parse_size("x", "--min-reports")


@pytest.mark.parametrize(
    ("spec", "selected", "size"),
    [
        ("10%", 5, 1),  # a share rounds up
        ("10%", 10, 1),
        ("10%", 11, 2),
        ("50%", 5, 3),
        ("50%", 4, 2),
        ("100%", 7, 7),
        ("33.3333%", 3, 1),
        ("1%", 0, 0),
        ("3", 5, 3),
        ("3", 2, 2),  # never more than selected
        ("1", 0, 0),
        ("16.1%", 1000, 161),  # 1000 * 16.1 / 100 is 161.00000000000003: not 162
        ("64.4%", 1000, 644),  # 644.0000000000001: not 645
        ("64.6%", 1000, 646),  # 645.9999999999999
    ],
)
def test_size_of(spec: str, selected: int, size: int) -> None:
    assert size_of(spec, selected) == size


_SPEC = st.one_of(
    st.integers(1, 50).map(str),
    st.floats(0.01, 100, allow_nan=False).map(lambda share: parse_size(f"{share}%")),
)


@settings(max_examples=300)
@given(spec=_SPEC, selected=st.integers(0, 500))
def test_a_size_is_within_the_selection_and_a_share_is_rounded_up(spec: str, selected: int) -> None:
    size = size_of(spec, selected)

    assert 0 <= size <= selected
    if spec.endswith("%"):
        exact = selected * float(spec[:-1]) / 100
        assert exact - 1e-6 <= size < exact + 1
        if selected:
            assert size >= 1  # a share of a non-empty selection is never nobody
    else:
        assert size == min(selected, int(spec))


@settings(max_examples=300)
@given(spec=_SPEC, selected=st.integers(0, 500), more=st.integers(0, 100))
def test_a_size_grows_with_the_selection(spec: str, selected: int, more: int) -> None:
    assert size_of(spec, selected) <= size_of(spec, selected + more)


@settings(max_examples=300)
@given(low=st.floats(0.01, 100), high=st.floats(0.01, 100), selected=st.integers(0, 500))
def test_a_larger_share_is_never_fewer_devices(low: float, high: float, selected: int) -> None:
    low, high = sorted((low, high))
    assert size_of(parse_size(f"{low}%"), selected) <= size_of(parse_size(f"{high}%"), selected)


@settings(max_examples=300)
@given(specs=st.lists(_SPEC, min_size=1, max_size=MAX_WAVES), selected=st.integers(0, 500))
def test_cumulative_wave_sizes_end_with_every_device(specs: list[str], selected: int) -> None:
    """Sizes are cumulative (the engine never shrinks a wave below what earlier ones reached): they never
    decrease, never exceed the selection, and the last wave reaches every selected device."""
    waves = parse_waves(",".join(specs))
    reached = 0
    for spec in waves:
        size = max(size_of(spec, selected), reached)
        assert reached <= size <= selected
        reached = size
    assert waves[-1] == "100%"
    assert reached == selected


# -- the policy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_failure_ratio", "min_accuracy", "max_accuracy_drop", "max_regression"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_a_ratio_may_be_0_or_1(name: str, value: float) -> None:
    assert getattr(policy(**{name: value}), name) == value


@pytest.mark.parametrize("name", ["max_failure_ratio", "min_accuracy", "max_accuracy_drop", "max_regression"])
@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan])
def test_a_ratio_outside_0_to_1_is_refused(name: str, value: float) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UserInputError, match=f"^{flag} must be between 0 and 1"):
        policy(**{name: value})


@pytest.mark.parametrize(
    ("name", "value", "flag"),
    [
        ("max_p95_ms", 0.0, "--max-p95-ms"),
        ("max_p95_ms", -1.0, "--max-p95-ms"),
        ("max_latency_ratio", 0.0, "--max-latency-ratio"),
        ("max_latency_ratio", -0.5, "--max-latency-ratio"),
        ("report_timeout_s", 0.0, "--report-timeout"),
        ("report_timeout_s", -1.0, "--report-timeout"),
    ],
)
def test_a_limit_that_must_be_positive_is_refused_at_0_and_below(name: str, value: float, flag: str) -> None:
    with pytest.raises(UserInputError, match=f"^{flag} must be positive"):
        policy(**{name: value})


@pytest.mark.parametrize(
    ("name", "flag"),
    [("max_p95_ms", "--max-p95-ms"), ("max_latency_ratio", "--max-latency-ratio"),
     ("report_timeout_s", "--report-timeout")],
)
def test_a_limit_that_is_not_a_number_is_refused(name: str, flag: str) -> None:
    """NaN compares false with everything: accepted, it would fail every gate (or never time out)."""
    with pytest.raises(UserInputError, match=f"^{flag} must be positive"):
        policy(**{name: math.nan})


@pytest.mark.parametrize("value", [-0.001, math.inf, math.nan])
def test_a_latency_slack_that_is_not_zero_or_positive_is_refused(value: float) -> None:
    with pytest.raises(UserInputError, match="^--latency-slack-ms must be zero or positive"):
        policy(latency_slack_ms=value)


def test_a_policy_stored_before_the_slack_existed_reads_with_the_default() -> None:
    stored = {k: v for k, v in policy(latency_slack_ms=0.2).to_json().items() if k != "latency_slack_ms"}
    assert RolloutPolicy.from_json(stored).latency_slack_ms == DEFAULT_LATENCY_SLACK_MS



@pytest.mark.parametrize(
    ("name", "value"), [("max_p95_ms", 1e-6), ("max_p95_ms", None), ("max_latency_ratio", 1e-6),
                        ("report_timeout_s", 1e-6)],
)
def test_a_limit_just_above_0_is_accepted(name: str, value: float | None) -> None:
    assert getattr(policy(**{name: value}), name) == value


def test_the_default_policy() -> None:
    rules = RolloutPolicy()

    assert rules.waves == ("1", "100%")
    assert rules.on_failure is OnFailure.ROLLBACK
    assert rules.min_reports is None


_POLICY = st.builds(
    RolloutPolicy,
    waves=st.lists(_SPEC, min_size=1, max_size=5).map(lambda specs: parse_waves(",".join(specs))),
    min_reports=st.none() | _SPEC,
    max_failure_ratio=st.floats(0, 1),
    min_accuracy=st.floats(0, 1),
    max_accuracy_drop=st.floats(0, 1),
    max_regression=st.floats(0, 1),
    max_p95_ms=st.none() | st.floats(0.001, 1e6),
    max_latency_ratio=st.floats(0.001, 100),
    report_timeout_s=st.floats(0.001, 1e7),
    on_failure=st.sampled_from(OnFailure),
)


@settings(max_examples=200)
@given(rules=_POLICY)
def test_a_policy_survives_its_json_round_trip(rules: RolloutPolicy) -> None:
    stored = json.loads(json.dumps(rules.to_json()))  # what the database column holds

    assert RolloutPolicy.from_json(stored) == rules
    assert stored["on_failure"] == rules.on_failure.value
    assert stored["waves"] == list(rules.waves)


def test_a_stored_policy_ignores_keys_it_does_not_know_and_defaults_missing_ones() -> None:
    stored = {**policy(waves=("1", "100%"), on_failure=OnFailure.PAUSE).to_json(), "added_later": 3}
    del stored["max_regression"]

    rules = RolloutPolicy.from_json(stored)

    assert rules == policy(waves=("1", "100%"), on_failure=OnFailure.PAUSE)


def test_a_stored_policy_is_validated_again() -> None:
    with pytest.raises(UserInputError, match="--max-failure-ratio"):
        RolloutPolicy.from_json({**policy().to_json(), "max_failure_ratio": 2.0})
    with pytest.raises(ValueError):
        RolloutPolicy.from_json({**policy().to_json(), "on_failure": "explode"})


@pytest.mark.parametrize("waves", [(), ("1",), ("1", "50"), ("0", "100%"), ("10.0%", "100%"), ("many", "100%")])
def test_a_policy_refuses_waves_not_normalised_or_not_ending_at_every_device(waves: tuple[str, ...]) -> None:
    with pytest.raises(UserInputError):
        RolloutPolicy(waves=waves)


def test_a_policy_refuses_a_bad_min_reports() -> None:
    with pytest.raises(UserInputError, match="--min-reports"):
        RolloutPolicy(min_reports="none")
