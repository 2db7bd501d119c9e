"""Strict decoding of JSON objects into frozen dataclasses.

``decode(Cls, data)`` rejects unknown keys, missing keys and wrong types with
a ProtocolError naming the path; ``encode(obj)`` is the inverse (an unset
optional field is left out, and decodes back to its default).
"""

from __future__ import annotations

import dataclasses
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
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: encode(value)
            for f in dataclasses.fields(obj)
            if (value := getattr(obj, f.name)) is not None or f.default is not None
        }
    if isinstance(obj, (tuple, list)):
        return [encode(item) for item in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(cls: type[T], data: Any, path: str = "$") -> T:
    return typing.cast(T, _decode(cls, data, path))


def _decode(tp: Any, value: Any, path: str) -> Any:
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
                return _decode(option, value, path)
            except ProtocolError as exc:
                errors.append(str(exc))
        raise ProtocolError("; ".join(errors))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise ProtocolError(f"{path}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise ProtocolError(f"{path}: expected {len(args)} items")
        return tuple(_decode(a, item, f"{path}[{i}]") for i, (a, item) in enumerate(zip(args, value)))
    if origin is dict:
        _, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected an object")
        return {str(k): _decode(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, path)
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


def _decode_dataclass(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ProtocolError(f"{path}: unknown keys {unknown}")
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{path}: missing key {name!r}")
            continue
        kwargs[name] = _decode(hints[name], value[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{path}: {exc}") from exc
