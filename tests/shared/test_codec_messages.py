"""Codec and wire messages: round-trips, strict decoding, and fuzzing.

The contract: ``decode_payload`` turns bytes into a frozen message object or
raises ``ProtocolError`` -- never any other exception, whatever the input.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Iterator
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.canonical import canonical_json
from shared.codec import decode, encode
from shared.errors import ProtocolError
from shared.messages import (
    MAX_CHUNK_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DESIRED_PAYLOAD,
    PAYLOAD_TYPES,
    ChunkRequest,
    Command,
    Directive,
    FileEntry,
    Manifest,
    UpdateState,
    decode_as,
    decode_payload,
    encode_payload,
)
from shared.topics import TopicKind
from tests.shared.factories import (
    MESSAGE_STRATEGIES,
    SAMPLES,
    directives,
    file_entry_for,
    make_directive,
    make_manifest,
    manifests,
)

NAN = float("nan")
INF = float("inf")
JSON_KINDS = sorted(PAYLOAD_TYPES, key=lambda k: k.value)


def _limit(kind: TopicKind) -> int:
    return MAX_DESIRED_PAYLOAD if kind is TopicKind.DESIRED else MAX_CONTROL_PAYLOAD


def _dumps(value: Any) -> bytes:
    """JSON as a hostile peer might send it: NaN/Infinity literals allowed, surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode("utf-8")


def _outcome(kind: TopicKind, payload: bytes) -> str:
    """'ok', 'ProtocolError', or the name of whatever else escaped."""
    try:
        decode_payload(kind, payload)
    except ProtocolError:
        return "ProtocolError"
    except Exception as exc:  # noqa: BLE001 - the point is to see what escapes
        return f"{type(exc).__name__}: {exc}"[:200]
    return "ok"


def _assert_protocol_error(kind: TopicKind, payload: bytes) -> None:
    outcome = _outcome(kind, payload)
    assert outcome == "ProtocolError", f"{kind.value}: {payload[:120]!r} -> {outcome}"


# -- coverage of the message table ----------------------------------------------


def test_every_topic_kind_but_chunks_has_a_json_message_type() -> None:
    assert set(PAYLOAD_TYPES) == set(TopicKind) - {TopicKind.CHUNK}
    assert set(MESSAGE_STRATEGIES) == set(PAYLOAD_TYPES)
    assert set(SAMPLES) == set(PAYLOAD_TYPES)
    for kind, cls in PAYLOAD_TYPES.items():
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"  # type: ignore[attr-defined]
        assert "v" in {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__} carries no protocol version"
        assert isinstance(SAMPLES[kind], cls)


def test_chunk_payloads_are_not_json_messages() -> None:
    _assert_protocol_error(TopicKind.CHUNK, b'{"v": 1}')


# -- round-trips ------------------------------------------------------------------


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
def test_samples_round_trip(kind: TopicKind) -> None:
    message = SAMPLES[kind]
    payload = encode_payload(message)
    assert decode_payload(kind, payload) == message
    assert encode_payload(decode_payload(kind, payload)) == payload


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@settings(max_examples=150)
@given(data=st.data())
def test_every_message_type_round_trips(kind: TopicKind, data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[kind])
    payload = encode_payload(message)
    decoded = decode_payload(kind, payload)
    assert type(decoded) is PAYLOAD_TYPES[kind]
    assert decoded == message
    # The encoding is canonical: re-encoding the decoded object gives the same bytes.
    assert encode_payload(decoded) == payload
    assert payload == canonical_json(json.loads(payload))


@settings(max_examples=150)
@given(manifest=manifests())
def test_manifest_round_trips(manifest: Manifest) -> None:
    assert decode_as(Manifest, encode(manifest)) == manifest
    assert decode(Manifest, json.loads(canonical_json(encode(manifest)))) == manifest


@settings(max_examples=150)
@given(directive=directives)
def test_directive_round_trips(directive: Directive) -> None:
    assert decode_as(Directive, encode(directive)) == directive
    assert decode(Directive, json.loads(canonical_json(encode(directive)))) == directive


