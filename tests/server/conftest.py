"""Server-side fixtures: a data directory with the digits model already built for the usual profiles.

Building variants (TFLite conversion + host measurement) takes seconds, so it
happens once per session in a template data directory, with a short host
benchmark; each test gets its own copy, where ``start_rollout`` only signs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.catalog import add_model
from server.compression import build_profiles
from server.setup import Workspace, init_data_dir, open_workspace
from shared.benchmark import BenchmarkSettings

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


@pytest.fixture
def workspace(tmp_path: Path, template_data_dir: Path) -> Iterator[Workspace]:
    """A private copy of the template data directory, opened; its engine is disposed afterwards."""
    root = tmp_path / "data"
    shutil.copytree(template_data_dir, root)
    opened = open_workspace(root)
    yield opened
    opened.db.close()
