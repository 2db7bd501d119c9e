"""``edgefleet profile add/list/show`` and the profile service behind it.

The CLI cases drive ``edgefleet.cli.cli`` in-process with click's ``CliRunner``;
every user mistake must be one ``Error:`` line and exit code 1 or 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from edgefleet.cli import cli
from server import profile_service
from server.compress.quantization import Quantization
from server.db.models import Profile
from server.profile_service import ProfileSpec, parse_size, spec_from_toml
from server.profiles import BUILTIN_PROFILES
from server.setup import init_data_dir
from shared.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KiB, MiB, GiB = 1024, 1024**2, 1024**3
BUILTIN_NAMES = ["rpi4", "rpi5", "rpi-zero2", "jetson-nano", "jetson-orin", "x86-64", "arm64"]
TABLE_HEADERS = ["NAME", "PREFERRED", "CHOICES", "OBJECTIVE", "BUDGET", "MAX MODEL", "MAX RAM", "THREADS", "RECIPE",
                 "DEVICES", "BUILTIN"]


@pytest.fixture
def data_dir(tmp_path: Path, db_url: str) -> Path:
    root = tmp_path / "srv"
    init_data_dir(root, db_url=db_url).db.close()
    return root


def run(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_ok(result: Result) -> str:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stdout


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit code 1 or 2, exactly one ``Error: ...`` line on stderr naming ``fragments``, no traceback."""
    assert result.exc_info is not None and result.exc_info[0] is SystemExit, (
        f"unexpected {result.exception!r}; output:\n{result.output}"
    )
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def add(data_dir: Path, name: str, *args: str | os.PathLike[str]) -> Result:
    return run("profile", "add", name, "--data-dir", data_dir, *args)


def listed(data_dir: Path) -> dict[str, dict[str, Any]]:
    rows = json.loads(assert_ok(run("profile", "list", "--data-dir", data_dir, "--json")))
    return {row["name"]: row for row in rows}


