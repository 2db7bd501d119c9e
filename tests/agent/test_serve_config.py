"""The agent's [serve] and [runtime] threads settings: parsing, defaults, errors, and what
``edgefleet device register`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import RuntimeSection, ServeSection, load_config
from shared.errors import ConfigError
from shared.serve_address import ServeAddress
from tests.agent.material import Keys, make_config, write_config_toml


def config_with(tmp_path: Path, keys: Keys, extra: str) -> Path:
    path = write_config_toml(tmp_path / "agent.toml", make_config(tmp_path / "data", keys))
    text = path.read_text().split("[serve]")[0]  # the tests' own [serve] section goes: these write theirs
    path.write_text(text + extra)
    return path


def test_serve_defaults_to_an_enabled_endpoint_on_localhost(tmp_path: Path, keys: Keys) -> None:
    config = load_config(config_with(tmp_path, keys, ""))
    assert config.serve == ServeSection(enabled=True, listen="127.0.0.1:8470", report_interval_s=10.0,
                                        rebenchmark_interval_s=0.0)
    assert config.serve.address == ServeAddress(host="127.0.0.1", port=8470)
    assert config.runtime.threads == 0


def test_serve_reads_every_setting(tmp_path: Path, keys: Keys) -> None:
    config = load_config(config_with(tmp_path, keys, (
        '[serve]\nenabled = false\nlisten = "unix:/run/ef.sock"\nreport_interval_s = 2\nrebenchmark_interval_s = 60\n')))
    assert config.serve == ServeSection(enabled=False, listen="unix:/run/ef.sock", report_interval_s=2.0,
                                        rebenchmark_interval_s=60.0)
    assert config.serve.address == ServeAddress(unix_path="/run/ef.sock")
    assert ServeAddress.parse("[::1]:0") == ServeAddress(host="::1", port=0)


@pytest.mark.parametrize(("section", "says"), [
    ('listen = "localhost"', "neither HOST:PORT"),
    ('listen = "127.0.0.1:99999"', "neither HOST:PORT"),
    ('listen = "unix:"', "names no socket path"),
    ("report_interval_s = 0", "report_interval_s must be positive"),
    ("rebenchmark_interval_s = -1", "rebenchmark_interval_s"),
    ("port = 8470", "unknown keys ['port']"),
    ('enabled = "yes"', "expected a boolean"),
])
def test_a_bad_serve_section_is_one_config_error(tmp_path: Path, keys: Keys, section: str, says: str) -> None:
    with pytest.raises(ConfigError, match="serve") as caught:
        load_config(config_with(tmp_path, keys, f"[serve]\n{section}\n"))
    assert says in str(caught.value)


def test_runtime_threads_zero_means_the_profiles_capped_at_the_usable_cpus() -> None:
    assert RuntimeSection(threads=0).threads_for(4, usable_cpus=4) == 4
    assert RuntimeSection(threads=0).threads_for(4, usable_cpus=2) == 2  # a 4-core profile on a 2-core board
    assert RuntimeSection(threads=0).threads_for(None, usable_cpus=8) == 1
    assert RuntimeSection(threads=2).threads_for(4, usable_cpus=1) == 2  # the operator's explicit choice stands
    assert RuntimeSection(threads=0).threads_for(1) == 1
    with pytest.raises(ValueError, match="0..256"):
        RuntimeSection(threads=-1)

