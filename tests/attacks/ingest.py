"""The server side of the attack suite: its ingest entry point (``ServerService.handle_batch``) on a real SQLite
registry, and its one assertion, ``assert_ingest_refused``.

The service is built on a freshly initialised data directory with one
registered device and a broker address nothing listens on; ``run()`` is never
called, so nothing connects, and its publishes are recorded. Adding a case is
one line::

    assert_ingest_refused(server, inbound(device_topic(TopicKind.EVENTS, server.device), payload), "...")
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from server.db.models import Base
from server.devices import register_device
from server.service import ServerService
from server.setup import Workspace, init_data_dir
from shared import PROTOCOL_VERSION
from shared.messages import ReportAck, Telemetry, decode_payload, encode_payload
from shared.mqtt import BrokerAddress, Inbound
from shared.topics import TopicKind, device_topic

WITNESS_BOOT = "boot-witness"


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class IngestBench:
    workspace: Workspace
    service: ServerService
    device: str  # the registered device's id
    published: list[tuple[str, bytes]] = field(default_factory=list)
    witnesses: int = 0

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of the registry."""
        with self.workspace.db.reading() as session:
            return {table.name: [tuple(row) for row in session.execute(select(table)).all()]
                    for table in Base.metadata.sorted_tables}

    def witness(self) -> Inbound:
        """A valid report from the registered device: stored, and acknowledged, if ingest kept going."""
        self.witnesses += 1
        report = Telemetry(v=PROTOCOL_VERSION, device_id=self.device, boot_id=WITNESS_BOOT, seq=self.witnesses,
                           deployment_id=None, kind="trial", ts=1_700_000_000.0, accuracy=0.9, samples=10)
        return Inbound(device_topic(TopicKind.TELEMETRY, self.device), encode_payload(report), False)


@contextmanager
def ingest_bench(root: Path, broker: BrokerAddress | None = None) -> Iterator[IngestBench]:
    """``broker``: where the service's link would connect (by default an unused port: nowhere)."""
    workspace = init_data_dir(root)
    device = register_device(workspace.db, "cam-1", "x86-64").id
    broker = broker or BrokerAddress("127.0.0.1", unused_port())
    service = ServerService(workspace.data_dir, broker, db=workspace.db)
    bench = IngestBench(workspace, service, device)
    service.link.publish = lambda topic, payload, **options: bench.published.append((topic, payload))  # type: ignore[method-assign]
    try:
        yield bench
    finally:
        service.link.stop()
        workspace.db.close()


def assert_ingest_refused(server: IngestBench, message: Inbound, error: str) -> None:
    """Hand ``message`` and a valid witness event to the server's ingest in one batch and prove that:

    1. the server logged exactly ``dropped a malformed message on {topic}: {error}`` (a warning, no traceback);
    2. it stored nothing from the message: every row of every table is as before, but for the witness's;
    3. it kept going: the witness report after it in the same batch was stored and acknowledged.
    """
    before = server.rows()
    acks = len(server.published)
    witness = server.witness()
    records: list[logging.LogRecord] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    said, logger = Said(logging.DEBUG), logging.getLogger("server")
    logger.addHandler(said)
    try:
        server.service.handle_batch([message, witness])
    finally:
        logger.removeHandler(said)

    problems = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in records if r.levelno >= logging.WARNING]
    assert problems == [(logging.WARNING, f"dropped a malformed message on {message.topic}: {error}", False)], problems

    after = server.rows()
    kept = before.pop("telemetry")
    stored = [row for row in after.pop("telemetry") if row not in kept]
    assert len(stored) == 1 and WITNESS_BOOT in stored[0], stored
    assert after == before, "the hostile message changed the registry"

    ((topic, payload),) = server.published[acks:]
    assert topic == device_topic(TopicKind.ACK, server.device)
    assert decode_payload(TopicKind.ACK, payload) == ReportAck(v=1, boot_id=WITNESS_BOOT, seqs=(server.witnesses,))
