"""The ``since``/``until``/``step`` query parameters of the latency routes, read by the same rules as
``edgefleet latency`` (``server.latency.timespec``): epoch seconds, ISO-8601 or a duration ago ("1h"),
and a step in seconds or a duration ("1m"). Left out: the last hour, in the smallest round step that
gives at most ~120 points."""

from __future__ import annotations

from dataclasses import dataclass

from server.latency import check_range
from server.latency.timespec import auto_step, parse_duration, parse_time

DEFAULT_SPAN_S = 3600.0
DEFAULT_POINTS = 120


@dataclass(frozen=True)
class TimeRange:
    since: float
    until: float
    step_s: float


def parse_since(now: float, text: str) -> float:
    return parse_time(text, now)


def time_range(now: float, *, since: str | None, until: str | None, step: str | None) -> TimeRange:
    """UserInputError (HTTP 400) for text it cannot read or a range ``check_range`` refuses."""
    end = parse_time(until, now) if until else now
    start = parse_time(since, now) if since else end - DEFAULT_SPAN_S
    step_s = parse_duration(step) if step else auto_step(start, end, DEFAULT_POINTS)
    check_range(start, end, step_s)
    return TimeRange(start, end, step_s)
