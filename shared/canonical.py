"""Canonical JSON: the exact bytes that signatures cover."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from shared.errors import ProtocolError

# How deep an inbound payload may nest objects and arrays. Every message of the protocol nests a handful of
# levels; past this, decoding and re-encoding (which recurse) would meet Python's recursion limit at a depth
# that depends on the caller's stack, and fail somewhere other than here.
MAX_JSON_DEPTH = 64


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise ProtocolError(f"value is not canonical JSON: {exc}") from exc


def canonical_digest(value: Any) -> str:
    """Hex sha256 of the canonical form."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses what two parsers could read differently.

    A duplicate key is read last-wins here and first-wins elsewhere, so a
    signed document carrying one could verify as one document and be acted on
    as another; NaN and Infinity have no canonical form, nor does a float
    literal too large for a float. Raises ValueError.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys, parse_float=_finite_float)


def parse_json_object(payload: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode an inbound payload that must be one JSON object of bounded size."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    too_deep = f"payload nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        value = loads_strict(payload)
    except RecursionError as exc:  # the parser recursed as deep as Python lets it
        raise ProtocolError(too_deep) from exc
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise ProtocolError(too_deep)
    if not isinstance(value, dict):
        raise ProtocolError(f"payload must be a JSON object, got {type(value).__name__}")
    # Only accept what can be encoded again (and so signed and verified). Parsing refused the floats that
    # overflow to infinity; what else cannot be encoded is a lone surrogate, which only an escape can spell
    # (raw surrogates are not UTF-8). Encoding every payload again cost a tenth of the server's ingest.
    if b"\\u" in payload:
        canonical_json(value)
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` deep (a bare scalar is 0 deep);
    iterative, so it cannot recurse itself."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):  # a literal of 1.8e308 or more: it has no canonical form either
        raise ValueError(f"number {literal[:24]}{'…' if len(literal) > 24 else ''} is out of range")
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # built in C; a key seen twice shows as a shorter dict (every inbound object passes here)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result
