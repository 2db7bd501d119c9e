"""Server-side fixtures: a data directory with the digits model already built for the usual profiles.

Building variants (TFLite conversion + host measurement) takes seconds, so it
happens once per session in a template data directory, with a short host
benchmark; each test gets its own copy, where ``start_rollout`` only signs.
``workspace`` runs its tests on both back-ends (``db_backend``): on PostgreSQL
the copy's registry is a database cloned from a template database that holds
exactly the template directory's rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from server.catalog import add_model
from server.compression import build_profiles
from server.db import sqlite_url
from server.db_location import record_database_url
from server.paths import DataDir
from server.setup import Workspace, init_data_dir, open_workspace
from shared.benchmark import BenchmarkSettings

if TYPE_CHECKING:
    from tests.pg import PostgresServer

TEMPLATE_MODEL = "digits"
QUICK_BENCHMARK = BenchmarkSettings(warmup_runs=1, warmup_seconds=0.01, min_runs=20, min_seconds=0.05)
# x86-64 pinned to one recipe so tests can name its variant; the others run auto
TEMPLATE_BUILDS = {"x86-64": "dynamic_range", "rpi4": "auto", "jetson-nano": "auto"}


@pytest.fixture(scope="session")
def template_data_dir(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Path:
    """An initialised data directory holding ``digits:1`` built for TEMPLATE_BUILDS (read-only: copy it)."""
    root = tmp_path_factory.mktemp("template") / "data"
    workspace = init_data_dir(root)
    try:
        add_model(workspace.db, workspace.blobs, TEMPLATE_MODEL, *digits_inputs)
        for profile, recipe in TEMPLATE_BUILDS.items():
            (report,) = build_profiles(workspace.db, workspace.blobs, TEMPLATE_MODEL, [profile], recipe=recipe,
                                       settings=QUICK_BENCHMARK, ship=recipe != "auto")  # a pinned recipe ships
            assert report.chosen is not None, report
    finally:
        workspace.db.close()  # the last connection checkpoints the WAL, so a file copy is complete
    return root


@pytest.fixture(scope="session")
def pg_template(template_data_dir: Path, postgres: PostgresServer) -> str:
    """A PostgreSQL database holding what the template data directory's SQLite file holds (clone it)."""
    from tests.registry_copy import copy_registry

    name = "edgefleet_template"
    copy_registry(sqlite_url(template_data_dir), postgres.create_database(name))
    return name


def copy_data_dir(template_data_dir: Path, root: Path, db_backend: str, request: pytest.FixtureRequest) -> Path:
    """A private copy of the template data directory; on PostgreSQL its registry is a fresh clone of
    ``pg_template``, recorded in the copy's server.json (and no SQLite file is left to be used by mistake)."""
    shutil.copytree(template_data_dir, root)
    if db_backend == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.create_database(template=request.getfixturevalue("pg_template"))
        for leftover in root.glob("edgefleet.db*"):
            leftover.unlink()
        record_database_url(DataDir(root), url)
    return root


@pytest.fixture
def workspace(tmp_path: Path, template_data_dir: Path, db_backend: str,
              request: pytest.FixtureRequest) -> Iterator[Workspace]:
    """A private copy of the template data directory, opened; its engine is disposed afterwards."""
    opened = open_workspace(copy_data_dir(template_data_dir, tmp_path / "data", db_backend, request))
    yield opened
    opened.db.close()
