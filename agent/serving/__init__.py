"""The agent hosts its committed model: a local inference endpoint, and latency reports from real calls.

::

    endpoint.py     HTTP on the standard library (TCP or a unix socket): /v1/infer, /v1/model, /healthz
    bodies.py       request and response bodies: JSON and .npy
    host.py         ModelHost: the served model, loaded off the loop, swapped atomically between two calls
    recorder.py     LatencyRecorder: every call's invoke and end-to-end time, per model version
    reporter.py     ServingReporter: one ServingReport per version and interval, through the outbox
    system.py       SystemSampler: load, CPU, RSS, temperature
    rebenchmark.py  Rebenchmark: with no traffic for a while, the eval samples keep the series alive
    serving.py      Serving: the above, wired together for AgentService

The HTTP server runs its own threads, the model loads on a loader thread,
a re-benchmark on its own thread: none of them runs on the agent's MQTT loop,
which only calls ``Serving.sync`` and ``Serving.tick`` (both quick).
"""

from agent.serving.serving import Serving

__all__ = ["Serving"]
