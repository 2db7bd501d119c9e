"""The attack suite's harness and its one assertion, ``assert_attack_refused``.

``AttackHarness`` is the agent tests' ``Harness`` (a real Updater on a real
data directory, real Ed25519 keys and signed documents, the server played by
``pump``) with two more ways in: ``deliver`` hands raw bytes on a topic to a
real ``AgentService`` (its decoding and dispatch, what the broker would hand
over), and a trial may be the real child process (``RealTrial``) with real
model bytes.

Adding a case is one line in a test::

    assert_attack_refused(harness, lambda h: h.updater.offer(forged.desired), "rejected: ...")
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.record import TrustedState
from agent.service import AgentService
from agent.states import State
from shared.canonical import canonical_json
from shared.codec import encode
from shared.errors import EdgefleetError
from shared.messages import DesiredState, Gates, SignedEnvelope, UpdateState
from shared.mqtt import Inbound
from shared.topics import TopicKind, device_topic
from shared.trial import TrialProcess, TrialRequest, start_trial
from tests.agent.fakes import Harness, ScriptedTrial
from tests.agent.material import DEVICE, Release

# The files under the data directory that hold what the agent trusts (agent/record.py TrustedState).
# A new piece of trusted state (e.g. a trusted root) adds its file here, and every attack then proves
# it unchanged.
TRUST_FILES: tuple[str, ...] = ("trusted.json",)
ERROR_LOGGERS = ("agent", "shared")  # whose log lines count as what the agent said about an attack
TRIAL_POLL_S = 0.02

Attack = Callable[["AttackHarness"], object]


class RealTrial:
    """Starts the real trial child (``python -m shared.trial``) with a time limit a test may lower."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.requests: list[TrialRequest] = []

    def __call__(self, request: TrialRequest) -> TrialProcess:
        self.requests.append(request)
        return start_trial(request, timeout=self.timeout)


