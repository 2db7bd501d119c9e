"""Queries about device profiles, for ``server.profile_service``."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Device, Profile


def profiles(session: Session) -> Sequence[Profile]:
    return session.scalars(select(Profile).order_by(Profile.name)).all()


def device_counts(session: Session) -> dict[str, int]:
    """Registered (not removed) devices per profile name; profiles without devices are absent."""
    rows = session.execute(
        select(Device.profile_name, func.count()).where(Device.removed_at.is_(None)).group_by(Device.profile_name)
    )
    return {name: int(count) for name, count in rows}


def device_count(session: Session, profile: str) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(Device).where(Device.profile_name == profile, Device.removed_at.is_(None))
        )
        or 0
    )
