"""Where an agent's local inference endpoint listens, as its config and ``device register`` spell it."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SERVE_LISTEN = "127.0.0.1:8470"


@dataclass(frozen=True)
class ServeAddress:
    """Where the inference endpoint listens: TCP ``host:port`` (port 0: any free port) or ``unix:/path``."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @classmethod
    def parse(cls, listen: str) -> ServeAddress:
        if listen.startswith("unix:"):
            path = listen[len("unix:"):]
            if not path:
                raise ValueError(f"serve.listen {listen!r} names no socket path (unix:/path)")
            return cls(unix_path=path)
        host, sep, port = listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"serve.listen {listen!r} is neither HOST:PORT (port 0..65535) nor unix:/path")
        return cls(host=host, port=int(port))