def shown(data_dir: Path, name: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(assert_ok(run("profile", "show", name, "--data-dir", data_dir, "--json")))
    return row


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- built-in profiles ---------------------------------------------------------------------------


def test_every_builtin_profile_is_listed_with_its_limits(data_dir: Path) -> None:
    rows = listed(data_dir)

    assert sorted(rows) == sorted(BUILTIN_NAMES) == sorted(p.name for p in BUILTIN_PROFILES)
    for builtin in BUILTIN_PROFILES:
        assert rows[builtin.name] == {
            "name": builtin.name,
            "description": builtin.description,
            "quantization": builtin.quantization,
            "quantizations": list(builtin.quantizations),
            "threads": builtin.threads,
            "recipe": builtin.recipe,
            "objective": builtin.objective,
            "accuracy_budget": builtin.accuracy_budget,
            "max_model_bytes": builtin.max_model_bytes,
            "max_ram_bytes": builtin.max_ram_bytes,
            "builtin": True,
            "devices": 0,
        }
    assert (rows["rpi4"]["max_model_bytes"], rows["rpi4"]["max_ram_bytes"]) == (256 * MiB, 1 * GiB)
    assert (rows["rpi-zero2"]["objective"], rows["rpi-zero2"]["max_model_bytes"]) == ("size", 16 * MiB)
    assert (rows["x86-64"]["max_model_bytes"], rows["x86-64"]["max_ram_bytes"]) == (None, None)


def test_json_keys_are_the_columns_plus_devices(data_dir: Path) -> None:
    columns = {column.name for column in Profile.__table__.columns}
    assert set(shown(data_dir, "rpi4")) == columns | {"devices"}
    assert all(set(row) == columns | {"devices"} for row in listed(data_dir).values())


def test_the_list_table(data_dir: Path) -> None:
    lines = assert_ok(run("profile", "list", "--data-dir", data_dir)).splitlines()

    assert lines[0].split("  ")[0] == "NAME"
    positions = [lines[0].index(header) for header in TABLE_HEADERS]
    assert positions == sorted(positions)
    assert len(lines) == 2 + len(BUILTIN_NAMES)
    rpi4 = next(line for line in lines if line.startswith("rpi4 "))
    assert rpi4.split() == [
        "rpi4", "int8", "int8,dynamic_range,float16,float32", "latency", "0.01", "256.0", "MiB", "1.0", "GiB", "4",
        "auto", "0", "yes",
    ]
    x86 = next(line for line in lines if line.startswith("x86-64 "))
    assert x86.split()[5:7] == ["-", "-"]


def test_show_a_builtin_profile_as_text(data_dir: Path) -> None:
    text = assert_ok(run("profile", "show", "rpi-zero2", "--data-dir", data_dir))
    assert "rpi-zero2" in text
    assert "16.0 MiB (16777216 bytes)" in text
    assert "256.0 MiB (268435456 bytes)" in text
    assert "size" in text and "built in:" in text


# -- adding profiles --------------------------------------------------------------------------


def test_add_from_flags_then_show(data_dir: Path) -> None:
    printed = assert_ok(add(
        data_dir, "cam-pi", "--quantizations", "int8, FLOAT16", "--quantization", "float16", "--threads", "2",
        "--objective", "size", "--accuracy-budget", "0.03", "--max-model-size", "64MiB", "--max-ram", "1 GiB",
        "--description", "Pi cameras", "--recipe", "prune:0.5+int8",
    ))
    assert printed.startswith("added profile cam-pi")

    assert shown(data_dir, "cam-pi") == {
        "name": "cam-pi",
        "description": "Pi cameras",
        "quantization": "float16",
        "quantizations": ["int8", "float16"],
        "threads": 2,
        "recipe": "prune:0.5+int8",
        "objective": "size",
        "accuracy_budget": 0.03,
        "max_model_bytes": 64 * MiB,
        "max_ram_bytes": 1 * GiB,
        "builtin": False,
        "devices": 0,
    }
    text = assert_ok(run("profile", "show", "cam-pi", "--data-dir", data_dir))
    assert "64.0 MiB (67108864 bytes)" in text and "Pi cameras" in text


def test_defaults_fill_what_is_not_given(data_dir: Path) -> None:
    assert_ok(add(data_dir, "only-choices", "--quantizations", "dynamic_range,float32"))
    assert_ok(add(data_dir, "only-preferred", "--quantization", "int8"))

    choices, preferred = shown(data_dir, "only-choices"), shown(data_dir, "only-preferred")
    assert (choices["quantization"], choices["quantizations"]) == ("dynamic_range", ["dynamic_range", "float32"])
    assert (preferred["quantization"], preferred["quantizations"]) == ("int8", ["int8"])
    assert {k: preferred[k] for k in ("threads", "recipe", "objective", "accuracy_budget", "max_model_bytes",
                                      "max_ram_bytes", "description")} == {
        "threads": 1, "recipe": "auto", "objective": "latency", "accuracy_budget": 0.01,
        "max_model_bytes": None, "max_ram_bytes": None, "description": "",
    }


PROFILE_TOML = """\
[profile]
name = "gateway"
description = "store gateways"
quantizations = ["float16", "int8"]
quantization = "int8"
threads = 2
objective = "latency"
accuracy_budget = 0.005
max_model_bytes = "300 KB"
max_ram_bytes = "2GB"
"""


def test_add_from_a_toml_file_with_flags_overriding_it(data_dir: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "gateway.toml", PROFILE_TOML)

    assert_ok(add(data_dir, "gateway", "--from-file", path, "--threads", "3", "--max-ram", "512MiB"))

    assert shown(data_dir, "gateway") == {
        "name": "gateway",
        "description": "store gateways",
        "quantization": "int8",
        "quantizations": ["float16", "int8"],
        "threads": 3,
        "recipe": "auto",
        "objective": "latency",
        "accuracy_budget": 0.005,
        "max_model_bytes": 300_000,
        "max_ram_bytes": 512 * MiB,
        "builtin": False,
        "devices": 0,
    }
    assert listed(data_dir)["gateway"]["threads"] == 3


def test_a_file_without_a_name_takes_the_command_line_name(data_dir: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "p.toml", '[profile]\nquantizations = "int8,float16"\nmax_model_bytes = 4096\n')
    assert_ok(add(data_dir, "from-cli", "--from-file", path))
    assert shown(data_dir, "from-cli")["max_model_bytes"] == 4096


def test_spec_from_toml(tmp_path: Path) -> None:
    spec = spec_from_toml(write(tmp_path / "gateway.toml", PROFILE_TOML))
    assert spec == ProfileSpec(
        name="gateway", description="store gateways", quantization="int8", quantizations=("float16", "int8"),
        threads=2, objective="latency", accuracy_budget=0.005, max_model_bytes=300_000, max_ram_bytes=2_000_000_000,
    )
    assert tomllib.loads(PROFILE_TOML)["profile"]["name"] == spec.name


def test_spec_from_toml_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="needs a name"):
        spec_from_toml(write(tmp_path / "p.toml", '[profile]\nquantization = "int8"\n'))


def test_every_quantization_of_the_enum_is_accepted(data_dir: Path) -> None:
    for i, quantization in enumerate(Quantization.convertible()):
        assert_ok(add(data_dir, f"q{i}", "--quantizations", quantization.value))
        assert shown(data_dir, f"q{i}")["quantization"] == quantization.value


