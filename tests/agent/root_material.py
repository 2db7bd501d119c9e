"""Roots of trust for agent tests: the server side's keys and the roots it signed, and an agent service that
trusts the first of them through ``[keys] root_file`` (fed by hand, against a broker nobody listens on)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig, KeysSection
from agent.root import TRUSTED_ROOT
from agent.service import AgentService
from agent.updater import Updater
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import RootChain, SignedEnvelope, encode_payload
from shared.mqtt import Inbound
from shared.root import Root
from shared.signing import sign_envelope
from shared.topics import ROOT_TOPIC, TopicKind, device_topic
from tests.agent.fakes import ScriptedTrial
from tests.agent.material import NOW, Keys, make_config
from tests.shared.factories import make_root

YEAR = 365 * 86_400


@dataclasses.dataclass
class Fleet:
    """The server side's keys and the roots it signed so far."""

    keys: Keys
    root_key: Ed25519PrivateKey
    roots: list[SignedEnvelope] = dataclasses.field(default_factory=list)
    release: list[Ed25519PrivateKey] = dataclasses.field(default_factory=list)

    def publish(self, root: Root, *signers: Ed25519PrivateKey) -> SignedEnvelope:
        envelope = sign_envelope(root, *(signers or (self.root_key,)))
        self.roots.append(envelope)
        return envelope

    def next_root(self, release: list[Ed25519PrivateKey], **changes: object) -> Root:
        return make_root(len(self.roots) + 1, root=[self.root_key], release=release, director=[self.keys.director],
                         expires=int(time.time()) + YEAR, **changes)  # type: ignore[arg-type]

    def chain(self, *roots: SignedEnvelope) -> Inbound:
        return Inbound(ROOT_TOPIC, encode_payload(RootChain(v=1, roots=roots or tuple(self.roots))), retain=True)


def new_fleet(keys: Keys) -> Fleet:
    """A fleet whose root v1 lists ``keys``' release and director keys and a fresh root key."""
    fleet = Fleet(keys, Ed25519PrivateKey.generate(), release=[keys.release])
    fleet.publish(fleet.next_root([keys.release]))
    return fleet


def root_config(tmp_path: Path, keys: Keys, fleet: Fleet) -> AgentConfig:
    root_file = tmp_path / "root.json"
    tmp_path.mkdir(parents=True, exist_ok=True)
    root_file.write_bytes(canonical_json(encode(fleet.roots[0])))
    config = make_config(tmp_path / "agent", keys, broker_url="mqtt://127.0.0.1:9")
    return dataclasses.replace(config, keys=KeysSection(root_file=str(root_file)))


def running_service(tmp_path: Path, keys: Keys, fleet: Fleet) -> Iterator[AgentService]:
    """An agent service trusting ``fleet``'s root v1, with a scripted trial (for a fixture to yield from)."""
    svc = AgentService(
        root_config(tmp_path, keys, fleet),
        updater_factory=lambda cfg, reporter: Updater(cfg, reporter, start_trial=ScriptedTrial(), clock=lambda: NOW),
    )
    yield svc
    svc.link.stop()


def saved_root(service: AgentService) -> bytes | None:
    path = service.config.data_dir / TRUSTED_ROOT
    return path.read_bytes() if path.exists() else None


def desired(release: object) -> Inbound:
    return Inbound(device_topic(TopicKind.DESIRED, "pi-kitchen-01"), encode_payload(release.desired),  # type: ignore[attr-defined]
                   retain=True)
