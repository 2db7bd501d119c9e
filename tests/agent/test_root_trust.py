"""An agent with a root of trust: its config, the chain on ef/v1/root, and what a new root changes.

The service is fed by hand (``service.handle``) against a broker nobody
listens on; roots and releases are really signed. A bad root changes nothing:
the trusted root on disk stays byte-identical and the keys in use stay the
same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import KeysSection, load_config
from agent.root import TRUSTED_ROOT, RootTrust
from agent.service import AgentService
from agent.states import State
from agent.updater import Updater
from shared.canonical import canonical_json
from shared.codec import encode
from shared.errors import ConfigError, StorageError
from shared.messages import REJECTED, Event, SignedEnvelope, decode_payload
from shared.mqtt import Inbound
from shared.signing import KeyRole, key_id, sign_envelope
from shared.topics import ROOT_TOPIC, TopicKind, device_topic
from tests.agent.material import NOW, Keys, make_config, make_release, write_config_toml
from tests.agent.root_material import Fleet, desired, new_fleet, root_config, running_service, saved_root
from tests.shared.factories import make_root


@pytest.fixture
def fleet(keys: Keys) -> Fleet:
    return new_fleet(keys)


@pytest.fixture
def service(tmp_path: Path, keys: Keys, fleet: Fleet) -> Iterator[AgentService]:
    yield from running_service(tmp_path, keys, fleet)


# -- config -----------------------------------------------------------------------------


def test_root_file_is_read_relative_to_the_config(tmp_path: Path, keys: Keys, fleet: Fleet) -> None:
    config = root_config(tmp_path / "etc", keys, fleet)
    path = write_config_toml(tmp_path / "etc" / "agent.toml",
                             dataclasses.replace(config, keys=KeysSection(root_file="root.json")))
    loaded = load_config(path)
    assert loaded.keys.root_file == str(tmp_path / "etc" / "root.json")
    assert RootTrust(loaded).version == 1


def test_a_config_with_a_root_and_pinned_keys_is_an_error(tmp_path: Path, keys: Keys, fleet: Fleet) -> None:
    config = root_config(tmp_path, keys, fleet)
    both = dataclasses.replace(config, keys=KeysSection(release=("x",), director=("y",), root_file="root.json"))
    with pytest.raises(ConfigError) as exc:
        load_config(write_config_toml(tmp_path / "agent.toml", both))
    assert "sets both root_file and pinned release/director keys: pick one" in str(exc.value)


def test_a_missing_or_unsigned_root_file_is_a_config_error(tmp_path: Path, keys: Keys, fleet: Fleet) -> None:
    config = dataclasses.replace(root_config(tmp_path, keys, fleet), keys=KeysSection(root_file="root.json"))
    path = write_config_toml(tmp_path / "agent.toml", config)
    (tmp_path / "root.json").unlink()
    with pytest.raises(ConfigError, match="cannot read the root of trust .*root.json"):
        load_config(path)
    unsigned = sign_envelope(make_root(1, root=[fleet.root_key], release=[keys.release], director=[keys.director]),
                             keys.attacker)
    (tmp_path / "root.json").write_bytes(canonical_json(encode(unsigned)))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).endswith(
        "root.json is not a signed root of trust: root v1 has 0 valid signature(s) by its own root keys, "
        "below its threshold of 1"
    )


def test_a_config_with_neither_is_an_error(tmp_path: Path, keys: Keys) -> None:
    config = dataclasses.replace(make_config(tmp_path / "agent", keys), keys=KeysSection())
    with pytest.raises(ConfigError, match=r"\[keys\] needs root_file .* or pinned keys"):
        load_config(write_config_toml(tmp_path / "agent.toml", config))


# -- the chain over MQTT ------------------------------------------------------------------


def test_a_rotation_is_saved_before_use_and_its_new_release_key_installs(
    service: AgentService, fleet: Fleet, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    new_release = Ed25519PrivateKey.generate()
    fleet.publish(fleet.next_root([keys.release, new_release]))
    signed_by_new = make_release(keys, release_key=new_release)
    assert service.root is not None and service.root.version == 1

    with caplog.at_level(logging.INFO, logger="agent.root"):
        service.handle(fleet.chain())

    assert "trusted root v1 → v2" in caplog.text
    assert saved_root(service) == canonical_json(encode(fleet.roots[1]))
    assert key_id(new_release.public_key()) in service.updater.keys.keys[KeyRole.RELEASE]
    service.handle(desired(signed_by_new))
    assert service.updater.state is State.DOWNLOADING  # accepted: verified with v2's keys
    # a restarted agent starts from the saved v2, not the configured v1
    assert RootTrust(service.config).version == 2


def test_a_release_that_arrives_before_its_root_is_taken_once_the_root_comes(
    service: AgentService, fleet: Fleet, keys: Keys
) -> None:
    new_release = Ed25519PrivateKey.generate()
    service.handle(desired(make_release(keys, release_key=new_release)))
    assert service.updater.state is State.IDLE  # refused: v1 does not know the key

    fleet.publish(fleet.next_root([keys.release, new_release]))
    service.handle(fleet.chain())

    assert service.updater.state is State.DOWNLOADING


def test_the_trusted_root_delivered_again_changes_nothing(service: AgentService, fleet: Fleet) -> None:
    service.handle(fleet.chain())
    assert saved_root(service) is None  # v1 is the configured one: nothing to save
    assert service.root is not None and service.root.version == 1


def test_a_rejected_root_is_reported_to_the_server_as_a_rejection(
    service: AgentService, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, bytes]] = []
    monkeypatch.setattr(service.link, "publish", lambda topic, payload, **kw: sent.append((topic, payload)))
    attacker = Ed25519PrivateKey.generate()
    service.handle(fleet.chain(sign_envelope(fleet.next_root([attacker]), attacker)))
    [(topic, payload)] = sent
    assert topic == device_topic(TopicKind.EVENTS, "pi-kitchen-01")
    event = decode_payload(TopicKind.EVENTS, payload)
    assert isinstance(event, Event) and event.state == REJECTED and event.deployment_id == ""
    assert event.reason == "rejected root of trust: root v2 does not chain from the trusted root v1: no valid " \
                           "signature by its root keys"


def test_malformed_root_payloads_are_dropped(service: AgentService, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for payload in (b"{", b'{"v": 1, "roots": []}', json.dumps({"v": 1, "roots": [{"signed": 1}]}).encode(),
                        b" " * (300 * 1024)):
            service.handle(Inbound(ROOT_TOPIC, payload, retain=True))
    assert caplog.text.count("dropped a malformed message on ef/v1/root") == 4
    assert saved_root(service) is None


def test_a_root_message_with_a_malformed_root_inside_is_refused(
    service: AgentService, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    bad = SignedEnvelope(signed={"type": "root", "version": 2}, signatures=())
    with caplog.at_level(logging.WARNING, logger="agent.root"):
        service.handle(fleet.chain(bad))
    assert "rejected root of trust: root of trust is malformed: $: missing key 'v'" in caplog.text


def test_a_corrupt_saved_root_is_a_storage_error(service: AgentService, fleet: Fleet, keys: Keys) -> None:
    fleet.publish(fleet.next_root([keys.release]))
    service.handle(fleet.chain())
    (service.config.data_dir / TRUSTED_ROOT).write_bytes(b"{half")
    with pytest.raises(StorageError, match="trusted-root.json is unreadable"):
        RootTrust(service.config)


def test_pinned_keys_ignore_roots(tmp_path: Path, keys: Keys, fleet: Fleet) -> None:
    config = make_config(tmp_path / "agent", keys, broker_url="mqtt://127.0.0.1:9")
    svc = AgentService(config, updater_factory=lambda cfg, reporter: Updater(cfg, reporter, clock=lambda: NOW))
    try:
        before = svc.updater.keys
        attacker = Ed25519PrivateKey.generate()
        svc.handle(fleet.chain(sign_envelope(fleet.next_root([attacker]), fleet.root_key)))
        assert svc.root is None and svc.updater.keys is before
        assert not (config.data_dir / TRUSTED_ROOT).exists()
    finally:
        svc.link.stop()
