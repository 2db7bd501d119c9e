"""The outbox keeps reports until the broker acknowledged them, across restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent.outbox import Outbox


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.acked: set[int] = set()

    def publish(self, topic: str, payload: bytes) -> Callable[[], bool]:
        index = len(self.sent)
        self.sent.append((topic, payload))
        return lambda: index in self.acked


def test_reports_stay_on_disk_until_acknowledged(tmp_path: Path) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish)
    outbox.send("ef/v1/devices/d-1/events", b'{"n":1}')
    outbox.send("ef/v1/devices/d-1/events", b'{"n":2}')
    assert len(link.sent) == 2 and len(outbox) == 2

    link.acked.add(0)
    outbox.collect()
    assert len(outbox) == 1
    (left,) = (tmp_path / "outbox").glob("*.msg")
    assert json.loads(left.read_text())["payload"] == '{"n":2}'


def test_a_restart_replays_what_was_not_acknowledged_in_order(tmp_path: Path) -> None:
    first = FakeLink()
    outbox = Outbox(tmp_path / "outbox", first.publish)
    for n in range(3):
        outbox.send("ef/v1/devices/d-1/telemetry", f'{{"n":{n}}}'.encode())
    first.acked.add(1)
    outbox.collect()

    second = FakeLink()  # the agent restarted: a new process, the same data dir
    again = Outbox(tmp_path / "outbox", second.publish)
    assert again.replay() == 2
    assert [p for _, p in second.sent] == [b'{"n":0}', b'{"n":2}']
    second.acked.update({0, 1})
    again.collect()
    assert len(again) == 0


def test_the_outbox_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    link = FakeLink()
    outbox = Outbox(tmp_path / "outbox", link.publish, limit=3)
    for n in range(5):
        outbox.send("t", f"{n}".encode())
    payloads = [json.loads(p.read_text())["payload"] for p in sorted((tmp_path / "outbox").glob("*.msg"))]
    assert payloads == ["2", "3", "4"]


def test_an_unwritable_outbox_still_sends(tmp_path: Path) -> None:
    blocker = tmp_path / "outbox"
    blocker.write_text("a file where the directory should be")
    link = FakeLink()
    outbox = Outbox(blocker, link.publish)
    outbox.send("t", b"{}")
    assert link.sent == [("t", b"{}")]
