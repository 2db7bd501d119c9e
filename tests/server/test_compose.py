"""docker-compose.yml, checked without Docker: the fleet it describes is wired the way the README says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # type: ignore[no-any-return]


def test_two_replicas_share_postgresql_the_data_volume_and_the_brokers_pids() -> None:
    found = services()
    replicas = {name: s for name, s in found.items() if "server" in s.get("command", [])}
    assert set(replicas) == {"server-a", "server-b"}
    names = set()
    for service in replicas.values():
        command = service["command"]
        names.add(command[command.index("--replica") + 1])
        assert service["environment"]["EDGEFLEET_DB_URL"].startswith("postgresql+psycopg://")
        assert "server-data:/data" in service["volumes"]
        assert service["pid"] == "service:broker"  # to SIGHUP Mosquitto after changing its identities
    assert names == {"a", "b"}
    assert found["server-a"]["ports"] == ["8080:8080"]


def test_the_broker_is_the_fleet_broker_and_agents_are_registered_once() -> None:
    found = services()
    assert found["broker"]["command"] == ["broker", "--data-dir", "/data"]
    assert found["init"]["build"]["args"]["BROKER"] == "1"
    assert "postgres" in found["init"]["depends_on"]
    agents = [name for name, s in found.items() if "agent" in s.get("command", [])]
    assert len(agents) == 2
    for name in agents:
        assert found[name]["depends_on"]["register"] == {"condition": "service_completed_successfully"}
    assert "device register" in found["register"]["command"][0]
