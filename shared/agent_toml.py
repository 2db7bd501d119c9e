"""The text of an agent.toml, written by ``edgefleet device register`` on the server and by
``edgefleet agent enrol`` on the device from what the server sent: one renderer, so both write the same file
that ``agent/config.py`` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shared.serve_address import DEFAULT_SERVE_LISTEN


@dataclass(frozen=True)
class BrokerIdentity:
    """The ``[broker]`` table: where, who, and for ``mqtts://`` the pinned CA and an optional client certificate.
    File names are relative to agent.toml's directory (the config never names a path on the server)."""

    url: str
    username: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class AgentToml:
    device_id: str
    name: str
    profile: str
    broker: BrokerIdentity
    data_dir: str
    root_file: str = "root.json"  # the signed root of trust the agent starts from, beside agent.toml
    serve_listen: str = DEFAULT_SERVE_LISTEN
    report_interval_s: float = 10.0
    extra: tuple[str, ...] = field(default=())  # more lines at the end (tests' quick benchmark settings)

    def render(self) -> str:
        def q(value: str) -> str:
            return json.dumps(value)  # a JSON string is a valid TOML basic string

        broker = [f"url = {q(self.broker.url)}"]
        for name in ("username", "password", "ca_file", "cert_file", "key_file"):
            if value := getattr(self.broker, name):
                broker.append(f"{name} = {q(value)}")
        return "\n".join([
            "# edgefleet agent configuration, written by 'edgefleet device register' or 'edgefleet agent enrol'",
            "[device]",
            f"id = {q(self.device_id)}",
            f"name = {q(self.name)}",
            f"profile = {q(self.profile)}",
            "",
            "[broker]  # the device's own broker identity: keep this file private (mode 0600)",
            *broker,
            "",
            "[keys]  # the signed root of trust the agent starts from; it follows rotations over MQTT",
            f"root_file = {q(self.root_file)}",
            "",
            "[storage]",
            f"data_dir = {q(self.data_dir)}",
            "",
            "[runtime]",
            "threads = 0  # 0: the profile's thread count",
            "",
            "[serve]  # the local inference endpoint: POST /v1/infer, GET /v1/model, GET /healthz",
            "enabled = true",
            f"listen = {q(self.serve_listen)}  # HOST:PORT (port 0: any free port) or unix:/path",
            f"report_interval_s = {float(self.report_interval_s)!r}",
            "rebenchmark_interval_s = 0.0  # > 0: re-run the eval samples after this long without calls",
            "",
            *self.extra,
        ])
