"""PROVISIONAL (replaced by the operator-basics branch): which devices a rollout selects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.db import Session, queries
from server.db.models import Device
from shared.errors import UserInputError


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserInputError(f"invalid tag {text!r}: use KEY=VALUE")
    return key, value


@dataclass(frozen=True)
class Selection:
    profiles: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.profiles or self.tags or self.devices)

    def matches(self, device: Device) -> bool:
        if device.name in self.devices:
            return True
        if not self.profiles and not self.tags:
            return False
        if self.profiles and device.profile_name not in self.profiles:
            return False
        tags = device.tags or {}
        return all(tags.get(k) == v for k, v in self.tags)

    def describe(self) -> str:
        parts = [f"profile {p}" for p in self.profiles] + [f"tag {k}={v}" for k, v in self.tags]
        parts += [f"device {d}" for d in self.devices]
        return ", ".join(parts) or "nothing"

    def to_json(self) -> dict[str, Any]:
        return {"profiles": list(self.profiles), "tags": dict(self.tags), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Selection:
        return cls(tuple(data.get("profiles", ())), tuple(sorted(data.get("tags", {}).items())),
                   tuple(data.get("devices", ())))


def select_devices(session: Session, selection: Selection) -> list[Device]:
    return [d for d in queries.devices(session) if selection.matches(d)]
