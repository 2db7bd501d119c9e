"""``edgefleet model list``: every model, its versions, and the recipe each built profile ships."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from server.db.models import Artifact
from server.setup import Workspace
from tests.server.test_cli_errors import assert_ok, model_add, run


def test_model_list_json(workspace: Workspace, digits_inputs: tuple[Path, Path]) -> None:
    data = workspace.data_dir.root
    assert_ok(model_add(data, *digits_inputs))  # digits:2, not built for any profile
    with workspace.db.session() as session:
        shipped = {a.profile_name: (a.recipe, a.quantization, a.size_bytes)
                   for a in session.scalars(select(Artifact)).all()}

    [model] = json.loads(assert_ok(run("model", "list", "--data-dir", data, "--json")))

    assert model["model"] == "digits"
    first, second = model["versions"]
    assert (first["version"], second["version"]) == (1, 2)
    for version in (first, second):
        assert set(version) == {"version", "created", "reference_accuracy", "eval_samples", "eval_labelled",
                                "num_classes", "builds"}
        assert datetime.fromisoformat(version["created"]).tzinfo is not None
        assert 0.9 < version["reference_accuracy"] <= 1.0
        assert version["eval_samples"] > 0 and version["eval_labelled"] is True and version["num_classes"] == 10
    assert {b["profile"]: (b["recipe"], b["quantization"], b["size_bytes"]) for b in first["builds"]} == shipped
    assert set(shipped) == {"x86-64", "rpi4", "jetson-nano"}
    assert shipped["x86-64"][0] == "dynamic_range"
    assert second["builds"] == []


def test_model_list_table(workspace: Workspace) -> None:
    data = workspace.data_dir.root
    with workspace.db.session() as session:  # a recipe with a transform shows whole
        artifact = session.scalars(select(Artifact).where(Artifact.profile_name == "rpi4")).one()
        artifact.recipe = "prune:0.5+int8"

    lines = assert_ok(run("model", "list", "--data-dir", data)).splitlines()

    assert lines[0].split() == ["MODEL", "CREATED", "REFERENCE", "ACC", "EVAL", "SAMPLES", "LABELLED", "PROFILE",
                                "SHIPS", "SIZE"]
    rows = [line.split() for line in lines[2:]]
    assert rows[0][0] == "digits:1" and len(rows) == 3  # one row per built profile, the version named once
    assert all(len(row) == 4 for row in rows[1:])  # PROFILE SHIPS SIZE under blank version cells
    ships = {row[-4]: row[-3] for row in rows}  # ... PROFILE SHIPS 51.5 KiB
    assert ships == {"jetson-nano": ships["jetson-nano"], "rpi4": "prune:0.5+int8", "x86-64": "dynamic_range"}
    assert rows[0][5] == "yes"  # labelled (CREATED is two words: date and time)
    assert all(row[-1] == "KiB" for row in rows)  # sizes are human: "51.5 KiB"


def test_model_list_without_models(tmp_path: Path) -> None:
    from server.setup import init_data_dir

    init_data_dir(tmp_path / "data").db.close()
    assert "no models yet" in assert_ok(run("model", "list", "--data-dir", tmp_path / "data"))
    assert json.loads(assert_ok(run("model", "list", "--data-dir", tmp_path / "data", "--json"))) == []