def test_realistic_manifest_and_directive_round_trip() -> None:
    manifest = make_manifest()
    assert [len(f.chunks) for f in manifest.files] == [3, 1]
    assert manifest.file("model").name == "model.tflite"
    assert manifest.file("eval").name == "eval.npz"
    assert decode_as(Manifest, json.loads(canonical_json(encode(manifest)))) == manifest
    directive = make_directive("ab" * 32)
    assert decode_as(Directive, json.loads(canonical_json(encode(directive)))) == directive


def test_optional_keys_with_defaults_may_be_omitted() -> None:
    command = decode_payload(TopicKind.CMD, b'{"v":1,"name":"ping"}')
    assert command == Command(v=1, name="ping", args={})
    availability = decode_payload(TopicKind.AVAILABILITY, b'{"v":1,"online":false}')
    assert availability.boot_id is None
    data = encode(SAMPLES[TopicKind.TELEMETRY])
    for key in ("benchmark", "accuracy", "samples"):
        del data[key]
    telemetry = decode_payload(TopicKind.TELEMETRY, _dumps(data))
    assert (telemetry.benchmark, telemetry.accuracy, telemetry.samples) == (None, None, None)
    state = encode(SAMPLES[TopicKind.STATE])
    del state["hello"]
    assert decode_payload(TopicKind.STATE, _dumps(state)).hello is False


def test_an_integer_is_accepted_for_a_float_field_and_becomes_a_float() -> None:
    data = encode(SAMPLES[TopicKind.EVENTS])
    data["ts"] = 1_700_000_000
    event = decode_payload(TopicKind.EVENTS, _dumps(data))
    assert type(event.ts) is float and event.ts == 1_700_000_000.0


# -- strict decoding: a sweep over every field of every message -----------------------


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        assert len(options) == 1, f"unexpected union {tp!r}"
        return options[0], True
    return tp, False


def _wrong_values(tp: Any) -> list[Any]:
    """Values of the wrong JSON type for a field annotated ``tp``."""
    base, optional = _strip_optional(tp)
    origin = get_origin(base)
    if base is bool:
        values: list[Any] = [1, 0, "true", 1.0]
    elif base is int:
        values = ["1", True, False, 1.5, 1.0, [1], {"n": 1}]
    elif base is float:
        values = ["1.0", True, NAN, INF, -INF, [1.0], {"x": 1.0}]
    elif base is str:
        values = [1, True, 1.5, ["a"], {"a": "b"}]
    elif origin is tuple:
        values = ["a", 1, True, {"a": 1}]
    elif origin is dict or dataclasses.is_dataclass(base):
        values = ["a", 1, True, []]
    elif base is Any:
        values = []
    else:  # pragma: no cover - a new field type needs a line here
        raise AssertionError(f"no wrong values known for {tp!r}")
    if not optional and base is not Any:
        values.append(None)
    return values


