"""Topic names: build/parse round-trips, strict rejection, subscription filters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from shared.errors import ProtocolError
from shared.topics import (
    DEVICE_KINDS,
    PREFIX,
    ROOT_TOPIC,
    SHARED_GROUP,
    TOPIC_TABLE,
    Topic,
    TopicKind,
    all_devices_filter,
    all_wants_filter,
    chunk_filter,
    chunk_topic,
    device_topic,
    is_valid_device_id,
    parse_topic,
    want_topic,
)
from tests.shared.factories import device_ids, sha256s

SHA = "0123456789abcdef" * 4
OTHER_SHA = "f" * 64
DEVICE_KIND_LIST = sorted(DEVICE_KINDS, key=lambda k: k.value)
chunk_indices = st.integers(min_value=0, max_value=10**9 - 1)


def rebuild(topic: Topic) -> str:
    """The builder call that should give back the parsed topic name."""
    if topic.kind in DEVICE_KINDS:
        assert topic.device_id is not None and topic.sha256 is None and topic.chunk_index is None
        return device_topic(topic.kind, topic.device_id)
    assert topic.sha256 is not None
    if topic.kind is TopicKind.WANT:
        assert topic.chunk_index is None and topic.device_id is not None
        return want_topic(topic.device_id, topic.sha256)
    assert topic.device_id is None
    assert topic.kind is TopicKind.CHUNK and topic.chunk_index is not None
    return chunk_topic(topic.sha256, topic.chunk_index)


# -- the table ------------------------------------------------------------------------


# The wire-protocol table of DESIGN.md, restated (plus the server's report acknowledgements).
EXPECTED_TABLE = {
    TopicKind.DESIRED: ("ef/v1/devices/{id}/desired", "server→agent", 1, True),
    TopicKind.CMD: ("ef/v1/devices/{id}/cmd", "server→agent", 1, False),
    TopicKind.STATE: ("ef/v1/devices/{id}/state", "agent→server", 1, True),
    TopicKind.AVAILABILITY: ("ef/v1/devices/{id}/availability", "agent→server", 1, True),
    TopicKind.EVENTS: ("ef/v1/devices/{id}/events", "agent→server", 1, False),
    TopicKind.TELEMETRY: ("ef/v1/devices/{id}/telemetry", "agent→server", 1, False),
    TopicKind.ACK: ("ef/v1/devices/{id}/ack", "server→agent", 1, False),
    TopicKind.WANT: ("ef/v1/devices/{id}/want/{sha256}", "agent→server", 1, False),
    TopicKind.CHUNK: ("ef/v1/artifacts/{sha256}/chunks/{i}", "server→agents", 1, False),
    TopicKind.ROOT: ("ef/v1/root", "server→agents", 1, True),
}


def test_topic_table_matches_the_design() -> None:
    assert PREFIX == "ef/v1"
    assert set(TOPIC_TABLE) == set(TopicKind)
    for kind, spec in TOPIC_TABLE.items():
        assert (spec.pattern, spec.direction, spec.qos, spec.retained) == EXPECTED_TABLE[kind]
    # one topic per device and kind; a device's chunk requests are one per artifact, under its namespace too
    assert DEVICE_KINDS == {k for k, spec in TOPIC_TABLE.items() if spec.pattern.endswith(f"{{id}}/{k.value}")}


@pytest.mark.parametrize("kind", DEVICE_KIND_LIST, ids=lambda k: k.value)
def test_device_builders_follow_the_table(kind: TopicKind) -> None:
    assert device_topic(kind, "pi-01") == TOPIC_TABLE[kind].pattern.format(id="pi-01")


def test_the_root_topic_follows_the_table_and_parses() -> None:
    assert ROOT_TOPIC == TOPIC_TABLE[TopicKind.ROOT].pattern == "ef/v1/root"
    assert parse_topic(ROOT_TOPIC) == Topic(TopicKind.ROOT)
    for near in ("ef/v1/root/", "ef/v1/root/x", "ef/v1/roots", "ef/v2/root", "ef/v1/Root", "/ef/v1/root"):
        with pytest.raises(ProtocolError):
            parse_topic(near)


def test_artifact_builders_follow_the_table() -> None:
    assert want_topic("pi-01", SHA) == TOPIC_TABLE[TopicKind.WANT].pattern.format(id="pi-01", sha256=SHA)
    assert chunk_topic(SHA, 17) == TOPIC_TABLE[TopicKind.CHUNK].pattern.format(sha256=SHA, i=17)


# -- round-trips ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", DEVICE_KIND_LIST, ids=lambda k: k.value)
@settings(max_examples=100)
@given(device_id=device_ids)
def test_device_topics_round_trip(kind: TopicKind, device_id: str) -> None:
    assert is_valid_device_id(device_id)
    name = device_topic(kind, device_id)
    assert parse_topic(name) == Topic(kind, device_id=device_id)
    assert rebuild(parse_topic(name)) == name


@settings(max_examples=100)
@given(device_id=device_ids, sha256=sha256s)
def test_want_topics_round_trip(device_id: str, sha256: str) -> None:
    name = want_topic(device_id, sha256)
    assert parse_topic(name) == Topic(TopicKind.WANT, device_id=device_id, sha256=sha256)
    assert rebuild(parse_topic(name)) == name


@settings(max_examples=200)
@given(sha256=sha256s, index=chunk_indices)
def test_chunk_topics_round_trip(sha256: str, index: int) -> None:
    name = chunk_topic(sha256, index)
    assert parse_topic(name) == Topic(TopicKind.CHUNK, sha256=sha256, chunk_index=index)
    assert topic_matches_sub(chunk_filter(sha256), name)


def test_boundary_identifiers_round_trip() -> None:
    for device_id in ("a", "0", "a-", "0-0", "a" * 63, "z9" + "-" * 61):
        assert parse_topic(device_topic(TopicKind.STATE, device_id)).device_id == device_id
    for index in (0, 1, 999_999_999):
        assert parse_topic(chunk_topic(SHA, index)).chunk_index == index


def test_chunk_topic_builder_and_parser_agree_on_the_largest_index() -> None:
    """chunk_topic builds names for indices that parse_topic rejects (it caps them at 9 digits)."""
    index = 10**9
    try:
        name = chunk_topic(SHA, index)
    except (ValueError, ProtocolError):
        return
    assert parse_topic(name).chunk_index == index


# -- builders reject bad input ------------------------------------------------------------


BAD_DEVICE_IDS = [
    "",
    "Pi-01",
    "PI",
    "pi_01",
    "pi.01",
    "pi 01",
    "pi/01",
    "+",
    "#",
    "pi+",
    "pi#",
    "-pi",
    "a" * 64,
    "pï",
    "pi\n",
    "\npi",
    "pi\x00",
]


@pytest.mark.parametrize("device_id", BAD_DEVICE_IDS, ids=repr)
def test_invalid_device_ids_are_rejected_by_builders_and_validator(device_id: str) -> None:
    assert not is_valid_device_id(device_id)
    for kind in DEVICE_KIND_LIST:
        with pytest.raises(ProtocolError):
            device_topic(kind, device_id)


BAD_SHAS = ["", "0" * 63, "0" * 65, SHA.upper(), "g" * 64, "+", "#", SHA[:-1] + " ", SHA + "\n", " " + SHA[1:]]


@pytest.mark.parametrize("sha256", BAD_SHAS, ids=repr)
def test_invalid_sha256_is_rejected_by_builders(sha256: str) -> None:
    for build in (lambda s: want_topic("pi-01", s), chunk_filter, lambda s: chunk_topic(s, 0)):
        with pytest.raises(ProtocolError):
            build(sha256)


def test_negative_chunk_index_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        chunk_topic(SHA, -1)


@pytest.mark.parametrize("kind", [TopicKind.WANT, TopicKind.CHUNK], ids=lambda k: k.value)
def test_artifact_kinds_are_not_device_topics(kind: TopicKind) -> None:
    with pytest.raises(ValueError):
        device_topic(kind, "pi-01")
    with pytest.raises(ValueError):
        all_devices_filter(kind)


# -- the parser rejects everything it does not know ------------------------------------------


BAD_TOPICS = [
    "",
    "/",
    "ef",
    "ef/v1",
    "ef/v1/",
    "ef/v1/devices",
    "ef/v1/devices/pi-01",
    "ef/v1/devices/pi-01/",
    # wrong prefix
    "ef/v2/devices/pi-01/state",
    "EF/v1/devices/pi-01/state",
    "xx/v1/devices/pi-01/state",
    "/ef/v1/devices/pi-01/state",
    "ef//v1/devices/pi-01/state",
    "v1/devices/pi-01/state",
    "$share/edgefleet/ef/v1/devices/pi-01/state",
    # bad device id
    "ef/v1/devices/Pi-01/state",
    "ef/v1/devices/PI/state",
    "ef/v1/devices/+/state",
    "ef/v1/devices/#/state",
    "ef/v1/devices/pi+/state",
    "ef/v1/devices//state",
    "ef/v1/devices/-pi/state",
    "ef/v1/devices/pi_01/state",
    f"ef/v1/devices/{'a' * 64}/state",
    # unknown or misplaced kind
    "ef/v1/devices/pi-01/unknown",
    "ef/v1/devices/pi-01/State",
    "ef/v1/devices/pi-01/want",
    "ef/v1/devices/pi-01/chunks",
    "ef/v1/devices/pi-01/chunks/0",
    f"ef/v1/artifacts/{SHA}/state",
    f"ef/v1/artifacts/{SHA}/desired",
    f"ef/v1/artifacts/{SHA}",
    f"ef/v1/artifacts/{SHA}/",
    "ef/v1/other/pi-01/state",
    "ef/v1/device/pi-01/state",
    # extra levels
    "ef/v1/devices/pi-01/state/extra",
    "ef/v1/devices/pi-01/state/",
    "ef/v1/devices/pi-01/desired/#",
    f"ef/v1/devices/pi-01/want/{SHA}/extra",
    f"ef/v1/devices/pi-01/want/{SHA}/",
    f"ef/v1/artifacts/{SHA}/want",  # where chunk requests were before they moved under the device
    f"ef/v1/artifacts/{SHA}/chunks/1/2",
    f"ef/v1/artifacts/{SHA}/chunks/1/",
    # bad sha
    "ef/v1/devices/pi-01/want/+",
    "ef/v1/devices/pi-01/want/#",
    f"ef/v1/devices/pi-01/want/{SHA.upper()}",
    f"ef/v1/devices/pi-01/want/{SHA[:-1]}",
    f"ef/v1/devices/pi-01/want/{SHA}0",
    f"ef/v1/devices/+/want/{SHA}",
    f"ef/v1/devices/PI/want/{SHA}",
    f"ef/v1/artifacts/{'g' * 64}/chunks/0",
    # bad chunk index
    f"ef/v1/artifacts/{SHA}/chunks",
    f"ef/v1/artifacts/{SHA}/chunks/",
    f"ef/v1/artifacts/{SHA}/chunks/x",
    f"ef/v1/artifacts/{SHA}/chunks/-1",
    f"ef/v1/artifacts/{SHA}/chunks/+1",
    f"ef/v1/artifacts/{SHA}/chunks/1.0",
    f"ef/v1/artifacts/{SHA}/chunks/1e3",
    f"ef/v1/artifacts/{SHA}/chunks/0x1",
    f"ef/v1/artifacts/{SHA}/chunks/ 1",
    f"ef/v1/artifacts/{SHA}/chunks/+",
    f"ef/v1/artifacts/{SHA}/chunks/#",
    f"ef/v1/artifacts/{SHA}/chunks/1234567890",
]


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=repr)
def test_unknown_or_malformed_topics_are_protocol_errors(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


# Found while writing these tests (see the report): ``$`` in the id regexes
# matches before a trailing newline, and ``str.isdigit`` accepts non-ASCII digits.
NON_CANONICAL_TOPICS = [
    "ef/v1/devices/pi-01\n/state",
    f"ef/v1/artifacts/{SHA}\n/want",
    f"ef/v1/artifacts/{SHA}\n/chunks/0",
    f"ef/v1/artifacts/{SHA}/chunks/\u00b2",  # superscript two: isdigit() but int() raises ValueError
    f"ef/v1/artifacts/{SHA}/chunks/\u0661\u0662",  # Arabic-Indic "12"
    f"ef/v1/artifacts/{SHA}/chunks/\uff11",  # fullwidth "1"
    f"ef/v1/artifacts/{SHA}/chunks/007",  # leading zeros: a second name for chunk 7
    f"ef/v1/artifacts/{SHA}/chunks/00",
]


@pytest.mark.parametrize("topic", NON_CANONICAL_TOPICS, ids=repr)
def test_non_canonical_topics_are_protocol_errors(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


def test_device_id_with_trailing_newline_is_invalid() -> None:
    assert not is_valid_device_id("pi-01\n")
    with pytest.raises(ProtocolError):
        device_topic(TopicKind.STATE, "pi-01\n")
    with pytest.raises(ProtocolError):
        want_topic("pi-01", SHA + "\n")
    with pytest.raises(ProtocolError):
        want_topic("pi-01\n", SHA)


_segments = st.one_of(
    device_ids,
    sha256s,
    st.sampled_from(
        ["ef", "v1", "devices", "artifacts", "chunks", "want", "+", "#", "", "007", "\u00b2", "\u0661", "0", "-1"]
        + [k.value for k in TopicKind]
    ),
    st.from_regex(r"[0-9]{1,11}", fullmatch=True),
    st.text(max_size=6),
    st.builds(lambda s: s + "\n", device_ids),
)


_HOSTILE_INDICES = [
    "\u00b2",
    "\u0661\u0662",
    "\uff11",
    "\uff10",
    "007",
    "00",
    "1\n",
    "\n1",
    "1_000",
    " 1",
    "1000000000",
]


@st.composite
def topic_like(draw: st.DrawFn) -> str:
    """Mostly well-shaped topic names, each with at most a few hostile parts."""
    shape = draw(st.sampled_from(["device", "want", "chunk", "chunk", "free"]))
    if shape == "free":
        head = draw(st.sampled_from(["ef/v1/devices", "ef/v1/artifacts", "ef/v1", "ef/v2/devices", ""]))
        tail = draw(st.lists(_segments, min_size=0, max_size=4))
        return "/".join([head, *tail]) if head else "/".join(tail)
    valid_ident = device_ids if shape == "device" else sha256s
    flavour = draw(st.sampled_from(["valid", "valid", "valid", "newline", "other"]))
    if flavour == "other":
        ident = draw(_segments)
    else:
        ident = draw(valid_ident) + ("\n" if flavour == "newline" else "")
    if shape == "device":
        parts = ["ef/v1/devices", ident, draw(st.sampled_from([k.value for k in TopicKind]) | _segments)]
    elif shape == "want":
        parts = ["ef/v1/artifacts", ident, "want"]
    else:
        index_flavour = draw(st.sampled_from(["number", "hostile", "hostile", "other"]))
        if index_flavour == "number":
            index = str(draw(st.integers(0, 10**10)))
        elif index_flavour == "hostile":
            index = draw(st.sampled_from(_HOSTILE_INDICES))
        else:
            index = draw(_segments)
        parts = ["ef/v1/artifacts", ident, "chunks", index]
    if draw(st.sampled_from([False, False, False, True])):  # now and then, one level too many
        parts.append(draw(_segments))
    return "/".join(parts)


@settings(max_examples=200)
@given(name=topic_like())
def test_parse_raises_only_protocol_error_and_success_is_canonical(name: str) -> None:
    """Whatever parses must be exactly what the builders would produce."""
    try:
        topic = parse_topic(name)
    except ProtocolError:
        return
    assert rebuild(topic) == name


# -- subscription filters ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DEVICE_KIND_LIST, ids=lambda k: k.value)
def test_all_devices_filter(kind: TopicKind) -> None:
    plain = all_devices_filter(kind)
    assert plain == f"ef/v1/devices/+/{kind.value}"
    assert all_devices_filter(kind, shared=False) == plain
    shared = all_devices_filter(kind, shared=True)
    assert SHARED_GROUP == "edgefleet"
    assert shared == f"$share/edgefleet/ef/v1/devices/+/{kind.value}"
    group_marker, group, inner = shared.split("/", 2)
    assert (group_marker, group, inner) == ("$share", SHARED_GROUP, plain)


def test_shared_telemetry_subscription_is_the_one_in_the_design() -> None:
    assert all_devices_filter(TopicKind.TELEMETRY, shared=True) == "$share/edgefleet/ef/v1/devices/+/telemetry"


@pytest.mark.parametrize("kind", DEVICE_KIND_LIST, ids=lambda k: k.value)
@settings(max_examples=50)
@given(device_id=device_ids)
def test_device_filter_matches_its_kind_only(kind: TopicKind, device_id: str) -> None:
    plain = all_devices_filter(kind)
    for other in TopicKind:
        if other in DEVICE_KINDS:
            assert topic_matches_sub(plain, device_topic(other, device_id)) == (other is kind)
    assert not topic_matches_sub(plain, want_topic(device_id, SHA))
    assert not topic_matches_sub(plain, chunk_topic(SHA, 0))


def test_want_and_chunk_filters() -> None:
    assert all_wants_filter() == "ef/v1/devices/+/want/+"
    assert all_wants_filter(shared=True) == "$share/edgefleet/ef/v1/devices/+/want/+"
    assert topic_matches_sub(all_wants_filter(), want_topic("pi-01", SHA))
    assert not topic_matches_sub(all_wants_filter(), chunk_topic(SHA, 0))
    assert not topic_matches_sub(all_wants_filter(), device_topic(TopicKind.STATE, "pi-01"))
    assert chunk_filter(SHA) == f"ef/v1/artifacts/{SHA}/chunks/+"
    assert topic_matches_sub(chunk_filter(SHA), chunk_topic(SHA, 3))
    assert not topic_matches_sub(chunk_filter(SHA), chunk_topic(OTHER_SHA, 3))
    assert not topic_matches_sub(chunk_filter(SHA), want_topic("pi-01", SHA))


def test_filters_are_not_concrete_topics() -> None:
    for name in [all_devices_filter(TopicKind.STATE), all_wants_filter(), chunk_filter(SHA)]:
        with pytest.raises(ProtocolError):
            parse_topic(name)
