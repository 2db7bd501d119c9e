"""What ``edgefleet device register`` writes for the agent: [runtime] threads = 0 (the profile's), [serve], and
[keys] root_file = "root.json" (the root of trust, beside the config)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ServeSection, load_config
from server.devices import DeviceRow, agent_config_toml
from server.roots import RootStore, make_root, sign_root, write_root_file
from shared.signing import KeyRole
from tests.agent.material import Keys


def write_root(directory: Path, keys: Keys) -> None:
    """A root of trust in a server's key store, and its root.json beside the agent's config."""
    root_key = keys.attacker  # any key will do as the root key here
    store = RootStore(directory / "server-keys")
    store.save(sign_root(make_root(1, {KeyRole.ROOT: [root_key.public_key()], KeyRole.RELEASE: [keys.release.public_key()],
                                       KeyRole.DIRECTOR: [keys.director.public_key()]}), [root_key]))
    write_root_file(store, directory / "root.json")


def test_device_register_writes_threads_0_and_a_serve_section(tmp_path: Path) -> None:
    keys = Keys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    row = DeviceRow(id="cam-01", name="cam", profile="rpi4", online=False, runtime=None, update_state=None,
                    active_model=None, active_version=None, active_quantization=None)
    text = agent_config_toml(row, "mqtt://127.0.0.1:1883", tmp_path / "agent", serve_listen="127.0.0.1:0")
    assert "threads = 0  # 0: the profile's thread count" in text
    assert 'root_file = "root.json"' in text and "release =" not in text
    write_root(tmp_path, keys)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.runtime.threads == 0
    assert config.serve == ServeSection(listen="127.0.0.1:0")


def test_the_report_interval_reaches_the_agent(tmp_path: Path) -> None:
    keys = Keys(Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate())
    row = DeviceRow(id="cam-01", name="cam", profile="rpi4", online=False, runtime=None, update_state=None,
                    active_model=None, active_version=None, active_quantization=None)
    write_root(tmp_path, keys)
    path = tmp_path / "agent.toml"
    path.write_text(agent_config_toml(row, "mqtt://127.0.0.1:1883", tmp_path / "agent",
                                      serve_listen="127.0.0.1:0", report_interval_s=2))
    assert load_config(path).serve == ServeSection(listen="127.0.0.1:0", report_interval_s=2.0)
