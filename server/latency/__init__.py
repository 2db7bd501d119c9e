"""Served-model latency on the server: storing serving reports (``store``), reading them (``query``, the one
read model the CLI, HTTP API and dashboard share), and retention with downsampling (``retention``)."""

from __future__ import annotations

from server.latency.query import (
    MAX_POINTS,
    BeforeAfter,
    DeviceLatencySummary,
    LatencyPoint,
    LatencySeries,
    LatencyStats,
    LatencyTotal,
    ModelChange,
    RolloutLatency,
    VersionLatency,
    check_range,
    device_latency,
    latency_summary,
    latency_totals,
    model_latency,
    profile_latency,
    rollout_latency,
    rollout_latency_json,
    series_json,
    summary_json,
)

__all__ = [
    "MAX_POINTS", "BeforeAfter", "DeviceLatencySummary", "LatencyPoint", "LatencySeries", "LatencyStats",
    "LatencyTotal", "ModelChange", "RolloutLatency", "VersionLatency", "check_range", "device_latency",
    "latency_summary", "latency_totals", "model_latency", "profile_latency", "rollout_latency",
    "rollout_latency_json", "series_json", "summary_json",
]
