"""Replica names, their broker identities (password file and ACL from the registry) and what each mode
subscribes to."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.broker_identities import sync_broker
from server.broker_setup import DEVICE_ACL, SERVER_USERNAME, BrokerLayout, server_password, setup_broker
from server.db import open_database
from server.db.replica_registry import register_replica, replica_names
from server.paths import DataDir
from server.replicas import broker_username, check_replica_name
from server.service import SESSION_EXPIRY_S, Subscriptions, session_client_id
from shared.errors import UserInputError


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a" * 33, "a/b", "ü"])
def test_a_bad_replica_name_is_a_user_error(name: str) -> None:
    with pytest.raises(UserInputError, match="replica name"):
        check_replica_name(name)


def test_the_default_replica_keeps_the_servers_identity_and_session(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    assert broker_username("main") == SERVER_USERNAME and broker_username("b") == "edgefleet-server-b"
    main, other = session_client_id(data_dir), session_client_id(data_dir, "b")
    assert main == session_client_id(data_dir, "main") and main != other
    assert (tmp_path / "mqtt-session-id").exists() and (tmp_path / "mqtt-session-id-b").exists()


def test_every_registered_replica_gets_an_identity_and_an_acl_block(tmp_path: Path) -> None:
    layout = BrokerLayout(tmp_path / "broker")
    setup_broker(layout)
    db = open_database(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    db.upgrade()
    try:
        assert sync_broker(db, layout) is True
        assert layout.acl.read_text() == DEVICE_ACL  # one server: as before
        register_replica(db, "main", "host", 1)
        register_replica(db, "b", "host", 2)
        register_replica(db, "b", "other", 3)  # started again: still one replica
        assert replica_names(db) == ["b", "main"]

        assert sync_broker(db, layout) is True
        users = [line.split(":")[0] for line in layout.passwords.read_text().splitlines()]
        assert users == [SERVER_USERNAME, "edgefleet-server-b"]
        acl = layout.acl.read_text()
        assert acl.startswith(DEVICE_ACL.split("\n# the server")[0])
        assert "user edgefleet-server\ntopic readwrite ef/v1/#\n" in acl
        assert "user edgefleet-server-b\ntopic readwrite ef/v1/#\n" in acl
        assert sync_broker(db, layout) is False  # nothing changed: nothing rewritten, no reload
        assert server_password(layout)  # every replica uses the server's password
    finally:
        db.close()


def test_one_server_subscribes_to_everything_plain_and_replicas_share_the_reports() -> None:
    alone = Subscriptions.for_mode(replicated=False)
    assert alone.leading == () and alone.session_expiry_s == SESSION_EXPIRY_S
    assert not any(f.startswith("$share/") for f in alone.always) and len(alone.always) == 5

    replica = Subscriptions.for_mode(replicated=True)
    assert replica.always == ("$share/edgefleet/ef/v1/devices/+/events", "$share/edgefleet/ef/v1/devices/+/telemetry")
    assert set(replica.leading) == {"ef/v1/devices/+/state", "ef/v1/devices/+/availability", "ef/v1/devices/+/want/+"}
    assert replica.session_expiry_s < 60


def test_replicas_find_the_blobs_where_they_are_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.setup import BLOB_DIR_ENV, blob_dir

    data_dir = DataDir(tmp_path / "data")
    assert blob_dir(data_dir) == data_dir.blobs
    monkeypatch.setenv(BLOB_DIR_ENV, str(tmp_path / "shared"))
    assert blob_dir(data_dir) == (tmp_path / "shared").resolve()
    assert blob_dir(data_dir, tmp_path / "option") == tmp_path / "option"  # --blob-dir wins
