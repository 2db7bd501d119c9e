"""Strict decoding of JSON objects into frozen dataclasses.

``decode(Cls, data)`` rejects unknown keys, missing keys and wrong types with
a ProtocolError naming the path; ``encode(obj)`` is the inverse (an unset
optional field is left out, and decodes back to its default).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from shared.errors import ProtocolError

T = TypeVar("T")

# What every database and every other implementation can store.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def encode(obj: Any) -> Any:
    """Plain JSON values. An optional field that is unset (None, its default) is left out, so a
    peer that predates the field still reads the message as long as the field is not used."""
    fields = _encoded_fields(type(obj))
    if fields is not None:
        return {name: value if type(value) in _SCALARS else encode(value) for name, keep_none in fields
                if (value := getattr(obj, name)) is not None or keep_none}
    if isinstance(obj, (tuple, list)):
        return [encode(item) for item in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


_ENCODED_FIELDS: dict[type, tuple[tuple[str, bool], ...] | None] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})  # encoded as they are


def _encoded_fields(cls: type) -> tuple[tuple[str, bool], ...] | None:
    """A dataclass's fields as (name, whether None is written out), worked out once per class (the
    server encodes every stored report); None for anything that is not a dataclass."""
    if cls not in _ENCODED_FIELDS:
        is_dataclass = dataclasses.is_dataclass(cls)
        _ENCODED_FIELDS[cls] = tuple((f.name, f.default is not None) for f in dataclasses.fields(cls)) \
            if is_dataclass else None
    return _ENCODED_FIELDS[cls]


def decode(cls: type[T], data: Any, path: str = "$", *, lenient: bool = False) -> T:
    """``lenient``: ignore keys the dataclasses do not know, at every level (a newer peer's optional
    fields; see ``shared.protocol``), instead of rejecting them."""
    return typing.cast(T, _decode(cls, data, path, lenient))


def _decode(tp: Any, value: Any, path: str, lenient: bool) -> Any:
    # The common case first: a well-typed str, bool, finite float or 64-bit int leaf (the general checks
    # below cost several times more per field; bench/ingest.py decodes thousands of messages a second).
    kind = type(value)
    if kind is tp and (kind is str or kind is bool or (kind is float and math.isfinite(value))
                       or (kind is int and INT64_MIN <= value <= INT64_MAX)):
        return value
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ProtocolError(f"{path}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, value, path, lenient)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError("; ".join(errors))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item, f"{path}[{i}]", lenient) for i, item in enumerate(value))
        if len(args) != len(value):
            raise ProtocolError(f"{path}: expected {len(args)} items")
        return tuple(_decode(a, item, f"{path}[{i}]", lenient) for i, (a, item) in enumerate(zip(args, value)))
    if origin is dict:
        _, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected an object")
        return {str(k): _decode(value_tp, v, f"{path}.{k}", lenient) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, path, lenient)
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{path}: expected a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{path}: expected an integer")
        if not INT64_MIN <= value <= INT64_MAX:
            raise ProtocolError(f"{path}: integer out of the 64-bit range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{path}: expected a finite number")
        try:
            number = float(value)
        except OverflowError as exc:
            raise ProtocolError(f"{path}: number out of range") from exc
        if not math.isfinite(number):
            raise ProtocolError(f"{path}: expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{path}: expected a string")
        return value
    raise TypeError(f"unsupported type {tp!r} at {path}")


@functools.cache
def dataclass_schema(
    cls: Any,
) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]], dict[str, tuple[type, bool]]]:
    """A dataclass's resolved type hints, its init fields, and (type, whether null is allowed) of each field
    typed str, bool, float or int, optionally ``| None``; worked out once per class: ``get_type_hints``
    evaluates every annotation string again on each call, which made it most of the cost of decoding
    (``bench/decode.py``)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    return hints, fields, {name: scalar for name in fields if (scalar := _scalar(hints[name])) is not None}


def _scalar(tp: Any) -> tuple[type, bool] | None:
    if tp in (str, bool, float, int):
        return tp, False
    if get_origin(tp) in (Union, types.UnionType):
        options = [option for option in get_args(tp) if option is not type(None)]
        if len(options) == 1 and options[0] in (str, bool, float, int):
            return options[0], True
    return None


def _decode_dataclass(cls: Any, value: Any, path: str, lenient: bool) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object")
    hints, fields, scalars = dataclass_schema(cls)
    unknown = sorted(set(value) - set(fields))
    if unknown and not lenient:
        raise ProtocolError(f"{path}: unknown keys {unknown}")
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{path}: missing key {name!r}")
            continue
        item = value[name]
        scalar = scalars.get(name)
        if scalar is not None:  # _decode's common case, inline: no call, no path string
            kind = type(item)
            if (kind is scalar[0] and (kind is str or kind is bool or (kind is float and math.isfinite(item))
                                       or (kind is int and INT64_MIN <= item <= INT64_MAX))) or (
                    item is None and scalar[1]):
                kwargs[name] = item
                continue
        kwargs[name] = _decode(hints[name], item, f"{path}.{name}", lenient)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{path}: {exc}") from exc
