"""What serving through the agent costs over a bare interpreter loop.

    python bench/latency_overhead.py [--quick]

Two int8 models: the digits CNN (trained here on scikit-learn's bundled
digits) and keras.applications MobileNetV2 (alpha 0.35, 96x96,
``weights=None``: nothing is downloaded). For each, in one process and
with one interpreter thread, in interleaved rounds so that both sides see
the same machine noise:

- **bare**: ``interpreter.set_tensor`` + ``interpreter.invoke()`` in a loop,
  each invoke timed with ``perf_counter``;
- **agent**: the agent's own serving stack (``agent.serving``: model host,
  latency recorder, the stdlib HTTP endpoint on 127.0.0.1) called by
  ``agent.client.InferenceClient`` with one sample per call, as JSON and as
  ``.npy`` bodies. The agent-recorded invoke p50 comes from the recorder's
  histograms; the round trip is timed by the client.

Both p50s are read through the same histogram (``shared/histogram.py``) so
its bucket interpolation cannot favour either side; the bare loop's exact
p50 is printed too. The agent times ``interpreter.invoke()`` alone, exactly
as the bare loop does, and records after the clock stopped; what separates
the two is the request's own work between invokes (parsing, copying, the
HTTP server), which leaves the caches cold for the next invoke. The last
columns show it: a diagnostic model host runs every call's invoke a second
time, at once, and that warm second invoke is close to the bare loop. Last,
the histogram's cost per call: ``record`` alone and the recorder's locked
``record`` (two histograms), in µs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from agent.serving.endpoint import InferenceApp, start_endpoint
from agent.serving.host import ModelHost, ModelSource, ServedModel, load_served
from agent.serving.recorder import LatencyRecorder
from bench.tables import markdown_table
from shared.histogram import LatencyHistogram
from shared.inference_client import InferenceClient
from shared.serve_address import ServeAddress


def digits_int8(epochs: int) -> tuple[bytes, np.ndarray]:
    from server.compress.convert import convert
    from server.compress.digits import train_digits_cnn
    from server.compress.quantization import Quantization

    model, test = train_digits_cnn(epochs=epochs)
    return convert(model, Quantization.INT8, test.x), test.x[:64]


def mobilenet_int8() -> tuple[bytes, np.ndarray]:
    import keras

    from server.compress.convert import convert
    from server.compress.quantization import Quantization

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=1000)
    x = np.random.default_rng(0).random((16, 96, 96, 3), dtype=np.float32)
    return convert(model, Quantization.INT8, x), x


def bare_round(interpreter: Any, tensor: np.ndarray, runs: int, into: LatencyHistogram, exact: list[float]) -> None:
    index = interpreter.get_input_details()[0]["index"]
    clock = time.perf_counter
    for _ in range(runs):
        interpreter.set_tensor(index, tensor)
        start = clock()
        interpreter.invoke()
        ms = (clock() - start) * 1000.0
        into.record(ms)
        exact.append(ms)


def agent_histograms(recorder: LatencyRecorder) -> tuple[LatencyHistogram, LatencyHistogram]:
    taken = recorder.swap()
    return (LatencyHistogram.merged(a.invoke for a in taken), LatencyHistogram.merged(a.e2e for a in taken))


class RunTwice(ServedModel):
    """A diagnosis, not the product: each call's invoke is run once more at once, and that second time kept
    apart. It shows what the first (recorded) one pays for the request's work between calls: cold caches."""

    again: ClassVar[list[float]] = []

    def run(self, batch: Any) -> tuple[Any, float]:
        outputs, invoke_ms = super().run(batch)
        self.again.append(super().run(batch)[1])
        return outputs, invoke_ms


def load_twice(source: ModelSource) -> ServedModel:
    served = load_served(source)
    return RunTwice(served.source, served.model, loaded_at=served.loaded_at)


def invoke_again_p50(source: ModelSource, sample: np.ndarray, calls: int) -> float:
    """The p50 of the second, back-to-back invoke of ``calls`` .npy calls through the endpoint."""
    host = ModelHost(load_twice)
    host.want(source)
    assert host.wait_settled(60), host.unavailable_reason()
    endpoint = start_endpoint(ServeAddress.parse("127.0.0.1:0"), InferenceApp(host, LatencyRecorder()))
    RunTwice.again = []
    try:
        with InferenceClient(endpoint.url) as client:
            for _ in range(calls):
                client.infer(sample, binary=True)
    finally:
        endpoint.stop()
        host.close()
    again = LatencyHistogram()
    for ms in RunTwice.again:
        again.record(ms)
    return again.percentile(50) or float("nan")


