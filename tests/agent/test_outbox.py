"""The outbox keeps each report until the server says it stored it, across disconnects and restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.outbox import ACK_TIMEOUT_S, MAX_WAIT_S, Outbox
from shared.errors import TransportError
from tests.agent.fakes import FakeClock

BOOT = "b-1"


class FakeLink:
    """Counts what is handed to the link; ``refuse`` makes publish fail as a link error would."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.refuse = False

    def publish(self, topic: str, payload: bytes) -> int:
        if self.refuse:
            raise TransportError("publish to t failed: the client is not currently connected")
        self.sent.append((topic, payload))
        return len(self.sent)


def report(seq: int, boot: str = BOOT) -> bytes:
    return json.dumps({"boot_id": boot, "seq": seq, "state": "committed"}).encode()


def seqs_on_disk(directory: Path) -> list[int]:
    return [json.loads(json.loads(p.read_text())["payload"])["seq"] for p in sorted(directory.glob("*.msg"))]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


def test_a_report_stays_on_disk_until_the_server_acknowledges_it(tmp_path: Path, clock: FakeClock) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, monotonic=clock)
    for seq in (1, 2, 3):
        outbox.send("ef/v1/devices/d-1/events", report(seq))
    assert len(link.sent) == 3 and seqs_on_disk(tmp_path / "outbox") == [1, 2, 3]

    outbox.acknowledge(BOOT, (1, 3))
    assert seqs_on_disk(tmp_path / "outbox") == [2]
    outbox.acknowledge(BOOT, (1,))  # a repeated acknowledgement
    outbox.acknowledge("another-boot", (2,))  # the same seq of another boot is another report
    assert seqs_on_disk(tmp_path / "outbox") == [2]


def test_an_unacknowledged_report_is_sent_again_with_back_off_while_connected(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The broker took it, but no server stored it (a lost queue, a stale session): send it again."""
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, monotonic=clock)
    outbox.send("t", report(1))
    waits = []
    for _ in range(7):
        before = len(link.sent)
        while len(link.sent) == before:
            clock.advance(1.0)
            outbox.retry_due(connected=True)
        waits.append(round(clock.now - 100.0 - sum(waits)))
    assert waits == [30, 60, 120, 240, 480, 600, 600]
    assert ACK_TIMEOUT_S == 30 and MAX_WAIT_S == 600

    outbox.acknowledge(BOOT, (1,))
    clock.advance(MAX_WAIT_S)
    count = len(link.sent)
    outbox.retry_due(connected=True)
    assert len(link.sent) == count and len(outbox) == 0


def test_nothing_is_sent_again_while_offline_and_timers_restart_on_reconnect(tmp_path: Path, clock: FakeClock) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, monotonic=clock)
    outbox.send("t", report(1))
    clock.advance(10 * ACK_TIMEOUT_S)
    outbox.retry_due(connected=False)  # paho holds the first copy for the next connection
    assert len(link.sent) == 1
    outbox.link_up()  # ... and sends it now: the acknowledgement gets a full wait again
    outbox.retry_due(connected=True)
    assert len(link.sent) == 1
    clock.advance(ACK_TIMEOUT_S)
    outbox.retry_due(connected=True)
    assert len(link.sent) == 2


def test_a_restart_replays_what_was_not_acknowledged_in_order(tmp_path: Path, clock: FakeClock) -> None:
    first = FakeLink()
    outbox = Outbox(tmp_path / "outbox", first.publish, monotonic=clock)
    for seq in range(3):
        outbox.send("ef/v1/devices/d-1/telemetry", report(seq))
    outbox.acknowledge(BOOT, (1,))

    second = FakeLink()  # the agent restarted: a new process, the same data dir
    again = Outbox(tmp_path / "outbox", second.publish, monotonic=clock)
    assert again.replay() == 2
    assert [p for _, p in second.sent] == [report(0), report(2)]
    assert again.replay() == 0  # what it holds is not handed over twice
    again.acknowledge(BOOT, (0, 2))
    assert len(again) == 0


def test_a_refused_publish_is_kept_and_sent_again(tmp_path: Path, clock: FakeClock) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, monotonic=clock)
    link.refuse = True
    outbox.send("t", report(1))  # no exception reaches the caller
    assert len(outbox) == 1 and link.sent == []
    link.refuse = False
    clock.advance(ACK_TIMEOUT_S)
    outbox.retry_due(connected=True)
    assert link.sent == [("t", report(1))]


def test_the_outbox_is_bounded_and_drops_the_oldest(tmp_path: Path, clock: FakeClock) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, limit=3, monotonic=clock)
    for seq in range(5):
        outbox.send("t", report(seq))
    assert seqs_on_disk(tmp_path / "outbox") == [2, 3, 4]
    clock.advance(ACK_TIMEOUT_S)
    outbox.retry_due(connected=True)
    assert [json.loads(p)["seq"] for _, p in link.sent[5:]] == [2, 3, 4]  # the dropped ones are not re-sent


def test_an_unwritable_outbox_still_sends(tmp_path: Path, clock: FakeClock) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the directory should be")
    link = FakeLink()
    outbox = Outbox(blocker, link.publish, monotonic=clock)
    outbox.send("t", report(1))
    assert link.sent == [("t", report(1))]
    outbox.acknowledge(BOOT, (1,))


def test_an_unreadable_entry_left_by_a_crash_is_dropped_on_replay(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "outbox"
    directory.mkdir()
    (directory / "00000000000000000001-000001.msg").write_text("{half a")
    link = FakeLink()
    assert Outbox(directory, link.publish, monotonic=clock).replay() == 0
    assert list(directory.glob("*.msg")) == []
