"""How peers of different releases talk: a minor protocol version on top of the major ``v``.

A fleet is never upgraded at once. The rule:

- ``v`` (``PROTOCOL_VERSION``) is the major version: a change an older peer
  cannot survive (a new required field, a changed meaning). A peer refuses
  another major.
- A minor version may only add *optional* fields. A field added in minor N is
  declared with ``field(default=None, metadata=since(N))``.
- ``encode_versioned`` writes ``"minor": N`` into a message or signed
  document only when it sets a field of minor N > 0, so a message that uses
  no newer field is byte-for-byte what older peers have always read.
- ``decode_versioned`` reads ``minor``: from a newer minor than this side
  speaks, keys it does not know are ignored (they are optional by the rule);
  from this minor or an older one, an unknown key is an error, as before. In
  a signed document ``minor`` is covered by the signature like every other
  key, so nobody can make a peer skip a key the signer meant.

Enumerated values are not fields: a new telemetry ``kind`` is still refused
by an older server (the agent keeps the report in its outbox until the
server is upgraded).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from shared import PROTOCOL_MINOR
from shared.codec import INT64_MAX, decode, encode
from shared.errors import ProtocolError

MINOR_KEY = "minor"

T = TypeVar("T")


def since(minor: int) -> dict[str, int]:
    """Field metadata: the minor version that added this optional field."""
    return {"since": minor}


def minor_of(obj: Any) -> int:
    """The newest minor version among the fields ``obj`` sets, at every level (0: none newer than the base)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        newest = 0
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            newest = max(newest, int(f.metadata.get("since", 0)), minor_of(value))
        return newest
    if isinstance(obj, (tuple, list)):
        return max((minor_of(item) for item in obj), default=0)
    return 0


def encode_versioned(obj: Any) -> Any:
    """``encode(obj)``, plus ``"minor"`` when ``obj`` sets a field newer than the base protocol."""
    data = encode(obj)
    minor = minor_of(obj)
    if minor and isinstance(data, dict):
        data[MINOR_KEY] = minor
    return data


def decode_versioned(cls: type[T], data: Any, path: str = "$") -> T:
    """Decode a message or signed document; a newer minor's unknown (optional) keys are ignored."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: expected an object")
    minor = data.get(MINOR_KEY, 0)
    if isinstance(minor, bool) or not isinstance(minor, int) or not 0 <= minor <= INT64_MAX:
        raise ProtocolError(f"{path}.{MINOR_KEY}: expected a non-negative integer")
    body = {key: value for key, value in data.items() if key != MINOR_KEY}
    return decode(cls, body, path, lenient=minor > PROTOCOL_MINOR)
