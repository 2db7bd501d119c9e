"""The simulated device's runtime stand-in: trials that report configured numbers, the same devices failing."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from agent.simulate.runtime import RUNTIME_NAME, SimulatedRuntime
from shared.errors import ConfigError
from shared.trial import TrialRequest


def request(tmp_path: Path, previous: bool = False) -> TrialRequest:
    return TrialRequest(model_path=str(tmp_path / "b" / "model.tflite"), eval_path=str(tmp_path / "b" / "eval.npz"),
                        threads=2, runtime="", warmup_runs=1, warmup_seconds=0.0, min_runs=20, min_seconds=0.1,
                        previous_model_path=str(tmp_path / "a" / "model.tflite") if previous else None)


def test_a_trial_reports_the_configured_numbers_with_a_little_jitter(tmp_path: Path) -> None:
    runtime = SimulatedRuntime(p50_ms=4.0, p95_ms=6.0, accuracy=0.9, jitter=0.05)
    result = runtime.result(request(tmp_path), random.Random(1))
    assert result.ok and result.benchmark is not None and result.accuracy is not None
    assert result.benchmark.runtime == RUNTIME_NAME
    assert 3.8 <= result.benchmark.p50_ms <= 4.2 and 5.7 <= result.benchmark.p95_ms <= 6.3
    assert abs(result.accuracy - 0.9) <= 0.005
    assert result.previous_benchmark is None and not result.paired  # a first install compares with nothing


def test_a_replacing_trial_also_measures_the_replaced_model(tmp_path: Path) -> None:
    result = SimulatedRuntime(accuracy=0.8).result(request(tmp_path, previous=True), random.Random(2))
    assert result.previous_benchmark is not None and result.previous_accuracy is not None and result.paired
    assert result.benchmark is not None
    assert result.benchmark.p95_ms / result.previous_benchmark.p95_ms < 1.2  # within any latency-ratio gate


def test_the_failing_fraction_is_the_same_devices_every_time() -> None:
    runtime = SimulatedRuntime(fail_fraction=0.2)
    ids = [f"d-{i:010x}" for i in range(2000)]
    failing = {i for i in ids if runtime.fails(i)}
    assert failing == {i for i in ids if SimulatedRuntime(fail_fraction=0.2).fails(i)}
    assert 300 < len(failing) < 500
    assert not any(SimulatedRuntime().fails(i) for i in ids)


def test_a_failing_device_reports_an_accuracy_far_too_low(tmp_path: Path) -> None:
    runtime = SimulatedRuntime(accuracy=0.95, fail_fraction=1.0)
    result = runtime.starter("d-0000000001")(request(tmp_path)).poll()
    assert result is not None and result.ok and result.accuracy is not None and result.accuracy < 0.5


def test_without_an_accuracy_an_unreadable_manifest_fails_the_trial_instead_of_the_loop(tmp_path: Path) -> None:
    result = SimulatedRuntime().starter("d-0000000001")(request(tmp_path)).poll()
    assert result is not None and not result.ok and "simulated trial" in result.error


def test_a_trial_takes_the_configured_time(tmp_path: Path) -> None:
    trial = SimulatedRuntime(accuracy=0.9, trial_seconds=0.2).starter("d-0000000001")(request(tmp_path))
    assert trial.poll() is None
    time.sleep(0.25)
    assert trial.poll() is not None


@pytest.mark.parametrize("settings", [
    {"p50_ms": 0.0}, {"p50_ms": 5.0, "p95_ms": 4.0}, {"accuracy": 1.5}, {"fail_fraction": -0.1},
    {"trial_seconds": -1.0}, {"jitter": 1.0},
])
def test_bad_settings_are_config_errors(settings: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SimulatedRuntime(**settings)  # type: ignore[arg-type]
