"""parse_json_object accepts exactly the objects that can be encoded again, although it encodes again only
payloads with an escape in them (shared/canonical.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.canonical import canonical_json, parse_json_object
from shared.errors import ProtocolError

LIMIT = 1 << 20

# JSON text, built as text so that it can spell what a JSON encoder never writes: floats past 1.8e308
# (plain, with a long integer part, with long exponents) and escaped lone surrogates.
numbers = st.from_regex(r"-?(0|[1-9][0-9]{0,230})(\.[0-9]{1,4})?([eE][+-]?0?[0-9]{1,3})?", fullmatch=True)
strings = st.lists(st.sampled_from(["a", "é", "\\n", "\\u00e9", "\\ud800", "\\udfff", "\\ud83d\\ude00", "e400"]),
                   max_size=4).map(lambda parts: '"' + "".join(parts) + '"')
scalars = numbers | strings | st.sampled_from(["true", "false", "null"])
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
    | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3).map(
        lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items()) + "}"),
    max_leaves=8,
)
objects = st.dictionaries(st.sampled_from(["x", "y", "z"]), values, max_size=3).map(
    lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items()) + "}")


def reencodes(text: str) -> bool:
    try:
        canonical_json(json.loads(text))
    except ProtocolError:
        return False
    return True


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # long digit runs are slow to draw
@given(objects)
def test_a_payload_is_accepted_exactly_when_it_can_be_encoded_again(text: str) -> None:
    payload = text.encode()
    if reencodes(text):
        assert parse_json_object(payload, max_bytes=LIMIT) == json.loads(text)
    else:
        with pytest.raises(ProtocolError):
            parse_json_object(payload, max_bytes=LIMIT)


@pytest.mark.parametrize("literal", [
    "1e309", "-1E+400", "2.5e0308", "9" * 310 + ".0", "1" + "0" * 210 + "e99", "17976931348623159" + "0" * 292 + ".5",
])
def test_every_spelling_of_an_overflowing_float_is_refused(literal: str) -> None:
    with pytest.raises(ProtocolError, match="is out of range"):
        parse_json_object(f'{{"x":{literal}}}'.encode(), max_bytes=LIMIT)


def test_the_largest_float_and_escaped_pairs_are_accepted() -> None:
    value = parse_json_object(b'{"x":1.7976931348623157e308,"y":"\\ud83d\\ude00"}', max_bytes=LIMIT)
    assert value == {"x": 1.7976931348623157e308, "y": "\U0001f600"}
