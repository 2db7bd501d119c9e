"""A small client for the agent's local inference endpoint (``agent/serving/``).

::

    from agent.client import InferenceClient               # the same class, for applications on the device

    client = InferenceClient("http://127.0.0.1:8470")      # or "unix:/run/edgefleet/serve.sock"
    result = client.infer([[0.1, 0.2, 0.3, 0.4]])          # a batch of one sample
    result.outputs, result.model, result.version            # numpy array (batch first), name, version
    client.infer(batch, binary=True)                        # .npy both ways: faster for large inputs

Standard library ``http.client`` and numpy only; in ``shared/`` so the
server's demo load generator uses it too (the server never imports ``agent/``). One client keeps one
connection (keep-alive); use one client per thread. Errors are
``EndpointUnreachableError`` (nothing answers) and ``InferenceError``
(an error response: ``status``, ``code`` and the endpoint's ``detail``).
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from shared.errors import EndpointUnreachableError, InferenceError

if TYPE_CHECKING:
    from typing_extensions import Self

NPY = "application/x-npy"
SERVE_FILE = "serve.json"  # in the agent's data directory: {"url": "http://HOST:PORT"} or {"unix": "/path"}


def npy_bytes(array: Any) -> bytes:
    """``array`` as a ``.npy`` body (no pickles)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class InferenceResult:
    outputs: Any  # numpy float32 array, first dimension the batch
    model: str
    version: int
    quantization: str


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class InferenceClient:
    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        """``address``: ``http://HOST:PORT`` or ``unix:/path`` (what the agent writes to serve.json)."""
        self.address = address
        self.timeout = timeout
        if address.startswith("unix:"):
            self._unix_path: str | None = address[len("unix:"):]
            self._host, self._port = "", 0
        else:
            parts = urlsplit(address)
            if parts.scheme != "http" or not parts.hostname:
                raise InferenceError(f"endpoint address {address!r} is neither http://HOST:PORT nor unix:/path")
            self._unix_path, self._host, self._port = None, parts.hostname, parts.port or 80
        self._connection: http.client.HTTPConnection | None = None

    @classmethod
    def from_serve_file(cls, path: str, **kwargs: Any) -> InferenceClient:
        """The endpoint an agent wrote to its ``DATA_DIR/serve.json``; EndpointUnreachableError when there is
        none to read (the agent is not running, or not serving)."""
        try:
            with open(path, encoding="utf-8") as fh:
                document = json.load(fh)
        except (OSError, ValueError) as exc:
            raise EndpointUnreachableError(f"cannot read {path}: {exc} (is the agent running?)") from exc
        if isinstance(document, dict) and document.get("unix"):
            return cls(f"unix:{document['unix']}", **kwargs)
        url = document.get("url") if isinstance(document, dict) else None
        if not isinstance(url, str) or not url.startswith("http://"):
            raise EndpointUnreachableError(f"{path} names no endpoint (neither an http:// url nor a unix socket)")
        return cls(url, **kwargs)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._unix_path is not None:
                self._connection = _UnixConnection(self._unix_path, self.timeout)
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, str, bytes, http.client.HTTPResponse]:
        # A kept-alive connection the agent closed meanwhile fails on first use: one fresh attempt.
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 2:
                    raise EndpointUnreachableError(f"{self.address} closed the connection: {exc}") from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise EndpointUnreachableError(f"cannot reach the inference endpoint at {self.address}: "
                                               f"{exc}") from exc
            if response.will_close:
                self.close()
            return response.status, response.getheader("Content-Type", ""), data, response
        raise AssertionError("unreachable")

    def _raise_for(self, status: int, data: bytes) -> None:
        try:
            document = json.loads(data)
            code, detail = str(document.get("error", "")), str(document.get("detail", ""))
        except (ValueError, AttributeError):
            code, detail = "", data[:200].decode(errors="replace")
        raise InferenceError(f"{self.address} answered {status}: {detail or code}", status=status, code=code)

    def infer(self, inputs: Any, *, binary: bool = False) -> InferenceResult:
        """Run a batch (first dimension: samples) on the served model."""
        import numpy as np

        if binary:
            body = npy_bytes(np.asarray(inputs, dtype=np.float32))
            headers = {"Content-Type": NPY, "Accept": NPY}
        else:
            listed = inputs.tolist() if isinstance(inputs, np.ndarray) else inputs
            body = json.dumps({"inputs": listed}, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json"}
        status, content_type, data, response = self._request("POST", "/v1/infer", body, headers)
        if status != 200:
            self._raise_for(status, data)
        if content_type.startswith(NPY):
            outputs = np.load(io.BytesIO(data), allow_pickle=False)
            return InferenceResult(outputs, response.getheader("X-Edgefleet-Model", ""),
                                   int(response.getheader("X-Edgefleet-Version", "0")),
                                   response.getheader("X-Edgefleet-Quantization", ""))
        document = json.loads(data)
        return InferenceResult(np.asarray(document["outputs"], dtype=np.float32), str(document["model"]),
                               int(document["version"]), str(document["quantization"]))

    def model(self) -> dict[str, Any]:
        """What the endpoint serves (GET /v1/model)."""
        status, _, data, _ = self._request("GET", "/v1/model")
        if status != 200:
            self._raise_for(status, data)
        document: dict[str, Any] = json.loads(data)
        return document

    def healthz(self) -> bool:
        """True when a model is served; False when the endpoint answers without one. Raises when unreachable."""
        status, _, _, _ = self._request("GET", "/healthz")
        return status == 200