def _mutations(tp: Any, value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every single-point corruption of ``value`` (typed ``tp``): wrong types, unknown and missing keys."""
    for bad in _wrong_values(tp):
        yield f"{path} = {bad!r}", bad
    base, _ = _strip_optional(tp)
    if value is None:
        return
    if dataclasses.is_dataclass(base):
        hints = get_type_hints(base)
        yield f"{path}: unknown key", {**value, "zz_unknown": 1}
        for f in dataclasses.fields(base):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                yield f"{path}: missing {f.name}", {k: v for k, v in value.items() if k != f.name}
            for desc, bad in _mutations(hints[f.name], value.get(f.name), f"{path}.{f.name}"):
                yield desc, {**value, f.name: bad}
    elif get_origin(base) is tuple and value:
        args = get_args(base)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]]  # corrupting the first item is enough
        else:
            item_types = list(args)
            yield f"{path}: one item short", value[:-1]
            yield f"{path}: one item too many", [*value, value[0]]
        for i, item_tp in enumerate(item_types):
            for desc, bad in _mutations(item_tp, value[i], f"{path}[{i}]"):
                yield desc, [*value[:i], bad, *value[i + 1 :]]


def _sweep(cls: type, message: Any, decode_fn: Any) -> list[str]:
    problems = []
    cases = list(_mutations(cls, encode(message), "$"))
    assert len(cases) > 10
    for desc, bad in cases:
        try:
            decode_fn(bad)
        except ProtocolError:
            continue
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{desc}: raised {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{desc}: was accepted")
    return problems


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
def test_every_unknown_missing_or_mistyped_field_is_a_protocol_error(kind: TopicKind) -> None:
    problems = _sweep(PAYLOAD_TYPES[kind], SAMPLES[kind], lambda bad: decode_payload(kind, _dumps(bad)))
    assert not problems, "\n".join(problems)


def test_every_unknown_missing_or_mistyped_manifest_field_is_a_protocol_error() -> None:
    problems = _sweep(Manifest, make_manifest(), lambda bad: decode_as(Manifest, bad))
    assert not problems, "\n".join(problems)


def test_every_unknown_missing_or_mistyped_directive_field_is_a_protocol_error() -> None:
    problems = _sweep(Directive, make_directive("ab" * 32), lambda bad: decode_as(Directive, bad))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
def test_explicit_strictness_examples(kind: TopicKind) -> None:
    data = encode(SAMPLES[kind])
    _assert_protocol_error(kind, _dumps({**data, "surprise": True}))  # unknown key
    _assert_protocol_error(kind, _dumps({k: v for k, v in data.items() if k != "v"}))  # missing key
    _assert_protocol_error(kind, _dumps({**data, "v": "1"}))  # str for int
    _assert_protocol_error(kind, _dumps({**data, "v": True}))  # bool for int
    _assert_protocol_error(kind, _dumps({**data, "v": 1.0}))  # float for int


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("version", [0, 2, -1, 2**70])
def test_wrong_protocol_version_is_a_protocol_error(kind: TopicKind, version: int) -> None:
    _assert_protocol_error(kind, _dumps({**encode(SAMPLES[kind]), "v": version}))


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("payload", [b"[]", b"[{}]", b"1", b'"v"', b"null", b"true", b"1.5"])
def test_non_object_json_is_a_protocol_error(kind: TopicKind, payload: bytes) -> None:
    _assert_protocol_error(kind, payload)


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize(
    "payload",
    [b"", b" ", b"{", b'{"v":1,}', b"{'v': 1}", b'{"v":1}{"v":1}', b"\x00", b'{"v":01}', b"nul"],
)
def test_malformed_json_is_a_protocol_error(kind: TopicKind, payload: bytes) -> None:
    _assert_protocol_error(kind, payload)


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe{}", b'{"v":1,"name":"\xc3("}', b'{"v":1,"name":"\xed\xa0\x80"}', b'\xef\xbb\xbf{"v":1}'],
    ids=["bom16", "truncated-seq", "encoded-surrogate", "utf8-bom"],
)
def test_invalid_utf8_is_a_protocol_error(kind: TopicKind, payload: bytes) -> None:
    _assert_protocol_error(kind, payload)


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
def test_payload_size_limit(kind: TopicKind) -> None:
    limit = _limit(kind)
    payload = encode_payload(SAMPLES[kind])
    at_limit = payload + b" " * (limit - len(payload))  # trailing whitespace is valid JSON
    assert len(at_limit) == limit
    assert decode_payload(kind, at_limit) == SAMPLES[kind]
    _assert_protocol_error(kind, at_limit + b" ")
    _assert_protocol_error(kind, b"{" * (limit + 1))


def test_desired_state_has_the_larger_limit() -> None:
    assert MAX_DESIRED_PAYLOAD > MAX_CONTROL_PAYLOAD
    payload = encode_payload(SAMPLES[TopicKind.DESIRED])
    padded = payload + b" " * (MAX_CONTROL_PAYLOAD + 1 - len(payload))
    assert decode_payload(TopicKind.DESIRED, padded) == SAMPLES[TopicKind.DESIRED]
    _assert_protocol_error(TopicKind.CMD, encode_payload(SAMPLES[TopicKind.CMD]) + b" " * MAX_CONTROL_PAYLOAD)


# -- semantic validation (``__post_init__``) also surfaces as ProtocolError ------------


def _with(kind: TopicKind, /, **changes: Any) -> bytes:
    return _dumps({**encode(SAMPLES[kind]), **changes})


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        (TopicKind.CMD, {"name": "rm -rf"}),
        (TopicKind.CMD, {"name": ""}),
        (TopicKind.CMD, {"name": "measure"}),  # a measure command carries its signed order and manifest
        (TopicKind.TELEMETRY, {"kind": "measurement", "reason": "and a result", "minor": 2}),  # one or the other
        (TopicKind.TELEMETRY, {"kind": "measurement", "deployment_id": None, "reason": "x", "benchmark": None,
                               "minor": 2}),
        (TopicKind.EVENTS, {"state": "exploded"}),
        (TopicKind.EVENTS, {"state": "TRIAL"}),
        (TopicKind.WANT, {"ranges": []}),
        (TopicKind.WANT, {"ranges": [[3, 3]]}),
        (TopicKind.WANT, {"ranges": [[5, 2]]}),
        (TopicKind.WANT, {"ranges": [[-1, 2]]}),
        (TopicKind.WANT, {"ranges": [[0, 1]] * 1025}),
        (TopicKind.WANT, {"ranges": [[0, 1, 2]]}),
        (TopicKind.WANT, {"ranges": [[0]]}),
        (TopicKind.WANT, {"ranges": [[0, 1.0]]}),
        (TopicKind.WANT, {"ranges": [[False, 1]]}),
    ],
)
def test_semantically_invalid_messages_are_protocol_errors(kind: TopicKind, changes: dict[str, Any]) -> None:
    _assert_protocol_error(kind, _with(kind, **changes))


def test_all_update_states_and_the_range_limit_are_accepted() -> None:
    for state in UpdateState:
        assert decode_payload(TopicKind.EVENTS, _with(TopicKind.EVENTS, state=state.value)).state == state.value
    request = decode_payload(TopicKind.WANT, _with(TopicKind.WANT, ranges=[[i, i + 1] for i in range(1024)]))
    assert isinstance(request, ChunkRequest) and len(request.ranges) == 1024


def _file_dict(**changes: Any) -> dict[str, Any]:
    return {**encode(file_entry_for("model.tflite", "model", b"x" * 1000, chunk_size=256)), **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"role": "weights"},
        {"chunk_size": 0},
        {"chunk_size": -256},
        {"chunk_size": MAX_CHUNK_SIZE + 1},
        {"size": -1},
        {"size": 1025},  # would need 5 chunks, lists 4
        {"chunks": ["00" * 32] * 3},
        {"chunks": []},
        {"name": ""},
        {"name": "."},
        {"name": ".."},
        {"name": "../etc/passwd"},
        {"name": "a/b.tflite"},
        {"name": "/abs.tflite"},
    ],
)
def test_invalid_file_entries_are_protocol_errors(changes: dict[str, Any]) -> None:
    assert decode_as(FileEntry, _file_dict())  # the base entry is valid
    with pytest.raises(ProtocolError):
        decode_as(FileEntry, _file_dict(**changes))


def test_file_name_with_nul_byte_is_a_protocol_error() -> None:
    """A NUL in a file name makes every later open() raise ValueError on the agent."""
    with pytest.raises(ProtocolError):
        decode_as(FileEntry, _file_dict(name="model\x00.tflite"))


def test_empty_file_has_exactly_one_chunk() -> None:
    entry = decode_as(FileEntry, _file_dict(size=0, chunks=["00" * 32]))
    assert entry.size == 0 and len(entry.chunks) == 1
    with pytest.raises(ProtocolError):
        decode_as(FileEntry, _file_dict(size=0, chunks=[]))


@pytest.mark.parametrize("roles", [["model"], ["eval"], ["model", "model"], ["model", "eval", "eval"], []])
def test_manifest_needs_exactly_one_model_and_one_eval_file(roles: list[str]) -> None:
    data = encode(make_manifest())
    data["files"] = [_file_dict(role=role, name=f"f{i}") for i, role in enumerate(roles)]
    with pytest.raises(ProtocolError):
        decode_as(Manifest, data)


# -- hostile JSON that Python's json module happily parses ------------------------------
# Found while writing these tests; see the report. Each must be a ProtocolError.


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize(
    ("kind", "template"),
    [
        (TopicKind.CMD, b'{"v":1,"name":"ping","args":{"x":%s}}'),
        (
            TopicKind.DESIRED,
            b'{"v":1,"directive":{"signed":{"x":%s},"signatures":[]},"manifest":{"signed":{},"signatures":[]}}',
        ),
    ],
    ids=["cmd-args", "desired-signed"],
)
def test_nan_and_infinity_literals_are_rejected_anywhere(kind: TopicKind, template: bytes, literal: bytes) -> None:
    """Non-standard JSON constants in free-form parts: decoded objects could never be re-encoded or signed."""
    _assert_protocol_error(kind, template % literal)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (TopicKind.CMD, b'{"v":1,"name":"ping","args":{"x":"\\ud800"}}'),
        (TopicKind.AVAILABILITY, b'{"v":1,"online":true,"boot_id":"\\udfff"}'),
        (
            TopicKind.DESIRED,
            b'{"v":1,"directive":{"signed":{"x":"\\ud800"},"signatures":[]},"manifest":{"signed":{},"signatures":[]}}',
        ),
    ],
    ids=["cmd-args", "availability-boot-id", "desired-signed"],
)
def test_escaped_lone_surrogates_are_rejected(kind: TopicKind, payload: bytes) -> None:
    """``"\\ud800"`` parses to a str that cannot be encoded as UTF-8 again (canonical_json then crashes)."""
    _assert_protocol_error(kind, payload)


def test_whatever_decodes_can_be_encoded_again() -> None:
    payloads = [
        (TopicKind.CMD, b'{"v":1,"name":"ping","args":{"x":NaN}}'),
        (TopicKind.CMD, b'{"v":1,"name":"ping","args":{"x":"\\ud800"}}'),
    ]
    for kind, payload in payloads:
        try:
            message = decode_payload(kind, payload)
        except ProtocolError:
            continue
        assert decode_payload(kind, encode_payload(message)) == message


def test_huge_integer_in_a_float_field_is_a_protocol_error() -> None:
    """``math.isfinite(10**400)`` raises OverflowError in codec._decode."""
    payload = _with(TopicKind.EVENTS, ts=10**400)
    _assert_protocol_error(TopicKind.EVENTS, payload)
    _assert_protocol_error(TopicKind.TELEMETRY, _with(TopicKind.TELEMETRY, accuracy=-(10**400)))


def test_integer_longer_than_the_int_digit_limit_is_a_protocol_error() -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) past sys.get_int_max_str_digits()."""
    payload = b'{"v":1,"name":"ping","args":{"n":1' + b"0" * 5000 + b"}}"
    assert len(payload) < MAX_CONTROL_PAYLOAD
    _assert_protocol_error(TopicKind.CMD, payload)


def test_deeply_nested_json_is_a_protocol_error() -> None:
    """json.loads raises RecursionError on deep nesting that still fits in the size limit."""
    depth = 100_000
    payload = b'{"v":1,"name":"ping","args":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    assert len(payload) < MAX_CONTROL_PAYLOAD
    _assert_protocol_error(TopicKind.CMD, payload)


def test_duplicate_keys_do_not_crash() -> None:
    # Python keeps the last value; what matters is a message or a ProtocolError.
    assert _outcome(TopicKind.AVAILABILITY, b'{"v":1,"online":true,"online":false}') in ("ok", "ProtocolError")


# -- fuzzing ----------------------------------------------------------------------


_hazards = st.sampled_from(
    [NAN, INF, -INF, -0.0, 1e308, 5e-324, 10**400, -(10**400), 2**64, -(2**63) - 1, "\ud800", "x\udc00", "", "\x00"]
)
_fuzz_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
    | _hazards
)
_fuzz_values = st.recursive(
    _fuzz_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["v", "name", "args", "ranges", "signed"]), children, max_size=4
        )
    ),
    max_leaves=16,
)


