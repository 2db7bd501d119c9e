"""Which devices an operator means: by profile, by tags, by name.

A :class:`Selection` is pure data; ``matches`` decides for one device and
``select_devices`` applies it to the live (not removed) devices in the
registry. Rollouts store a selection in ``Rollout.selection`` (``to_json``)
and re-resolve it while they are live, so devices registered or tagged later
still converge.

The rule: a device matches when its name is listed in ``devices``, or when a
profile or a tag was given and the device has one of the ``profiles`` (any
profile if none was given) and carries every ``K=V`` in ``tags``. A selection
with neither profiles nor tags therefore holds only the devices it names, and
an empty selection holds no device at all: a rollout stored before selections
existed (``{}``) must never grow to the whole fleet.

Tags are short ``key=value`` labels on a device (``site=lab``, ``ring=canary``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import UserInputError

if TYPE_CHECKING:  # the registry is imported only by select_devices: matching needs no database
    from server.db import Session
    from server.db.models import Device

TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}")
MAX_TAG_VALUE = 128
MAX_TAGS = 64  # per device


class Selectable(Protocol):
    """What ``Selection.matches`` reads of a device (``server.db.models.Device`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def profile_name(self) -> str: ...

    @property
    def tags(self) -> Mapping[str, Any] | None: ...


def check_tag_key(key: str) -> str:
    if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
        raise UserInputError(
            f"invalid tag key {key!r}: use 1-63 letters, digits, '_', '.', ':', '/' or '-', "
            "starting with a letter or digit"
        )
    return key


def check_tag_value(key: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TAG_VALUE or not value.isprintable() or (
        value != value.strip()
    ):
        raise UserInputError(
            f"invalid value {value!r} for tag {key!r}: use 1-{MAX_TAG_VALUE} printable characters, "
            "without leading or trailing spaces"
        )
    return value


def parse_tag(text: str) -> tuple[str, str]:
    """``"site=lab"`` -> ``("site", "lab")``; the key is what comes before the first ``=``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise UserInputError(f"expected a tag as KEY=VALUE (e.g. site=lab), got {text!r}")
    return check_tag_key(key), check_tag_value(key, value)


def tag_pairs(tags: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Checked, sorted, without repeats; one key given with two values is a mistake (a device has one)."""
    values: dict[str, str] = {}
    for key, value in tags:
        check_tag_value(check_tag_key(key), value)
        if values.setdefault(key, value) != value:
            raise UserInputError(f"tag {key!r} given twice ({values[key]!r} and {value!r}): a device has one value")
    return tuple(sorted(values.items()))


def _names(values: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
        raise UserInputError(f"{what} must be a list of names, got {values!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class Selection:
    profiles: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()  # names, always included

    def __post_init__(self) -> None:  # one canonical form, so equal selections compare and store equal
        object.__setattr__(self, "profiles", _names(self.profiles, "profiles"))
        object.__setattr__(self, "tags", tag_pairs(self.tags))
        object.__setattr__(self, "devices", _names(self.devices, "devices"))

    @property
    def is_empty(self) -> bool:
        return not (self.profiles or self.tags or self.devices)

    @property
    def filters(self) -> bool:
        """True when a profile or a tag was given (else only the named devices match)."""
        return bool(self.profiles or self.tags)

    def matches(self, device: Selectable) -> bool:
        if device.name in self.devices:
            return True
        if not self.filters:
            return False
        if self.profiles and device.profile_name not in self.profiles:
            return False
        tags = device.tags or {}
        return all(tags.get(key) == value for key, value in self.tags)

    def to_json(self) -> dict[str, Any]:
        """The stored form: ``{"profiles": [...], "tags": {k: v}, "devices": [names]}``."""
        return {"profiles": list(self.profiles), "tags": dict(self.tags), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        """The inverse of ``to_json``; missing keys are empty (``{}`` is the empty selection)."""
        if not isinstance(data, Mapping):
            raise UserInputError(f"a selection is a JSON object, got {data!r}")
        unknown = sorted(set(data) - {"profiles", "tags", "devices"})
        if unknown:
            raise UserInputError(f"unknown key(s) in a selection: {', '.join(unknown)}")
        tags = data.get("tags", {})
        if not isinstance(tags, Mapping):
            raise UserInputError(f"a selection's tags are an object of KEY: VALUE, got {tags!r}")
        profiles, devices = data.get("profiles", []), data.get("devices", [])
        for what, names in (("profiles", profiles), ("devices", devices)):
            if not isinstance(names, list):
                raise UserInputError(f"a selection's {what} must be a list of names, got {names!r}")
        return cls(tuple(profiles), tuple(tags.items()), tuple(devices))

    def describe(self) -> str:
        """For messages: ``profile rpi4, tags site=lab, devices cam-1``."""
        parts = []
        if self.profiles:
            parts.append(f"profile {', '.join(self.profiles)}")
        if self.tags:
            parts.append(f"tags {' '.join(f'{k}={v}' for k, v in self.tags)}")
        if self.devices:
            parts.append(f"devices {', '.join(self.devices)}")
        return "; ".join(parts) or "no device"


def select_devices(session: Session, selection: Selection) -> list[Device]:
    """The live (not removed) devices ``selection`` matches, sorted by name."""
    from server.db import queries

    if selection.is_empty:
        return []
    return [device for device in queries.devices(session) if selection.matches(device)]
