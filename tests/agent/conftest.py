"""Fixtures for the agent's unit tests: fresh keys and a harness around a real Updater in ``tmp_path``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.agent.fakes import Harness
from tests.agent.material import Keys, make_config


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
