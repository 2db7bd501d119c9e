"""An agent reads what a newer server signs: optional fields of a newer minor protocol version are skipped
(they are under the signature like everything else), while the same unknown keys without that newer minor
are refused (a malformed payload, or a rejected signed document), leaving the trusted state and the active
model as they were."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.service import AgentService
from agent.states import State
from shared import PROTOCOL_MINOR
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import DesiredState
from shared.mqtt import Inbound
from shared.protocol import MINOR_KEY, encode_versioned
from shared.signing import envelope_digest, sign_envelope
from shared.topics import TopicKind, chunk_topic, device_topic
from tests.agent.material import DEVICE, Keys, Release, chunk_of, make_release


def from_a_newer_server(release: Release, keys: Keys, minor: int, *, unsigned_keys: bool = True) -> bytes:
    """``release``'s desired state as a server of protocol minor ``minor`` would sign and send it, with fields
    this agent does not know in the manifest (top level and nested), the directive and the payload."""
    manifest: dict[str, Any] = encode_versioned(release.manifest)
    manifest.update({MINOR_KEY: minor, "delta_from": "b" * 64})
    manifest["files"][0]["compression"] = "zstd"
    manifest_env = sign_envelope(manifest, keys.release)
    directive: dict[str, Any] = encode_versioned(
        dataclasses.replace(release.directive, manifest_sha256=envelope_digest(manifest_env)))
    directive.update({MINOR_KEY: minor, "priority": "high"})
    desired: dict[str, Any] = encode(DesiredState(v=1, directive=sign_envelope(directive, keys.director),
                                                  manifest=manifest_env))
    if unsigned_keys:
        desired.update({MINOR_KEY: minor, "hint": {"cdn": "none"}})
    return canonical_json(desired)


def deliver(service: AgentService, payload: bytes, release: Release) -> None:
    service.handle(Inbound(device_topic(TopicKind.DESIRED, DEVICE), payload, True))
    for sha, blob in release.blobs().items():
        for index in range(-(-len(blob) // 64)):
            service.handle(Inbound(chunk_topic(sha, index), chunk_of(blob, index), False))


def test_a_newer_servers_optional_fields_are_skipped_and_the_release_installs(service: AgentService,
                                                                               keys: Keys) -> None:
    release = make_release(keys, version=1)
    deliver(service, from_a_newer_server(release, keys, PROTOCOL_MINOR + 1), release)
    assert service.updater.state is State.IDLE
    assert service.updater.slots.active_deployment() == release.deployment_id
    assert service.updater.slots.active_manifest() == release.manifest  # what this agent knows of it


@pytest.mark.parametrize("unsigned_keys", [True, False], ids=["payload-refused", "signed-documents-refused"])
def test_the_same_unknown_keys_without_a_newer_minor_are_refused(service: AgentService, keys: Keys,
                                                                  unsigned_keys: bool) -> None:
    first = make_release(keys, version=1)
    deliver(service, canonical_json(encode(first.desired)), first)
    data_dir = service.config.data_dir
    before = {name: (data_dir / name).read_bytes() for name in ("trusted.json", "active.json")}

    second = make_release(keys, version=2)
    deliver(service, from_a_newer_server(second, keys, PROTOCOL_MINOR, unsigned_keys=unsigned_keys), second)

    assert service.updater.state is State.IDLE
    assert service.updater.slots.active_deployment() == first.deployment_id
    assert {name: (data_dir / name).read_bytes() for name in before} == before
