"""``auto`` with training data: the report lists weight pruning at 50% and 80% with gzip sizes and neuron/filter
pruning with its parameter count; limits refuse rollouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from server.compress.digits import digits_split
from server.compress.evalset import write_eval_file
from server.compression import build_profiles
from server.setup import Workspace
from tests.server.conftest import QUICK_BENCHMARK


@pytest.fixture
def db_backend() -> str:
    """Compression work, not the registry's: SQLite only (a PostgreSQL run would repeat a minute of TensorFlow)."""
    return "sqlite"


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def with_training_data(workspace: Workspace, digits_inputs: tuple[Path, Path], tmp_path: Path) -> str:
    train, _ = digits_split()
    train_file = write_eval_file(train, tmp_path / "train.npz")
    added = run("model", "add", "digits", "--file", digits_inputs[0], "--eval", digits_inputs[1],
                "--train", train_file, "--data-dir", workspace.data_dir.root)
    assert added.exit_code == 0, added.output
    return added.output.split()[0]


def test_auto_with_training_data_reports_every_step_and_picks_within_budget(
    workspace: Workspace, with_training_data: str
) -> None:
    (report,) = build_profiles(workspace.db, workspace.blobs, with_training_data, ["rpi4"], settings=QUICK_BENCHMARK)
    variants = {v.recipe: v for v in report.variants}
    assert set(variants) == {
        "int8", "dynamic_range", "float16", "float32", "prune:0.5+int8", "prune:0.8+int8", "prune-units:0.5+int8",
        "distill:0.5+int8", "lowrank:0.9+int8",
    }
    for recipe in ("prune:0.5+int8", "prune:0.8+int8"):
        pruned = variants[recipe]
        assert pruned.verdict != "failed", pruned.reason
        target = 0.5 if "0.5" in recipe else 0.8
        assert abs(pruned.details["zero_fraction"] - target) < 0.05
        assert pruned.gzip_bytes is not None and pruned.size_bytes is not None
        assert "encoding" in pruned.details  # sparse shipped, or the reason it fell back to dense
    assert variants["prune:0.8+int8"].gzip_bytes < variants["int8"].gzip_bytes  # type: ignore[operator]
    narrowed = variants["prune-units:0.5+int8"]
    assert narrowed.verdict != "failed", narrowed.reason
    assert narrowed.details["params"] < 0.6 * variants["int8"].details["params"]
    assert narrowed.size_bytes < 0.6 * variants["int8"].size_bytes  # type: ignore[operator]
    assert variants["distill:0.5+int8"].details["student_params"] < variants["distill:0.5+int8"].details[
        "teacher_params"]
    (chosen,) = [v for v in report.variants if v.chosen]
    assert chosen.accuracy is not None and chosen.accuracy >= report.reference_accuracy - 0.01

    shown = run("model", "report", with_training_data, "--profile", "rpi4", "--data-dir",
                workspace.data_dir.root, "--json")
    (as_json,) = json.loads(shown.stdout)
    for row in as_json["variants"]:
        assert {"recipe", "size_bytes", "gzip_bytes", "accuracy", "p50_ms", "p95_ms", "chosen"} <= set(row)
    assert [row["recipe"] for row in as_json["variants"] if row["chosen"]] == [chosen.recipe]
    table = run("model", "report", with_training_data, "--profile", "rpi4", "--data-dir", workspace.data_dir.root)
    assert f"* {chosen.recipe}" in table.output and "prune:0.8+int8" in table.output
    assert "prune-units:0.5+int8: units kept" in table.output
    assert "left whole: scores (its units are the model's output)" in table.output
    ops = run("model", "report", with_training_data, "--profile", "rpi4", "--ops", "--data-dir",
              workspace.data_dir.root).output
    (int8_graph,) = [line for line in ops.splitlines() if line.startswith("  int8: ")]
    assert "CONV_2D 2" in int8_graph and "XNNPACK took" in int8_graph, ops


def test_a_profile_whose_limits_no_variant_fits_is_refused_before_rollout(workspace: Workspace, tmp_path: Path) -> None:
    data = workspace.data_dir.root
    assert run("profile", "add", "tiny", "--quantizations", "int8,float32", "--quantization", "int8",
               "--max-model-size", "10KiB", "--data-dir", data).exit_code == 0
    assert run("device", "register", "speck", "--profile", "tiny", "--out", tmp_path / "speck.toml",
               "--data-dir", data).exit_code == 0
    refused = run("rollout", "start", "digits", "--device", "speck", "--data-dir", data)
    assert refused.exit_code == 1
    assert "no variant of digits:1 fits profile tiny" in refused.output
    assert "too_big" in refused.output and "limit of 10240" in refused.output
    listing = run("device", "list", "--data-dir", data, "--json")
    assert json.loads(listing.stdout)[0]["active_model"] is None  # nothing was sent


def test_distillation_into_a_user_supplied_student(
    workspace: Workspace, with_training_data: str, tmp_path: Path
) -> None:
    from server.compress.convert import import_keras

    keras = import_keras()
    student = keras.Sequential([
        keras.Input(shape=(8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    student.save(tmp_path / "student.keras")
    (report,) = build_profiles(workspace.db, workspace.blobs, with_training_data, ["rpi4"],
                               recipe="distill:student+int8", student=tmp_path / "student.keras",
                               settings=QUICK_BENCHMARK)
    (variant,) = report.variants
    assert variant.recipe == "distill:student+int8" and variant.verdict != "failed", variant.reason
    assert variant.details["student_params"] == student.count_params()
    assert variant.accuracy is not None and variant.accuracy > 0.8

    missing = run("model", "build", with_training_data, "--profile", "rpi4", "--recipe", "distill:student+int8",
                  "--data-dir", workspace.data_dir.root, "--json")
    assert missing.exit_code == 1 and "the experiment distill:student+int8 failed for profile rpi4" in missing.stderr
    (row,) = json.loads(missing.stdout)[0]["variants"]
    assert row["verdict"] == "failed" and "--student" in row["reason"]
