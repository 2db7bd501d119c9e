"""The demo's load generator (``server/load_generator.py``) against a real agent endpoint on a real small model.

It finds the endpoint through ``serve.json`` as the agent writes it, every answered call is one call the
agent recorded, it keeps its rate, and it survives an endpoint that is not there yet or moved to another
port (the failed attempts are counted, then it carries on).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.serving.endpoint import Endpoint, InferenceApp, start_endpoint
from agent.serving.host import ModelHost
from agent.serving.recorder import LatencyRecorder
from server.broker import free_port
from server.load_generator import LoadGenerator, Target, load_samples
from shared.errors import EndpointUnreachableError
from shared.inference_client import SERVE_FILE, InferenceClient
from shared.serve_address import ServeAddress
from tests.agent.serving_material import ServedModels, build_served_models

WAIT_S = 30.0


@pytest.fixture(scope="module")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> ServedModels:
    return build_served_models(tmp_path_factory.mktemp("served"))


class Agent:
    """What the load generator sees of an agent: an endpoint serving a model, and its serve.json."""

    def __init__(self, served_models: ServedModels, serve_file: Path) -> None:
        self.host, self.recorder = ModelHost(), LatencyRecorder()
        self.endpoint: Endpoint = start_endpoint(ServeAddress(host="127.0.0.1", port=0),
                                                 InferenceApp(self.host, self.recorder))
        self.host.want(served_models.source(1))
        assert self.host.wait_settled(WAIT_S)
        serve_file.write_text(json.dumps({"url": self.endpoint.url}))

    def recorded_calls(self) -> int:
        return sum(acc.calls for acc in self.recorder.swap())

    def stop(self) -> None:
        self.endpoint.stop()
        self.host.close()


@pytest.fixture
def agent(served_models: ServedModels, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(served_models, tmp_path / SERVE_FILE)
    yield a
    a.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_every_answered_call_is_a_call_the_agent_recorded(agent: Agent, served_models: ServedModels,
                                                          tmp_path: Path) -> None:
    samples = load_samples(served_models.eval_path)
    generator = LoadGenerator([Target("a", tmp_path / SERVE_FILE)], samples, rate_per_s=200.0)
    with generator:
        wait_until(lambda: generator.counts()["a"].ok >= 50)
    counts = generator.counts()["a"]
    assert (counts.failed, counts.unreachable) == (0, 0), counts.last_error
    assert counts.versions == {1: counts.ok}
    assert agent.recorded_calls() == counts.ok


def test_it_keeps_a_modest_rate(agent: Agent, served_models: ServedModels, tmp_path: Path) -> None:
    generator = LoadGenerator([Target("a", tmp_path / SERVE_FILE)], load_samples(served_models.eval_path),
                              rate_per_s=20.0)
    with generator:
        time.sleep(1.0)
    assert 1 <= generator.counts()["a"].ok <= 25  # never faster than the rate (slower on a loaded machine)


def test_it_waits_for_an_endpoint_and_follows_it_to_a_new_port(served_models: ServedModels,
                                                               tmp_path: Path) -> None:
    serve_file = tmp_path / SERVE_FILE  # no agent yet: no serve.json
    generator = LoadGenerator([Target("a", serve_file)], load_samples(served_models.eval_path), rate_per_s=100.0,
                              retry_s=0.05)
    with generator:
        wait_until(lambda: generator.counts()["a"].unreachable >= 2)
        serve_file.write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}"}))  # nothing listens there
        before = generator.counts()["a"].unreachable
        wait_until(lambda: generator.counts()["a"].unreachable >= before + 2)
        agent = Agent(served_models, serve_file)  # "restarted" on a new port
        try:
            wait_until(lambda: generator.counts()["a"].ok >= 20)
            generator.stop()
            assert agent.recorded_calls() == generator.counts()["a"].ok
        finally:
            agent.stop()
    counts = generator.counts()["a"]
    assert counts.failed == 0 and counts.unreachable >= 4
    assert "cannot reach" in counts.last_error


def test_an_error_answer_is_counted_and_the_next_call_reconnects(served_models: ServedModels,
                                                                 tmp_path: Path) -> None:
    host, recorder = ModelHost(), LatencyRecorder()  # no model committed: 503
    endpoint = start_endpoint(ServeAddress(host="127.0.0.1", port=0), InferenceApp(host, recorder))
    try:
        (tmp_path / SERVE_FILE).write_text(json.dumps({"url": endpoint.url}))
        generator = LoadGenerator([Target("a", tmp_path / SERVE_FILE)], load_samples(served_models.eval_path),
                                  rate_per_s=100.0)
        with generator:
            wait_until(lambda: generator.counts()["a"].failed >= 3)
        counts = generator.counts()["a"]
        assert counts.ok == 0 and "answered 503" in counts.last_error
    finally:
        endpoint.stop()
        host.close()


def test_the_serve_file_and_the_samples(tmp_path: Path) -> None:
    path = tmp_path / SERVE_FILE
    path.write_text('{"url": "http://127.0.0.1:8470"}')
    assert InferenceClient.from_serve_file(str(path)).address == "http://127.0.0.1:8470"
    path.write_text('{"unix": "/run/x.sock"}')
    assert InferenceClient.from_serve_file(str(path)).address == "unix:/run/x.sock"
    for bad in ("[]", "{}", '{"url": "ftp://x"}', "not json"):
        path.write_text(bad)
        with pytest.raises(EndpointUnreachableError):
            InferenceClient.from_serve_file(str(path))
    np.savez(tmp_path / "eval.npz", x=np.zeros((3, 8, 8, 1)), y=np.zeros(3))
    samples = load_samples(tmp_path / "eval.npz")
    assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.float32
    with pytest.raises(ValueError):
        LoadGenerator([], samples, rate_per_s=0.0)
