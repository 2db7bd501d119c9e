"""A small fleet with real serving traffic, for the HTTP API and dashboard tests.

Three devices (cam-1 and cam-2 on x86-64, pi-1 on rpi4); digits:1 rolled out to the cameras and
committed, then digits:2 (built for x86-64 here) rolled out to cam-1 and committed 25 minutes ago.
Each device reports serving telemetry (real ``Telemetry(kind="serving")`` messages with histograms built
by ``shared.histogram``) every minute of the last 50 minutes, applied through ``server.ingest``; cam-1
served digits:1 until the commit and digits:2 after it, so its series has one model change.
``Seeded.ingested`` keeps, per (profile, model, version), the calls, errors and merged histogram sent.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from server.catalog import add_model
from server.compression import build_profiles
from server.db import Database
from server.db.models import Deployment
from server.devices import register_device
from server.ingest import apply_event, apply_state, apply_telemetry
from server.setup import Workspace, open_workspace
from shared import PROTOCOL_VERSION
from shared.histogram import LatencyHistogram
from shared.messages import ActiveModel, DeviceState, Event, ServingReport, SystemStats, Telemetry, UpdateState
from tests.server.conftest import QUICK_BENCHMARK
from tests.server.rollout_helpers import start_all_at_once, take_up

BOOT = "boot-web"
REPORT_S = 60.0
HISTORY_S = 50 * 60.0
SWITCH_AGO_S = 25 * 60.0
LATENCY_MS = {"x86-64": {1: 0.40, 2: 0.25}, "rpi4": {1: 2.5, 2: 1.6}}  # median invoke time per profile, version


@dataclass
class Seeded:
    workspace: Workspace
    now: float
    devices: dict[str, str]  # name -> id
    profiles: dict[str, str]  # name -> profile
    rollouts: tuple[str, str]  # digits:1 to the cameras, digits:2 to cam-1
    ingested: dict[tuple[str, str, int], tuple[int, int, LatencyHistogram]] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.workspace.db

    def serve(self, name: str, model: str, version: int, start: float, end: float, calls: int,
              errors: int = 0, rng: random.Random | None = None) -> Telemetry:
        """Send one serving report for device ``name`` (through ingest, committed) and count it."""
        rng = rng or random.Random(f"{name}{start}")
        profile = self.profiles[name]
        median = LATENCY_MS[profile][version]
        invoke, e2e = LatencyHistogram(), LatencyHistogram()
        for _ in range(calls - errors):
            ms = median * rng.lognormvariate(0.0, 0.25)
            invoke.record(ms)
            e2e.record(ms + 0.05)
        seq = self.seqs[name] = self.seqs.get(name, 0) + 1
        message = Telemetry(
            v=PROTOCOL_VERSION, device_id=self.devices[name], boot_id=BOOT, seq=1000 + seq, deployment_id=None,
            kind="serving", ts=end,
            serving=ServingReport(
                model=model, version=version, sha256="0" * 64, quantization="int8", runtime="ai-edge-litert 1.2.0",
                threads=1, source="traffic", start=start, end=end, calls=calls, errors=errors, samples=calls - errors,
                invoke=invoke.to_wire(), e2e=e2e.to_wire(), p50_ms=invoke.percentile(50),
                p90_ms=invoke.percentile(90), p99_ms=invoke.percentile(99),
                system=SystemStats(load_1m=0.3, cpu_percent=12.0, rss_bytes=90_000_000, temperature_c=48.0),
            ),
        )
        with self.db.session() as session:
            assert apply_telemetry(session, message)
        key = (profile, model, version)
        old_calls, old_errors, histogram = self.ingested.get(key, (0, 0, LatencyHistogram()))
        histogram.add(invoke)
        self.ingested[key] = (old_calls + calls, old_errors + errors, histogram)
        return message


def _commit(db: Database, device_id: str, rollout_id: str, ts: float, seq: int) -> None:
    """The device's events through to committed, the last at ``ts``, and its state saying so."""
    with db.session() as session:
        deployment = session.query(Deployment).filter_by(rollout_id=rollout_id, device_id=device_id).one()
        deployment_id, version = deployment.id, deployment.release.artifact.model_version.version
        for i, state in enumerate((UpdateState.DOWNLOADING, UpdateState.TRIAL, UpdateState.COMMITTED)):
            apply_event(session, Event(v=PROTOCOL_VERSION, device_id=device_id, boot_id=BOOT, seq=seq + i,
                                       deployment_id=deployment_id, state=state.value, reason="", ts=ts - 2 + i))
        apply_state(session, DeviceState(
            v=PROTOCOL_VERSION, device_id=device_id, boot_id=BOOT, runtime="ai-edge-litert", runtime_version="1.2.0",
            update_state="idle", deployment_id=deployment_id, directive_seq=deployment.seq,
            active=ActiveModel("digits", version, "0" * 64, "int8", deployment_id)))


def seed(workspace: Workspace, digits_inputs: tuple[Path, Path], now: float | None = None) -> Seeded:
    now = time.time() if now is None else now
    db = workspace.db
    devices, profiles = {}, {}
    for name, profile in (("cam-1", "x86-64"), ("cam-2", "x86-64"), ("pi-1", "rpi4")):
        devices[name], profiles[name] = register_device(db, name, profile).id, profile
    first = start_all_at_once(workspace, "cam-1", "cam-2")
    _commit(db, devices["cam-1"], first, now - HISTORY_S - 120, 1)
    _commit(db, devices["cam-2"], first, now - HISTORY_S - 120, 1)
    take_up(workspace)  # the wave's gates are evaluated
    add_model(db, workspace.blobs, "digits", *digits_inputs)
    build_profiles(db, workspace.blobs, "digits:2", ["x86-64"], recipe="dynamic_range", settings=QUICK_BENCHMARK,
                   ship=True)
    second = start_all_at_once(workspace, "cam-1", ref="digits:2")
    _commit(db, devices["cam-1"], second, now - SWITCH_AGO_S, 10)
    take_up(workspace)
    seeded = Seeded(workspace, now, devices, profiles, (first, second))
    start = now - HISTORY_S
    while start + REPORT_S <= now:
        end = start + REPORT_S
        seeded.serve("cam-1", "digits", 1 if end < now - SWITCH_AGO_S else 2, start, end, calls=120, errors=1)
        seeded.serve("cam-2", "digits", 1, start, end, calls=60)
        seeded.serve("pi-1", "digits", 1, start, end, calls=30)
        start = end
    return seeded


@contextmanager
def seeded_copy(template_data_dir: Path, root: Path, digits_inputs: tuple[Path, Path]) -> Iterator[Seeded]:
    """A copy of the tests' template data directory at ``root``, seeded; closed afterwards."""
    shutil.copytree(template_data_dir, root)
    workspace = open_workspace(root)
    try:
        yield seed(workspace, digits_inputs)
    finally:
        workspace.db.close()
