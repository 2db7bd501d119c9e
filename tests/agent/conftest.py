"""Fixtures for the agent's unit tests: fresh keys and a harness around a real Updater in ``tmp_path``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.service import AgentService
from agent.updater import Updater
from tests.agent.fakes import Harness, ScriptedTrial
from tests.agent.material import NOW, Keys, make_config
from tests.agent.serving_material import ServedModels, build_served_models


@pytest.fixture
def keys() -> Keys:
    return Keys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())


@pytest.fixture
def harness(tmp_path: Path, keys: Keys) -> Iterator[Harness]:
    data_dir = tmp_path / "agent"
    h = Harness(keys=keys, data_dir=data_dir, config=make_config(data_dir, keys))
    yield h
    # No test may leave the updater half-way without saying so: the record on disk matches memory.
    if h.record_path.exists():
        assert h.updater.records.load_record() == h.updater.record


@pytest.fixture(scope="session")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> ServedModels:
    """Two real small .tflite classifiers (different weights) and an eval set, built once per session."""
    return build_served_models(tmp_path_factory.mktemp("served"))


@pytest.fixture
def service(tmp_path: Path, keys: Keys) -> Iterator[AgentService]:
    """A whole agent service fed by hand (``service.handle``): no broker listens, the trial is scripted, the
    clock is the signed fixtures' (test_service_dispatch.py has its own, with the real trial)."""
    config = make_config(tmp_path / "agent", keys, broker_url="mqtt://127.0.0.1:9")  # nobody listens
    svc = AgentService(
        config, updater_factory=lambda cfg, reporter: Updater(cfg, reporter, start_trial=ScriptedTrial(),
                                                              clock=lambda: NOW)
    )
    yield svc
    svc.link.stop()
