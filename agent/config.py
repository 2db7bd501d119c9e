"""The agent's configuration: one TOML file, decoded into frozen dataclasses.

``edgefleet device register`` writes it. Unknown keys are rejected so a typo
is an error, not a silently ignored setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.codec import decode
from shared.errors import ConfigError, ProtocolError
from shared.mqtt import BrokerAddress
from shared.root import read_root_file
from shared.serve_address import DEFAULT_SERVE_LISTEN, ServeAddress
from shared.signing import KeyRole, TrustedKeys
from shared.tomlfile import read_toml
from shared.topics import is_valid_device_id

MAX_THREADS = 256


@dataclass(frozen=True)
class DeviceSection:
    id: str
    name: str
    profile: str

    def __post_init__(self) -> None:
        if not is_valid_device_id(self.id):
            raise ValueError(f"invalid device id {self.id!r}")


@dataclass(frozen=True)
class BrokerSection:
    """``[broker]``: the URL, the device's broker identity and, for ``mqtts://``, the CA it pins and an optional
    client certificate. Relative file names are relative to agent.toml's directory."""

    url: str
    username: str = ""
    password: str = ""
    password_file: str = ""  # instead of password: a file holding it (first line), kept 0600
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def resolved(self, base: Path) -> BrokerSection:
        """File names made absolute against ``base`` and ``password_file`` read into ``password``."""
        def absolute(name: str) -> str:
            return str(base / name) if name and not Path(name).is_absolute() else name

        if self.password and self.password_file:
            raise ConfigError("broker: set password or password_file, not both")
        password = self.password
        if self.password_file:
            path = Path(absolute(self.password_file))
            try:
                password = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
            except OSError as exc:
                raise ConfigError(f"broker: cannot read password_file {path}: {exc.strerror or exc}") from exc
            if not password:
                raise ConfigError(f"broker: password_file {path} is empty")
        return replace(self, password=password, password_file=absolute(self.password_file),
                       ca_file=absolute(self.ca_file), cert_file=absolute(self.cert_file),
                       key_file=absolute(self.key_file))


@dataclass(frozen=True)
class KeysSection:
    """Either ``root_file``, the signed root of trust this agent starts from (it then follows every
    rotation the server publishes on ``ef/v1/root``), or pinned ``release`` and ``director`` keys: the
    older form, which keeps working but never rotates (its pins change only by editing this file)."""

    release: tuple[str, ...] = ()
    director: tuple[str, ...] = ()
    root_file: str = ""  # relative to agent.toml's directory; load_config makes it absolute

    @property
    def uses_root(self) -> bool:
        return bool(self.root_file)


@dataclass(frozen=True)
class StorageSection:
    data_dir: str


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeSection:
    threads: int = 0  # 0: the profile's thread count, from the signed manifest (1 when it names none)
    preferred: str = ""  # "", "ai-edge-litert", "tflite-runtime" or "tensorflow"

    def __post_init__(self) -> None:
        if not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"runtime.threads must be 0..{MAX_THREADS}, got {self.threads}")

    def threads_for(self, manifest_threads: int | None, usable_cpus: int | None = None) -> int:
        """The interpreter threads for a model: this section's when set, else the manifest's (the
        profile's) capped at the CPUs this process may use, else 1. The trial and serving both use it.

        The cap matters: a profile written for a 4-core board run on a 2-core one oversubscribes the
        cores, and the interpreter's spinning worker threads then make its p95 swing from trial to
        trial, which a latency gate reads as a regression."""
        if self.threads > 0:
            return self.threads  # the operator's explicit choice stands
        wanted = manifest_threads if manifest_threads else 1
        return max(1, min(wanted, usable_cpus if usable_cpus is not None else _usable_cpus()))


@dataclass(frozen=True)
class ServeSection:
    """The local inference endpoint (``agent/serving/``) and its latency reports."""

    enabled: bool = True
    listen: str = DEFAULT_SERVE_LISTEN
    report_interval_s: float = 10.0
    rebenchmark_interval_s: float = 0.0  # 0: off; else re-run the eval samples after this long without calls

    def __post_init__(self) -> None:
        ServeAddress.parse(self.listen)
        if not self.report_interval_s > 0:
            raise ValueError(f"serve.report_interval_s must be positive, got {self.report_interval_s}")
        if not self.rebenchmark_interval_s >= 0:
            raise ValueError(f"serve.rebenchmark_interval_s must be 0 (off) or positive, got "
                             f"{self.rebenchmark_interval_s}")

    @property
    def address(self) -> ServeAddress:
        return ServeAddress.parse(self.listen)


@dataclass(frozen=True)
class BenchmarkSection:
    warmup_runs: int = 1
    warmup_seconds: float = 0.5
    min_runs: int = 50
    min_seconds: float = 1.0


@dataclass(frozen=True)
class TrialSection:
    timeout_seconds: float = 300.0
    memory_limit_mb: int = 0  # an extra cap on a trial's memory; 0: the profile's limit and what is available


@dataclass(frozen=True)
class DownloadSection:
    request_interval_seconds: float = 5.0
    stall_timeout_seconds: float = 600.0


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceSection
    broker: BrokerSection
    keys: KeysSection
    storage: StorageSection
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)
    trial: TrialSection = field(default_factory=TrialSection)
    download: DownloadSection = field(default_factory=DownloadSection)
    serve: ServeSection = field(default_factory=ServeSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    def broker_address(self) -> BrokerAddress:
        b = self.broker
        return BrokerAddress.parse(b.url, username=b.username, password=b.password, ca_file=b.ca_file,
                                   cert_file=b.cert_file, key_file=b.key_file)

    def pinned_keys(self) -> TrustedKeys:
        """The keys pinned in [keys] release/director; an agent with a root_file takes its keys from the
        root instead (``agent/root.py``)."""
        return TrustedKeys.from_text({KeyRole.RELEASE: list(self.keys.release), KeyRole.DIRECTOR: list(self.keys.director)})


def load_config(path: Path) -> AgentConfig:
    """Read and check a config file; every problem becomes one ConfigError."""
    data = read_toml(path, "config file", ConfigError)
    try:
        config = decode(AgentConfig, data, path="config")
    except ProtocolError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        config = replace(config, broker=config.broker.resolved(path.parent))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    keys = config.keys
    if keys.uses_root and (keys.release or keys.director):
        raise ConfigError(
            f"{path}: [keys] sets both root_file and pinned release/director keys: pick one (root_file, the "
            "signed root of trust, follows key rotations; pinned keys never change)"
        )
    if keys.uses_root:
        root_file = path.parent.absolute() / keys.root_file  # an absolute root_file stays as it is
        config = replace(config, keys=replace(keys, root_file=str(root_file)))
        read_root_file(root_file)  # raises ConfigError on a missing, malformed or unsigned root
    else:
        if not keys.release or not keys.director:
            raise ConfigError(
                f"{path}: [keys] needs root_file (the signed root of trust) or pinned keys: keys.release and "
                "keys.director must each pin at least one public key"
            )
        config.pinned_keys()  # parses every key; raises ConfigError on a bad one
    try:
        config.broker_address().ssl_context()  # the CA and client certificate load
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config
