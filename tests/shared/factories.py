"""Realistic example messages and hypothesis strategies for every wire message.

Shared by the tests in this directory; keeps one definition of "a valid X".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from shared.messages import (
    MAX_CHUNK_SIZE,
    REJECTED,
    ActiveModel,
    Availability,
    BenchmarkResult,
    ChunkRequest,
    Command,
    DeploymentOutcome,
    DesiredState,
    DeviceState,
    Directive,
    Event,
    FileEntry,
    Gates,
    Manifest,
    PreviousModel,
    ReferenceMetrics,
    ReportAck,
    RootChain,
    Signature,
    SignedEnvelope,
    Telemetry,
    UpdateState,
)
from shared.root import RoleKeys, Root
from shared.signing import key_id, public_key_text
from shared.topics import TopicKind

NOW = 1_700_000_000
DAY = 86_400
CHUNK = 256 * 1024


# -- hand-made, realistic examples -------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry_for(name: str, role: str, data: bytes, chunk_size: int = CHUNK) -> FileEntry:
    """A FileEntry computed from real bytes, so sizes and chunk digests agree."""
    chunks = tuple(sha256_hex(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)) or (sha256_hex(b""),)
    return FileEntry(
        name=name, role=role, sha256=sha256_hex(data), size=len(data), chunk_size=chunk_size, chunks=chunks
    )


MODEL_BYTES = bytes(range(256)) * 2500  # 640,000 bytes -> 3 chunks of 256 KiB
EVAL_BYTES = b"eval-set:" + bytes(range(100)) * 10  # 1,009 bytes -> 1 chunk


def make_manifest(**overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "v": 1,
        "model": "mobilenet-v2",
        "version": 3,
        "release_counter": 7,
        "profile": "rpi5",
        "quantization": "int8",
        "files": (
            file_entry_for("model.tflite", "model", MODEL_BYTES),
            file_entry_for("eval.npz", "eval", EVAL_BYTES),
        ),
        "reference": ReferenceMetrics(accuracy=0.912, host_accuracy=0.905, host_p50_ms=4.25),
        "created": NOW - DAY,
        "expires": NOW + 30 * DAY,
    }
    fields.update(overrides)
    return Manifest(**fields)


def make_directive(manifest_sha256: str, **overrides: Any) -> Directive:
    fields: dict[str, Any] = {
        "v": 1,
        "device_id": "pi-kitchen-01",
        "deployment_id": "dep-42",
        "rollout_id": "ro-7",
        "manifest_sha256": manifest_sha256,
        "seq": 12,
        "gates": Gates(min_accuracy=0.88, max_p95_ms=25.0),
        "issued": NOW - 60,
        "expires": NOW + DAY,
    }
    fields.update(overrides)
    return Directive(**fields)


BENCHMARK = BenchmarkResult(
    runtime="ai-edge-litert",
    threads=4,
    init_ms=12.5,
    first_ms=9.0,
    warmup_runs=5,
    runs=50,
    mean_ms=4.4,
    std_ms=0.3,
    min_ms=4.0,
    max_ms=6.1,
    p50_ms=4.3,
    p90_ms=4.9,
    p95_ms=5.2,
    p99_ms=5.9,
    peak_rss_bytes=48_000_000,
)

# One valid example per payload kind, with every optional part filled in so
# nested dataclasses are present for the strict-decoding sweeps.
SAMPLES: dict[TopicKind, Any] = {
    TopicKind.DESIRED: DesiredState(
        v=1,
        directive=SignedEnvelope(
            signed={"device_id": "pi-kitchen-01", "seq": 12, "gates": {"min_accuracy": 0.88}},
            signatures=(Signature(keyid="ab" * 32, sig="c2lnbmF0dXJl"),),
        ),
        manifest=SignedEnvelope(
            signed={"model": "mobilenet-v2", "files": [{"name": "model.tflite"}]},
            signatures=(Signature(keyid="cd" * 32, sig="c2ln"),),
        ),
    ),
    TopicKind.CMD: Command(v=1, name="benchmark", args={"runs": 50, "threads": 4, "note": "after swap"}),
    TopicKind.STATE: DeviceState(
        v=1,
        device_id="pi-kitchen-01",
        boot_id="b-1",
        runtime="ai-edge-litert",
        runtime_version="2.3.0",
        update_state="committed",
        deployment_id="dep-42",
        directive_seq=12,
        active=ActiveModel(
            model="mobilenet-v2", version=3, sha256="ef" * 32, quantization="int8", deployment_id="dep-42"
        ),
        hello=True,
        outcome=DeploymentOutcome(deployment_id="dep-42", state="committed", reason=""),
    ),
    TopicKind.AVAILABILITY: Availability(v=1, online=True, boot_id="b-1"),
    TopicKind.EVENTS: Event(
        v=1,
        device_id="pi-kitchen-01",
        boot_id="b-1",
        seq=3,
        deployment_id="dep-42",
        state="trial",
        reason="benchmarking",
        ts=1_700_000_000.25,
    ),
    TopicKind.TELEMETRY: Telemetry(
        v=1,
        device_id="pi-kitchen-01",
        boot_id="b-1",
        seq=4,
        deployment_id="dep-42",
        kind="trial",
        ts=1_700_000_001.5,
        benchmark=BENCHMARK,
        accuracy=0.9,
        samples=500,
        previous=PreviousModel(model="mobilenet-v2", version=2, sha256="cd" * 32, accuracy=0.91, p50_ms=4.1,
                               p95_ms=5.0),
    ),
    TopicKind.ACK: ReportAck(v=1, boot_id="b-1", seqs=(3, 4)),
    TopicKind.WANT: ChunkRequest(v=1, device_id="pi-kitchen-01", ranges=((0, 2), (5, 9))),
    TopicKind.ROOT: RootChain(
        v=1,
        roots=(
            SignedEnvelope(signed={"type": "root", "version": 1}, signatures=(Signature(keyid="ab" * 32, sig="c2ln"),)),
            SignedEnvelope(signed={"type": "root", "version": 2}, signatures=()),
        ),
    ),
}


# -- hypothesis strategies ------------------------------------------------------

texts = st.text(max_size=24)  # hypothesis excludes lone surrogates by default
device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)
sha256s = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # the codec's 64-bit range
counters = st.integers(min_value=0, max_value=2**53)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

json_scalars = st.none() | st.booleans() | ints | finite_floats | texts
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(texts, json_values, max_size=6)

signatures = st.builds(Signature, keyid=sha256s, sig=texts)
envelopes = st.builds(SignedEnvelope, signed=json_objects, signatures=st.lists(signatures, max_size=3).map(tuple))


@st.composite
def file_entries(draw: st.DrawFn, role: str | None = None) -> FileEntry:
    chunk_size = draw(st.integers(min_value=1, max_value=MAX_CHUNK_SIZE))
    size = draw(st.integers(min_value=0, max_value=chunk_size * 20))
    count = max(1, -(-size // chunk_size))
    return FileEntry(
        name=draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True)),
        role=role if role is not None else draw(st.sampled_from(["model", "eval"])),
        sha256=draw(sha256s),
        size=size,
        chunk_size=chunk_size,
        chunks=tuple(draw(st.lists(sha256s, min_size=count, max_size=count))),
    )


reference_metrics = st.builds(
    ReferenceMetrics, accuracy=finite_floats, host_accuracy=finite_floats, host_p50_ms=st.none() | finite_floats
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    files = [draw(file_entries("model")), draw(file_entries("eval"))]
    if draw(st.booleans()):
        files.reverse()
    return Manifest(
        v=1,
        model=draw(texts),
        version=draw(counters),
        release_counter=draw(counters),
        profile=draw(texts),
        quantization=draw(texts),
        files=tuple(files),
        reference=draw(reference_metrics),
        created=draw(ints),
        expires=draw(ints),
    )


gates = st.builds(
    Gates,
    min_accuracy=finite_floats,
    max_p95_ms=st.none() | finite_floats,
    max_regression=st.none() | finite_floats,
    max_latency_ratio=st.none() | finite_floats,
)
directives = st.builds(
    Directive,
    v=st.just(1),
    device_id=device_ids,
    deployment_id=texts,
    rollout_id=texts,
    manifest_sha256=sha256s,
    seq=counters,
    gates=gates,
    issued=ints,
    expires=ints,
)

desired_states = st.builds(DesiredState, v=st.just(1), directive=envelopes, manifest=envelopes)
commands = st.builds(Command, v=st.just(1), name=st.sampled_from(["ping", "benchmark"]), args=json_objects)
active_models = st.builds(
    ActiveModel, model=texts, version=counters, sha256=sha256s, quantization=texts, deployment_id=texts
)
device_states = st.builds(
    DeviceState,
    v=st.just(1),
    device_id=device_ids,
    boot_id=texts,
    runtime=texts,
    runtime_version=texts,
    update_state=st.sampled_from([s.value for s in UpdateState]),
    deployment_id=st.none() | texts,
    directive_seq=counters,
    active=st.none() | active_models,
    hello=st.booleans(),
    outcome=st.none() | st.builds(
        DeploymentOutcome,
        deployment_id=texts,
        state=st.sampled_from([s.value for s in UpdateState if s.is_final]),
        reason=texts,
    ),
)
availabilities = st.builds(Availability, v=st.just(1), online=st.booleans(), boot_id=st.none() | texts)
events = st.builds(
    Event,
    v=st.just(1),
    device_id=device_ids,
    boot_id=texts,
    seq=counters,
    deployment_id=texts,
    state=st.sampled_from([s.value for s in UpdateState] + [REJECTED]),
    reason=texts,
    ts=finite_floats,
)
benchmarks = st.builds(
    BenchmarkResult,
    runtime=texts,
    threads=st.integers(1, 64),
    init_ms=finite_floats,
    first_ms=finite_floats,
    warmup_runs=counters,
    runs=counters,
    mean_ms=finite_floats,
    std_ms=finite_floats,
    min_ms=finite_floats,
    max_ms=finite_floats,
    p50_ms=finite_floats,
    p90_ms=finite_floats,
    p95_ms=finite_floats,
    p99_ms=finite_floats,
    peak_rss_bytes=counters,
)
telemetries = st.builds(
    Telemetry,
    v=st.just(1),
    device_id=device_ids,
    boot_id=texts,
    seq=counters,
    deployment_id=st.none() | texts,
    kind=st.just("trial"),
    ts=finite_floats,
    benchmark=st.none() | benchmarks,
    accuracy=st.none() | finite_floats,
    samples=st.none() | counters,
    previous=st.none() | st.builds(
        PreviousModel, model=texts, version=counters, sha256=sha256s, accuracy=finite_floats, p50_ms=finite_floats,
        p95_ms=finite_floats,
    ),
)


@st.composite
def chunk_ranges(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(st.integers(min_value=0, max_value=2**31))
    return (start, start + draw(st.integers(min_value=1, max_value=2**20)))


report_acks = st.builds(
    ReportAck, v=st.just(1), boot_id=texts, seqs=st.lists(counters, min_size=1, max_size=20).map(tuple)
)
chunk_requests = st.builds(
    ChunkRequest,
    v=st.just(1),
    device_id=device_ids,
    ranges=st.lists(chunk_ranges(), min_size=1, max_size=20).map(tuple),
)

MESSAGE_STRATEGIES: dict[TopicKind, st.SearchStrategy[Any]] = {
    TopicKind.DESIRED: desired_states,
    TopicKind.CMD: commands,
    TopicKind.STATE: device_states,
    TopicKind.AVAILABILITY: availabilities,
    TopicKind.EVENTS: events,
    TopicKind.TELEMETRY: telemetries,
    TopicKind.ACK: report_acks,
    TopicKind.WANT: chunk_requests,
    TopicKind.ROOT: st.builds(RootChain, v=st.just(1), roots=st.lists(envelopes, min_size=1, max_size=3).map(tuple)),
}


# -- roots of trust ------------------------------------------------------------------


def make_root(
    version: int, *, root: Sequence[Ed25519PrivateKey], release: Sequence[Ed25519PrivateKey],
    director: Sequence[Ed25519PrivateKey], thresholds: dict[str, int] | None = None, expires: int = NOW + 365 * DAY,
) -> Root:
    """A root listing these keys per role (threshold 1 unless ``thresholds`` says otherwise)."""
    listed = {key_id(k.public_key()): public_key_text(k.public_key()) for k in (*root, *release, *director)}
    thresholds = thresholds or {}
    return Root(
        v=1, type="root", version=version, expires=expires, keys=listed,
        roles={
            name: RoleKeys(tuple(key_id(k.public_key()) for k in keys), thresholds.get(name, 1))
            for name, keys in (("root", root), ("release", release), ("director", director))
        },
    )
