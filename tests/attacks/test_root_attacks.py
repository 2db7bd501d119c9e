"""Malicious root rotations (``agent/root.py``, ``shared/root.py``): the root of trust on ``ef/v1/root``.

An agent that trusts root v2 is sent a chain that must not move it: not chained (signed only by a key v2 does not
list), a lower version, a skipped version, an expired one (freeze), one below its root threshold. Each is refused
with its exact reason (logged, and reported to the server once as a rejection); the trusted root on disk, the
trusted state, the active model and the keys in use stay byte-identical; and a release signed by v2's release key
still installs next.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.service import AgentService
from agent.states import State
from shared.signing import key_id, sign_envelope
from tests.agent.material import Keys, make_release
from tests.agent.root_material import Fleet, desired, new_fleet, running_service, saved_root


@pytest.fixture
def fleet(keys: Keys) -> Fleet:
    return new_fleet(keys)


@pytest.fixture
def service(tmp_path: Path, keys: Keys, fleet: Fleet) -> Iterator[AgentService]:
    yield from running_service(tmp_path, keys, fleet)


def state_files(service: AgentService) -> dict[str, bytes]:
    """Every file of the agent's data directory: trusted root and state, active model, record."""
    root = service.config.data_dir
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("attack", ["not-chained", "lower", "skipped", "expired", "below-threshold"])
def test_a_malicious_root_rotation(
    service: AgentService, fleet: Fleet, keys: Keys, attack: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet.publish(fleet.next_root([keys.release]))
    service.handle(fleet.chain())  # trusts v2, saved
    before, keys_before, files_before = saved_root(service), service.updater.keys, state_files(service)
    attacker = Ed25519PrivateKey.generate()
    v3 = fleet.next_root([attacker])
    chain, expected = {
        "not-chained": ((fleet.roots[0], fleet.roots[1], sign_envelope(v3, attacker)),
                        "root v3 does not chain from the trusted root v2: no valid signature by its root keys"),
        "lower": ((fleet.roots[0],), "root version 1 is not newer than the trusted version 2"),
        "skipped": ((sign_envelope(dataclasses.replace(v3, version=4), fleet.root_key),),
                    "root version 4 skips a version: the trusted root is v2, the next must be v3"),
        "expired": ((sign_envelope(dataclasses.replace(v3, expires=int(time.time()) - 1), fleet.root_key),),
                    "root v3 expired at "),
        "below-threshold": ((sign_envelope(dataclasses.replace(v3, roles={**v3.roles, "root": dataclasses.replace(
            v3.roles["root"], keyids=(key_id(fleet.root_key.public_key()), key_id(attacker.public_key())),
            threshold=2)}, keys={**v3.keys, key_id(attacker.public_key()): v3.keys[key_id(attacker.public_key())]}),
            fleet.root_key),), "root v3 has 1 valid signature(s) by its own root keys, below its threshold of 2"),
    }[attack]
    rejections: list[str] = []
    monkeypatch.setattr(service, "rejected", lambda claimed, reason: rejections.append(reason))

    with caplog.at_level(logging.WARNING, logger="agent.root"):
        service.handle(fleet.chain(*chain))
        service.handle(fleet.chain(*chain))  # the same retained message on a reconnect: reported once

    assert f"rejected root of trust: {expected}" in caplog.text
    assert len(rejections) == 1 and rejections[0].startswith(f"rejected root of trust: {expected}")
    assert saved_root(service) == before and state_files(service) == files_before  # byte-identical
    assert service.updater.keys is keys_before
    assert service.root is not None and service.root.version == 2
    # and the agent still takes a good update, signed by the release key of the root it trusts
    service.handle(desired(make_release(keys)))
    assert service.updater.state is State.DOWNLOADING
