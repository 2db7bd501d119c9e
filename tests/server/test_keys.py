"""``edgefleet init`` (online or offline release key), ``keys show|rotate|revoke``, and the server publishing
the root of trust: real keys, real files, through the CLI where an operator would type it."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from agent.config import load_config
from agent.root import RootTrust
from server.db import open_database, sqlite_url
from server.db.models import AuditEvent
from server.keys import load_keys, new_key_file, read_key_file
from server.paths import DataDir
from server.roots import RootStore, chain_payload, make_root, sign_root
from server.service import ServerService
from server.setup import Workspace
from shared.canonical import canonical_json
from shared.codec import encode
from shared.errors import ConfigError
from shared.files import write_private
from shared.messages import MAX_ROOT_PAYLOAD, RootChain, decode_payload
from shared.mqtt import BrokerAddress
from shared.root import Root, update_root, verify_root_self
from shared.signing import KeyRole, key_id, private_key_pem
from shared.topics import ROOT_TOPIC, TopicKind
from tests.server.test_cli_errors import assert_ok, assert_user_error, run
from tests.server.test_unit_service import Recorder, unused_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current(data: Path) -> Root:
    return RootStore(data / "keys").current()[0]


def kid_of(path: Path) -> str:
    return key_id(read_key_file(path, "key").public_key())


def assert_private(data: Path) -> None:
    keys = data / "keys"
    assert mode(keys) == 0o700 and mode(keys / "root") == 0o700
    for path in [*keys.glob("*.pem"), *(keys / "root").iterdir()]:
        assert mode(path) == 0o600, path


def audit_kinds(data: Path) -> list[tuple[str, str]]:
    db = open_database(sqlite_url(data))
    try:
        with db.session() as session:
            return [(e.kind, e.actor) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    finally:
        db.close()


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    out = assert_ok(run("init", "--data-dir", data, "--release-key-out", tmp_path / "release.pem"))
    assert "release key: offline (written to" in out
    return data


@pytest.fixture
def online(tmp_path: Path) -> Path:
    data = tmp_path / "online-data"
    assert "release key: online" in assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    return data


# -- init --------------------------------------------------------------------------------------


def test_offline_init_keeps_no_release_key_in_the_data_directory(offline: Path, tmp_path: Path) -> None:
    release = tmp_path / "release.pem"
    assert mode(release) == 0o600
    assert not (offline / "keys" / "release.pem").exists()
    secret = private_key_pem(read_key_file(release, "release key"))
    assert not [p for p in offline.rglob("*") if p.is_file() and secret in p.read_bytes()]
    root = current(offline)
    assert root.version == 1 and root.role(KeyRole.RELEASE).keyids == (kid_of(release),)
    assert root.role(KeyRole.DIRECTOR).keyids == (kid_of(offline / "keys" / "director.pem"),)
    assert root.role(KeyRole.ROOT).keyids == (kid_of(offline / "keys" / "root.pem"),)
    assert_private(offline)
    assert load_keys(offline / "keys").release is None


def test_offline_is_the_default_and_needs_somewhere_for_the_key(tmp_path: Path) -> None:
    assert_user_error(run("init", "--data-dir", tmp_path / "data"), "an offline release key (the default) needs "
                      "--release-key-out PATH", "--release-key online")
    assert not (tmp_path / "data" / "keys").exists()


def test_init_never_overwrites_a_key(tmp_path: Path) -> None:
    (tmp_path / "release.pem").write_text("precious")
    assert_user_error(run("init", "--data-dir", tmp_path / "data", "--release-key-out", tmp_path / "release.pem"),
                      "release.pem already exists: init never overwrites a key")
    assert (tmp_path / "release.pem").read_text() == "precious"


def test_online_init_holds_the_release_key_in_the_root(online: Path) -> None:
    assert current(online).role(KeyRole.RELEASE).keyids == (kid_of(online / "keys" / "release.pem"),)
    assert_private(online)
    assert load_keys(online / "keys").release is not None


def test_init_again_changes_nothing_and_never_switches_modes_silently(offline: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (offline / "keys").rglob("*") if p.is_file()}
    again = assert_ok(run("init", "--data-dir", offline))
    assert "release key: offline" in again and "root of trust: v1;" in again
    assert {p: p.read_bytes() for p in (offline / "keys").rglob("*") if p.is_file()} == before
    assert_user_error(run("init", "--data-dir", offline, "--release-key", "online"),
                      "already has an offline release key, and init does not switch modes")


def test_init_on_an_online_directory_names_the_way_to_take_the_key_offline(online: Path) -> None:
    assert_user_error(run("init", "--data-dir", online, "--release-key", "offline"),
                      "already has an online release key", "keys rotate --role release --new-key-out PATH")


def test_a_data_directory_from_before_the_root_keeps_its_keys(online: Path) -> None:
    """Its agents pin the release and director keys: root v1 lists exactly those, online."""
    release, director = (kid_of(online / "keys" / f"{r}.pem") for r in ("release", "director"))
    for path in (online / "keys" / "root").iterdir():
        path.unlink()
    (online / "keys" / "root.pem").unlink()
    assert "release key: online" in assert_ok(run("init", "--data-dir", online))
    root = current(online)
    assert root.role(KeyRole.RELEASE).keyids == (release,) and root.role(KeyRole.DIRECTOR).keyids == (director,)


def test_the_server_refuses_an_online_key_the_root_does_not_list(online: Path) -> None:
    (online / "keys" / "release.pem").unlink()
    assert_ok(run("init", "--data-dir", online))  # offline now: nothing in the root changes
    stray = new_key_file(online / "keys" / "release.pem")
    with pytest.raises(ConfigError) as exc:
        load_keys(online / "keys")
    assert str(exc.value).startswith(f"the online release key {key_id(stray.public_key())} ")
    assert "is not in the release role of the root of trust v1: refusing to sign with it" in str(exc.value)
    with pytest.raises(ConfigError, match="refusing to sign with it"):
        ServerService(DataDir(online), BrokerAddress("127.0.0.1", unused_port()))


# -- keys show -------------------------------------------------------------------------------------


def test_keys_show_lists_roles_thresholds_and_where_each_private_key_is(offline: Path) -> None:
    text = assert_ok(run("keys", "show", "--data-dir", offline))
    root = current(offline)
    assert text.startswith("root of trust v1, expires ")
    assert f"release   1          {root.role(KeyRole.RELEASE).keyids[0]}  not on this server" in text
    shown = json.loads(assert_ok(run("keys", "show", "--data-dir", offline, "--json")))
    assert shown["version"] == 1 and shown["expires"] == root.expires
    assert shown["roles"]["director"] == {"threshold": 1, "keyids": list(root.role(KeyRole.DIRECTOR).keyids)}
    assert set(shown["held"]) == {*root.role(KeyRole.DIRECTOR).keyids, *root.role(KeyRole.ROOT).keyids}


# -- rotate and revoke ------------------------------------------------------------------------------


def chain_walks(data: Path) -> Root:
    """Every version follows from v1 the way an agent walks it."""
    store = RootStore(data / "keys")
    first = store.envelope(1)
    update = update_root(verify_root_self(first), first, store.chain(), now=time.time())
    return update.root if update is not None else verify_root_self(first)


def test_rotating_the_online_release_key_adds_it_and_signs_with_it(online: Path) -> None:
    old = kid_of(online / "keys" / "release.pem")
    out = assert_ok(run("keys", "rotate", "--role", "release", "--data-dir", online))
    new = kid_of(online / "keys" / "release.pem")
    assert f"root of trust v2: release key rotated: {new} signs from now on" in out
    root = chain_walks(online)
    assert root.version == 2 and root.role(KeyRole.RELEASE).keyids == (old, new)
    assert load_keys(online / "keys").release is not None
    assert_private(online)
    assert ("keys.rotated", audit_kinds(online)[-1][1]) == audit_kinds(online)[-1]
    assert audit_kinds(online)[-1][1].startswith("operator ")


def test_rotating_an_offline_release_key_needs_a_place_for_it(offline: Path, tmp_path: Path) -> None:
    assert_user_error(run("keys", "rotate", "--role", "release", "--data-dir", offline),
                      "the release key is offline: say where the new one goes with --new-key-out PATH")
    assert current(offline).version == 1
    assert_ok(run("keys", "rotate", "--role", "release", "--new-key-out", tmp_path / "release2.pem",
                  "--data-dir", offline))
    assert mode(tmp_path / "release2.pem") == 0o600
    assert kid_of(tmp_path / "release2.pem") in chain_walks(offline).role(KeyRole.RELEASE).keyids
    assert_user_error(run("keys", "rotate", "--role", "release", "--new-key-out", tmp_path / "release2.pem",
                          "--data-dir", offline), "already exists: a key is never overwritten")


def test_rotating_an_online_release_key_to_a_file_takes_it_offline(online: Path, tmp_path: Path) -> None:
    out = assert_ok(run("keys", "rotate", "--role", "release", "--new-key-out", tmp_path / "r.pem",
                        "--data-dir", online))
    assert "the release key is offline from now on" in out
    assert not (online / "keys" / "release.pem").exists()
    assert load_keys(online / "keys").release is None


def test_rotating_the_director_key_swaps_the_servers_key(offline: Path, tmp_path: Path) -> None:
    old = kid_of(offline / "keys" / "director.pem")
    assert_ok(run("keys", "rotate", "--role", "director", "--data-dir", offline))
    new = kid_of(offline / "keys" / "director.pem")
    assert chain_walks(offline).role(KeyRole.DIRECTOR).keyids == (old, new)
    assert key_id(load_keys(offline / "keys").director.public_key()) == new
    assert not (offline / "keys" / "director.pem.next").exists()
    assert_user_error(run("keys", "rotate", "--role", "director", "--new-key-out", tmp_path / "d.pem",
                          "--data-dir", offline), "the director key stays on the server")


def test_rotating_the_root_key_replaces_it_signed_by_old_and_new(offline: Path) -> None:
    old = kid_of(offline / "keys" / "root.pem")
    assert_ok(run("keys", "rotate", "--role", "root", "--data-dir", offline))
    new = kid_of(offline / "keys" / "root.pem")
    root = chain_walks(offline)
    assert root.role(KeyRole.ROOT).keyids == (new,) and old not in root.keys
    assert {s.keyid for s in RootStore(offline / "keys").envelope(2).signatures} == {old, new}
    assert_ok(run("keys", "rotate", "--role", "director", "--data-dir", offline))  # the new one signs v3
    assert chain_walks(offline).version == 3


def test_an_offline_root_key_is_passed_with_root_key(offline: Path, tmp_path: Path) -> None:
    (offline / "keys" / "root.pem").rename(tmp_path / "root.pem")
    assert_user_error(run("keys", "rotate", "--role", "director", "--data-dir", offline),
                      "the root key is not on this server", "--root-key PATH")
    assert_ok(run("keys", "rotate", "--role", "director", "--root-key", tmp_path / "root.pem", "--data-dir", offline))
    assert chain_walks(offline).version == 2
    assert_user_error(run("keys", "rotate", "--role", "root", "--root-key", tmp_path / "root.pem",
                          "--data-dir", offline), "the root key is offline: say where the new one goes")
    assert_ok(run("keys", "rotate", "--role", "root", "--root-key", tmp_path / "root.pem", "--new-key-out",
                  tmp_path / "root2.pem", "--data-dir", offline))
    assert chain_walks(offline).role(KeyRole.ROOT).keyids == (kid_of(tmp_path / "root2.pem"),)


def test_a_wrong_root_key_cannot_sign_the_next_root(offline: Path, tmp_path: Path) -> None:
    (offline / "keys" / "root.pem").rename(tmp_path / "root.pem")
    result = run("keys", "rotate", "--role", "director", "--root-key", offline / "keys" / "director.pem",
                 "--data-dir", offline)
    assert_user_error(result, "cannot sign root v2: root v2 does not chain from the trusted root v1")
    assert current(offline).version == 1
    assert kid_of(offline / "keys" / "director.pem") in current(offline).role(KeyRole.DIRECTOR).keyids


def test_revoking_the_old_release_key(offline: Path, tmp_path: Path) -> None:
    old = kid_of(tmp_path / "release.pem")
    assert_user_error(run("keys", "revoke", old, "--data-dir", offline),
                      f"revoking {old} would leave the release role 0 key(s), below its threshold of 1")
    assert_ok(run("keys", "rotate", "--role", "release", "--new-key-out", tmp_path / "r2.pem", "--data-dir", offline))
    out = assert_ok(run("keys", "revoke", old[:10], "--data-dir", offline))
    assert f"root of trust v3: key {old} revoked (release)" in out
    root = chain_walks(offline)
    assert root.role(KeyRole.RELEASE).keyids == (kid_of(tmp_path / "r2.pem"),) and old not in root.keys
    assert [k for k, _ in audit_kinds(offline)][-2:] == ["keys.rotated", "keys.revoked"]
    assert_private(offline)


def test_revoke_refuses_the_key_the_server_signs_with_and_unknown_ids(offline: Path) -> None:
    director = kid_of(offline / "keys" / "director.pem")
    assert_user_error(run("keys", "revoke", director, "--data-dir", offline),
                      f"this server signs with {director}", "rotate the director key first")
    assert_user_error(run("keys", "revoke", "0123456789", "--data-dir", offline), "no key 0123456789 in the root")
    assert_user_error(run("keys", "revoke", "abc", "--data-dir", offline), "a key id is 8 to 64 hex digits")
    assert current(offline).version == 1


# -- the running server ----------------------------------------------------------------------------


@pytest.fixture
def service(workspace: Workspace) -> Iterator[tuple[ServerService, Recorder]]:
    service = ServerService(workspace.data_dir, BrokerAddress("127.0.0.1", unused_port()), db=workspace.db)
    recorder = Recorder()
    service.link.publish = recorder  # type: ignore[method-assign]
    service.engine.tick()  # takes the engine lease: only the leader publishes the root
    assert service.follow_leadership()
    recorder.calls.clear()
    yield service, recorder
    service.link.stop()


def published_chain(recorder: Recorder) -> RootChain:
    topic, payload, retain = recorder.calls[-1]
    assert topic == ROOT_TOPIC and retain
    chain = decode_payload(TopicKind.ROOT, payload)
    assert isinstance(chain, RootChain)
    return chain


def test_the_server_publishes_the_chain_at_start_and_after_a_rotation(
    workspace: Workspace, service: tuple[ServerService, Recorder]
) -> None:
    server, recorder = service
    server.check_root()
    assert [verify_root_self(e).version for e in published_chain(recorder).roots] == [1]
    server.check_root()
    assert len(recorder.calls) == 1  # nothing changed: nothing sent

    assert_ok(run("keys", "rotate", "--role", "director", "--data-dir", workspace.data_dir.root))
    server.check_root()

    assert [verify_root_self(e).version for e in published_chain(recorder).roots] == [1, 2]
    assert server.engine.keys.director.public_key() == load_keys(workspace.data_dir.keys).director.public_key()
    assert key_id(server.keys.director.public_key()) == kid_of(workspace.data_dir.keys / "director.pem")


# -- what devices are given ---------------------------------------------------------------------------


def test_device_register_writes_the_current_root_beside_the_config(offline: Path, tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    out = assert_ok(run("device", "register", "cam", "--profile", "rpi4", "--data-dir", offline,
                        "--out", agents / "cam.toml"))
    assert f"root of trust v1: {agents / 'root.json'}" in out
    assert (agents / "root.json").read_bytes() == canonical_json(encode(RootStore(offline / "keys").envelope(1)))
    assert mode(agents / "root.json") == 0o600
    assert_ok(run("keys", "rotate", "--role", "director", "--data-dir", offline))
    assert_ok(run("device", "register", "cam2", "--profile", "rpi4", "--data-dir", offline,
                  "--out", agents / "cam2.toml"))  # the same directory: the shared root.json moves on to v2
    for name in ("cam", "cam2"):
        assert RootTrust(load_config(agents / f"{name}.toml")).version == 2


def test_device_register_refuses_to_replace_another_fleets_root(offline: Path, online: Path, tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    assert_ok(run("device", "register", "theirs", "--profile", "rpi4", "--data-dir", online,
                  "--out", agents / "theirs.toml"))
    before = (agents / "root.json").read_bytes()
    assert_user_error(run("device", "register", "ours", "--profile", "rpi4", "--data-dir", offline,
                          "--out", agents / "ours.toml"), "root.json holds another fleet's root of trust")
    assert (agents / "root.json").read_bytes() == before
    assert not (agents / "ours.toml").exists()
    assert json.loads(assert_ok(run("device", "list", "--data-dir", offline, "--json"))) == []


def test_a_chain_too_long_for_one_message_keeps_its_newest_roots() -> None:
    root_key = Ed25519PrivateKey.generate()
    others = [Ed25519PrivateKey.generate() for _ in range(6)]
    roles = {KeyRole.ROOT: [root_key.public_key()], KeyRole.RELEASE: [k.public_key() for k in others[:3]],
             KeyRole.DIRECTOR: [k.public_key() for k in others[3:]]}
    chain = [sign_root(make_root(v, roles), [root_key]) for v in range(1, 301)]

    payload = chain_payload(chain)

    assert len(payload) <= MAX_ROOT_PAYLOAD
    sent = decode_payload(TopicKind.ROOT, payload)
    assert isinstance(sent, RootChain)
    versions = [verify_root_self(e).version for e in sent.roots]
    assert 1 < versions[0] and versions == list(range(versions[0], 301))
    assert len(chain_payload(chain[-versions[0]:])) <= MAX_ROOT_PAYLOAD


def test_the_server_notices_a_key_file_replaced_without_a_new_root(
    workspace: Workspace, service: tuple[ServerService, Recorder]
) -> None:
    """A rotation writes the root first and moves the key into place after: the server may look in between."""
    server, _ = service
    director = workspace.data_dir.keys / "director.pem"
    old = director.read_bytes()
    assert_ok(run("keys", "rotate", "--role", "director", "--data-dir", workspace.data_dir.root))
    server.check_root()
    new_id = kid_of(director)
    assert key_id(server.engine.keys.director.public_key()) == new_id
    time.sleep(0.01)  # a coarse clock must still see the directory change
    write_private(director, old)  # the old key is still listed in v2

    server.check_root()

    assert key_id(server.engine.keys.director.public_key()) == kid_of(director) != new_id
