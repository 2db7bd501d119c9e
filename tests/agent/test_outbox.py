"""The outbox keeps reports until the broker acknowledged them to a listener, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from agent.outbox import REFUSED_RETRY_S, Outbox
from shared.errors import TransportError
from tests.agent.fakes import FakeClock


class FakeLink:
    """Hands out message ids like paho; ``refuse`` makes publish fail as a link error would."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.refuse = False

    def publish(self, topic: str, payload: bytes) -> int | None:
        if self.refuse:
            raise TransportError("publish to t failed: the payload is too large")
        self.sent.append((topic, payload))
        return len(self.sent)  # mids start at 1


def payloads(directory: Path) -> list[str]:
    return [json.loads(p.read_text())["payload"] for p in sorted(directory.glob("*.msg"))]


def test_reports_stay_on_disk_until_acknowledged(tmp_path: Path) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish)
    outbox.send("ef/v1/devices/d-1/events", b'{"n":1}')
    outbox.send("ef/v1/devices/d-1/events", b'{"n":2}')
    assert len(link.sent) == 2 and len(outbox) == 2

    outbox.delivered(1)
    assert payloads(tmp_path / "outbox") == ['{"n":2}']
    outbox.delivered(1)  # a duplicate acknowledgement, or a mid that was never the outbox's
    outbox.delivered(99)
    assert len(outbox) == 1


def test_a_restart_replays_what_was_not_acknowledged_in_order(tmp_path: Path) -> None:
    first = FakeLink()
    outbox = Outbox(tmp_path / "outbox", first.publish)
    for n in range(3):
        outbox.send("ef/v1/devices/d-1/telemetry", f'{{"n":{n}}}'.encode())
    outbox.delivered(2)

    second = FakeLink()  # the agent restarted: a new process, the same data dir
    again = Outbox(tmp_path / "outbox", second.publish)
    assert again.replay() == 2
    assert [p for _, p in second.sent] == [b'{"n":0}', b'{"n":2}']
    assert again.replay() == 0  # what is in flight is not handed over twice
    again.delivered(1)
    again.delivered(2)
    assert len(again) == 0


def test_a_report_nobody_heard_is_offered_again_later(tmp_path: Path) -> None:
    """The broker acknowledged it with "no matching subscribers": no server session was there."""
    link, clock = FakeLink(), FakeClock(100.0)
    outbox = Outbox(tmp_path / "outbox", link.publish, unheard_retry_s=30.0, monotonic=clock)
    outbox.send("ef/v1/devices/d-1/events", b'{"n":1}')
    outbox.delivered(1, unheard=True)
    assert len(outbox) == 1

    clock.advance(29.0)
    outbox.retry_due()
    assert len(link.sent) == 1
    clock.advance(1.0)
    outbox.retry_due()
    assert [p for _, p in link.sent] == [b'{"n":1}', b'{"n":1}']
    outbox.delivered(2)  # heard this time
    assert len(outbox) == 0


def test_a_refused_publish_is_kept_and_retried(tmp_path: Path) -> None:
    link, clock = FakeLink(), FakeClock(100.0)
    outbox = Outbox(tmp_path / "outbox", link.publish, monotonic=clock)
    link.refuse = True
    outbox.send("t", b'{"n":1}')  # no exception reaches the caller
    assert len(outbox) == 1 and link.sent == []

    link.refuse = False
    outbox.retry_due()
    assert link.sent == []  # not before its time
    clock.advance(REFUSED_RETRY_S)
    outbox.retry_due()
    assert link.sent == [("t", b'{"n":1}')]


def test_the_outbox_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, limit=3)
    for n in range(5):
        outbox.send("t", f"{n}".encode())
    assert payloads(tmp_path / "outbox") == ["2", "3", "4"]
    outbox.delivered(1)  # the dropped report's late acknowledgement changes nothing
    assert payloads(tmp_path / "outbox") == ["2", "3", "4"]


def test_an_unwritable_outbox_still_sends(tmp_path: Path) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the directory should be")
    link = FakeLink()
    outbox = Outbox(blocker, link.publish)
    outbox.send("t", b"{}")
    assert link.sent == [("t", b"{}")]
    outbox.delivered(1)
