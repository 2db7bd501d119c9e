"""Fixtures of the attack suite: an agent harness with a scripted trial, one with the real trial child and
real models, and the hostile model files (built once per session)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.slots import SlotStore
from shared.messages import Gates
from tests.agent.conftest import keys  # noqa: F401 (a fixture: fresh release, director and attacker keys)
from tests.agent.material import Keys, make_config
from tests.attacks.harness import AttackHarness, RealTrial
from tests.attacks.hostile_models import ModelFiles, build_model_files

TRIAL_TIMEOUT_S = 120.0  # generous: a busy 2-core CI box; the hanging model's test lowers it


def _close(h: AttackHarness) -> None:
    h.close()
    # No test may leave the updater half-way without saying so: the record on disk matches memory.
    if h.record_path.exists():
        assert h.updater.records.load_record() == h.updater.record


@pytest.fixture
def harness(tmp_path: Path, keys: Keys) -> Iterator[AttackHarness]:  # noqa: F811
    """The agent with a scripted trial: metadata, chunk and wire attacks."""
    data_dir = tmp_path / "agent"
    h = AttackHarness(keys=keys, data_dir=data_dir, config=make_config(data_dir, keys))
    yield h
    _close(h)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_model_files(tmp_path_factory.mktemp("hostile-models"))


@pytest.fixture
def real_harness(tmp_path: Path, keys: Keys, model_files: ModelFiles) -> Iterator[AttackHarness]:  # noqa: F811
    """The agent with the real trial child, a real model (v1) committed and real good models to come."""
    data_dir = tmp_path / "agent"
    h = AttackHarness(
        keys=keys, data_dir=data_dir, config=make_config(data_dir, keys),
        trial=RealTrial(TRIAL_TIMEOUT_S),  # type: ignore[arg-type]
        good_model=model_files.good_v2, good_eval=model_files.eval_set,
        good_gates=Gates(min_accuracy=0.0),  # the tiny models guess; the trial's other failures are the point
    )
    first = h.release(version=1, model=model_files.good_v1, eval_bytes=model_files.eval_set,
                      gates=Gates(min_accuracy=0.0))
    h.updater.offer(first.desired)
    h.settle(first.deployment_id)
    assert SlotStore(data_dir).active_deployment() == first.deployment_id, h.reporter.events
    h.reporter.clear()
    yield h
    _close(h)
