"""The trial runs beside the agent's loop, within a memory limit derived from the device (issue 6.8, 6.11)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.memory import FLOOR_BYTES, UNKNOWN_LIMIT_BYTES, available_memory_bytes, trial_memory_budget
from agent.states import State
from agent.trials import replaced_model
from shared.messages import Gates, PreviousModel, UpdateState
from shared.trial import TrialResult
from tests.agent.fakes import HAPPY, UNTIL_TRIAL, Harness, assert_idle, install_first
from tests.agent.material import BENCHMARK

MiB = 1024 * 1024

# -- off the loop ---------------------------------------------------------------------------------


def test_a_running_trial_leaves_the_updater_free_and_ends_on_a_later_tick(harness: Harness) -> None:
    h = harness
    install_first(h)
    release, newer = h.release(version=2), h.release(version=3)
    h.trial.hold = True

    h.install(release)  # returns while the trial child still runs
    started = len(h.trial.requests)
    assert h.updater.state is State.TRIAL
    assert h.reporter.states() == UNTIL_TRIAL
    for _ in range(3):
        h.updater.tick()  # polls the child; nothing blocks
    h.updater.offer(newer.desired)  # messages are still handled meanwhile
    assert h.updater.pending == newer.desired
    assert len(h.trial.requests) == started  # one child, polled, not started again

    h.trial.hold = False
    h.updater.tick()
    h.pump()
    assert h.reporter.states(release.deployment_id) == HAPPY
    assert h.reporter.states(newer.deployment_id) == HAPPY
    assert_idle(h)


def test_stopping_the_agent_ends_a_running_trial_and_a_restart_rolls_it_back(harness: Harness) -> None:
    h = harness
    first = install_first(h)
    h.trial.hold = True
    h.install(h.release(version=2))
    (handle,) = h.trial.handles[-1:]

    h.updater.stop()
    assert handle.cancelled
    h.trial.hold = False
    h.restart().resume()
    assert h.reporter.final()[1:] == (UpdateState.ROLLED_BACK, "agent restarted during trial")
    assert h.active_model_bytes() == first.model


# -- the memory limit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "configured_mb", "available", "limit", "why"),
    [
        (1024 * MiB, 0, 8192 * MiB, 1024 * MiB, "the profile's RAM limit of 1024 MiB"),
        (1024 * MiB, 0, 900 * MiB, 810 * MiB, "90% of the 900 MiB available now"),
        (1024 * MiB, 512, 8192 * MiB, 512 * MiB, "the agent's trial.memory_limit_mb of 512 MiB"),
        (None, 0, 2000 * MiB, 1800 * MiB, "90% of the 2000 MiB available now"),
        (None, 0, None, UNKNOWN_LIMIT_BYTES, "a default of 4096 MiB"),
        (None, 0, 10 * MiB, FLOOR_BYTES, "90% of the 10 MiB available now"),
    ],
)
def test_the_trial_limit_is_the_smallest_known_bound(
    profile: int | None, configured_mb: int, available: int | None, limit: int, why: str
) -> None:
    budget = trial_memory_budget(profile, configured_mb, available)
    assert budget.limit_bytes == limit
    assert why in budget.why


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2048000 kB\nMemFree:          100000 kB\nMemAvailable:     812000 kB\n")
    assert available_memory_bytes(meminfo) == 812000 * 1024
    assert available_memory_bytes(tmp_path / "missing") is None
    meminfo.write_text("MemAvailable: lots\n")
    assert available_memory_bytes(meminfo) is None


def test_the_trial_gets_the_profile_limit_and_an_oom_says_which_bound_applied(harness: Harness) -> None:
    h = harness
    install_first(h)
    h.available_memory = 1500 * MiB
    h.restart()
    release = h.release(version=2, max_ram_bytes=1024 * MiB)  # a Pi 4's profile
    h.trial.result = TrialResult(
        ok=False, oom=True, error="model.tflite has a tensor of 4,096 MiB, more than the 980 MiB this trial may use"
    )

    h.install(release)

    assert h.trial.requests[-1].memory_limit_mb == 1024
    assert h.reporter.states() == [*UNTIL_TRIAL, "rolled_back"]
    assert h.reporter.final()[2] == (
        "oom: model.tflite has a tensor of 4,096 MiB, more than the 980 MiB this trial may use "
        "(limit 1024 MiB: the profile's RAM limit of 1024 MiB)"
    )


def test_a_small_device_gets_what_it_has_not_the_profile_limit(harness: Harness) -> None:
    h = harness
    h.available_memory = 600 * MiB
    h.restart()
    h.install(h.release(version=1, max_ram_bytes=2048 * MiB))
    assert h.trial.requests[-1].memory_limit_mb == 540
    assert h.reporter.states() == HAPPY


# -- the replaced model in the same trial ---------------------------------------------------------


def test_the_committed_model_is_measured_beside_the_candidate(harness: Harness) -> None:
    h = harness
    first = install_first(h)
    assert h.trial.requests[-1].previous_model_path is None  # the first install replaces nothing
    h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.9, samples=120,
                                 previous_benchmark=BENCHMARK, previous_accuracy=0.92)

    h.install(h.release(version=2))

    request = h.trial.requests[-1]
    assert request.model_path == str(h.slot_file("b")) and request.previous_model_path == str(h.slot_file("a"))
    (call,) = h.reporter.telemetry_calls
    assert call[4] == PreviousModel(model="kws", version=1, sha256=first.model_sha, accuracy=0.92,
                                    p50_ms=BENCHMARK.p50_ms, p95_ms=BENCHMARK.p95_ms)


def test_the_slot_on_trial_is_never_its_own_replaced_model(harness: Harness) -> None:
    h = harness
    install_first(h)
    assert replaced_model(h.updater.slots, "a") is None  # the active slot itself
    replaced = replaced_model(h.updater.slots, "b")
    assert replaced is not None and replaced.path == h.slot_file("a")


def test_an_unreadable_committed_manifest_means_no_comparison_not_a_failed_trial(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    install_first(h)
    (h.data_dir / "slots" / "a" / "manifest.json").write_text("{not json")
    h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.9, samples=120)
    caplog.set_level(logging.WARNING, logger="agent.trials")

    h.install(h.release(version=2, gates=Gates(min_accuracy=0.5, max_regression=0.0)))

    assert h.trial.requests[-1].previous_model_path is None
    assert h.reporter.states() == HAPPY
    assert h.reporter.telemetry_calls[0][4] is None
    assert "the committed model is unreadable" in caplog.text


def test_a_replaced_model_that_could_not_run_is_logged_and_skipped(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    install_first(h)
    h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.5, samples=120,
                                 previous_error="benchmark failed: cannot reshape array of size 4 into shape (1,7)")
    caplog.set_level(logging.WARNING, logger="agent.trials")

    h.install(h.release(version=2, gates=Gates(min_accuracy=0.5, max_regression=0.0, max_latency_ratio=1.0)))

    assert h.reporter.states() == HAPPY  # only the absolute gates applied
    assert h.reporter.telemetry_calls[0][4] is None
    assert ("could not measure the replaced model kws v1 on this eval set, so the gates do not compare with it: "
            "benchmark failed: cannot reshape array of size 4 into shape (1,7)") in caplog.text
