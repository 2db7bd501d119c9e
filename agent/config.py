"""The agent's configuration: one TOML file, decoded into frozen dataclasses.

``edgefleet device register`` writes it. Unknown keys are rejected so a typo
is an error, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.codec import decode
from shared.errors import ConfigError, ProtocolError
from shared.mqtt import BrokerAddress
from shared.signing import KeyRole, TrustedKeys
from shared.tomlfile import read_toml
from shared.topics import is_valid_device_id


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
    url: str


@dataclass(frozen=True)
class KeysSection:
    release: tuple[str, ...]
    director: tuple[str, ...]


@dataclass(frozen=True)
class StorageSection:
    data_dir: str


@dataclass(frozen=True)
class RuntimeSection:
    threads: int = 1
    preferred: str = ""  # "", "ai-edge-litert", "tflite-runtime" or "tensorflow"


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

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    def broker_address(self) -> BrokerAddress:
        return BrokerAddress.parse(self.broker.url)

    def trusted_keys(self) -> TrustedKeys:
        return TrustedKeys.from_text({KeyRole.RELEASE: list(self.keys.release), KeyRole.DIRECTOR: list(self.keys.director)})


def load_config(path: Path) -> AgentConfig:
    """Read and check a config file; every problem becomes one ConfigError."""
    data = read_toml(path, "config file", ConfigError)
    try:
        config = decode(AgentConfig, data, path="config")
    except ProtocolError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not config.keys.release or not config.keys.director:
        raise ConfigError(f"{path}: keys.release and keys.director must each pin at least one public key")
    config.trusted_keys()  # parses every key; raises ConfigError on a bad one
    config.broker_address()
    return config
