"""How a rollout proceeds: its waves, the thresholds of its gates, and what a failed gate does.

Stored as JSON on the rollout (``Rollout.policy``), so a restarted server
decides exactly as before. A wave size is a count (``1``) or a share of the
selection (``10%``); sizes are cumulative, so ``1,10%,50%,100%`` means a
canary, then up to a tenth, half and all of the devices.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.errors import UserInputError

DEFAULT_WAVES = ("1", "100%")
DEFAULT_REPORT_TIMEOUT_S = 1800.0
# The p95 of a model that runs in microseconds moves by tens of percent between two runs of the same model
# (1.44x, +1.3 µs, measured on a 3 µs model; README). 10 µs is several times that noise, yet a 3 µs model
# that became a 30 µs one still fails, and no user of a millisecond model would call 10 µs a slowdown.
DEFAULT_LATENCY_SLACK_MS = 0.01
MAX_WAVES = 20


class OnFailure(enum.Enum):
    PAUSE = "pause"
    ROLLBACK = "rollback"


def parse_size(text: str, what: str = "wave") -> str:
    """A normalised count (``"3"``) or share (``"10%"``); raises UserInputError."""
    text = text.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return f"{share:g}%"
        count = int(text)
        if count < 1:
            raise ValueError
        return str(count)
    except ValueError:
        raise UserInputError(f"invalid {what} size {text!r}: use a count like 1 or a share like 10%") from None


def parse_waves(text: str) -> tuple[str, ...]:
    """``"1,10%,50%,100%"`` -> the wave sizes; the last one always reaches every device."""
    sizes = tuple(parse_size(part) for part in text.split(",") if part.strip())
    if not sizes:
        raise UserInputError("--waves needs at least one size, e.g. 1,100%")
    if len(sizes) > MAX_WAVES:
        raise UserInputError(f"--waves lists {len(sizes)} waves; at most {MAX_WAVES}")
    if sizes[-1] != "100%":
        sizes = (*sizes, "100%")  # every selected device is reached in the end
    return sizes


def size_of(spec: str, selected: int) -> int:
    """How many of ``selected`` devices a size covers (a share rounds up, so 10% of 5 is 1)."""
    if spec.endswith("%"):
        return min(selected, math.ceil(selected * float(spec[:-1]) / 100 - 1e-9))
    return min(selected, int(spec))


@dataclass(frozen=True)
class RolloutPolicy:
    waves: tuple[str, ...] = DEFAULT_WAVES
    min_reports: str | None = None  # a size within a wave; None: every device of it (or its timeout)
    max_failure_ratio: float = 0.0
    min_accuracy: float = 0.0
    max_accuracy_drop: float = 0.02  # below the float model's host reference
    max_regression: float = 0.01  # below the replaced model on the same device and samples
    max_p95_ms: float | None = None
    max_latency_ratio: float = 1.5  # new p95 / replaced model's p95 on the same device, same trial
    # a p95 at most this many ms above the replaced model's passes whatever its ratio (microsecond noise)
    latency_slack_ms: float = DEFAULT_LATENCY_SLACK_MS
    report_timeout_s: float = DEFAULT_REPORT_TIMEOUT_S
    on_failure: OnFailure = OnFailure.ROLLBACK

    def __post_init__(self) -> None:
        if not self.waves or any(parse_size(spec) != spec for spec in self.waves) or self.waves[-1] != "100%":
            raise UserInputError(f"invalid waves {','.join(self.waves)!r}: normalised sizes ending in 100% "
                                 "(parse them with parse_waves)")
        if self.min_reports is not None and parse_size(self.min_reports, "--min-reports") != self.min_reports:
            raise UserInputError(f"invalid --min-reports {self.min_reports!r}")
        for name in ("max_failure_ratio", "min_accuracy", "max_accuracy_drop", "max_regression"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserInputError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value:g}")
        if self.max_p95_ms is not None and not self.max_p95_ms > 0:  # NaN too
            raise UserInputError(f"--max-p95-ms must be positive, got {self.max_p95_ms:g}")
        if not self.max_latency_ratio > 0:
            raise UserInputError(f"--max-latency-ratio must be positive, got {self.max_latency_ratio:g}")
        if not 0 <= self.latency_slack_ms < math.inf:
            raise UserInputError(f"--latency-slack-ms must be zero or positive, got {self.latency_slack_ms:g}")
        if not self.report_timeout_s > 0:
            raise UserInputError(f"--report-timeout must be positive, got {self.report_timeout_s:g}")

    def accuracy_gate(self, reference_accuracy: float) -> float:
        """The on-device accuracy floor: the absolute minimum or the drop below the host reference."""
        return round(max(self.min_accuracy, reference_accuracy - self.max_accuracy_drop), 6)

    def reports_needed(self, wave_size: int) -> int:
        return wave_size if self.min_reports is None else max(1, size_of(self.min_reports, wave_size))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["waves"], data["on_failure"] = list(self.waves), self.on_failure.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutPolicy:
        """A stored policy; keys a newer server added and an older one does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "waves" in values:
            values["waves"] = tuple(values["waves"])
        if "on_failure" in values:
            values["on_failure"] = OnFailure(values["on_failure"])
        return cls(**values)
