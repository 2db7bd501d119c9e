"""The update state machine's runner and handlers.

Every handler ``on_<state>`` returns an Event (or None while it waits: for
chunks, or for the trial child); expected failures become a
FAILURE/GATES_FAILED event with a reason, only programming errors propagate.
The record is saved before each side effect; trust checks run before any
model byte is touched.

Only a desired state whose signatures verify can change what the agent does
or which deployment it reports on: one that fails a check is reported as a
*rejection* (naming the deployment it merely claims), never as the failure of
a deployment, and it never displaces a verified directive waiting its turn.

A verified newer directive cancels an install that has not reached its trial
(``SUPERSEDABLE``): the current deployment ends FAILED, "superseded by
deployment <id>", its downloads discarded and a half-staged spare slot
cleared, and the newer one is accepted. From the trial on it waits its turn.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig
from agent.download import (
    CORRUPT_PATIENCE_REQUESTS,
    CORRUPT_RETRY_S,
    ChunkAssembler,
    ChunkVerdict,
    Download,
    as_ranges,
    verify_file,
)
from agent.files import fsync_file
from agent.gates import gate_failures
from agent.memory import MemoryBudget, available_memory_bytes, trial_memory_budget
from agent.record import RecordStore, UpdateRecord
from agent.root import trusted_keys
from agent.slots import SlotStore
from agent.states import REPORTED, RESUME_FROM, SUPERSEDABLE, Event, State, next_state
from agent.trials import ReplacedModel, previous_model, replaced_model, trial_request
from agent.trust import claimed_deployment, trusted_after, verify_desired
from shared.canonical import canonical_digest
from shared.codec import encode
from shared.errors import EdgefleetError, StorageError, TrustError
from shared.failpoints import failpoint
from shared.messages import (
    SUPERSEDED_BY,
    BenchmarkResult,
    DeploymentOutcome,
    DesiredState,
    Directive,
    Manifest,
    PreviousModel,
    UpdateState,
    clip_reason,
)
from shared.protocol import decode_versioned
from shared.signing import TrustedKeys
from shared.trial import TrialHandle, TrialRequest, start_trial

logger = logging.getLogger(__name__)

TrialStarter = Callable[[TrialRequest], TrialHandle]


class Reporter(Protocol):
    """What the updater tells the outside world; the MQTT service implements it."""

    def event(self, deployment_id: str, state: UpdateState, reason: str) -> None: ...

    def rejected(self, claimed_deployment: str, reason: str) -> None: ...

    def telemetry(
        self, deployment_id: str, benchmark: BenchmarkResult, accuracy: float, samples: int,
        previous: PreviousModel | None,
    ) -> None: ...

    def state_changed(self) -> None: ...

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None: ...

    def watch_chunks(self, sha256: str, indices: Collection[int]) -> None:
        """Receive these chunks of the file from now on, and no others (none: stop listening)."""


class Updater:
    def __init__(
        self,
        config: AgentConfig,
        reporter: Reporter,
        *,
        start_trial: TrialStarter | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        available_memory: Callable[[], int | None] = available_memory_bytes,
    ) -> None:
        self.config = config
        self.reporter = reporter
        self.records = RecordStore(config.data_dir)
        self.slots = SlotStore(config.data_dir)
        self.downloads_dir = config.data_dir / "downloads"
        self.keys = trusted_keys(config)
        self.clock = clock
        self.monotonic = monotonic
        self.available_memory = available_memory
        self.start_trial = start_trial or self._start_trial_in_child
        self.record = self.records.load_record()
        self.trusted = self.records.load_trusted()
        self.pending: DesiredState | None = None  # verified, newer than anything accepted, waiting its turn
        self._pending_seq = 0
        self._pending_id = ""
        self._last_rejection: str | None = None  # digest of the last rejected desired state, reported once
        self._rejected: DesiredState | None = None  # ... and itself: a newer root of trust may vouch for it
        self._download: Download | None = None
        self._trial: TrialHandle | None = None
        self._budget: MemoryBudget | None = None
        self._replaced: ReplacedModel | None = None  # the committed model the running trial also measures
        self._last_retry = float("-inf")
        self._resumed = True  # resume() clears it until it has run to the end
        self._handlers: dict[State, Callable[[], Event | None]] = {
            State.IDLE: self.on_idle,
            State.DOWNLOADING: self.on_downloading,
            State.VERIFYING: self.on_verifying,
            State.STAGED: self.on_staged,
            State.TRIAL: self.on_trial,
            State.COMMITTED: self.on_committed,
            State.ROLLING_BACK: self.on_rolling_back,
            State.FAILED: self.on_failed,
        }

    # -- public entry points (called by the service loop) -------------------

    @property
    def state(self) -> State:
        return self.record.current

    def resume(self) -> None:
        """After a restart: continue or roll back whatever was in flight. If the disk refuses (full),
        the agent runs on and tick() tries again: it must not crash at every start."""
        self._resumed = False
        if self.record.directive is not None and self.record.manifest is not None:
            # The record is saved before the trusted state; catch up if we crashed in between.
            recorded = trusted_after(self.trusted, self._manifest(), self._directive())
            if recorded != self.trusted:
                self.trusted = recorded
                self.records.save_trusted(recorded)
        saved = self.record.current
        resumed = RESUME_FROM[saved]
        if resumed is not saved:
            reason = f"agent restarted during {saved.value}"
            logger.warning("%s: resuming in %s", reason, resumed.value)
            self._save(self.record.moved(resumed, reason=reason))
        self._resumed = True
        self.step()

    def offer(self, desired: DesiredState) -> None:
        """A desired state arrived: verify it, then install it now, instead of an install that has not
        reached its trial, or once the current update ends."""
        try:
            manifest, directive = self._verify(desired)
        except TrustError as exc:
            self._reject(desired, exc)
            return
        if directive.seq == self.trusted.directive_seq:
            return  # the deployment already accepted: its retained message came again
        if self.state is not State.IDLE:
            if self.pending is None or directive.seq > self._pending_seq:
                self.pending, self._pending_seq, self._pending_id = desired, directive.seq, directive.deployment_id
            if self.state in SUPERSEDABLE:
                self.step()  # cancels the current install (see step), then on_idle accepts the pending one
            return
        self._accept(desired, manifest, directive)
        self.step()

    def install_under_way(self) -> str | None:
        """The deployment being installed, or verified and waiting its turn; None when there is none."""
        if self.state is not State.IDLE:
            return self.record.deployment_id or "?"
        return self._pending_id if self.pending is not None else None

    def use_keys(self, keys: TrustedKeys) -> None:
        """A newer root of trust: verify with its keys from now on, and offer the last refused desired state
        again (its directive or release may be signed by a key only the new root lists: the two travel on
        different topics, so the desired state may have arrived first)."""
        self.keys = keys
        desired, self._rejected, self._last_rejection = self._rejected, None, None
        if desired is not None:
            self.offer(desired)

    def on_chunk(self, sha256: str, index: int, data: bytes) -> None:
        download = self._download
        if self.state is not State.DOWNLOADING or download is None or sha256 not in download.assemblers:
            # e.g. a redelivery after the file was complete: the subscription is gone, its queue is not
            logger.debug("ignored chunk %d of %s: no download of it is under way", index, sha256)
            return
        assembler = download.assemblers[sha256]
        try:
            verdict = assembler.accept(index, data)
        except StorageError as exc:
            self._fire(Event.FAILURE, reason=str(exc))
            self.step()
            return
        if verdict is ChunkVerdict.OUT_OF_RANGE:
            logger.warning("dropped %s chunk %d: the signed manifest lists chunks 0 to %d", assembler.entry.name,
                           index, assembler.count - 1)
            return
        if verdict is ChunkVerdict.CORRUPT:
            logger.warning("dropped a copy of %s chunk %d that does not match its signed sha256: asking again",
                           assembler.entry.name, index)
            download.corrupt_this_round.append(f"{assembler.entry.name} chunk {index}")
            return
        if verdict is not ChunkVerdict.STORED:
            return
        failpoint("agent.chunk.stored")
        download.stored_this_round = True
        download.last_progress = self.monotonic()
        progress = assembler.progress(download.last_progress)
        if progress is not None:
            logger.info("downloading %s for deployment %s: %s", assembler.entry.name, self.record.deployment_id,
                        progress)
        window = download.windows.setdefault(sha256, set())
        window.discard(index)
        if assembler.complete:
            self.reporter.watch_chunks(sha256, ())
            self.step()
        elif window:
            self.reporter.watch_chunks(sha256, window)  # a copy published for another device no longer comes
        else:
            self._ask(download, sha256, assembler)  # this window is in: the next one at once

    def tick(self) -> None:
        """Periodic work: see whether the trial ended, re-ask for missing chunks (resume, or soon
        after a corrupt copy), give up on a stalled download, and retry a step that a storage
        error (e.g. a full disk) interrupted."""
        now = self.monotonic()
        if not self._resumed:
            if now - self._last_retry >= self.config.download.request_interval_seconds:
                self._last_retry = now
                self.resume()
            return
        if self.state is State.IDLE:
            return
        if self.state in SUPERSEDABLE and self.pending is not None:
            self.step()  # a cancel the disk interrupted: try again
            return
        if self.state is State.TRIAL and self._trial is not None:
            self.step()
            return
        download = self._download
        if self.state is not State.DOWNLOADING or download is None:
            # a synchronous state, or a download that never got set up: an interrupted step
            if now - self._last_retry >= self.config.download.request_interval_seconds:
                self._last_retry = now
                self.step()
            return
        interval = CORRUPT_RETRY_S if download.corrupt_this_round else self.config.download.request_interval_seconds
        if now - download.last_progress > self.config.download.stall_timeout_seconds:
            self._fire(Event.FAILURE, reason="download stalled: no chunk arrived in time")
            self.step()
        elif now - download.last_request >= interval:
            self.request_missing()

    def request_missing(self) -> None:
        download = self._download
        if download is None:
            return
        # A bad copy alone proves nothing (anyone may publish one); good chunks missing for a while do.
        patience = CORRUPT_PATIENCE_REQUESTS * self.config.download.request_interval_seconds
        failure = download.next_round(self.monotonic(), patience)
        if failure is not None:
            self._fire(Event.FAILURE, reason=failure)
            self.step()
            return
        for sha256, assembler in download.assemblers.items():
            if not assembler.complete:
                self._ask(download, sha256, assembler)
        download.last_request = self.monotonic()

    def _ask(self, download: Download, sha256: str, assembler: ChunkAssembler) -> None:
        """Listen for the file's next window of missing chunks, then ask for them (the subscription is in
        place before the server can answer: both go out on one connection, in this order)."""
        window = assembler.next_window()
        download.windows[sha256] = set(window)
        self.reporter.watch_chunks(sha256, window)
        self.reporter.want(sha256, as_ranges(window))

    def step(self) -> None:
        """Run handlers until one waits in an unchanged state. A verified newer directive waiting while
        the current install has not reached its trial ends that install first (``_superseded``)."""
        while True:
            before = self.state
            if before in SUPERSEDABLE and self.pending is not None:
                event: Event | None = self._superseded()
            else:
                event = self._handlers[before]()
            if event is not None:
                self._fire(event)
            elif self.state is before:
                return

    def outcome(self) -> DeploymentOutcome | None:
        """How the last deployment ended, for the device's retained state."""
        if self.record.outcome is None or self.record.deployment_id is None:
            return None
        return DeploymentOutcome(self.record.deployment_id, self.record.outcome, clip_reason(self.record.reason))

    def stop(self) -> None:
        """The agent is shutting down: end a running trial (a restart rolls it back)."""
        if self._trial is not None:
            self._trial.cancel()
            self._trial = None

    # -- transitions -------------------------------------------------------

    def _save(self, record: UpdateRecord) -> None:
        self.records.save_record(record)
        self.record = record
        failpoint(f"agent.saved.{record.state}")

    def _fire(self, event: Event, **changes: object) -> None:
        target = next_state(self.state, event)
        logger.info("%s --%s--> %s %s", self.state.value, event.value, target.value, changes.get("reason", ""))
        self._save(self.record.moved(target, **changes))
        reported = REPORTED[target]
        if reported is not None and not reported.is_final and self.record.deployment_id:
            self.reporter.event(self.record.deployment_id, reported, "")
        self.reporter.state_changed()

    def _finish(self, state: UpdateState) -> Event:
        assert self.record.deployment_id is not None
        self._save(self.record.moved(self.state, outcome=state.value))
        self.reporter.event(self.record.deployment_id, state, clip_reason(self.record.reason))
        return Event.DONE

    def _manifest(self) -> Manifest:
        assert self.record.manifest is not None
        return decode_versioned(Manifest, self.record.manifest.signed)

    def _directive(self) -> Directive:
        assert self.record.directive is not None
        return decode_versioned(Directive, self.record.directive.signed)

    # -- trust -------------------------------------------------------------

    def _verify(self, desired: DesiredState) -> tuple[Manifest, Directive]:
        return verify_desired(desired, self.keys, self.trusted, device_id=self.config.device.id,
                              profile=self.config.device.profile, now=self.clock())

    def _reject(self, desired: DesiredState, exc: TrustError) -> None:
        """Log and report a refused desired state once; it names no deployment we trust."""
        logger.warning("rejected desired state: %s", exc)
        self._rejected = desired
        digest = canonical_digest(encode(desired))
        if digest == self._last_rejection:
            return  # the same retained message again (every reconnect delivers it)
        self._last_rejection = digest
        self.reporter.rejected(claimed_deployment(desired), clip_reason(f"rejected: {exc}"))

    def _accept(self, desired: DesiredState, manifest: Manifest, directive: Directive) -> None:
        self.trusted = trusted_after(self.trusted, manifest, directive)
        logger.info(
            "accepted deployment %s: %s v%s (%s)", directive.deployment_id, manifest.model, manifest.version,
            manifest.quantization,
        )
        self._fire(
            Event.ACCEPTED,
            deployment_id=directive.deployment_id,
            directive=desired.directive,
            manifest=desired.manifest,
            slot=None,
            reason="",
            outcome=None,
        )
        # After the record: a crash in between is repaired by resume() from the record.
        self.records.save_trusted(self.trusted)

    # -- handlers ----------------------------------------------------------

    def on_idle(self) -> Event | None:
        if self.pending is None:
            return None
        desired, self.pending = self.pending, None
        try:
            manifest, directive = self._verify(desired)  # again: it may have expired while it waited
        except TrustError as exc:
            self._reject(desired, exc)
            return None
        if directive.seq != self.trusted.directive_seq:
            self._accept(desired, manifest, directive)
        return None

    def _staging_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.part"

    def on_downloading(self) -> Event | None:
        manifest = self._manifest()
        if self._download is None:
            assemblers: dict[str, ChunkAssembler] = {}
            try:
                for entry in manifest.files:
                    local = self.slots.find_local(entry)
                    if local is not None and not self._staging_path(entry.sha256).exists():
                        self.downloads_dir.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(local, self._staging_path(entry.sha256))
                        fsync_file(self._staging_path(entry.sha256))  # it ends up in the committed slot
                        continue
                    assemblers[entry.sha256] = ChunkAssembler(entry, self.downloads_dir)
            except (StorageError, OSError) as exc:
                return self._fail(exc)
            self._download = Download(assemblers, last_progress=self.monotonic())
            if not self._download.complete:
                self.request_missing()  # later asks come from tick() (resume, corrupt copies) and reconnects
        if self._download.complete:
            try:
                for assembler in self._download.assemblers.values():
                    assembler.flush()  # one fsync per file, before the record moves past the download
            except StorageError as exc:
                return self._fail(exc)
            self._download = None
            return Event.DOWNLOADED
        return None

    def _superseded(self) -> Event:
        """The FAILURE that ends an install before its trial when a newer directive came: FAILED
        discards its downloads and a half-staged slot, IDLE accepts the newer one."""
        reason = f"{SUPERSEDED_BY}{self._pending_id}"
        logger.info("deployment %s %s before its trial: cancelling it", self.record.deployment_id, reason)
        self._save(self.record.moved(self.state, reason=reason))
        return Event.FAILURE

    def _fail(self, exc: Exception) -> Event:
        self._save(self.record.moved(self.state, reason=str(exc)))
        return Event.FAILURE

    def on_verifying(self) -> Event:
        try:
            for entry in self._manifest().files:
                verify_file(self._staging_path(entry.sha256), entry)
                failpoint("agent.verified.file")
        except TrustError as exc:
            return self._fail(exc)
        return Event.VERIFIED

    def on_staged(self) -> Event:
        manifest = self._manifest()
        try:
            slot = self.slots.stage(manifest, {e.name: self._staging_path(e.sha256) for e in manifest.files})
        except (StorageError, TrustError) as exc:
            return self._fail(exc)
        self._save(self.record.moved(State.STAGED, slot=slot))
        return Event.STAGED_OK

    def _start_trial_in_child(self, request: TrialRequest) -> TrialHandle:
        return start_trial(request, timeout=self.config.trial.timeout_seconds)

    def on_trial(self) -> Event | None:
        """Start the trial child, then (on later ticks) collect its result: the loop stays free."""
        if self._trial is None:
            manifest, slot = self._manifest(), self.record.slot
            assert slot is not None
            self._budget = trial_memory_budget(
                manifest.max_ram_bytes, self.config.trial.memory_limit_mb, self.available_memory()
            )
            self._replaced = replaced_model(self.slots, slot)
            self._trial = self.start_trial(
                trial_request(self.config, self.slots, manifest, slot, self._budget, self._replaced)
            )
            failpoint("agent.trial.started")
        result = self._trial.poll()
        if result is None:
            return None
        self._trial = None
        if not result.ok or result.benchmark is None or result.accuracy is None:
            if result.oom and self._budget is not None:
                reason = f"{result.reason} ({self._budget.why})"
            else:
                reason = result.reason if result.load_error else f"trial failed: {result.error}"
            self._save(self.record.moved(State.TRIAL, reason=reason))
            return Event.FAILURE
        assert self.record.deployment_id is not None
        previous = previous_model(self._replaced, result)
        self.reporter.telemetry(
            self.record.deployment_id, result.benchmark, result.accuracy, result.samples or 0, previous
        )
        problems = gate_failures(self._directive().gates, result.accuracy, result.benchmark.p95_ms, previous)
        if problems:
            self._save(self.record.moved(State.TRIAL, reason="; ".join(problems)))
            return Event.GATES_FAILED
        return Event.GATES_PASSED

    def on_committed(self) -> Event:
        slot = self.record.slot
        assert slot is not None
        assert self.record.deployment_id is not None
        try:
            self.slots.commit(slot, self.record.deployment_id)
        except StorageError as exc:
            if self.slots.active_slot() != slot:
                return self._fail(exc)
            logger.warning("the active pointer switched, but not durably: %s", exc)
        failpoint("agent.committed.switched")
        self._discard_downloads()
        return self._finish(UpdateState.COMMITTED)

    def on_rolling_back(self) -> Event:
        if self.record.slot is not None and self.record.slot != self.slots.active_slot():
            self.slots.clear_spare()
        self._discard_downloads()
        return self._finish(UpdateState.ROLLED_BACK)

    def on_failed(self) -> Event:
        self._discard_downloads()
        self._clear_half_staged()
        return self._finish(UpdateState.FAILED)

    def _clear_half_staged(self) -> None:
        """A failure before the trial may come after staging began (a full disk, or a newer directive
        while the record still said STAGED): clear the spare slot if it holds a half-staged model (no
        manifest) or this deployment's own copy. A previous model kept there as the fallback stays."""
        try:
            spare = self.slots.spare_slot()
        except (EdgefleetError, OSError, ValueError):
            return  # which slot is active is unclear: touch neither
        if not self.slots.slot_dir(spare).exists():
            return
        try:
            held = self.slots.manifest(spare)
        except (EdgefleetError, OSError, ValueError):
            held = None
        if held is None or held == self._manifest():
            self.slots.clear_spare()

    def _discard_downloads(self) -> None:
        if self._download is not None:
            for sha256 in self._download.assemblers:
                self.reporter.watch_chunks(sha256, ())
        self._download = None
        shutil.rmtree(self.downloads_dir, ignore_errors=True)

    def active_summary(self) -> tuple[Manifest | None, str | None]:
        """The active model's manifest and the deployment that installed it."""
        try:
            return self.slots.active_manifest(), self.slots.active_deployment()
        except (EdgefleetError, OSError, ValueError):
            return None, None