def _check_decodes_or_protocol_error(kind: TopicKind, payload: bytes) -> None:
    try:
        message = decode_payload(kind, payload)
    except ProtocolError:
        return
    assert type(message) is PAYLOAD_TYPES[kind]


@pytest.mark.parametrize("kind", list(TopicKind), ids=lambda k: k.value)
@settings(max_examples=200)
@given(payload=st.binary(max_size=256) | st.text(max_size=64).map(str.encode))
def test_fuzz_arbitrary_bytes(kind: TopicKind, payload: bytes) -> None:
    _check_decodes_or_protocol_error(kind, payload)


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@settings(max_examples=200)
@given(value=_fuzz_values)
def test_fuzz_arbitrary_json(kind: TopicKind, value: Any) -> None:
    _check_decodes_or_protocol_error(kind, _dumps(value))


_replacements = st.one_of(_hazards, _fuzz_scalars, _fuzz_values)


def _corrupt(data: st.DataObject, node: Any) -> Any:
    """Replace, drop or add one thing somewhere inside a decoded JSON tree (never the root itself)."""
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)), label="key")
        action = data.draw(st.sampled_from(["descend", "descend", "replace", "drop", "add"]), label="action")
        if action == "drop":
            return {k: v for k, v in node.items() if k != key}
        if action == "add":
            return {**node, data.draw(st.text(max_size=8), label="new key"): data.draw(_replacements)}
        if action == "replace":
            return {**node, key: data.draw(_replacements, label="replacement")}
        return {**node, key: _corrupt(data, node[key])}
    if isinstance(node, list) and node:
        i = data.draw(st.integers(0, len(node) - 1), label="index")
        return [*node[:i], _corrupt(data, node[i]), *node[i + 1 :]]
    return data.draw(_replacements, label="replacement")


