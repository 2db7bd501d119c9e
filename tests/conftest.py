"""Fixtures shared by every tier: a private Mosquitto and the digits model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[object]:
    """A real Mosquitto (MQTT 5) on a free port, for this test only."""
    from server.broker import Mosquitto

    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def digits_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A digits CNN trained once per session: (digits.keras, digits-eval.npz)."""
    from server.compress.digits import write_demo_inputs

    return write_demo_inputs(tmp_path_factory.mktemp("digits"))
