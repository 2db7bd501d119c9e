"""Every message on the wire, as frozen dataclasses with a protocol version.

Each payload is decoded in exactly one place, ``decode_payload``, which checks
the size limit, the JSON, the version and every key. Handlers receive these
objects, never raw bytes or dicts.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared import PROTOCOL_VERSION
from shared.canonical import canonical_json, parse_json_object
from shared.codec import decode
from shared.errors import ProtocolError
from shared.histogram import WireHistogram
from shared.protocol import decode_versioned, encode_versioned, since
from shared.topics import TopicKind, is_valid_device_id

MAX_CONTROL_PAYLOAD = 256 * 1024
MAX_DESIRED_PAYLOAD = 1024 * 1024
MAX_ROOT_PAYLOAD = 256 * 1024  # the root chain: some 1.5 KiB per version; the server sends the newest that fit
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1024 * 1024
# The largest MQTT packet each side lets the broker deliver to it: its largest payload, plus room for the
# topic, properties and headers. Anything larger could only be refused after arriving whole.
PACKET_OVERHEAD = 64 * 1024
MAX_AGENT_PACKET = max(MAX_DESIRED_PAYLOAD, MAX_CHUNK_SIZE) + PACKET_OVERHEAD
MAX_SERVER_PACKET = MAX_CONTROL_PAYLOAD + PACKET_OVERHEAD


def _check_version(v: int) -> None:
    if v != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version {v} (this side speaks {PROTOCOL_VERSION})")


class UpdateState(enum.Enum):
    """Deployment states as reported by agents and shown by ``rollout status``. Values are persisted."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED)


# An event in this state reports a desired state the agent refused before trusting it. Its
# deployment id is only what the unverified message claimed: it never settles a deployment.
REJECTED = "rejected"
# How an agent's reason starts when a newer verified directive cancelled an install before its trial: the
# device was sent something newer, not a sign that this version is bad.
SUPERSEDED_BY = "superseded by deployment "
MAX_ID_LENGTH = 64
MAX_REASON_LENGTH = 4096


def clip_reason(reason: str) -> str:
    """A reason short enough for every report (an interpreter's error can be pages long)."""
    return reason if len(reason) <= MAX_REASON_LENGTH else reason[: MAX_REASON_LENGTH - 1] + "…"


# -- signed metadata -------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: str


@dataclass(frozen=True)
class SignedEnvelope:
    """``signed`` is covered by the signatures in its canonical JSON form."""

    signed: dict[str, Any]
    signatures: tuple[Signature, ...]


