"""End-to-end fixtures: a representative set of end-to-end tests runs on both registry back-ends.

A module builds its fleet with ``fleet_init_args``; its tests marked ``both_backends`` run twice,
``[sqlite]`` then ``[postgresql]`` (one fleet per back-end per module), the others on SQLite only:
a whole end-to-end module twice would cost minutes the suite does not have. ``edgefleet init --db-url``
records the database in the data directory, so every later command and the server use it unasked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.compression import BENCHMARK_SECONDS_VARIABLE
from tests.conftest import BACKENDS


@pytest.fixture(scope="session", autouse=True)
def quick_host_benchmark() -> Iterator[None]:
    """Every ``edgefleet`` process these tests start times candidates on the host for 0.2 s, not 1 s: the tests
    assert what a build and a rollout do, not how fast a variant is (the agents' trials keep their settings)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BENCHMARK_SECONDS_VARIABLE, "0.2")
        yield


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fleet_backend" in metafunc.fixturenames:
        backends = BACKENDS if metafunc.definition.get_closest_marker("both_backends") else BACKENDS[:1]
        metafunc.parametrize("fleet_backend", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def fleet_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def fleet_init_args(fleet_backend: str, request: pytest.FixtureRequest) -> tuple[str, ...]:
    """What ``edgefleet init`` needs besides --data-dir to put the fleet's registry on its back-end."""
    if fleet_backend == "sqlite":
        return ()
    return ("--db-url", request.getfixturevalue("postgres").create_database())
