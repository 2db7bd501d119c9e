"""Chunk fan-out with a real Mosquitto, the real ``ServerService`` and 20 agent-like clients.

Issue 6, item 9: the server used to ignore a want for a chunk it had sent in
the last 2 s, so an agent that subscribed just after a broadcast waited for
its 5 s re-ask. Now every want is served by the next publish of its chunk
window. This test counts requests and publishes; it never asserts on time.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.broker import Mosquitto
from server.chunks import DEFAULT_WINDOW_S
from server.setup import init_data_dir
from shared.messages import DEFAULT_CHUNK_SIZE
from shared.mqtt import BrokerAddress
from tests.server.fanout_harness import add_servable_blob, download_wave, running_server, wait_until_flushed

AGENTS = 20
# The rollout engine sends a wave's directives in one tick; each agent then verifies two
# signatures, saves its record (an fsync, slow on an SD card) and subscribes, so a wave's
# wants reach the server spread over a few hundred milliseconds. 20 joins over 0.5 s put
# late joiners right after the first broadcast, where the old server ignored them until
# their 5 s re-ask. The second window opens no earlier than the first closes, so two
# windows cover at least 2 x 0.3 s from the first want: at most two copies per chunk.
JOIN_SPREAD_S = 0.5
ARTIFACT = os.urandom(6 * DEFAULT_CHUNK_SIZE - 1000)  # 6 chunks, the last one short


def test_staggered_joiners_each_get_the_artifact_with_one_request_and_at_most_two_copies_per_chunk(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    assert JOIN_SPREAD_S <= 2 * DEFAULT_WINDOW_S  # the premise of "at most twice"
    workspace = init_data_dir(tmp_path / "data")
    try:
        sha256 = add_servable_blob(workspace, ARTIFACT)
        offsets = [i * JOIN_SPREAD_S / (AGENTS - 1) for i in range(AGENTS)]
        with running_server(workspace, BrokerAddress.parse(mosquitto.url)) as (service, publishes):
            downloads = download_wave(BrokerAddress.parse(mosquitto.url), ARTIFACT, offsets)
            wait_until_flushed(service)
    finally:
        workspace.db.close()

    assert len(downloads) == AGENTS
    assert [d.name for d in downloads if not d.sha256_ok] == []
    assert {d.name: d.requests for d in downloads} == {d.name: 1 for d in downloads}  # nobody had to re-ask
    copies = publishes.per_chunk(sha256, 6)
    assert all(1 <= n <= 2 for n in copies), copies
    assert sum(publishes.copies.values()) == sum(copies)  # nothing else was sent
