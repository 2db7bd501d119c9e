"""Durations and points in time as operators type them, for the CLI and the HTTP query parameters.

``parse_duration("15m") == 900.0``; units ms, s, m, h, d, w; a bare number is
seconds. ``parse_time`` takes ``now``, a duration back from now (``1h``,
``-1h`` or ``now-1h``), epoch seconds, or ISO-8601 (a time without a zone is
UTC). Bad input raises :class:`~shared.errors.UserInputError`.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from shared.errors import UserInputError

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)?\s*$")
# Steps a chart reads easily; auto_step picks the smallest that keeps a range within its points.
NICE_STEPS = (1.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 3 * 3600.0,
              6 * 3600.0, 12 * 3600.0, 86400.0, 7 * 86400.0)


def parse_duration(text: str | float) -> float:
    """Seconds in ``text`` ("90s", "15m", "24h", "30d", "1.5h", "500ms", or a number of seconds); > 0."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if match is None:
            raise UserInputError(f"bad duration {text!r}: expected a number with a unit ms, s, m, h, d or w "
                                 "(e.g. 90s, 15m, 24h, 30d)")
        seconds = float(match.group(1)) * UNITS[match.group(2) or "s"]
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserInputError(f"bad duration {text!r}: it must be more than zero")
    return seconds


def parse_time(text: str | float, now: float) -> float:
    """Epoch seconds for ``text``: "now", "1h" / "-1h" / "now-1h" (that long before ``now``), epoch seconds, or
    ISO-8601 ("2026-12-06T10:00:00Z")."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        stripped = text.strip()
        if stripped == "now":
            return now
        relative = stripped.removeprefix("now").lstrip()
        if relative.startswith("-"):
            return now - parse_duration(relative[1:])
        if _DURATION.match(stripped) and not _is_number(stripped):
            return now - parse_duration(stripped)
        if _is_number(stripped):
            value = float(stripped)
        else:
            try:
                parsed = datetime.fromisoformat(stripped.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise UserInputError(f"bad time {text!r}: expected 'now', a duration back from now like 1h, "
                                     "epoch seconds, or ISO-8601 like 2026-12-06T10:00:00Z") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            value = parsed.timestamp()
    if not math.isfinite(value) or value < 0:
        raise UserInputError(f"bad time {text!r}: epoch seconds must be a finite, non-negative number")
    return value


def auto_step(since: float, until: float, max_points: int = 120) -> float:
    """The smallest nice step that splits [since, until) into at most ``max_points`` steps."""
    span = max(until - since, 0.0)
    for step in NICE_STEPS:
        if span / step <= max_points:
            return step
    return math.ceil(span / max_points / NICE_STEPS[-1]) * NICE_STEPS[-1]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 900 -> "15m", 86400 -> "1d", 90 -> "90s"."""
    for unit in ("w", "d", "h", "m", "s"):
        count = seconds / UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
