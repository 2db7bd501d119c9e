"""``model build --recipe R`` is an experiment: reported, marked, and shipped only with ``--ship``.

The builds here convert and measure the digits CNN for real, one recipe each; the refusals happen before
anything is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from server.compression import build_profiles, experiment_recipe
from server.db.models import Artifact, AuditEvent, Profile, Variant
from server.setup import Workspace
from shared.errors import UserInputError
from tests.server.conftest import QUICK_BENCHMARK
from tests.server.test_cli_errors import assert_ok, assert_user_error, run


@pytest.fixture
def db_backend() -> str:
    """Compression work, not the registry's: SQLite only (a PostgreSQL run would repeat a minute of TensorFlow)."""
    return "sqlite"


def shipped(workspace: Workspace, profile: str) -> tuple[str, str] | None:
    """(recipe, sha256) of what ``profile`` ships of digits:1."""
    with workspace.db.session() as session:
        artifact = session.scalars(select(Artifact).where(Artifact.profile_name == profile)).one_or_none()
        return (artifact.recipe, artifact.sha256) if artifact is not None else None


def rows(workspace: Workspace, profile: str) -> dict[str, Variant]:
    with workspace.db.session() as session:
        return {v.recipe: v for v in session.scalars(select(Variant).where(Variant.profile_name == profile)).all()}


def report_json(data: Path, profile: str) -> dict[str, Any]:
    [report] = json.loads(assert_ok(run("model", "report", "digits", "--profile", profile, "--data-dir", data,
                                        "--json")))
    return report  # type: ignore[no-any-return]


def test_an_experiment_is_reported_and_shipped_only_when_asked(workspace: Workspace) -> None:
    data = workspace.data_dir.root
    assert_ok(run("profile", "add", "lab", "--quantizations", "float32,float16", "--recipe", "float32",
                  "--data-dir", data))
    build_profiles(workspace.db, workspace.blobs, "digits", ["lab"], settings=QUICK_BENCHMARK)  # its own recipe
    own = shipped(workspace, "lab")
    assert own is not None and own[0] == "float32"

    table = assert_ok(run("model", "build", "digits", "--profile", "lab", "--recipe", "float16", "--data-dir", data))

    assert shipped(workspace, "lab") == own  # an experiment changes nothing that ships
    assert "* float32" in table and "  float16 [experiment]" in table
    assert "[experiment] = built with 'model build --recipe'" in table
    assert table.rstrip().endswith("experiment: float16 was measured for lab, not shipped; lab ships float32")
    report = report_json(data, "lab")
    assert report["ships"] == "float32" and "experiment" not in report  # a stored report: no build outcome
    variants = {v["recipe"]: v for v in report["variants"]}
    assert (variants["float32"]["experiment"], variants["float32"]["chosen"]) == (False, True)
    assert (variants["float16"]["experiment"], variants["float16"]["chosen"], variants["float16"]["verdict"]) == (
        True, False, "ok")
    assert "not shipped" in variants["float16"]["reason"]

    result = run("model", "build", "digits", "--profile", "lab", "--recipe", "float16", "--ship", "--data-dir", data,
                 "--json")

    [built] = json.loads(assert_ok(result))
    assert built["experiment"] == {"recipe": "float16", "ship": True, "shipped": True, "ships": "float16"}
    assert built["ships"] == "float16"
    now = shipped(workspace, "lab")
    assert now is not None and now[0] == "float16"
    assert now[1] == rows(workspace, "lab")["float16"].sha256
    stored = rows(workspace, "lab")
    assert (stored["float16"].chosen, stored["float16"].verdict, stored["float16"].details["experiment"]) == (
        True, "chosen", True)
    assert (stored["float32"].chosen, stored["float32"].verdict) == (False, "ok")
    assert "float16 was shipped instead with --ship" in stored["float32"].reason
    with workspace.db.session() as session:
        entries = session.scalars(select(AuditEvent).where(AuditEvent.kind == "model.experiment_shipped")).all()
        [entry] = [e for e in entries if e.data["profile"] == "lab"]  # the template shipped x86-64's pinned recipe
        assert entry.actor.startswith("operator ") and entry.data["recipe"] == "float16"
        assert "ships float16 to profile lab" in entry.message

    # the profile's own build takes over again, and keeps the experiment's row (it did not build float16)
    build_profiles(workspace.db, workspace.blobs, "digits", ["lab"], settings=QUICK_BENCHMARK)
    again = shipped(workspace, "lab")
    assert again is not None and again[0] == "float32"
    stored = rows(workspace, "lab")
    assert set(stored) == {"float32", "float16"}
    assert stored["float32"].chosen and not stored["float16"].chosen
    assert stored["float16"].details["experiment"] is True and stored["float16"].verdict == "ok"


