"""Server-side fixtures: a data directory with the digits model and its x86-64 variant already built.

Building a variant (TFLite conversion + host evaluation) takes a couple of
seconds, so it happens once per session in a template data directory; each
test gets its own copy, where ``start_rollout`` only has to sign releases.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.catalog import add_model, resolve_version
from server.db.models import Profile
from server.releases import build_artifact
from server.setup import Workspace, init_data_dir, open_workspace

TEMPLATE_MODEL = "digits"
TEMPLATE_PROFILE = "x86-64"  # the variant built in the template; other profiles convert on demand


@pytest.fixture(scope="session")
def template_data_dir(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Path:
    """An initialised data directory holding ``digits:1`` and its x86-64 artifact (read-only: copy it)."""
    root = tmp_path_factory.mktemp("template") / "data"
    workspace = init_data_dir(root)
    try:
        add_model(workspace.db, workspace.blobs, TEMPLATE_MODEL, *digits_inputs)
        with workspace.db.session() as session:
            version = resolve_version(session, TEMPLATE_MODEL)
            profile = session.get(Profile, TEMPLATE_PROFILE)
            assert profile is not None
            build_artifact(session, workspace.blobs, version, profile)
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