@dataclass(frozen=True)
class FileEntry:
    name: str
    role: str  # "model" | "eval"
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]  # sha256 of each chunk, in order

    def __post_init__(self) -> None:
        if self.role not in ("model", "eval"):
            raise ValueError(f"unknown file role {self.role!r}")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {self.chunk_size} out of range")
        expected = max(1, -(-self.size // self.chunk_size))
        if self.size < 0 or len(self.chunks) != expected:
            raise ValueError(f"{self.name}: {len(self.chunks)} chunk digests for {self.size} bytes")
        if "/" in self.name or "\x00" in self.name or self.name in ("", ".", ".."):
            raise ValueError(f"unsafe file name {self.name!r}")


def describe_file(name: str, role: str, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileEntry:
    """The manifest entry for ``data``: size, sha256 and the sha256 of every chunk."""
    chunks = tuple(
        hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, max(len(data), 1), chunk_size)
    )
    return FileEntry(
        name=name, role=role, sha256=hashlib.sha256(data).hexdigest(), size=len(data), chunk_size=chunk_size,
        chunks=chunks,
    )


@dataclass(frozen=True)
class ReferenceMetrics:
    accuracy: float  # the float model on the travelling eval set, on the host
    host_accuracy: float  # this variant on the host, same eval set
    host_p50_ms: float | None = None


@dataclass(frozen=True)
class Manifest:
    v: int
    model: str
    version: int
    release_counter: int
    profile: str
    quantization: str
    files: tuple[FileEntry, ...]
    reference: ReferenceMetrics
    created: int
    expires: int
    max_ram_bytes: int | None = None  # the target profile's RAM limit: the agent's trial stays under it
    # the target profile's interpreter threads (the agent's [runtime] threads may override); minor 1
    threads: int | None = field(default=None, metadata=since(1))

    def __post_init__(self) -> None:
        _check_version(self.v)
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be 1..256, got {self.threads}")
        roles = sorted(f.role for f in self.files)
        if roles != ["eval", "model"]:
            raise ValueError("a manifest lists exactly one model file and one eval file")

    def file(self, role: str) -> FileEntry:
        return next(f for f in self.files if f.role == role)


# How close to a gate's threshold a measured value still counts as at it (thresholds are inclusive): 0.87 - 0.86
# is 0.010000000000000009 in binary floating point, and must pass a 0.01 limit. The device's gates and the
# server's wave gates both use it, so they never disagree at a boundary.
GATE_EPSILON = 1e-9


def within_latency_slack(p95_ms: float, previous_p95_ms: float, slack_ms: float | None) -> bool:
    """Whether a p95 rose at most ``slack_ms`` above the replaced model's: the ratio of two microsecond
    timings is noise, so the device's gate and the server's wave gate both leave the ratio unjudged then."""
    return p95_ms - previous_p95_ms <= (slack_ms or 0.0) + GATE_EPSILON


@dataclass(frozen=True)
class Gates:
    """What the device checks before it commits (see ``agent/gates.py``). The comparisons with the model
    being replaced use that model's accuracy and p95 measured in the same trial, on the same eval samples;
    a device with no model yet skips them."""

    min_accuracy: float
    max_p95_ms: float | None = None
    max_regression: float | None = None  # accuracy may fall at most this far below the replaced model's
    max_latency_ratio: float | None = None  # p95 at most this many times the replaced model's p95
    # a p95 at most this many ms above the replaced model's passes whatever its ratio: the ratio of two
    # microsecond timings is noise (minor 3; an older agent ignores it and checks the ratio alone)
    latency_slack_ms: float | None = field(default=None, metadata=since(3))

    def __post_init__(self) -> None:
        if self.latency_slack_ms is not None and not 0 <= self.latency_slack_ms < math.inf:
            raise ValueError(f"latency_slack_ms must be a non-negative number, got {self.latency_slack_ms}")


@dataclass(frozen=True)
class Directive:
    v: int
    device_id: str
    deployment_id: str
    rollout_id: str
    manifest_sha256: str
    seq: int
    gates: Gates
    issued: int
    expires: int

    def __post_init__(self) -> None:
        _check_version(self.v)


# -- server -> agent -------------------------------------------------------


@dataclass(frozen=True)
class DesiredState:
    v: int
    directive: SignedEnvelope
    manifest: SignedEnvelope

    def __post_init__(self) -> None:
        _check_version(self.v)


@dataclass(frozen=True)
class MeasureOrder:
    """A benchmark-only trial of a release-signed candidate on one device (``model build --measure-on``),
    signed by the director key. It is not a directive: it has no sequence number, rollout or gates, so no
    agent can take it for an install, and the candidate is never staged in a slot or committed."""

    v: int
    device_id: str
    measurement_id: str
    manifest_sha256: str  # pins the candidate's signed manifest
    issued: int
    expires: int

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not 0 < len(self.measurement_id) <= MAX_ID_LENGTH:
            raise ValueError("measurement id must be 1..64 characters")


@dataclass(frozen=True)
class Command:
    v: int
    name: str  # "ping" | "benchmark" | "measure"
    args: dict[str, Any] = field(default_factory=dict)
    # "measure": a signed MeasureOrder and the candidate's signed manifest. An agent of minor 1 refuses the
    # command by its name, so it can never mistake it for anything it knows.
    order: SignedEnvelope | None = field(default=None, metadata=since(2))
    manifest: SignedEnvelope | None = field(default=None, metadata=since(2))

    def __post_init__(self) -> None:
        _check_version(self.v)
        if self.name not in ("ping", "benchmark", "measure"):
            raise ValueError(f"unknown command {self.name!r}")
        if (self.name == "measure") != (self.order is not None and self.manifest is not None):
            raise ValueError("a measure command carries a signed order and manifest, and only it does")


@dataclass(frozen=True)
class RootChain:
    """Every version of the signed root of trust, oldest first (``shared/root.py`` walks it)."""

    v: int
    roots: tuple[SignedEnvelope, ...]

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not self.roots:
            raise ValueError("a root chain holds at least one root")


# -- agent -> server -------------------------------------------------------


@dataclass(frozen=True)
class ActiveModel:
    model: str
    version: int
    sha256: str
    quantization: str
    deployment_id: str


@dataclass(frozen=True)
class DeploymentOutcome:
    """How the device's last deployment ended, kept in its retained state so that a server
    that missed the final event still learns it."""

    deployment_id: str
    state: str  # a final UpdateState value
    reason: str = ""

    def __post_init__(self) -> None:
        if not UpdateState(self.state).is_final:
            raise ValueError(f"outcome state {self.state!r} is not final")
        if len(self.deployment_id) > MAX_ID_LENGTH or len(self.reason) > MAX_REASON_LENGTH:
            raise ValueError("outcome deployment id or reason too long")


@dataclass(frozen=True)
class DeviceState:
    v: int
    device_id: str
    boot_id: str
    runtime: str
    runtime_version: str
    update_state: str
    deployment_id: str | None
    directive_seq: int
    active: ActiveModel | None
    hello: bool = False
    outcome: DeploymentOutcome | None = None

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not is_valid_device_id(self.device_id):
            raise ValueError(f"invalid device id {self.device_id!r}")
        for name in ("boot_id", "runtime", "runtime_version", "update_state"):
            if len(getattr(self, name)) > 64:
                raise ValueError(f"{name} longer than 64 characters")


@dataclass(frozen=True)
class Availability:
    v: int
    online: bool
    boot_id: str | None = None

    def __post_init__(self) -> None:
        _check_version(self.v)


@dataclass(frozen=True)
class Event:
    v: int
    device_id: str
    boot_id: str
    seq: int
    deployment_id: str
    state: str
    reason: str
    ts: float

    def __post_init__(self) -> None:
        _check_version(self.v)
        if self.state != REJECTED:
            UpdateState(self.state)
        if len(self.deployment_id) > MAX_ID_LENGTH or len(self.reason) > MAX_REASON_LENGTH:
            raise ValueError("event deployment id or reason too long")

    @property
    def is_rejection(self) -> bool:
        return self.state == REJECTED


@dataclass(frozen=True)
class BenchmarkResult:
    """benchmark_model-style numbers; times in milliseconds, memory in bytes."""

    runtime: str
    threads: int
    init_ms: float
    first_ms: float
    warmup_runs: int
    runs: int
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class PreviousModel:
    """The model a trial's candidate would replace, measured in the same trial on the same eval samples."""

    model: str
    version: int
    sha256: str
    accuracy: float
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class SystemStats:
    """The device as the agent read it at the end of a report's interval; None where it is not readable."""

    load_1m: float | None = None  # the 1-minute load average, divided by the number of CPUs
    cpu_percent: float | None = None  # the agent process's CPU time over the interval, % of one core
    rss_bytes: int | None = None  # the agent process's resident memory (it serves the model)
    temperature_c: float | None = None  # the hottest thermal zone


SERVING_SOURCES = frozenset({"traffic", "rebenchmark"})


@dataclass(frozen=True)
class ServingReport:
    """What the model the agent serves did during one interval [start, end] (wall clock, seconds).

    ``invoke`` holds each successful call's interpreter time, ``e2e`` its time inside the agent (request
    parsed to response ready); both in the shared log-spaced buckets (``shared/histogram.py``), so the
    server merges intervals and devices exactly. ``source`` "rebenchmark" says the agent ran the eval
    samples itself because no application called it. Percentiles are of ``invoke``, for a reader that
    does not merge.
    """

    model: str
    version: int
    sha256: str
    quantization: str
    runtime: str
    threads: int
    source: str
    start: float
    end: float
    calls: int
    errors: int
    samples: int
    invoke: WireHistogram
    e2e: WireHistogram
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    system: SystemStats | None = None

    def __post_init__(self) -> None:
        if self.source not in SERVING_SOURCES:
            raise ValueError(f"unknown serving source {self.source!r}")
        if not (math.isfinite(self.start) and math.isfinite(self.end) and self.start <= self.end):
            raise ValueError("a serving interval needs finite start <= end")
        if min(self.calls, self.errors, self.samples) < 0 or self.errors > self.calls:
            raise ValueError("calls, errors and samples must be non-negative, errors at most calls")
        if sum(count for _, count in self.invoke.buckets) > self.calls:
            raise ValueError("more recorded invoke times than calls")


TELEMETRY_KINDS = frozenset({"trial", "serving", "measurement"})


@dataclass(frozen=True)
class Telemetry:
    v: int
    device_id: str
    boot_id: str
    seq: int
    deployment_id: str | None
    # "trial" (benchmark, accuracy, samples, previous), "serving" (serving), or "measurement" (a benchmark-only
    # trial, its deployment_id the measurement id: benchmark, accuracy and samples, or the reason it failed)
    kind: str
    ts: float
    benchmark: BenchmarkResult | None = None
    accuracy: float | None = None
    samples: int | None = None
    previous: PreviousModel | None = None
    serving: ServingReport | None = field(default=None, metadata=since(1))
    reason: str | None = field(default=None, metadata=since(2))

    def __post_init__(self) -> None:
        _check_version(self.v)
        if self.kind not in TELEMETRY_KINDS:
            raise ValueError(f"unknown telemetry kind {self.kind!r}")
        if (self.kind == "serving") != (self.serving is not None):
            raise ValueError("serving telemetry carries a serving report, and only it does")
        if self.kind == "measurement" and (self.deployment_id is None
                                           or (self.reason is None) == (self.benchmark is None)):
            raise ValueError("a measurement names its id and carries either a benchmark or the reason it failed")
        if self.reason is not None and len(self.reason) > MAX_REASON_LENGTH:
            raise ValueError("telemetry reason too long")


@dataclass(frozen=True)
class ChunkRequest:
    v: int
    device_id: str
    ranges: tuple[tuple[int, int], ...]  # [start, end) chunk indices

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not self.ranges or len(self.ranges) > 1024:
            raise ValueError("ranges must list 1..1024 ranges")
        for start, end in self.ranges:
            if not 0 <= start < end:
                raise ValueError(f"bad range [{start}, {end})")


MAX_ACK_SEQS = 1024


@dataclass(frozen=True)
class ReportAck:
    """The server stored these reports (events and telemetry) of one agent boot: the agent may
    forget them. Until then it keeps them and sends them again, whatever the broker said."""

    v: int
    boot_id: str
    seqs: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_version(self.v)
        if not 0 < len(self.seqs) <= MAX_ACK_SEQS or len(self.boot_id) > MAX_ID_LENGTH:
            raise ValueError(f"an acknowledgement names 1..{MAX_ACK_SEQS} reports of one boot")


M = TypeVar("M")

PAYLOAD_TYPES: dict[TopicKind, type] = {
    TopicKind.DESIRED: DesiredState,
    TopicKind.CMD: Command,
    TopicKind.STATE: DeviceState,
    TopicKind.AVAILABILITY: Availability,
    TopicKind.EVENTS: Event,
    TopicKind.TELEMETRY: Telemetry,
    TopicKind.ACK: ReportAck,
    TopicKind.WANT: ChunkRequest,
    TopicKind.ROOT: RootChain,
}

PAYLOAD_LIMITS: dict[TopicKind, int] = {TopicKind.DESIRED: MAX_DESIRED_PAYLOAD, TopicKind.ROOT: MAX_ROOT_PAYLOAD}


def decode_payload(kind: TopicKind, payload: bytes) -> Any:
    """The single place a JSON payload becomes a message object."""
    cls = PAYLOAD_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"{kind.value} payloads are not JSON messages")
    limit = PAYLOAD_LIMITS.get(kind, MAX_CONTROL_PAYLOAD)
    data = parse_json_object(payload, max_bytes=limit)
    return decode_versioned(cls, data)


def decode_as(cls: type[M], data: Any) -> M:
    return decode(cls, data)


def encode_payload(message: Any) -> bytes:
    return canonical_json(encode_versioned(message))