@pytest.mark.parametrize("kind", JSON_KINDS, ids=lambda k: k.value)
@settings(max_examples=200)
@given(data=st.data())
def test_fuzz_corrupted_valid_messages(kind: TopicKind, data: st.DataObject) -> None:
    tree = json.loads(encode_payload(data.draw(MESSAGE_STRATEGIES[kind], label="message")))
    _check_decodes_or_protocol_error(kind, _dumps(_corrupt(data, tree)))


def test_fuzz_helpers_produce_hazards() -> None:
    # Guard against the fuzz strategies silently losing their teeth.
    assert _dumps([NAN, INF]) == b"[NaN, Infinity]"
    assert _dumps("\ud800") == b'"\\ud800"'
    assert _dumps(10**400).startswith(b"1000")


def test_describe_file_agrees_with_an_independent_computation() -> None:
    from shared.messages import describe_file
    from tests.shared.factories import EVAL_BYTES, MODEL_BYTES, file_entry_for

    for data in (MODEL_BYTES, EVAL_BYTES, b""):
        assert describe_file("f", "model", data) == file_entry_for("f", "model", data)


def test_unset_optional_fields_are_left_out_so_older_peers_still_read_the_message() -> None:
    """A peer that predates an optional field rejects it as an unknown key; unset, it is not sent."""
    from shared.codec import decode, encode
    from shared.messages import DeviceState, Manifest

    state = SAMPLES[TopicKind.STATE]
    bare = dataclasses.replace(state, outcome=None, hello=False)
    assert "outcome" not in encode(bare) and encode(bare)["hello"] is False  # False is a value, not unset
    assert decode(DeviceState, encode(bare)) == bare
    telemetry = dataclasses.replace(SAMPLES[TopicKind.TELEMETRY], benchmark=None, accuracy=None)
    assert {"benchmark", "accuracy"}.isdisjoint(encode(telemetry))
    assert "active" in encode(dataclasses.replace(state, active=None))  # required, even when null
    assert Manifest.__dataclass_fields__["max_ram_bytes"].default is None