def test_a_user_profile_serves_device_registration(data_dir: Path, tmp_path: Path) -> None:
    assert_ok(add(data_dir, "myprofile", "--quantizations", "int8,dynamic_range"))
    out = tmp_path / "x.toml"

    printed = assert_ok(run("device", "register", "x", "--profile", "myprofile", "--data-dir", data_dir, "--out", out))

    assert "profile myprofile" in printed
    assert tomllib.loads(out.read_text())["device"]["profile"] == "myprofile"
    assert listed(data_dir)["myprofile"]["devices"] == 1
    assert shown(data_dir, "myprofile")["devices"] == 1
    assert listed(data_dir)["rpi4"]["devices"] == 0


def test_replace_overwrites_a_user_profile(data_dir: Path) -> None:
    assert_ok(add(data_dir, "mine", "--quantizations", "int8", "--max-ram", "1GiB"))
    assert_user_error(add(data_dir, "mine", "--quantizations", "float16"), "'mine' already exists", "--replace")
    assert shown(data_dir, "mine")["quantization"] == "int8"

    printed = assert_ok(add(data_dir, "mine", "--quantizations", "float16,float32", "--replace"))

    assert printed.startswith("saved profile mine")
    row = shown(data_dir, "mine")
    assert (row["quantization"], row["quantizations"], row["max_ram_bytes"]) == ("float16", ["float16", "float32"], None)


def test_replace_keeps_the_devices_of_a_profile(data_dir: Path, tmp_path: Path) -> None:
    assert_ok(add(data_dir, "mine", "--quantizations", "int8"))
    assert_ok(run("device", "register", "x", "--profile", "mine", "--data-dir", data_dir, "--out", tmp_path / "x.toml"))
    assert_ok(add(data_dir, "mine", "--quantizations", "float16", "--replace"))
    assert shown(data_dir, "mine")["devices"] == 1


@pytest.mark.parametrize("replace", [[], ["--replace"]], ids=["plain", "replace"])
def test_a_builtin_profile_cannot_be_replaced(data_dir: Path, replace: list[str]) -> None:
    before = shown(data_dir, "rpi4")
    assert_user_error(add(data_dir, "rpi4", "--quantizations", "float32", *replace), "'rpi4'", "built in")
    assert shown(data_dir, "rpi4") == before


# -- mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--quantizations", "int8,int4"],
         ["unknown quantization 'int4'", *(q.value for q in Quantization.convertible())]),
        (["--quantization", "int3"], ["unknown quantization 'int3'", "float16"]),
        (["--quantizations", "int8,float16", "--quantization", "float32"],
         ["preferred quantization 'float32'", "int8, float16"]),
        ([], ["needs quantizations"]),
        (["--quantization", "int8", "--max-model-size", "lots"], ["invalid size 'lots'", "MiB"]),
        (["--quantization", "int8", "--max-ram", "12 parsecs"], ["invalid size '12 parsecs'"]),
        (["--quantization", "int8", "--max-ram", "0MiB"], ["max_ram_bytes must be a positive number"]),
        (["--quantization", "int8", "--objective", "speed"], ["unknown objective 'speed'", "latency, size"]),
        (["--quantization", "int8", "--accuracy-budget", "1.5"], ["accuracy_budget", "0 to 1", "1.5"]),
        (["--quantization", "int8", "--accuracy-budget", "-0.1"], ["accuracy_budget", "0 to 1"]),
        (["--quantization", "int8", "--accuracy-budget", "nan"], ["accuracy_budget", "0 to 1"]),
        (["--quantization", "int8", "--threads", "0"], ["threads must be an integer from 1 to 256"]),
        (["--quantization", "int8", "--threads", "257"], ["threads must be an integer from 1 to 256"]),
        (["--quantization", "int8", "--recipe", "not a recipe!"], ["invalid recipe 'not a recipe!'"]),
        (["--quantization", "int8", "--description", "x" * 201], ["description", "200 characters"]),
    ],
    ids=[
        "unknown quantization", "unknown preferred", "preferred not a choice", "no quantization", "bad size",
        "bad unit", "zero size", "bad objective", "budget 1.5", "negative budget", "nan budget", "no threads",
        "too many threads", "bad recipe", "long description",
    ],
)
def test_a_bad_option_is_one_clear_line(data_dir: Path, args: list[str], fragments: list[str]) -> None:
    assert_user_error(add(data_dir, "mine", *args), *fragments)
    assert "mine" not in listed(data_dir)


