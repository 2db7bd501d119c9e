"""Hostile model files, genuinely signed, through the real trial child: the model itself is the attack.

A release key holder can ship a broken or crafted model (a bad build, a
compromised pipeline): its metadata verifies, so the agent trusts the release
and downloads it, but the bytes never serve. The trial loads and runs them in
a child process (``shared/trial.py``) with a memory limit, refusing up front a
tensor that cannot fit, and a time limit; whatever the model does, the
deployment ends rolled back with the reason, and the committed model, which
kept serving throughout, stays active. Each case starts with a real model
(v1) committed and the hostile release accepted.
"""

from __future__ import annotations

import re

from shared.interpreter import runtime_info
from shared.messages import Gates, UpdateState
from tests.attacks.harness import Attack, AttackHarness, RealTrial, assert_attack_refused
from tests.attacks.hostile_models import ModelFiles

HANG_TIMEOUT_S = 3.0


def accepted(h: AttackHarness, model: bytes, files: ModelFiles) -> str:
    """Offer a genuine release of ``model``: trusted (the metadata is fine), its bytes on their way."""
    release = h.release(version=2, model=model, eval_bytes=files.eval_set, gates=Gates(min_accuracy=0.0))
    h.updater.offer(release.desired)
    return release.deployment_id


def run_to_the_end(deployment_id: str) -> Attack:
    def trial(h: AttackHarness) -> None:
        _, state, _ = h.settle(deployment_id)
        assert state is UpdateState.ROLLED_BACK

    return trial


def load_error(detail: str) -> str:
    info = runtime_info()
    return f"load_error: {info.name} {info.version} cannot load model.tflite: {detail}"


def test_truncated_model(real_harness: AttackHarness, model_files: ModelFiles) -> None:
    deployment = accepted(real_harness, model_files.truncated, model_files)
    assert_attack_refused(real_harness, run_to_the_end(deployment),
                          load_error("The model is not a valid Flatbuffer buffer"))


def test_random_bytes_as_a_model(real_harness: AttackHarness, model_files: ModelFiles) -> None:
    deployment = accepted(real_harness, model_files.random, model_files)
    assert_attack_refused(real_harness, run_to_the_end(deployment),
                          load_error("The model is not a valid Flatbuffer buffer"))


def test_huge_tensor_allocation(real_harness: AttackHarness, model_files: ModelFiles) -> None:
    """A 2 KiB file asking for a 4 GiB tensor: refused before anything is allocated, as out of memory
    (not a load error, which would count against the runtime), naming the bound."""
    deployment = accepted(real_harness, model_files.huge_tensor, model_files)
    assert_attack_refused(real_harness, run_to_the_end(deployment), re.compile(
        r"oom: model\.tflite has a tensor of 4,096 MiB, more than the [\d,]+ MiB this trial may use "
        r"\(limit 1843 MiB: 90% of the 2048 MiB available now\)"))


def test_unknown_custom_op(real_harness: AttackHarness, model_files: ModelFiles) -> None:
    deployment = accepted(real_harness, model_files.custom_op, model_files)
    assert_attack_refused(real_harness, run_to_the_end(deployment),
                          load_error("Encountered unresolved custom op: Erfinv.\nSee instructions: "
                                     "https://www.tensorflow.org/lite/guide/ops_custom Node number 0 (Erfinv) "
                                     "failed to prepare."))


def test_model_that_hangs(real_harness: AttackHarness, model_files: ModelFiles) -> None:
    """One invoke runs for hours: the child is killed at the trial's time limit; the agent's loop, which
    only polls it, was free throughout."""
    trial = real_harness.trial
    assert isinstance(trial, RealTrial)
    deployment = accepted(real_harness, model_files.hanging, model_files)

    def hang(h: AttackHarness) -> None:
        trial.timeout, usual = HANG_TIMEOUT_S, trial.timeout
        try:
            run_to_the_end(deployment)(h)
        finally:
            trial.timeout = usual

    assert_attack_refused(real_harness, hang, f"trial failed: trial timed out after {HANG_TIMEOUT_S:g} s")
