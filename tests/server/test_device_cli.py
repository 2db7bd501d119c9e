"""``edgefleet device register/tag/list/remove`` on a real SQLite data directory, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select

from server import audit
from server.db import open_database
from server.db.models import AuditEvent, Device
from server.db_location import database_url
from server.paths import DataDir
from tests.server.test_cli_errors import assert_ok, assert_user_error, run


@pytest.fixture
def data_dir(tmp_path: Path, db_url: str) -> Path:
    from server.setup import init_data_dir

    root = tmp_path / "data"
    init_data_dir(root, db_url=db_url).db.close()
    return root


def register(data_dir: Path, name: str, *extra: str, profile: str = "rpi4") -> Result:
    out = data_dir.parent / "agents" / f"{name}-{len(list(data_dir.parent.glob('agents/*')))}.toml"
    return run("device", "register", name, "--profile", profile, "--data-dir", data_dir, "--out", out, *extra)


def listed(data_dir: Path, *filters: str) -> list[dict[str, Any]]:
    return json.loads(assert_ok(run("device", "list", "--data-dir", data_dir, "--json", *filters)))  # type: ignore[no-any-return]


def names(data_dir: Path, *filters: str) -> list[str]:
    return [d["name"] for d in listed(data_dir, *filters)]


def audit_log(data_dir: Path) -> list[AuditEvent]:
    db = open_database(database_url(DataDir(data_dir)))
    try:
        with db.session() as session:
            return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all())
    finally:
        db.close()


@pytest.fixture
def fleet(data_dir: Path) -> Path:
    """pi-lab (rpi4; site=lab, ring=canary), pi-field (rpi4; site=field), nano-lab (jetson-nano; site=lab),
    bare (x86-64, no tags)."""
    assert_ok(register(data_dir, "pi-lab", "--tag", "site=lab", "--tag", "ring=canary"))
    assert_ok(register(data_dir, "pi-field", "--tag", "site=field"))
    assert_ok(register(data_dir, "nano-lab", "--tag", "site=lab", profile="jetson-nano"))
    assert_ok(register(data_dir, "bare", profile="x86-64"))
    return data_dir


# -- register --tag ----------------------------------------------------------------------------------


def test_register_with_tags(data_dir: Path) -> None:
    printed = assert_ok(register(data_dir, "cam-1", "--tag", "site=lab", "--tag", "ring=canary"))
    assert "registered cam-1" in printed and "tags ring=canary,site=lab" in printed
    [device] = listed(data_dir)
    assert device["tags"] == {"ring": "canary", "site": "lab"}


@pytest.mark.parametrize(
    ("tag", "fragments"),
    [
        ("site", ["--tag", "KEY=VALUE", "'site'"]),
        ("bad key=x", ["--tag", "invalid tag key 'bad key'"]),
        ("site=", ["--tag", "invalid value '' for tag 'site'"]),
        ("site=" + "x" * 129, ["--tag", "1-128 printable characters"]),
    ],
)
def test_register_with_a_bad_tag_registers_nothing(data_dir: Path, tag: str, fragments: list[str]) -> None:
    assert_user_error(register(data_dir, "cam-1", "--tag", tag), *fragments)
    assert listed(data_dir) == []
    assert not list(data_dir.parent.glob("agents/*.toml"))  # no agent config left behind either


def test_register_with_one_key_twice(data_dir: Path) -> None:
    assert_user_error(register(data_dir, "cam-1", "--tag", "site=lab", "--tag", "site=field"),
                      "tag 'site' given twice")
    assert listed(data_dir) == []


# -- tag -----------------------------------------------------------------------------------------------


def test_tag_sets_overwrites_and_removes(fleet: Path) -> None:
    assert assert_ok(run("device", "tag", "bare", "site=lab", "rack=3", "--data-dir", fleet)).strip() == (
        "bare: rack=3,site=lab"
    )
    assert assert_ok(run("device", "tag", "bare", "site=field", "--data-dir", fleet)).strip() == (
        "bare: rack=3,site=field"  # overwritten, the other kept
    )
    result = run("device", "tag", "bare", "--remove", "rack", "--remove", "owner", "--data-dir", fleet)
    assert assert_ok(result).strip() == "bare: site=field"
    assert "note: bare had no tag 'owner'" in result.stderr
    assert run("device", "tag", "bare", "--remove", "site", "--data-dir", fleet).stdout.strip() == "bare: -"
    assert {d["name"]: d["tags"] for d in listed(fleet)}["bare"] == {}


def test_tag_can_set_and_remove_in_one_go(fleet: Path) -> None:
    assert assert_ok(run("device", "tag", "pi-lab", "owner=ops", "--remove", "ring", "--data-dir", fleet)).strip() == (
        "pi-lab: owner=ops,site=lab"
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["ghost", "site=lab"], ["unknown device 'ghost'", "edgefleet device list"]),
        (["bare"], ["nothing to change", "--remove KEY"]),
        (["bare", "site"], ["tag: expected a tag as KEY=VALUE"]),
        (["bare", "site=lab", "--remove", "site"], ["'site'", "both set and removed"]),
        (["bare", "--remove", "bad key"], ["invalid tag key 'bad key'"]),
        (["bare", "site=a", "site=b"], ["tag 'site' given twice"]),
    ],
)
def test_tag_mistakes_change_nothing(fleet: Path, args: list[str], fragments: list[str]) -> None:
    before = listed(fleet)
    assert_user_error(run("device", "tag", *args, "--data-dir", fleet), *fragments)
    assert listed(fleet) == before


def test_a_device_holds_at_most_64_tags(fleet: Path) -> None:
    many = [f"k{i}=v" for i in range(64)]
    assert_ok(run("device", "tag", "bare", *many, "--data-dir", fleet))
    assert_user_error(run("device", "tag", "bare", "one-more=v", "--data-dir", fleet), "65 tags", "at most 64")


# -- list --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], ["bare", "nano-lab", "pi-field", "pi-lab"]),
        (["--tag", "site=lab"], ["nano-lab", "pi-lab"]),
        (["--tag", "site=lab", "--tag", "ring=canary"], ["pi-lab"]),
        (["--profile", "rpi4"], ["pi-field", "pi-lab"]),
        (["--profile", "rpi4", "--profile", "x86-64"], ["bare", "pi-field", "pi-lab"]),
        (["--profile", "rpi4", "--tag", "site=lab"], ["pi-lab"]),
        (["--profile", "jetson-nano", "--tag", "site=field"], []),
        (["--tag", "ring=stable"], []),
    ],
)
def test_list_filters_and_together(fleet: Path, filters: list[str], expected: list[str]) -> None:
    assert names(fleet, *filters) == expected


def test_list_filter_mistakes(fleet: Path) -> None:
    assert_user_error(run("device", "list", "--profile", "rpi9", "--data-dir", fleet), "unknown profile 'rpi9'")
    assert_user_error(run("device", "list", "--tag", "site", "--data-dir", fleet), "--tag", "KEY=VALUE")


def test_list_table_has_a_tags_column(fleet: Path) -> None:
    lines = assert_ok(run("device", "list", "--data-dir", fleet, "--tag", "site=lab")).splitlines()
    assert lines[0].split() == ["DEVICE", "ID", "PROFILE", "TAGS", "STATUS", "RUNTIME", "ACTIVE", "MODEL", "VARIANT"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"nano-lab", "pi-lab"}
    assert rows["pi-lab"][3] == "ring=canary,site=lab" and rows["nano-lab"][3] == "site=lab"
    assert rows["pi-lab"][4:] == ["offline", "-", "-", "-"]


# -- remove --------------------------------------------------------------------------------------------------


def test_remove_frees_the_name_and_hides_the_device(fleet: Path) -> None:
    [old_id] = [d["id"] for d in listed(fleet) if d["name"] == "pi-lab"]
    printed = assert_ok(run("device", "remove", "pi-lab", "--data-dir", fleet))
    assert printed.strip() == f"removed pi-lab ({old_id})"

    assert "pi-lab" not in names(fleet)
    assert names(fleet, "--tag", "site=lab") == ["nano-lab"]
    assert_user_error(run("device", "tag", "pi-lab", "x=y", "--data-dir", fleet), "unknown device 'pi-lab'")
    assert_user_error(run("device", "remove", "pi-lab", "--data-dir", fleet), "unknown device 'pi-lab'")
    profiles = json.loads(assert_ok(run("profile", "list", "--data-dir", fleet, "--json")))
    assert {p["name"]: p["devices"] for p in profiles}["rpi4"] == 1  # pi-field only

    assert_ok(register(fleet, "pi-lab", profile="rpi5"))  # the name is free again: a new device
    [new] = [d for d in listed(fleet) if d["name"] == "pi-lab"]
    assert new["id"] != old_id and new["profile"] == "rpi5" and new["tags"] == {}
    db = open_database(database_url(DataDir(fleet)))
    try:
        with db.session() as session:
            rows = session.scalars(select(Device).where(Device.name == "pi-lab")).all()
            assert sorted((r.id == old_id, r.removed_at is not None) for r in rows) == [(False, False), (True, True)]
    finally:
        db.close()
    assert_user_error(register(fleet, "pi-lab"), "'pi-lab'", "already registered")  # but only once


def test_every_change_is_audited_with_its_operator(fleet: Path) -> None:
    assert_ok(run("device", "tag", "bare", "site=lab", "--data-dir", fleet))
    assert_ok(run("device", "tag", "bare", "--remove", "site", "--data-dir", fleet))
    assert_ok(run("device", "remove", "bare", "--data-dir", fleet))

    events = audit_log(fleet)
    assert [e.kind for e in events] == ["device.registered"] * 4 + ["device.tagged"] * 2 + ["device.removed"]
    assert {e.actor for e in events} == {audit.operator()}
    assert audit.operator().startswith("operator ")
    registered = events[0]
    assert registered.data == {"name": "pi-lab", "profile": "rpi4", "tags": {"ring": "canary", "site": "lab"}}
    assert "pi-lab" in registered.message and registered.device_id is not None
    tagged, untagged, removed = events[4:]
    assert (tagged.data["set"], tagged.data["after"]) == ({"site": "lab"}, {"site": "lab"})
    assert (untagged.data["removed"], untagged.data["after"]) == (["site"], {})
    assert removed.data["name"] == "bare" and removed.data["settled_deployments"] == []
    assert removed.device_id == tagged.device_id


def test_a_failed_command_writes_no_audit_entry(fleet: Path) -> None:
    before = len(audit_log(fleet))
    assert_user_error(run("device", "tag", "bare", "site=lab", "--remove", "site", "--data-dir", fleet))
    assert_user_error(run("device", "remove", "ghost", "--data-dir", fleet))
    assert_user_error(register(fleet, "bare"))
    assert len(audit_log(fleet)) == before
