"""The server's side of ``model build --measure-on``: signed orders stored, sent one per device until the
device reports, results recorded once, and the devices' numbers put in place of the host's."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import measurements
from server.catalog import resolve_version
from server.compress.pipeline import VariantReport
from server.compression import build_profiles, compression_report
from server.db import queries
from server.db.models import Device, Measurement, Release
from server.devices import register_device
from server.keys import SigningKeys
from server.setup import Workspace
from shared.canonical import parse_json_object
from shared.errors import ConfigError, NotFoundError, UserInputError
from shared.messages import Command, Telemetry, decode_payload
from shared.signing import KeyRole, TrustedKeys, public_key_text, verify_manifest, verify_measure_order
from shared.topics import TopicKind, device_topic
from tests.agent.material import BENCHMARK

pytestmark = pytest.mark.usefixtures("db_backend")


@pytest.fixture
def fleet(workspace: Workspace) -> dict[str, str]:
    ids = {name: register_device(workspace.db, name, profile).id
           for name, profile in (("pi-1", "rpi4"), ("pi-2", "rpi4"), ("nano", "jetson-nano"))}
    with workspace.db.session() as session:
        for device_id in ids.values():
            session.get(Device, device_id).online = True  # type: ignore[union-attr]
    return ids


def candidates(workspace: Workspace) -> list[VariantReport]:
    (report,) = compression_report(workspace.db, "digits:1", "rpi4")
    return [replace(v, tflite=workspace.blobs.read(v.sha256)) for v in report.variants if v.sha256]


def request(workspace: Workspace, fleet: dict[str, str], *names: str) -> list[str]:
    with workspace.db.session() as session:
        version_id = resolve_version(session, "digits:1").id
    return measurements.request(workspace.db, workspace.blobs, workspace.keys(), version_id, "rpi4",
                                candidates(workspace), [fleet[n] for n in names])


def send(workspace: Workspace, now: datetime | None = None) -> list[tuple[str, bytes]]:
    sent: list[tuple[str, bytes]] = []
    with workspace.db.session() as session:
        measurements.send_due(session, lambda topic, payload: sent.append((topic, payload)), now)
    return sent


def report(workspace: Workspace, device_id: str, measurement_id: str, **fields: Any) -> None:
    from server.ingest import apply_telemetry

    message = Telemetry(v=1, device_id=device_id, boot_id="b", seq=fields.pop("seq", 1),
                        deployment_id=measurement_id, kind="measurement", ts=0.0, **fields)
    with workspace.db.session() as session:
        assert apply_telemetry(session, message)


def test_each_candidate_gets_an_order_per_device_that_the_device_can_verify(
    workspace: Workspace, fleet: dict[str, str]
) -> None:
    ids = request(workspace, fleet, "pi-1", "pi-2")
    assert len(ids) == 2 * len(candidates(workspace))
    sent = send(workspace)
    assert sorted(topic for topic, _ in sent) == sorted(device_topic(TopicKind.CMD, fleet[n]) for n in ("pi-1", "pi-2"))
    keys = workspace.keys()
    assert keys.release is not None
    trusted = TrustedKeys.from_text({KeyRole.RELEASE: [public_key_text(keys.release.public_key())],
                                     KeyRole.DIRECTOR: [public_key_text(keys.director.public_key())]})
    for topic, payload in sent:
        command = decode_payload(TopicKind.CMD, payload)
        assert isinstance(command, Command) and command.name == "measure"
        assert command.order is not None and command.manifest is not None
        device_id = topic.split("/")[3]
        manifest = verify_manifest(command.manifest, trusted, now=datetime.now().timestamp(), profile="rpi4")
        order = verify_measure_order(command.order, trusted, now=datetime.now().timestamp(), device_id=device_id,
                                     manifest_envelope=command.manifest)
        assert manifest.threads == 4 and order.measurement_id in ids
        assert "minor" in parse_json_object(payload, max_bytes=1 << 20)  # an older agent refuses it by name


def test_one_order_at_a_time_per_device_sent_again_until_answered(workspace: Workspace, fleet: dict[str, str]) -> None:
    first, second, *_ = request(workspace, fleet, "pi-1")
    now = datetime.now(timezone.utc)
    assert len(send(workspace, now)) == 1
    assert send(workspace, now + timedelta(seconds=1)) == []  # not before RESEND_S
    (again,) = send(workspace, now + timedelta(seconds=measurements.RESEND_S + 1))
    assert first in again[1].decode()
    with workspace.db.session() as session:
        measurements.on_hello(session, fleet["pi-1"])  # a reconnect: at once
    assert len(send(workspace, now + timedelta(seconds=measurements.RESEND_S + 2))) == 1
    report(workspace, fleet["pi-1"], first, benchmark=BENCHMARK, accuracy=0.9, samples=200)
    (after,) = send(workspace)
    assert second in after[1].decode()


def test_an_offline_device_is_not_sent_to_and_an_expired_order_ends(workspace: Workspace, fleet: dict[str, str]) -> None:
    ids = request(workspace, fleet, "pi-1")
    with workspace.db.session() as session:
        session.get(Device, fleet["pi-1"]).online = False  # type: ignore[union-attr]
    assert send(workspace) == []
    send(workspace, datetime.now(timezone.utc) + timedelta(days=1))
    with workspace.db.session() as session:
        states = {m.state for m in session.query(Measurement).filter(Measurement.id.in_(ids))}
    assert states == {measurements.EXPIRED}


def test_the_first_result_counts_and_only_from_the_device_asked(workspace: Workspace, fleet: dict[str, str]) -> None:
    first, second, *_ = request(workspace, fleet, "pi-1")
    report(workspace, fleet["pi-2"], first, benchmark=BENCHMARK, accuracy=0.5, samples=200)  # not asked
    report(workspace, fleet["pi-1"], first, benchmark=BENCHMARK, accuracy=0.9, samples=200, seq=2)
    report(workspace, fleet["pi-1"], first, reason="a late failure", seq=3)
    report(workspace, fleet["pi-1"], second, reason="load_error: cannot load", seq=4)
    results = measurements.wait(workspace.db, [first, second], timeout_s=0.1, poll_s=0.01)
    assert [(r.state, r.accuracy, r.p95_ms, r.reason) for r in results] == [
        ("done", 0.9, BENCHMARK.p95_ms, ""), ("failed", None, None, "load_error: cannot load")]


def test_the_files_of_an_open_measurement_are_served_until_it_ends(workspace: Workspace, fleet: dict[str, str]) -> None:
    ids = request(workspace, fleet, "pi-1")
    with workspace.db.session() as session:
        row = session.get(Measurement, ids[0])
        assert row is not None
        sha = row.model_sha256
        released = {r.model_sha256 for r in session.query(Release)}
    assert sha not in released  # int8 ships to rpi4 but no release was ever signed for it here
    with workspace.db.session() as session:
        assert queries.servable_blob(session, sha)
    for seq, measurement_id in enumerate(ids, start=1):  # distinct numbers: a repeated one is a duplicate
        report(workspace, fleet["pi-1"], measurement_id, reason="not today", seq=seq)
    with workspace.db.session() as session:
        assert not queries.servable_blob(session, sha)


def test_device_numbers_replace_the_hosts_and_failures_fail(workspace: Workspace) -> None:
    host = [VariantReport("int8", "int8", p50_ms=0.003, p95_ms=0.003, accuracy=0.98, peak_rss_bytes=1),
            VariantReport("float32", "float32", p50_ms=0.005, p95_ms=0.005, accuracy=0.98, peak_rss_bytes=1),
            VariantReport("dynamic_range", "dynamic_range", p50_ms=0.003, p95_ms=0.003, accuracy=0.98)]
    results = [measurements.DeviceResult("pi", "int8", "done", 4.0, 6.0, 5, 0.97, "tflite-runtime 2.14.0", 4, ""),
               measurements.DeviceResult("pi", "float32", "done", 0.04, 0.06, 5, 0.97, "tflite-runtime 2.14.0", 4, ""),
               measurements.DeviceResult("pi", "dynamic_range", "failed", None, None, None, None, "", None, "boom")]
    measured, on_device = measurements.with_device_numbers(host, results)
    assert on_device
    int8, float32, dynamic = measured
    assert (int8.p95_ms, int8.accuracy, int8.details["host"]["p95_ms"]) == (6.0, 0.97, 0.003)
    assert int8.details["measured_on"] == {"devices": ["pi"], "runtime": "tflite-runtime 2.14.0", "threads": 4}
    assert float32.p95_ms == 0.06
    assert (dynamic.verdict, dynamic.reason) == ("failed", "on pi: boom")

    expired = [replace(results[0], state="expired"), results[1]]
    kept, on_device = measurements.with_device_numbers(host, expired)
    assert not on_device and [v.p95_ms for v in kept] == [0.003, 0.005, 0.003]  # never device beside host
    assert kept[0].details["measured_on"] == {"devices": [], "unanswered": ["pi"]}


def test_reference_devices_must_exist_be_online_and_of_a_built_profile(
    workspace: Workspace, fleet: dict[str, str]
) -> None:
    with workspace.db.session() as session:
        assert [d.name for d in measurements.reference_devices(session, ["pi-1", "pi-1"], ["rpi4"])["rpi4"]] == ["pi-1"]
        with pytest.raises(NotFoundError, match="--measure-on ghost: no such device"):
            measurements.reference_devices(session, ["ghost"], ["rpi4"])
        with pytest.raises(UserInputError, match="the device is a jetson-nano, and this build is for rpi4"):
            measurements.reference_devices(session, ["nano"], ["rpi4"])
        session.get(Device, fleet["pi-2"]).online = False  # type: ignore[union-attr]
    with workspace.db.session() as session, pytest.raises(UserInputError, match="pi-2: the device is offline"):
        measurements.reference_devices(session, ["pi-2"], ["rpi4"])


def test_an_offline_release_key_cannot_sign_candidates_for_devices(workspace: Workspace, fleet: dict[str, str]) -> None:
    offline = SigningKeys(release=None, director=Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match="--measure-on signs every candidate .* holds no release key"):
        build_profiles(workspace.db, workspace.blobs, "digits", ["rpi4"], measure_on=["pi-1"], keys=offline)
