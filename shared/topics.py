"""Every MQTT topic of the wire protocol, built and parsed by pure functions.

The README's wire-protocol table is checked against ``TOPIC_TABLE`` by a test.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from shared.errors import ProtocolError

PREFIX = "ef/v1"
SHARED_GROUP = "edgefleet"

_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")
MAX_CHUNK_INDEX = 10**9 - 1


class TopicKind(enum.Enum):
    DESIRED = "desired"
    CMD = "cmd"
    STATE = "state"
    AVAILABILITY = "availability"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    ACK = "ack"
    WANT = "want"
    CHUNK = "chunks"
    ROOT = "root"


@dataclass(frozen=True)
class TopicSpec:
    pattern: str
    direction: str
    qos: int
    retained: bool


TOPIC_TABLE: dict[TopicKind, TopicSpec] = {
    TopicKind.DESIRED: TopicSpec(f"{PREFIX}/devices/{{id}}/desired", "server→agent", 1, True),
    TopicKind.CMD: TopicSpec(f"{PREFIX}/devices/{{id}}/cmd", "server→agent", 1, False),
    TopicKind.STATE: TopicSpec(f"{PREFIX}/devices/{{id}}/state", "agent→server", 1, True),
    TopicKind.AVAILABILITY: TopicSpec(f"{PREFIX}/devices/{{id}}/availability", "agent→server", 1, True),
    TopicKind.EVENTS: TopicSpec(f"{PREFIX}/devices/{{id}}/events", "agent→server", 1, False),
    TopicKind.TELEMETRY: TopicSpec(f"{PREFIX}/devices/{{id}}/telemetry", "agent→server", 1, False),
    TopicKind.ACK: TopicSpec(f"{PREFIX}/devices/{{id}}/ack", "server→agent", 1, False),
    # in the device's namespace, so a broker ACL can bind a device's chunk requests to its own identity
    TopicKind.WANT: TopicSpec(f"{PREFIX}/devices/{{id}}/want/{{sha256}}", "agent→server", 1, False),
    TopicKind.CHUNK: TopicSpec(f"{PREFIX}/artifacts/{{sha256}}/chunks/{{i}}", "server→agents", 1, False),
    # the signed root of trust, as the chain of every version (shared/root.py): every device reads it
    TopicKind.ROOT: TopicSpec(f"{PREFIX}/root", "server→agents", 1, True),
}

ROOT_TOPIC = f"{PREFIX}/root"

DEVICE_KINDS = frozenset(
    {
        TopicKind.DESIRED, TopicKind.CMD, TopicKind.STATE, TopicKind.AVAILABILITY, TopicKind.EVENTS,
        TopicKind.TELEMETRY, TopicKind.ACK,
    }
)


@dataclass(frozen=True)
class Topic:
    kind: TopicKind
    device_id: str | None = None
    sha256: str | None = None
    chunk_index: int | None = None


def is_valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID.fullmatch(device_id))


def _check_device_id(device_id: str) -> str:
    if not is_valid_device_id(device_id):
        raise ProtocolError(f"invalid device id {device_id!r}")
    return device_id


def _check_sha256(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ProtocolError(f"invalid sha256 {sha256!r}")
    return sha256


def device_topic(kind: TopicKind, device_id: str) -> str:
    if kind not in DEVICE_KINDS:
        raise ValueError(f"{kind} is not a device topic")
    return f"{PREFIX}/devices/{_check_device_id(device_id)}/{kind.value}"


def want_topic(device_id: str, sha256: str) -> str:
    return f"{PREFIX}/devices/{_check_device_id(device_id)}/want/{_check_sha256(sha256)}"


def chunk_topic(sha256: str, index: int) -> str:
    if not 0 <= index <= MAX_CHUNK_INDEX:
        raise ValueError(f"chunk index must be in [0, {MAX_CHUNK_INDEX}]")
    return f"{PREFIX}/artifacts/{_check_sha256(sha256)}/chunks/{index}"


def chunk_filter(sha256: str) -> str:
    """Subscription filter for every chunk of one file."""
    return f"{PREFIX}/artifacts/{_check_sha256(sha256)}/chunks/+"


def all_devices_filter(kind: TopicKind, *, shared: bool = False) -> str:
    """Subscription filter for one kind across all devices, optionally a shared subscription."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"{kind} is not a device topic")
    topic = f"{PREFIX}/devices/+/{kind.value}"
    return f"$share/{SHARED_GROUP}/{topic}" if shared else topic


def all_wants_filter(*, shared: bool = False) -> str:
    topic = f"{PREFIX}/devices/+/want/+"
    return f"$share/{SHARED_GROUP}/{topic}" if shared else topic


def parse_topic(topic: str) -> Topic:
    """Parse a concrete topic name; raises ProtocolError for anything unknown."""
    if topic == ROOT_TOPIC:
        return Topic(TopicKind.ROOT)
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise ProtocolError(f"unknown topic {topic!r}")
    section, ident, rest = parts[2], parts[3], parts[4:]
    if section == "devices" and len(rest) == 1:
        try:
            kind = TopicKind(rest[0])
        except ValueError as exc:
            raise ProtocolError(f"unknown device topic {topic!r}") from exc
        if kind in DEVICE_KINDS:
            return Topic(kind, device_id=_check_device_id(ident))
    if section == "devices" and len(rest) == 2 and rest[0] == "want":
        return Topic(TopicKind.WANT, device_id=_check_device_id(ident), sha256=_check_sha256(rest[1]))
    if section == "artifacts" and len(rest) == 2 and rest[0] == "chunks" and _CHUNK_INDEX.fullmatch(rest[1]):
        return Topic(TopicKind.CHUNK, sha256=_check_sha256(ident), chunk_index=int(rest[1]))
    raise ProtocolError(f"unknown topic {topic!r}")
