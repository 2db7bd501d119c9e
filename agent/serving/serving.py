"""The agent's serving side, wired together: endpoint, model host, recorder, reporter, re-benchmark.

``AgentService`` calls ``start`` once, ``sync`` whenever the update state may
have changed (the committed model it finds in the slots is loaded and swapped
in off the loop), ``tick`` on every pass of its loop, and ``stop`` on the way
out (a final report of every recorded call, into the outbox).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.config import AgentConfig
from agent.files import atomic_write_json
from agent.serving.endpoint import Endpoint, InferenceApp, start_endpoint
from agent.serving.host import Loader, ModelHost, ModelSource, load_served
from agent.serving.rebenchmark import Rebenchmark
from agent.serving.recorder import LatencyRecorder
from agent.serving.reporter import SendReport, ServingReporter
from agent.serving.system import SystemSampler
from agent.slots import SlotStore
from shared.errors import EdgefleetError
from shared.inference_client import SERVE_FILE

logger = logging.getLogger(__name__)



def model_source(config: AgentConfig, slots: SlotStore) -> ModelSource | None:
    """The committed model as the slots hold it; None when there is none. Raises EdgefleetError/OSError."""
    slot = slots.active_slot()
    manifest = slots.manifest(slot) if slot is not None else None
    if slot is None or manifest is None:
        return None
    entry = manifest.file("model")
    return ModelSource(
        model=manifest.model, version=manifest.version, sha256=entry.sha256, quantization=manifest.quantization,
        deployment_id=slots.active_deployment() or "", model_path=str(slots.file_path(slot, entry)),
        eval_path=str(slots.file_path(slot, manifest.file("eval"))),
        threads=config.runtime.threads_for(manifest.threads), runtime=config.runtime.preferred,
    )


class Serving:
    def __init__(
        self,
        config: AgentConfig,
        *,
        send: SendReport,
        backlog: Callable[[], int],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        load: Loader = load_served,
        system: SystemSampler | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.serve.enabled
        self.slots = SlotStore(config.data_dir)
        self.host = ModelHost(load)
        self.recorder = LatencyRecorder(clock=clock, monotonic=monotonic)
        self.reporter = ServingReporter(
            self.recorder.swap, send, backlog, interval_s=config.serve.report_interval_s, monotonic=monotonic,
            system=system if system is not None else SystemSampler(monotonic=monotonic),
        )
        self.rebenchmark = Rebenchmark(self.host, self.recorder, interval_s=config.serve.rebenchmark_interval_s,
                                       monotonic=monotonic)
        self.endpoint: Endpoint | None = None
        self.serve_file = config.data_dir / SERVE_FILE

    @property
    def url(self) -> str | None:
        return None if self.endpoint is None else self.endpoint.url

    def start(self) -> None:
        """Bind the endpoint and load the committed model; a taken address is logged, never fatal."""
        if not self.enabled:
            logger.info("the local inference endpoint is off ([serve] enabled = false)")
            return
        try:
            self.endpoint = start_endpoint(self.config.serve.address, InferenceApp(self.host, self.recorder))
        except OSError as exc:
            logger.error("cannot serve inference on %s (%s); the agent runs on without its endpoint",
                         self.config.serve.listen, exc)
            return
        url = self.endpoint.url
        document = {"unix": self.endpoint.unix_path} if self.endpoint.unix_path else {"url": url}
        try:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.serve_file, document)
        except (EdgefleetError, OSError) as exc:
            logger.warning("could not write %s: %s", self.serve_file, exc)
        logger.info("serving inference at %s (POST /v1/infer, GET /v1/model, GET /healthz)", url)
        self.sync()

    def sync(self) -> None:
        """Serve the committed model: a different one than served is loaded off the loop and swapped in."""
        if self.endpoint is None:
            return
        try:
            source = model_source(self.config, self.slots)
        except (EdgefleetError, OSError, ValueError, StopIteration) as exc:
            logger.warning("cannot read the committed model to serve it (the served one stays): %s", exc)
            return
        if source is not None:
            self.host.want(source)

    def tick(self) -> None:
        self.reporter.tick()
        if self.endpoint is not None:
            self.rebenchmark.tick()

    def stop(self) -> None:
        """Stop answering, then report every call recorded (the outbox keeps it for the next run)."""
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
            try:
                self.serve_file.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not remove %s: %s", self.serve_file, exc)
        self.rebenchmark.join()
        self.reporter.flush()
        self.host.close()