def measure(label: str, flatbuffer: bytes, samples: np.ndarray, rounds: int, runs: int, work: Path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    path = work / f"{label.split()[0]}.tflite"
    path.write_bytes(flatbuffer)
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    scale, zero = detail["quantization"]
    tensor = np.clip(np.round(samples[:1] / scale + zero), -128, 127).astype(detail["dtype"])

    source = ModelSource(model=label, version=1, sha256="0" * 64, quantization="int8", deployment_id="bench",
                         model_path=str(path), eval_path="", threads=1)
    host = ModelHost()
    host.want(source)
    assert host.wait_settled(60), host.unavailable_reason()
    recorder = LatencyRecorder()
    endpoint = start_endpoint(ServeAddress.parse("127.0.0.1:0"), InferenceApp(host, recorder))
    bare, exact = LatencyHistogram(), list[float]()
    invoke = {False: LatencyHistogram(), True: LatencyHistogram()}  # by body: JSON (False) or .npy (True)
    e2e = {False: LatencyHistogram(), True: LatencyHistogram()}
    rtt = {False: LatencyHistogram(), True: LatencyHistogram()}
    sample = samples[:1]
    try:
        with InferenceClient(endpoint.url) as client:
            for binary in (False, True):  # warm up both paths and the bare loop
                client.infer(sample, binary=binary)
            bare_round(interpreter, tensor, runs // 4, LatencyHistogram(), [])
            recorder.swap()
            for _ in range(rounds):
                bare_round(interpreter, tensor, runs, bare, exact)
                for binary in (False, True):
                    for _ in range(runs // 2):
                        start = time.perf_counter()
                        client.infer(sample, binary=binary)
                        rtt[binary].record((time.perf_counter() - start) * 1000.0)
                    recorded_invoke, recorded_e2e = agent_histograms(recorder)
                    invoke[binary].add(recorded_invoke)
                    e2e[binary].add(recorded_e2e)
    finally:
        endpoint.stop()
        host.close()

    def p50(histogram: LatencyHistogram) -> float:
        return histogram.percentile(50) or float("nan")

    base = p50(bare)
    row = [label, f"{invoke[False].total + invoke[True].total:,}", f"{float(np.percentile(exact, 50)):.4f}",
           f"{base:.4f}"]
    for binary in (False, True):
        row += [f"{p50(invoke[binary]):.4f}", f"{p50(invoke[binary]) / base:.2f}x", f"{p50(e2e[binary]):.4f}",
                f"{p50(rtt[binary]):.4f}", f"{p50(rtt[binary]) / base:.1f}x"]
    again = invoke_again_p50(source, sample, runs * 2)
    return [*row, f"{again:.4f}", f"{again / base:.2f}x"]


def histogram_cost(calls: int) -> list[list[str]]:
    values = np.random.default_rng(0).lognormal(0.0, 1.0, calls).tolist()
    histogram = LatencyHistogram()
    start = time.perf_counter()
    for value in values:
        histogram.record(value)
    record_us = (time.perf_counter() - start) / calls * 1e6
    recorder = LatencyRecorder()
    source = ModelSource(model="m", version=1, sha256="0" * 64, quantization="int8", deployment_id="d",
                         model_path="", eval_path="", threads=1)
    start = time.perf_counter()
    for value in values:
        recorder.record(source, "bench", 1, invoke_ms=value, e2e_ms=value, samples=1)
    recorder_us = (time.perf_counter() - start) / calls * 1e6
    return [["LatencyHistogram.record", f"{record_us:.3f}"],
            ["LatencyRecorder.record (lock, two histograms, counters)", f"{recorder_us:.3f}"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs (a smoke run)")
    args = parser.parse_args()
    rounds, runs = (3, 200) if args.quick else (10, 1000)
    print("building the int8 models ...", file=sys.stderr)
    cases = [("digits CNN int8", *digits_int8(epochs=3 if args.quick else 10)),
             ("MobileNetV2 0.35 96x96 int8", *mobilenet_int8())]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for label, flatbuffer, samples in cases:
            print(f"measuring {label} ...", file=sys.stderr)
            model_runs = runs if "digits" in label else max(runs // 10, 50)
            rows.append(measure(label, flatbuffer, samples, rounds, model_runs, Path(tmp)))
    import ai_edge_litert

    print(f"\nhost: {os.cpu_count()} cores, LiteRT {getattr(ai_edge_litert, '__version__', '?')}, 1 thread, one sample "
          f"per call, {rounds} interleaved rounds; p50 in ms, read through the shared histogram; ratios vs the bare "
          "loop's histogram p50 in the same run\n")
    print(markdown_table(
        ["model", "agent calls", "bare p50 (exact)", "bare p50",
         "JSON: agent invoke p50", "vs bare", "agent e2e p50", "round trip p50", "vs bare",
         ".npy: agent invoke p50", "vs bare", "agent e2e p50", "round trip p50", "vs bare",
         "same invoke again at once p50", "vs bare"], rows))
    print()
    print(markdown_table(["histogram cost per call", "µs"], histogram_cost(200_000)))


if __name__ == "__main__":
    main()
