"""Real signed material for the agent's tests: fresh Ed25519 keys, manifests and directives, an AgentConfig.

Manifests list a model file and an eval file cut into 64-byte chunks with
per-chunk sha256, signed by ``shared.signing.sign_envelope``; the directive
pins the manifest by ``envelope_digest``. The bytes are arbitrary: the unit
tests script the trial.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import (
    AgentConfig,
    BenchmarkSection,
    BrokerSection,
    DeviceSection,
    DownloadSection,
    KeysSection,
    ServeSection,
    StorageSection,
    TrialSection,
)
from agent.record import TrustedState
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import (
    BenchmarkResult,
    DesiredState,
    Directive,
    FileEntry,
    Gates,
    Manifest,
    ReferenceMetrics,
    SignedEnvelope,
    describe_file,
)
from shared.signing import envelope_digest, public_key_text, sign_envelope

NOW = 1_700_000_000
DAY = 86_400
DEVICE = "pi-kitchen-01"
CHUNK_SIZE = 64
STALL_TIMEOUT = 30.0
REQUEST_INTERVAL = 5.0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(seed: str, size: int) -> bytes:
    """Deterministic, distinct bytes: the trial is scripted, so they need not be a real model."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


def file_entry(name: str, role: str, data: bytes, chunk_size: int = CHUNK_SIZE) -> FileEntry:
    return describe_file(name, role, data, chunk_size)


def chunk_of(data: bytes, index: int, chunk_size: int = CHUNK_SIZE) -> bytes:
    return data[index * chunk_size : (index + 1) * chunk_size]


BENCHMARK = BenchmarkResult(
    runtime="ai-edge-litert 2.3.0",
    threads=1,
    init_ms=3.0,
    first_ms=1.2,
    warmup_runs=2,
    runs=50,
    mean_ms=1.1,
    std_ms=0.1,
    min_ms=0.9,
    max_ms=2.0,
    p50_ms=1.0,
    p90_ms=1.4,
    p95_ms=1.6,
    p99_ms=1.9,
    peak_rss_bytes=40_000_000,
)

GATES = Gates(min_accuracy=0.8, max_p95_ms=10.0)


# -- keys and signed releases -------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    release: Ed25519PrivateKey
    director: Ed25519PrivateKey
    attacker: Ed25519PrivateKey


@dataclass(frozen=True)
class Release:
    """One signed desired state plus the bytes the server would serve for it."""

    manifest: Manifest
    directive: Directive
    manifest_env: SignedEnvelope
    directive_env: SignedEnvelope
    model: bytes
    eval: bytes

    @property
    def desired(self) -> DesiredState:
        return DesiredState(v=1, directive=self.directive_env, manifest=self.manifest_env)

    @property
    def deployment_id(self) -> str:
        return self.directive.deployment_id

    @property
    def model_sha(self) -> str:
        return self.manifest.file("model").sha256

    @property
    def eval_sha(self) -> str:
        return self.manifest.file("eval").sha256

    def blobs(self) -> dict[str, bytes]:
        return {self.model_sha: self.model, self.eval_sha: self.eval}


def make_release(
    keys: Keys,
    *,
    version: int = 1,
    release_counter: int | None = None,
    seq: int | None = None,
    deployment_id: str | None = None,
    model: bytes | None = None,
    eval_bytes: bytes | None = None,
    gates: Gates = GATES,
    device_id: str = DEVICE,
    manifest_expires: int = NOW + 30 * DAY,
    directive_expires: int = NOW + DAY,
    release_key: Ed25519PrivateKey | None = None,
    director_key: Ed25519PrivateKey | None = None,
    pin_manifest: SignedEnvelope | None = None,
    profile: str = "rpi5",
    max_ram_bytes: int | None = None,
    threads: int | None = None,
) -> Release:
    """A signed manifest (model + eval files, 64-byte chunks) and a directive pinning it."""
    model = model if model is not None else payload(f"model-v{version}", 300)  # 5 chunks
    eval_bytes = eval_bytes if eval_bytes is not None else payload(f"eval-v{version}", 150)  # 3 chunks
    manifest = Manifest(
        v=1,
        model="kws",
        version=version,
        release_counter=release_counter if release_counter is not None else version,
        profile=profile,
        quantization="int8",
        files=(file_entry("model.tflite", "model", model), file_entry("eval.npz", "eval", eval_bytes)),
        reference=ReferenceMetrics(accuracy=0.93, host_accuracy=0.92, host_p50_ms=1.0),
        created=NOW - DAY,
        expires=manifest_expires,
        max_ram_bytes=max_ram_bytes,
        threads=threads,
    )
    manifest_env = sign_envelope(manifest, release_key or keys.release)
    directive = Directive(
        v=1,
        device_id=device_id,
        deployment_id=deployment_id or f"dep-{version}",
        rollout_id=f"ro-{version}",
        manifest_sha256=envelope_digest(pin_manifest or manifest_env),
        seq=seq if seq is not None else version,
        gates=gates,
        issued=NOW - 60,
        expires=directive_expires,
    )
    directive_env = sign_envelope(directive, director_key or keys.director)
    return Release(manifest, directive, manifest_env, directive_env, model, eval_bytes)


def make_config(
    data_dir: Path,
    keys: Keys,
    *,
    release_keys: tuple[str, ...] | None = None,
    director_keys: tuple[str, ...] | None = None,
    broker_url: str = "mqtt://127.0.0.1:1",
) -> AgentConfig:
    return AgentConfig(
        device=DeviceSection(id=DEVICE, name="kitchen", profile="rpi5"),
        broker=BrokerSection(url=broker_url),
        keys=KeysSection(
            release=release_keys if release_keys is not None else (public_key_text(keys.release.public_key()),),
            director=director_keys if director_keys is not None else (public_key_text(keys.director.public_key()),),
        ),
        storage=StorageSection(data_dir=str(data_dir)),
        benchmark=BenchmarkSection(warmup_runs=1, warmup_seconds=0.0, min_runs=5, min_seconds=0.0),
        trial=TrialSection(timeout_seconds=30.0, memory_limit_mb=2048),
        download=DownloadSection(request_interval_seconds=REQUEST_INTERVAL, stall_timeout_seconds=STALL_TIMEOUT),
        serve=ServeSection(listen="127.0.0.1:0"),  # any free port: tests run side by side
    )


def trusted_bytes(state: TrustedState) -> bytes:
    """What ``trusted.json`` holds for ``state`` (canonical JSON, as RecordStore writes it)."""
    return canonical_json(encode(state))




def write_config_toml(path: Path, config: AgentConfig) -> Path:
    """``config`` as the agent.toml ``load_config`` reads (a JSON string or list is valid TOML)."""
    lines: list[str] = []
    for section, values in asdict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}"
                  for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
