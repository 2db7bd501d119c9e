"""Benchmark-only trials: ``model build --measure-on`` asks a device to time a candidate before anything ships.

The server sends a ``measure`` command: a director-signed ``MeasureOrder``
pinning a release-signed manifest of the candidate. The measurer verifies both
(as the updater verifies a desired state, but without moving the trusted
release counter or sequence number: nothing is installed), downloads the files
into a scratch folder with the same chunk requests, runs the same trial child
(the manifest's threads, the profile's memory limit, the eval slice that
travels with it), reports ``measurement`` telemetry through the outbox and
deletes the folder. The slots, the update record and the served model are
never touched.

An install comes first: an order that arrives while an update runs waits for
the server's next send (it sends again until it has a result), and a
measurement under way when an install begins is abandoned, reported as
interrupted. One measurement runs at a time; a repeat of the one under way or
of one already reported is ignored. The scratch folder is emptied at start,
so a crash leaves nothing behind; the server sends the order again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig
from agent.download import ChunkAssembler, ChunkVerdict, Download, as_ranges, verify_file
from agent.memory import available_memory_bytes, trial_memory_budget
from agent.slots import SlotStore
from shared.errors import EdgefleetError, StorageError, TrustError
from shared.failpoints import failpoint
from shared.messages import BenchmarkResult, Command, Manifest, MeasureOrder, clip_reason
from shared.signing import TrustedKeys, verify_manifest, verify_measure_order
from shared.trial import TrialHandle, TrialRequest, start_trial

logger = logging.getLogger(__name__)

REMEMBERED = 64  # finished measurement ids kept to ignore repeats of their orders


class MeasureReporter(Protocol):
    def measured(self, measurement_id: str, benchmark: BenchmarkResult | None, accuracy: float | None,
                 samples: int | None, reason: str | None) -> None: ...

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None: ...

    def watch_chunks(self, sha256: str, indices: Collection[int]) -> None: ...


@dataclass
class _Measurement:
    order: MeasureOrder
    manifest: Manifest
    download: Download | None = None
    trial: TrialHandle | None = None

    @property
    def id(self) -> str:
        return self.order.measurement_id


class Measurer:
    def __init__(
        self, config: AgentConfig, reporter: MeasureReporter, *, keys: Callable[[], TrustedKeys],
        release_counter: Callable[[], int], busy: Callable[[], str | None],
        start: Callable[[TrialRequest], TrialHandle] | None = None, clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        available_memory: Callable[[], int | None] = available_memory_bytes,
    ) -> None:
        """``keys`` and ``release_counter``: the updater's current trust; ``busy``: what install is under way,
        if one is (it comes first)."""
        self.config = config
        self.reporter = reporter
        self.keys = keys
        self.release_counter = release_counter
        self.busy = busy
        self.start = start or (lambda request: start_trial(request, timeout=config.trial.timeout_seconds))
        self.clock = clock
        self.monotonic = monotonic
        self.available_memory = available_memory
        self.scratch = config.data_dir / "measure"
        self.slots = SlotStore(config.data_dir)
        self.current: _Measurement | None = None
        self.finished: deque[str] = deque(maxlen=REMEMBERED)
        shutil.rmtree(self.scratch, ignore_errors=True)  # what a crash left half done: the server asks again

    # -- entry points (the service loop) -------------------------------------

    def offer(self, command: Command) -> None:
        assert command.order is not None and command.manifest is not None
        device = self.config.device
        keys, now = self.keys(), self.clock()
        try:
            manifest = verify_manifest(command.manifest, keys, now=now, min_release_counter=self.release_counter(),
                                       profile=device.profile)
            order = verify_measure_order(command.order, keys, now=now, device_id=device.id,
                                         manifest_envelope=command.manifest)
        except TrustError as exc:
            logger.warning("rejected a measure order: %s", exc)
            return  # nothing signed names it: there is no measurement to report on
        if order.measurement_id in self.finished or (self.current and self.current.id == order.measurement_id):
            return  # a repeat: the result is in the outbox, or on its way
        installing = self.busy()
        if installing is not None:
            logger.info("measurement %s waits: %s", order.measurement_id, installing)
            return  # the server sends it again
        if self.current is not None:
            self._end(self.current, reason=f"replaced by measurement {order.measurement_id}")
        logger.info("measuring %s v%s (%s) for measurement %s", manifest.model, manifest.version,
                    manifest.quantization, order.measurement_id)
        self.current = _Measurement(order, manifest)
        self._advance()

    def on_chunk(self, sha256: str, index: int, data: bytes) -> bool:
        """Take a chunk of a file this measurement downloads; False when it is not one (the updater's)."""
        current = self.current
        if current is None or current.download is None or sha256 not in current.download.assemblers:
            return False
        assembler = current.download.assemblers[sha256]
        try:
            verdict = assembler.accept(index, data)
        except StorageError as exc:
            self._end(current, reason=str(exc))
            return True
        if verdict is not ChunkVerdict.STORED:
            return True  # a duplicate, or a bad copy: the next ask fetches it again
        current.download.last_progress = self.monotonic()
        window = current.download.windows.setdefault(sha256, set())
        window.discard(index)
        if assembler.complete:
            self.reporter.watch_chunks(sha256, ())
            self._advance()
        elif not window:
            self._ask(current.download, sha256, assembler)
        return True

    def tick(self) -> None:
        current = self.current
        if current is None:
            return
        installing = self.busy()
        if installing is not None:
            self._end(current, reason=f"interrupted: {installing}")
            return
        download = current.download
        if download is not None and not download.complete:
            now = self.monotonic()
            if now - download.last_progress > self.config.download.stall_timeout_seconds:
                self._end(current, reason="download stalled: no chunk arrived in time")
            elif now - download.last_request >= self.config.download.request_interval_seconds:
                self.request_missing()
            return
        self._advance()

    def request_missing(self) -> None:
        """Ask for every missing chunk again (after a reconnect, or when the last ask went unanswered)."""
        current = self.current
        if current is None or current.download is None:
            return
        for sha256, assembler in current.download.assemblers.items():
            if not assembler.complete:
                self._ask(current.download, sha256, assembler)
        current.download.last_request = self.monotonic()

    def stop(self) -> None:
        if self.current is not None and self.current.trial is not None:
            self.current.trial.cancel()

    # -- the steps ------------------------------------------------------------

    def _advance(self) -> None:
        current = self.current
        if current is None:
            return
        try:
            if current.download is None:
                current.download = self._start_download(current.manifest)
                if not current.download.complete:
                    self.request_missing()
                    return
            if not current.download.complete:
                return
            if current.trial is None:
                for entry in current.manifest.files:
                    verify_file(self._path(entry.sha256), entry)
                failpoint("agent.measure.downloaded")
                current.trial = self.start(self._request(current.manifest))
                failpoint("agent.measure.trial.started")
            result = current.trial.poll()
        except (EdgefleetError, OSError) as exc:
            self._end(current, reason=str(exc))
            return
        if result is None:
            return
        if not result.ok or result.benchmark is None or result.accuracy is None:
            self._end(current, reason=result.reason if result.load_error else f"trial failed: {result.error}")
            return
        logger.info("measurement %s: p50 %.3f ms, p95 %.3f ms, accuracy %.4f on %d samples", current.id,
                    result.benchmark.p50_ms, result.benchmark.p95_ms, result.accuracy, result.samples or 0)
        self._end(current, benchmark=result.benchmark, accuracy=result.accuracy, samples=result.samples or 0)

    def _start_download(self, manifest: Manifest) -> Download:
        self.scratch.mkdir(parents=True, exist_ok=True)
        assemblers = {}
        for entry in manifest.files:
            local = self.slots.find_local(entry)  # the eval slice is often the active model's own
            if local is not None:
                shutil.copyfile(local, self._path(entry.sha256))
                continue
            assemblers[entry.sha256] = ChunkAssembler(entry, self.scratch)
        return Download(assemblers, last_progress=self.monotonic())

    def _path(self, sha256: str) -> Path:
        return self.scratch / f"{sha256}.part"

    def _request(self, manifest: Manifest) -> TrialRequest:
        bench = self.config.benchmark
        budget = trial_memory_budget(manifest.max_ram_bytes, self.config.trial.memory_limit_mb,
                                     self.available_memory())
        return TrialRequest(
            model_path=str(self._path(manifest.file("model").sha256)),
            eval_path=str(self._path(manifest.file("eval").sha256)),
            threads=self.config.runtime.threads_for(manifest.threads), runtime=self.config.runtime.preferred,
            warmup_runs=bench.warmup_runs, warmup_seconds=bench.warmup_seconds, min_runs=bench.min_runs,
            min_seconds=bench.min_seconds, memory_limit_mb=budget.limit_mb,
        )

    def _ask(self, download: Download, sha256: str, assembler: ChunkAssembler) -> None:
        window = assembler.next_window()
        download.windows[sha256] = set(window)
        self.reporter.watch_chunks(sha256, window)
        self.reporter.want(sha256, as_ranges(window))

    def _end(self, measurement: _Measurement, *, benchmark: BenchmarkResult | None = None,
             accuracy: float | None = None, samples: int | None = None, reason: str | None = None) -> None:
        """Report the result (or why there is none), then forget the files."""
        if measurement.trial is not None and reason is not None:
            measurement.trial.cancel()
        if measurement.download is not None:
            for sha256 in measurement.download.assemblers:
                self.reporter.watch_chunks(sha256, ())
        if reason is not None:
            logger.warning("measurement %s failed: %s", measurement.id, reason)
        self.reporter.measured(measurement.id, benchmark, accuracy, samples,
                               None if reason is None else clip_reason(reason))
        failpoint("agent.measure.reported")
        self.finished.append(measurement.id)
        if self.current is measurement:
            self.current = None
        shutil.rmtree(self.scratch, ignore_errors=True)