def test_an_experiment_that_does_not_fit_is_not_shipped(workspace: Workspace) -> None:
    data = workspace.data_dir.root
    assert_ok(run("profile", "add", "speck", "--quantizations", "int8,float32", "--max-model-size", "10KiB",
                  "--data-dir", data))

    result = run("model", "build", "digits", "--profile", "speck", "--recipe", "float32", "--ship", "--data-dir", data)

    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: not shipped: float32 is too_big for profile speck" in result.stderr
    assert "speck still ships nothing" in result.stderr
    assert "float32 [experiment]" in result.stdout  # the measurement is reported all the same
    assert shipped(workspace, "speck") is None
    assert rows(workspace, "speck")["float32"].verdict == "too_big"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--profile", "jetson-nano", "--recipe", "int8"],
         ["profile jetson-nano does not allow int8 (recipe int8)", "it allows float16, float32"]),
        (["--profile", "rpi4", "--profile", "jetson-nano", "--recipe", "int8_float_io"],
         ["profile rpi4 does not allow int8_float_io", "it allows int8, dynamic_range, float16, float32"]),
        (["--profile", "rpi-zero2", "--recipe", "prune:0.5+float16"], ["retrains the model"]),
        (["--profile", "x86-64", "--recipe", "dynamic_range"],
         ["digits:1 already ships dynamic_range to x86-64", "--ship"]),
        (["--profile", "rpi4", "--ship"], ["--ship ships an experiment", "--recipe"]),
        (["--profile", "rpi4", "--recipe", "auto", "--ship"], ["--ship ships an experiment"]),
    ],
    ids=["not allowed", "not allowed, several profiles", "retrains", "already shipped", "ship alone", "ship auto"],
)
def test_refused_before_anything_is_built(workspace: Workspace, args: list[str], fragments: list[str]) -> None:
    data = workspace.data_dir.root
    before = {p: (shipped(workspace, p), sorted(rows(workspace, p))) for p in ("rpi4", "jetson-nano", "x86-64")}

    assert_user_error(run("model", "build", "digits", *args, "--data-dir", data), *fragments)

    assert {p: (shipped(workspace, p), sorted(rows(workspace, p))) for p in before} == before


# -- what counts as an experiment (no build) ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str = "keras"


def profile(recipe: str = "auto", quantizations: str = "int8,float16", quantization: str = "int8") -> Profile:
    return Profile(name="cam", recipe=recipe, quantizations=quantizations, quantization=quantization)


@pytest.mark.parametrize("recipe", [None, "auto", "AUTO", " auto "])
def test_auto_and_no_recipe_are_the_profiles_build(recipe: str | None) -> None:
    assert experiment_recipe(profile(), recipe, Source()) is None  # type: ignore[arg-type]


def test_the_profiles_own_recipe_is_its_build_however_it_is_written() -> None:
    own = profile(recipe="prune:0.5+int8")
    assert experiment_recipe(own, "Prune:0.50+INT8", Source()) is None  # type: ignore[arg-type]
    assert str(experiment_recipe(own, "prune:0.8+int8", Source())) == "prune:0.8+int8"  # type: ignore[arg-type]


def test_any_other_recipe_is_an_experiment_within_the_allowed_quantizations() -> None:
    assert str(experiment_recipe(profile(), "float16", Source())) == "float16"  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match=r"does not allow float32 \(recipe distill:0.5\+float32\); it allows "
                                             r"int8, float16"):
        experiment_recipe(profile(), "distill:0.5+float32", Source())  # type: ignore[arg-type]
    only_preferred = profile(quantizations="", quantization="float16")  # a profile row with no list: its preferred
    with pytest.raises(UserInputError, match="it allows float16"):
        experiment_recipe(only_preferred, "int8", Source())  # type: ignore[arg-type]


def test_a_prebuilt_model_has_no_experiments() -> None:
    assert experiment_recipe(profile(), "prebuilt", Source("tflite")) is None  # type: ignore[arg-type]