@pytest.mark.parametrize("name", ["Upper", "_under", ".dot", "a b", "a/b", "x" * 65, "ünï"])
def test_an_invalid_profile_name(data_dir: Path, name: str) -> None:
    assert_user_error(add(data_dir, name, "--quantization", "int8"), "invalid profile name")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[profile]\nquantization = "int8"\ncolour = "red"\n', ["unknown key(s) in [profile]: colour", "allowed:"]),
        ('[profile]\nquantization = "int8"\n[extra]\nx = 1\n', ["unexpected top-level keys: extra"]),
        ('quantization = "int8"\n', ["expected exactly one [profile] table"]),
        ('[profile]\nquantization = "int8\n', ["is not valid TOML"]),
        ('[profile]\nquantization = "int8"\nthreads = "four"\n', ["threads must be an integer"]),
        ('[profile]\nquantization = "int8"\nmax_ram_bytes = "big"\n', ["p.toml", "invalid size 'big'"]),
        ('[profile]\nquantization = "int8"\nmax_ram_bytes = 1.5\n', ["max_ram_bytes must be a number of bytes"]),
        ('[profile]\nquantizations = ["int8", 8]\n', ["quantizations must be a list"]),
        ('[profile]\nname = "other"\nquantization = "int8"\n', ["'mine' does not match", "'other'"]),
        ('[profile]\nquantization = "int8"\naccuracy_budget = 1.5\n', ["accuracy_budget", "0 to 1"]),
    ],
    ids=[
        "unknown key", "unknown table", "no table", "not toml", "wrong type", "bad size", "float size",
        "bad list", "name mismatch", "budget 1.5",
    ],
)
def test_a_bad_profile_file_is_one_clear_line(data_dir: Path, tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path / "p.toml", text)
    assert_user_error(add(data_dir, "mine", "--from-file", path), *fragments)
    assert "mine" not in listed(data_dir)


def test_a_missing_profile_file(data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert_user_error(add(data_dir, "mine", "--from-file", missing), "profile file", "missing.toml", "does not exist")


def test_show_an_unknown_profile_lists_the_known_ones(data_dir: Path) -> None:
    line = assert_user_error(run("profile", "show", "rpi9", "--data-dir", data_dir), "unknown profile 'rpi9'")
    assert all(name in line for name in BUILTIN_NAMES)


@pytest.mark.parametrize("command", [["list"], ["show", "rpi4"], ["add", "mine", "--quantization", "int8"]])
def test_a_data_dir_that_was_never_initialised(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    assert_user_error(run("profile", *command, "--data-dir", missing), "not an edgefleet data directory")
    assert not missing.exists()


# -- the service on its own -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096), ("10 B", 10), ("512MiB", 512 * MiB), ("2GB", 2_000_000_000), ("300 KB", 300_000),
        ("1.5 GiB", 3 * GiB // 2), ("0.5KiB", 512), ("64mib", 64 * MiB), (" 1 TiB ", 1024 * GiB), ("1.1KB", 1100),
        ("0.3B", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "1e3", "12 parsecs", "1,024", "1 2 MB", "1M", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserInputError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantizations": ()}, "at least one"),
        ({"quantizations": ("int8", "int8")}, "twice"),
        ({"threads": True}, "threads"),
        ({"threads": 2.0}, "threads"),
        ({"accuracy_budget": True}, "accuracy_budget"),
        ({"max_model_bytes": 0}, "max_model_bytes"),
        ({"max_ram_bytes": 2**63}, "max_ram_bytes"),
        ({"recipe": ""}, "recipe"),
        ({"objective": "Latency"}, "objective"),
    ],
)
def test_profile_spec_rejects(changes: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"name": "p", "quantization": "int8", "quantizations": ("int8",), **changes}
    with pytest.raises(UserInputError, match=message):
        ProfileSpec(**values)


def test_recipes_are_stored_in_their_canonical_form() -> None:
    base = {"name": "p", "quantization": "int8", "quantizations": ("int8",)}
    assert ProfileSpec(**base, recipe="AUTO").recipe == "auto"  # type: ignore[arg-type]
    assert ProfileSpec(**base, recipe="Prune:0.50+INT8").recipe == "prune:0.5+int8"  # type: ignore[arg-type]


def test_recipes_without_a_recipe_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile_service, "_recipe_parser", lambda: None)
    base = {"name": "p", "quantization": "int8", "quantizations": ("int8",)}
    assert ProfileSpec(**base, recipe="prune:0.5+int8").recipe == "prune:0.5+int8"  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="invalid recipe"):
        ProfileSpec(**base, recipe="Prune 50%")  # type: ignore[arg-type]
