"""A commit swaps the served model between two calls; a rolled-back trial leaves it alone. Real interpreters.

Client threads call the endpoint without pause while the host swaps v1 for v2: no call fails, and every
answer is wholly v1's or wholly v2's outputs for its batch, as its ``version`` says (never a mix).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.config import ServeAddress
from agent.serving.endpoint import Endpoint, InferenceApp, start_endpoint
from agent.serving.host import ModelHost
from agent.serving.recorder import LatencyRecorder
from agent.serving.serving import Serving
from agent.states import State
from shared.messages import UpdateState
from shared.trial import TrialResult
from tests.agent.fakes import Harness, install_first
from tests.agent.material import BENCHMARK
from tests.agent.serving_material import FEATURES, ServedModels, direct_outputs

WAIT_S = 30.0
CLIENTS = 4


@pytest.fixture
def endpoint(served_models: ServedModels) -> Iterator[tuple[ModelHost, LatencyRecorder, Endpoint]]:
    host, recorder = ModelHost(), LatencyRecorder()
    endpoint = start_endpoint(ServeAddress(host="127.0.0.1", port=0), InferenceApp(host, recorder))
    host.want(served_models.source(1))
    assert host.wait_settled(WAIT_S)
    yield host, recorder, endpoint
    endpoint.stop()
    host.close()


def test_a_swap_under_concurrent_load_fails_no_call_and_never_mixes_versions(
    endpoint: tuple[ModelHost, LatencyRecorder, Endpoint], served_models: ServedModels,
) -> None:
    host, recorder, ep = endpoint
    x = np.random.default_rng(3).random((6, FEATURES), dtype=np.float32)
    expected = {1: direct_outputs(served_models.v1, x), 2: direct_outputs(served_models.v2, x)}
    answers: list[tuple[int, bool]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    seen_v2 = threading.Event()

    def call(binary: bool) -> None:
        with InferenceClient(ep.url) as client:
            while not stop.is_set():
                try:
                    result = client.infer(x, binary=binary)
                except Exception as exc:  # noqa: BLE001 - any failure fails the test
                    failures.append(exc)
                    return
                wholly = bool(np.allclose(result.outputs, expected[result.version], rtol=1e-6, atol=1e-7))
                answers.append((result.version, wholly))
                if result.version == 2:
                    seen_v2.set()

    threads = [threading.Thread(target=call, args=(i % 2 == 1,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    while len(answers) < 50 and not failures:
        stop.wait(0.01)
    host.want(served_models.source(2))
    assert seen_v2.wait(WAIT_S)
    count = len(answers)
    while len(answers) < count + 50 and not failures:
        stop.wait(0.01)
    stop.set()
    for thread in threads:
        thread.join(WAIT_S)

    assert failures == []
    assert all(wholly for _, wholly in answers), "an answer mixed the two models"
    versions = [version for version, _ in answers]
    assert versions.count(1) >= 50 and versions.count(2) >= 50
    calls = {acc.source.version: acc.calls for acc in recorder.swap()}
    assert calls == {1: versions.count(1), 2: versions.count(2)}
    assert host.current is not None and host.current.source.version == 2


def test_the_served_model_stays_through_a_download_a_trial_and_a_rollback(harness: Harness,
                                                                            served_models: ServedModels) -> None:
    h = harness
    v1 = install_first(h, model=served_models.v1.read_bytes(), eval_bytes=served_models.eval_path.read_bytes())
    sent: list[object] = []
    serving = Serving(h.config, send=lambda report, deployment: sent.append(report), backlog=lambda: 0)
    serving.start()
    try:
        assert serving.host.wait_settled(WAIT_S)
        served = serving.host.current
        assert served is not None and served.source.version == 1 and served.source.deployment_id == v1.deployment_id
        assert serving.url is not None
        client = InferenceClient(serving.url)
        x = np.random.default_rng(5).random((2, FEATURES), dtype=np.float32)

        def answers_v1() -> None:
            serving.sync()  # what AgentService does on every state change
            assert serving.host.current is served
            assert client.infer(x).version == 1

        v2 = h.release(version=2, model=served_models.v2.read_bytes(),
                       eval_bytes=served_models.eval_path.read_bytes())
        h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.1, samples=10)  # fails the gate
        h.trial.hold = True  # the trial runs (in its child process) until released
        h.updater.offer(v2.desired)
        answers_v1()  # downloading
        h.pump()
        assert h.updater.state is State.TRIAL
        answers_v1()
        h.trial.hold = False
        h.updater.tick()
        answers_v1()
        assert h.reporter.final(v2.deployment_id)[1] is UpdateState.ROLLED_BACK
        assert serving.host.wait_settled(WAIT_S) and serving.host.current is served
        client.close()
    finally:
        serving.stop()
