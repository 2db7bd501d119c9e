"""The agent's inference endpoint against a real interpreter on a real small model: no mocked interpreter.

Bodies (JSON and .npy) round-trip to what a direct interpreter run computes; every error has its
status and a JSON body that says what is wrong; the unix socket serves the same routes; the client
translates failures into the error tree.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.serving.endpoint import MAX_BODY_BYTES, Endpoint, InferenceApp, start_endpoint
from agent.serving.host import ModelHost
from agent.serving.recorder import LatencyRecorder
from shared.errors import EndpointUnreachableError, InferenceError
from shared.serve_address import ServeAddress
from tests.agent.serving_material import FEATURES, ServedModels, direct_outputs

WAIT_S = 30.0


class Served:
    def __init__(self, host: ModelHost, recorder: LatencyRecorder, endpoint: Endpoint) -> None:
        self.host, self.recorder, self.endpoint = host, recorder, endpoint
        self.client = InferenceClient(endpoint.url)

    def raw(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, object]]:
        address = self.endpoint.server.server_address
        connection = http.client.HTTPConnection(str(address[0]), int(address[1]), timeout=10)  # type: ignore[index]
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()


def start(address: ServeAddress) -> tuple[ModelHost, LatencyRecorder, Endpoint]:
    host, recorder = ModelHost(), LatencyRecorder()
    return host, recorder, start_endpoint(address, InferenceApp(host, recorder))


@pytest.fixture
def served(served_models: ServedModels) -> Iterator[Served]:
    host, recorder, endpoint = start(ServeAddress(host="127.0.0.1", port=0))
    host.want(served_models.source(1, threads=2))
    assert host.wait_settled(WAIT_S)
    s = Served(host, recorder, endpoint)
    yield s
    s.client.close()
    endpoint.stop()
    host.close()


def batch(n: int = 5) -> np.ndarray:
    return np.random.default_rng(n).random((n, FEATURES), dtype=np.float32)


def test_json_round_trip_matches_a_direct_interpreter_run(served: Served, served_models: ServedModels) -> None:
    x = batch(5)
    result = served.client.infer(x.tolist())
    assert (result.model, result.version, result.quantization) == ("clf", 1, "float32")
    assert result.outputs.shape == (5, 3)
    np.testing.assert_allclose(result.outputs, direct_outputs(served_models.v1, x), rtol=1e-6, atol=1e-7)


def test_npy_round_trip_matches_a_direct_interpreter_run(served: Served, served_models: ServedModels) -> None:
    x = batch(7)
    result = served.client.infer(x, binary=True)
    assert (result.model, result.version) == ("clf", 1)
    assert result.outputs.dtype == np.float32 and result.outputs.shape == (7, 3)
    np.testing.assert_array_equal(result.outputs, direct_outputs(served_models.v1, x))


def test_every_call_is_recorded_with_its_samples(served: Served) -> None:
    for n in (1, 3, 4):
        served.client.infer(batch(n))
    served.client.infer(batch(2), binary=True)
    (acc,) = served.recorder.swap()
    assert (acc.calls, acc.errors, acc.samples) == (4, 0, 10)
    assert acc.invoke.total == acc.e2e.total == 4
    assert acc.e2e.sum_ms >= acc.invoke.sum_ms > 0
    assert (acc.runtime, acc.threads, acc.origin) == ("ai-edge-litert", 2, "traffic")


def test_the_model_route_describes_what_is_served_with_the_manifests_threads(served: Served) -> None:
    described = served.client.model()
    assert {k: described[k] for k in ("model", "version", "sha256", "quantization", "deployment_id", "threads",
                                      "runtime")} == {
        "model": "clf", "version": 1, "sha256": "sha-1", "quantization": "float32", "deployment_id": "dep-1",
        "threads": 2, "runtime": "ai-edge-litert"}
    assert described["input"] == {"shape": [-1, FEATURES], "dtype": "float32", "graph_shape": [1, FEATURES]}
    assert described["output"] == {"shape": [-1, 3], "dtype": "float32"}
    assert described["load_error"] is None and described["loaded_at"] > 0
    assert served.host.current is not None and served.host.current.model.description.threads == 2
    assert served.client.healthz() is True


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "says"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "bad_json", "not valid JSON"),
        (b'{"x": 1}', {"Content-Type": "application/json"}, 400, "bad_json", '{"inputs": [...]}'),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "bad_json", "nests too deeply"),
        (b'{"inputs": [[1, 2, 3]]}', {}, 400, "bad_shape", "expects [n, 4]"),
        (b'{"inputs": [1, 2, 3, 4]}', {}, 400, "bad_shape", "expects [n, 4]"),
        (b'{"inputs": [[1, 2], [1, 2, 3, 4]]}', {}, 400, "bad_shape", "rectangular"),
        (b'{"inputs": []}', {}, 400, "bad_shape", "expects [n, 4]"),
        (b"not npy", {"Content-Type": "application/x-npy"}, 400, "bad_npy", ".npy"),
        (b"a,b", {"Content-Type": "text/csv"}, 415, "unsupported_media_type", "text/csv"),
    ],
)
def test_bad_requests_get_a_clear_json_error(served: Served, body: bytes, headers: dict[str, str], status: int,
                                             code: str, says: str) -> None:
    got, document = served.raw("POST", "/v1/infer", body, headers)
    assert got == status
    assert document["error"] == code and says in str(document["detail"])
    (acc,) = served.recorder.swap()
    assert (acc.calls, acc.errors, acc.invoke.total) == (1, 1, 0)


def test_a_body_over_the_limit_is_413_without_reading_it(served: Served) -> None:
    got, document = served.raw("POST", "/v1/infer", b"{}",
                               {"Content-Length": str(MAX_BODY_BYTES + 1), "Content-Type": "application/json"})
    assert got == 413 and document["error"] == "too_large"


def test_unknown_paths_and_methods(served: Served) -> None:
    assert served.raw("GET", "/v2/nothing")[0] == 404
    assert served.raw("GET", "/v1/infer") == (405, {"error": "method_not_allowed", "detail": "/v1/infer takes POST"})
    assert served.client.healthz() is True  # the endpoint still answers


def test_503_says_why_when_no_model_is_committed_or_it_failed_to_load(tmp_path: Path,
                                                                         served_models: ServedModels) -> None:
    host, _, endpoint = start(ServeAddress(host="127.0.0.1", port=0))
    client = InferenceClient(endpoint.url)
    try:
        with pytest.raises(InferenceError, match="no model is committed") as caught:
            client.infer(batch(1))
        assert (caught.value.status, caught.value.code) == (503, "no_model")
        assert client.healthz() is False
        broken = tmp_path / "broken.tflite"
        broken.write_bytes(b"not a flatbuffer")
        source = served_models.source(3)
        host.want(replace(source, model_path=str(broken)))
        assert host.wait_settled(WAIT_S)
        with pytest.raises(InferenceError, match="clf v3 failed to load") as caught:
            client.model()
        assert caught.value.status == 503
    finally:
        client.close()
        endpoint.stop()
        host.close()


def test_a_new_model_that_fails_to_load_leaves_the_previous_one_serving(served: Served, tmp_path: Path,
                                                                        served_models: ServedModels) -> None:
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"garbage")
    served.host.want(replace(served_models.source(2), model_path=str(broken)))
    assert served.host.wait_settled(WAIT_S)
    assert served.client.infer(batch(1)).version == 1
    assert "clf v2" in str(served.client.model()["load_error"])


def test_the_unix_socket_serves_the_same_routes(tmp_path: Path, served_models: ServedModels) -> None:
    path = tmp_path / "serve.sock"
    host, _, endpoint = start(ServeAddress(unix_path=str(path)))
    host.want(served_models.source(2))
    assert host.wait_settled(WAIT_S)
    client = InferenceClient(endpoint.url)
    try:
        assert endpoint.url == f"unix:{path}"
        x = batch(3)
        for binary in (False, True):
            result = client.infer(x, binary=binary)
            assert result.version == 2
            np.testing.assert_allclose(result.outputs, direct_outputs(served_models.v2, x), rtol=1e-6, atol=1e-7)
        assert client.model()["version"] == 2 and client.healthz()
    finally:
        client.close()
        endpoint.stop()
        host.close()
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "stale.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))
    left.close()  # bound, never listening: what a killed agent leaves
    _, _, endpoint = start(ServeAddress(unix_path=str(path)))
    try:
        with InferenceClient(endpoint.url) as client:
            assert client.healthz() is False
    finally:
        endpoint.stop()


def test_the_client_says_when_nothing_answers(tmp_path: Path) -> None:
    with pytest.raises(EndpointUnreachableError, match="cannot reach"):
        InferenceClient(f"unix:{tmp_path / 'none.sock'}").healthz()
    with pytest.raises(EndpointUnreachableError):
        InferenceClient("http://127.0.0.1:1", timeout=2).infer([[0.0] * FEATURES])
    with pytest.raises(InferenceError, match="neither"):
        InferenceClient("ftp://host")
    with pytest.raises(EndpointUnreachableError, match="is the agent running"):
        InferenceClient.from_serve_file(str(tmp_path / "serve.json"))


def test_the_client_reconnects_after_the_endpoint_closed_a_kept_alive_connection(served: Served) -> None:
    served.client.infer(batch(1))
    assert served.client._connection is not None and served.client._connection.sock is not None
    served.client._connection.sock.close()  # as if the agent had dropped it
    served.client._connection.sock = None
    assert served.client.infer(batch(1)).version == 1


def test_a_kept_alive_call_takes_well_under_nagles_delayed_ack(served: Served) -> None:
    """Headers and body leave in one write: two would cost ~40 ms a call (Nagle meets delayed ACK)."""
    import time

    x = batch(1)
    served.client.infer(x)
    for binary in (False, True):
        start = time.perf_counter()
        for _ in range(50):
            served.client.infer(x, binary=binary)
        assert time.perf_counter() - start < 1.0  # 50 x 40 ms would be 2 s
