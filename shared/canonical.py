"""Canonical JSON: the exact bytes that signatures cover."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shared.errors import ProtocolError


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
    as another; NaN and Infinity have no canonical form. Raises ValueError.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def parse_json_object(payload: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode an inbound payload that must be one JSON object of bounded size."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        value = loads_strict(payload)
    except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"payload must be a JSON object, got {type(value).__name__}")
    canonical_json(value)  # only accept what can be re-encoded (and so signed and verified)
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