@dataclass
class AttackHarness(Harness):
    """``Harness`` plus the wire (``deliver``) and, optionally, real model bytes for the good releases."""

    good_model: bytes | None = None  # None: arbitrary bytes (the trial is scripted)
    good_eval: bytes | None = None
    good_gates: Gates | None = None
    highest: int = 0  # the highest version, counter or sequence signed so far: the next good one goes above
    _service: AgentService | None = field(default=None, init=False, repr=False)

    # -- signing -------------------------------------------------------------------------------

    def release(self, **kwargs: Any) -> Release:
        release = super().release(**kwargs)
        self.highest = max(self.highest, release.manifest.version, release.manifest.release_counter,
                           release.directive.seq)
        return release

    def next_good_release(self) -> Release:
        """A fresh, valid release and directive, above everything signed before."""
        n = self.highest + 1
        extra: dict[str, Any] = {"gates": self.good_gates} if self.good_gates is not None else {}
        return self.release(version=n, seq=n, release_counter=n, deployment_id=f"dep-good-{n}",
                            model=self.good_model, eval_bytes=self.good_eval, **extra)

    # -- the wire --------------------------------------------------------------------------------

    @property
    def service(self) -> AgentService:
        """A real AgentService around this harness's updater (its reports go to the recording reporter);
        never started, so nothing connects."""
        if self._service is None:
            self._service = AgentService(self.config, updater_factory=lambda config, reporter: self.updater)
        self._service.updater = self.updater  # the updater may have been rebuilt (restart)
        return self._service

    def deliver(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """``payload`` on ``topic``, as the broker hands it to the agent's loop."""
        self.service.handle(Inbound(topic, payload, retain))

    def deliver_desired(self, payload: bytes | DesiredState) -> None:
        body = payload if isinstance(payload, bytes) else canonical_json(encode(payload))
        self.deliver(device_topic(TopicKind.DESIRED, DEVICE), body, retain=True)

    def close(self) -> None:
        if self._service is not None:
            self._service.link.stop()

    # -- running until the agent rests ---------------------------------------------------------------

    def settle(self, deployment_id: str, *, limit_s: float = 120.0) -> tuple[str, UpdateState, str]:
        """Answer chunk requests, tick and wait for trials (scripted or real) until ``deployment_id``
        ends; returns its final event."""
        if isinstance(self.trial, ScriptedTrial):
            self.trial.hold = False
        deadline = time.monotonic() + limit_s
        while not self._ended(deployment_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"deployment {deployment_id} did not end: {self.reporter.events}")
            self.pump()
            if self.updater.state is State.TRIAL:
                time.sleep(0.0 if isinstance(self.trial, ScriptedTrial) else TRIAL_POLL_S)
            self.updater.tick()
        return self.reporter.final(deployment_id)

    def _ended(self, deployment_id: str) -> bool:
        return any(d == deployment_id and s.is_final for d, s, _ in self.reporter.events)


# -- what "refused" means -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedView:
    """What an attack must leave byte-identical: the trusted state and the active model."""

    trusted: TrustedState
    trust_files: dict[str, bytes]
    active_slot: str | None
    active_files: dict[str, bytes]  # active.json and every file of the active slot
    active_model: bytes | None


def trusted_view(h: AttackHarness) -> TrustedView:
    slot = h.updater.slots.active_slot()
    return TrustedView(
        trusted=h.updater.trusted,
        trust_files=h.snapshot(*TRUST_FILES),
        active_slot=slot,
        active_files=h.snapshot("active.json", *([f"slots/{slot}"] if slot else [])),
        active_model=h.active_model_bytes(),
    )


class _Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _listening() -> Iterator[_Said]:
    said = _Said()
    loggers = [logging.getLogger(name) for name in ERROR_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(said)
        lg.setLevel(logging.DEBUG)
    try:
        yield said
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(said)
            lg.setLevel(level)


def _matches(error: str | re.Pattern[str], text: str) -> bool:
    return error.fullmatch(text) is not None if isinstance(error, re.Pattern) else error == text


def assert_attack_refused(harness: AttackHarness, attack: Attack, error: str | re.Pattern[str]) -> None:
    """Run ``attack(harness)`` and prove it was refused:

    1. ``error`` is exactly (a string) or wholly (a compiled pattern) one of the things the agent said about
       it: a rejection's reason, a deployment's final reason, a log line of ``agent``/``shared``, or the
       text of the EdgefleetError the attack raised;
    2. the trusted state (in memory and in ``TRUST_FILES``) and the active model (``active.json``, every file
       of the active slot) are byte-identical to before; and when the agent was idle before and after and
       reported no deployment event, every byte of its data directory is;
    3. the agent still installs a good update next: a fresh valid release and directive commit.
    """
    h = harness
    before = trusted_view(h)
    was_idle = h.updater.state is State.IDLE and h.updater.pending is None
    whole_dir = h.snapshot()
    events, rejections = len(h.reporter.events), len(h.reporter.rejections)

    raised: list[str] = []
    with _listening() as said:
        try:
            attack(h)
        except EdgefleetError as exc:
            raised.append(str(exc))

    new_events = h.reporter.events[events:]
    heard = ([reason for _, reason in h.reporter.rejections[rejections:]]
             + [reason for _, state, reason in new_events if state.is_final] + said.lines + raised)
    assert any(_matches(error, text) for text in heard), (
        f"the agent never said {error!r}; it said:\n" + "\n".join(f"  {text!r}" for text in heard))

    after = trusted_view(h)
    assert after == before, f"the attack moved the trusted state or the active model:\n{before}\n{after}"
    if was_idle and not new_events and h.updater.state is State.IDLE:
        assert h.snapshot() == whole_dir, "an attack refused before any deployment began changed the data dir"

    good = h.next_good_release()
    h.updater.offer(good.desired)
    final = h.settle(good.deployment_id)
    assert final[1] is UpdateState.COMMITTED, f"the next good update did not commit: {final}"
    assert h.active_model_bytes() == good.model
    n = good.manifest.release_counter
    assert h.updater.records.load_trusted() == TrustedState(n, n, good.deployment_id)


# -- builders for hostile documents ------------------------------------------------------------------


def with_signed(envelope: SignedEnvelope, **changes: Any) -> SignedEnvelope:
    """``envelope`` with fields of its signed part changed after signing (the signatures kept)."""
    return SignedEnvelope(signed={**envelope.signed, **changes}, signatures=envelope.signatures)


def desired_text(desired: DesiredState) -> str:
    """The desired state as the server sends it (canonical JSON), to be edited as text."""
    return canonical_json(encode(desired)).decode()
